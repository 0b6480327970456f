"""Directional correctness: cosine(K-worker averaged pseudogradient, K=1 pseudogradient) (issue 6.3).

  python experiments/directional_correctness.py           # full version
  python experiments/directional_correctness.py --smoke   # a few steps

From one starting point theta_0 (fresh init + N data-parallel warm-up steps of the inner optimizer,
whose state is kept), a round of H inner steps is run on the same H global batches by
  * K=1: one worker on the whole global batch (the union of the K workers' data), and
  * K workers: worker k on rows [k B/K, (k+1) B/K) of each global batch (the DiLoCo split),
each worker starting from theta_0 and the warm-up optimizer state.  Pseudogradients
delta = theta_0 - theta_H; the K-worker one is the mean over workers.  The cosine between the two is
measured per parameter matrix ("layer") and per block, for AdamW (DiLoCo) and Muon (MuLoCo) inner
optimizers.  Uses `muloco_jax.diloco`'s pure `init` / `inner_step` / `pseudogradient`.
Resumable: one result file per (optimizer, warm-up point) under results/directional/cells/.
"""

import functools
import os
import sys

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top

SWEEP = "directional"
OPTIMIZERS = {"adamw": ("diloco", "AdamW (DiLoCo)"), "muon": ("muloco", "Muon (MuLoCo)")}
LRS = {"adamw": 6e-3, "muon": 0.04}  # reproduce.py passes its chosen DP learning rates

common.define_flags()
flags.DEFINE_list("ks", ["2", "4", "8", "16"], "Numbers of workers K compared with K=1.")
flags.DEFINE_list("warmup", ["60"], "Warm-up steps before the measured round (one point each).")


def _leaf_name(path) -> str:
  return "/".join(str(getattr(p, "key", p)) for p in path)


def _block(name: str) -> str:
  return name.split("/")[0]


def measure(
  optimizer: str, warmup: int, ks, smoke: bool, *, seed: int = 0, lr: float | None = None
) -> dict:
  """Per-leaf cosines between the K-worker and the K=1 averaged pseudogradients; `seed` sets
  the initialisation and the data order, `lr` the inner learning rate (default LRS's)."""
  import jax
  import jax.numpy as jnp
  import optax
  from muloco_jax import data as data_lib
  from muloco_jax import diloco
  from muloco_jax import model as model_lib
  from muloco_jax import train

  method, _ = OPTIMIZERS[optimizer]
  lr = LRS[optimizer] if lr is None else lr
  config = common.cell_config(dict(common.method_overrides(method, 1, lr), seed=seed), smoke)
  s = common.scale(smoke)
  h, batch_size = s["sync_every"], s["batch_size"]
  config.train.num_steps = max(config.train.num_steps, warmup + h + 1)
  data = data_lib.get_dataset(config.data)
  model = train.make_model(config, data.vocab_size)
  loss_fn = train.make_loss_fn(model)
  tx = train.make_optimizer(config)
  params = jax.jit(functools.partial(model_lib.init_params, model.config))(
    jax.random.key(config.seed)
  )
  opt_state = tx.init(params)

  @jax.jit
  def dp_step(params, opt_state, batch):
    grads = jax.grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  iterator = data.train_iterator(batch_size, config.seed)
  for _ in range(warmup):
    params, opt_state = dp_step(params, opt_state, next(iterator))
  batches = [next(iterator) for _ in range(h)]
  inner = jax.jit(functools.partial(diloco.inner_step, loss_fn=loss_fn, inner_tx=tx))
  outer_tx = diloco.outer_optimizer()

  def averaged_pseudogradient(k):
    state = diloco.init(params, tx, outer_tx, k)
    state = state._replace(
      worker_opt_state=jax.tree.map(lambda x: jnp.broadcast_to(x, (k,) + jnp.shape(x)), opt_state)
    )
    losses = []
    for b in batches:
      split = {n: jnp.asarray(v).reshape((k, batch_size // k) + v.shape[1:]) for n, v in b.items()}
      state, m = inner(state, split)
      losses.append(float(jnp.mean(m["loss"])))
    deltas = diloco.pseudogradient(params, state.worker_params)
    return jax.tree.map(lambda d: jnp.mean(d, axis=0), deltas), losses

  reference, ref_losses = averaged_pseudogradient(1)
  ref_leaves = jax.tree_util.tree_flatten_with_path(reference)[0]
  names = [_leaf_name(p) for p, _ in ref_leaves]
  out = {
    "optimizer": optimizer,
    "warmup": warmup,
    "seed": seed,
    "lr": lr,
    "H": h,
    "batch_size": batch_size,
    "leaves": names,
    "shapes": [list(np.shape(x)) for _, x in ref_leaves],
    "ref_final_loss": ref_losses[-1],
    "per_k": {},
  }
  ref = [np.asarray(x, np.float64).ravel() for _, x in ref_leaves]
  for k in ks:
    print(f"  {optimizer} warmup {warmup}: K={k}", flush=True)
    avg, losses = averaged_pseudogradient(k)
    got = [np.asarray(x, np.float64).ravel() for x in jax.tree.leaves(avg)]
    cos = [
      float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)) for a, b in zip(got, ref)
    ]
    blocks = {}
    for name, a, b in zip(names, got, ref):
      blocks.setdefault(_block(name), []).append((a, b))
    block_cos = {}
    for blk, pairs in blocks.items():
      a = np.concatenate([p[0] for p in pairs])
      b = np.concatenate([p[1] for p in pairs])
      block_cos[blk] = float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30))
    a, b = np.concatenate(got), np.concatenate(ref)
    matrices = [c for c, shape in zip(cos, out["shapes"]) if len(shape) >= 2]
    out["per_k"][str(k)] = {
      "leaf_cosine": cos,
      "block_cosine": block_cos,
      "mean_matrix_cosine": float(np.mean(matrices)),
      "global_cosine": float(a @ b / max(np.linalg.norm(a) * np.linalg.norm(b), 1e-30)),
      "norm_ratio": float(np.linalg.norm(a) / max(np.linalg.norm(b), 1e-30)),
      "final_worker_loss": losses[-1],
    }
  return out


def main(argv):
  del argv
  fl = flags.FLAGS
  common.setup_jax()
  ks = [int(k) for k in fl.ks]
  warmups = [2] if fl.smoke else [int(w) for w in fl.warmup]
  path = common.sweep_dir(SWEEP)
  results = []
  for optimizer in OPTIMIZERS:
    for warmup in warmups:
      cell = os.path.join(
        path,
        "cells",
        common.cell_name(optimizer, f"warmup{warmup}", "smoke" if fl.smoke else "") + ".json",
      )
      if os.path.exists(cell):
        print(f"{SWEEP}/{os.path.basename(cell)}: done already, skipped.")
        results.append(common.load_json(cell))
        continue
      print(f"{SWEEP}: {optimizer}, warm-up {warmup} steps", flush=True)
      r = measure(optimizer, warmup, ks, fl.smoke)
      common.save_json(cell, r)
      results.append(r)

  rows, table = [], []
  for r in results:
    for k in ks:
      p = r["per_k"][str(k)]
      rows.append(
        dict(
          optimizer=r["optimizer"],
          warmup=r["warmup"],
          K=k,
          mean_matrix_cosine=p["mean_matrix_cosine"],
          global_cosine=p["global_cosine"],
          norm_ratio=p["norm_ratio"],
          **{f"cos_{b}": v for b, v in p["block_cosine"].items()},
        )
      )
  blocks = sorted({b for r in results for b in r["per_k"][str(ks[0])]["block_cosine"]})
  for r in results:
    table.append(
      [OPTIMIZERS[r["optimizer"]][1], r["warmup"]]
      + [f"{r['per_k'][str(k)]['mean_matrix_cosine']:.3f}" for k in ks]
      + [f"{r['per_k'][str(ks[-1])]['global_cosine']:.3f}"]
    )
  per_layer = []
  for r in results:
    for k in ks:
      per_layer.append(
        f"| {OPTIMIZERS[r['optimizer']][1]} | {r['warmup']} | {k} | "
        + " | ".join(f"{r['per_k'][str(k)]['block_cosine'][b]:.3f}" for b in blocks)
        + " |"
      )
  s = common.scale(fl.smoke)
  notes = [
    f"Cosine similarity between the mean pseudogradient of K workers (each on 1/K of every "
    f"global batch) and the K=1 pseudogradient (one worker on the whole batch), after one "
    f"round of H={s['sync_every']} inner steps from the same point (fresh init + N "
    f"data-parallel warm-up steps); inner lr {LRS}; global batch {s['batch_size']} x {s['seq_len']}. "
    "'mean over matrices' averages the per-matrix cosines (every 2-D parameter, embedding "
    "and head included); the last column is the cosine of the whole flattened tree.",
    "",
    "Per block (cosine over the block's concatenated parameters):",
    "",
    "| optimizer | warm-up | K | " + " | ".join(blocks) + " |",
    "|" + "---|" * (len(blocks) + 3),
  ] + per_layer
  common.write_results(
    SWEEP,
    rows,
    list(rows[0].keys()),
    table,
    ["inner optimizer", "warm-up N"]
    + [f"K={k} (mean over matrices)" for k in ks]
    + [f"K={ks[-1]} whole tree"],
    "Directional correctness vs K",
    notes=notes,
  )

  series, styles, per_block = {}, {}, {}
  for r in results:
    label = f"{OPTIMIZERS[r['optimizer']][1]}, N={r['warmup']}"
    series[label] = (ks, [r["per_k"][str(k)]["mean_matrix_cosine"] for k in ks])
    if r["warmup"] != warmups[0]:
      continue  # the per-block plot shows the first warm-up point only
    for i, b in enumerate(blocks):
      key = f"{OPTIMIZERS[r['optimizer']][1].split()[0]} N={r['warmup']} {b}"
      per_block[key] = (ks, [r["per_k"][str(k)]["block_cosine"][b] for k in ks])
      styles[key] = dict(color=f"C{i}", linestyle="-" if r["optimizer"] == "muon" else "--")
  common.plot_lines(
    os.path.join(path, "cosine_vs_k.png"),
    series,
    logx=True,
    xticks=ks,
    title="cos(avg K-worker pseudogradient, K=1 pseudogradient), mean over matrices",
    xlabel="workers K",
    ylabel="cosine similarity",
  )
  common.plot_lines(
    os.path.join(path, "cosine_per_layer.png"),
    per_block,
    styles=styles,
    logx=True,
    xticks=ks,
    title=f"Per-block cosine, N={warmups[0]} (solid: Muon, dashed: AdamW)",
    xlabel="workers K",
    ylabel="cosine similarity",
  )
  print(open(os.path.join(path, "table.md")).read())


if __name__ == "__main__":
  app.run(main)
