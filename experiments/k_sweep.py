"""Final eval loss vs the number of workers K: DP AdamW, DP Muon, DiLoCo, MuLoCo (issue 6.1).

  python experiments/k_sweep.py              # the full sweep (see README.md for its cost)
  python experiments/k_sweep.py --smoke      # a few steps of every cell

Every run has the same token budget (global batch, sequence length and steps); DiLoCo/MuLoCo sync
every H=30 steps with outer Nesterov SGD (lr 0.7, momentum 0.9).  Each method's inner learning rate
is swept over a small grid and a cell's result is its best final eval loss over that grid.
Resumable: finished cells (results/k_sweep/cells/*.json) are skipped.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top

SWEEP = "k_sweep"
METHODS = ("dp_adamw", "dp_muon", "diloco", "muloco")
LABELS = {
  "dp_adamw": "DP AdamW",
  "dp_muon": "DP Muon",
  "diloco": "DiLoCo (AdamW inner)",
  "muloco": "MuLoCo (Muon inner)",
}
LRS = {"adamw": (3e-3, 6e-3), "muon": (0.02, 0.04)}  # the last one is the default
DEFAULT_OUTER = (common.OUTER_LR, common.OUTER_MOMENTUM)

common.define_flags()
flags.DEFINE_list("ks", ["1", "2", "4", "8", "16"], "Numbers of workers K.")
flags.DEFINE_integer("curve_k", 8, "K whose loss curves are plotted.")
flags.DEFINE_list(
  "outer",
  [],
  "Extra outer optimizer settings LR:MOMENTUM (besides the default "
  f"{common.OUTER_LR}:{common.OUTER_MOMENTUM}) tried at the K values of --outer_ks "
  "with the grid's largest inner lr, e.g. 0.7:0.6 (the paper's MuLoCo K=1).",
)
flags.DEFINE_list("outer_ks", ["1", "8"], "K values of the extra outer settings.")
flags.DEFINE_list(
  "grid_ks",
  ["1"],
  "K values of DiLoCo/MuLoCo that get the whole lr grid; the "
  "other K values run only the grid's last (largest) lr.  'all': every K.",
)


def _inner(method):
  return "muon" if method in ("dp_muon", "muloco") else "adamw"


def cells(ks, smoke, grid_ks=("all",), outer=(), outer_ks=()):
  """(method, K, lr, (outer lr, outer momentum)) of every run; K=0: data-parallel baselines."""
  out = []
  for method in METHODS:
    grid = LRS[_inner(method)]
    for k in [0] if method.startswith("dp_") else ks:
      full = k == 0 or "all" in grid_ks or str(k) in grid_ks
      lrs = grid[-1:] if smoke or not full else grid
      out += [(method, k, lr, DEFAULT_OUTER) for lr in lrs]
  for method in ("diloco", "muloco"):
    for k in ks:
      if str(k) in outer_ks:
        out += [(method, k, LRS[_inner(method)][-1], o) for o in outer if o != DEFAULT_OUTER]
  return out


def main(argv):
  del argv
  fl = flags.FLAGS
  common.setup_jax()
  ks = [int(k) for k in fl.ks]
  results = []
  outer = [tuple(float(v) for v in o.split(":")) for o in fl.outer]
  for method, k, lr, (olr, omom) in cells(ks, fl.smoke, fl.grid_ks, outer, fl.outer_ks):
    extra = (olr, omom) != DEFAULT_OUTER
    parts = [method, f"K{k}", f"lr{lr:g}"] + ([f"outer{olr:g}-{omom:g}"] if extra else [])
    overrides = common.method_overrides(method, k, lr)
    if extra:
      overrides.update({"diloco.outer_lr": olr, "diloco.outer_momentum": omom})
    r = common.run_cell(
      SWEEP,
      common.cell_name(*parts),
      overrides,
      smoke=fl.smoke,
      info=dict(method=method, K=k, lr=lr, outer_lr=olr, outer_momentum=omom),
      shared_with=("compression",),
    )
    if r is not None:
      results.append(r)

  # Best over the lr grid per (method, K), default outer optimizer; extra outer settings are
  # reported separately (an ablation at a few K).
  def outer_of(r):
    return (r.get("outer_lr", common.OUTER_LR), r.get("outer_momentum", common.OUTER_MOMENTUM))

  extra_outer = [r for r in results if outer_of(r) != DEFAULT_OUTER]
  best = {}
  for r in results:
    if outer_of(r) != DEFAULT_OUTER:
      continue
    key = (r["method"], r["K"])
    if key not in best or r["final_eval_loss"] < best[key]["final_eval_loss"]:
      best[key] = r

  def loss(method, k):  # best final eval loss of a cell, None if not run (yet)
    r = best.get((method, 0 if method.startswith("dp_") else k))
    return None if r is None else r["final_eval_loss"]

  def show(method, k):
    r = best.get((method, 0 if method.startswith("dp_") else k))
    if r is None:
      return "not run"
    o = (r.get("outer_lr", common.OUTER_LR), r.get("outer_momentum", common.OUTER_MOMENTUM))
    return (
      f"{r['final_eval_loss']:.4f} (lr {r['lr']:g}"
      + ("" if o == DEFAULT_OUTER or k == 0 else f", outer {o[0]:g}/{o[1]:g}")
      + ")"
    )

  header = ["method"] + [f"K={k}" for k in ks]
  table = []
  for method in METHODS:
    if method.startswith("dp_"):
      table.append([LABELS[method], show(method, 0)] + ["(same)"] * (len(ks) - 1))
    else:
      table.append([LABELS[method]] + [show(method, k) for k in ks])
  gap_rows = []
  for method, dp in (("diloco", "dp_adamw"), ("muloco", "dp_muon")):
    gap_rows.append(
      [f"{LABELS[method]} - {LABELS[dp]}"]
      + [
        "" if None in (loss(method, k), loss(dp, 0)) else f"{loss(method, k) - loss(dp, 0):+.4f}"
        for k in ks
      ]
    )
  s = common.scale(fl.smoke)
  grid_note = (
    "every K"
    if "all" in fl.grid_ks
    else f"the DP baselines and K in {{{', '.join(fl.grid_ks)}}}; other K run only the "
    "grid's largest lr"
  )
  notes = [
    f"Final eval loss (nats/byte, byte-level KJV), best over the inner lr grid {LRS} "
    f"(grid run for {grid_note}); "
    f"{s['num_steps']} steps x {s['batch_size']} seqs x {s['seq_len']} tokens per run, "
    f"H={s['sync_every']}, outer Nesterov SGD lr {common.OUTER_LR} momentum "
    f"{common.OUTER_MOMENTUM}. The DP baselines do not depend on K.",
    "",
    "Gap to the method's own data-parallel baseline:",
    "",
    "| gap | " + " | ".join(f"K={k}" for k in ks) + " |",
    "|" + "---|" * (len(ks) + 1),
  ]
  notes += ["| " + " | ".join(row) + " |" for row in gap_rows]
  if extra_outer:
    notes += [
      "",
      "Outer-optimizer ablation (inner lr = the grid's largest; same budget):",
      "",
      "| method | K | outer lr / momentum | final eval loss | default 0.7/0.9 (same lr) |",
      "|---|---|---|---|---|",
    ]
    default = {(r["method"], r["K"], r["lr"]): r for r in results if outer_of(r) == DEFAULT_OUTER}
    for r in sorted(extra_outer, key=lambda r: (r["method"], r["K"])):
      d = default.get((r["method"], r["K"], r["lr"]))
      notes.append(
        f"| {LABELS[r['method']]} | {r['K']} | {outer_of(r)[0]:g} / "
        f"{outer_of(r)[1]:g} | {r['final_eval_loss']:.4f} | "
        + (f"{d['final_eval_loss']:.4f}" if d else "")
        + " |"
      )
  rows = [dict(r, best_for_cell=(best[(r["method"], r["K"])] is r)) for r in results]
  path = common.write_results(
    SWEEP,
    rows,
    [
      "method",
      "K",
      "lr",
      "outer_lr",
      "outer_momentum",
      "final_eval_loss",
      "final_train_loss",
      "best_for_cell",
      "comm_bytes_total",
      "mean_worker_cosine_mean",
      "median_step_time",
      "wall_seconds",
      "tokens",
    ],
    table,
    header,
    "Final eval loss vs K",
    notes=notes,
  )

  series, styles = {}, {}
  for method in METHODS:
    xs = [k for k in ks if loss(method, k) is not None]
    series[LABELS[method]] = (xs, [loss(method, k) for k in xs])
    if method.startswith("dp_"):
      styles[LABELS[method]] = dict(linestyle="--", marker="")
  common.plot_lines(
    os.path.join(path, "loss_vs_k.png"),
    series,
    styles=styles,
    title="Final eval loss vs K (best lr per cell)",
    xlabel="workers K",
    ylabel="eval loss (nats/byte)",
    logx=True,
    xticks=ks,
  )
  curve_k = fl.curve_k if fl.curve_k in ks else ks[-1]
  curves = {}
  for method in METHODS:
    r = best.get((method, 0 if method.startswith("dp_") else curve_k))
    if r is None:
      continue
    xs, ys = zip(*r["train_curve"])
    curves[f"{LABELS[method]} train"] = (xs, ys)
    if r["eval_curve"]:
      ex, ey = zip(*r["eval_curve"])
      curves[f"{LABELS[method]} eval"] = (ex, ey)
  colors = {LABELS[m]: f"C{i}" for i, m in enumerate(METHODS)}
  styles = {
    k: dict(marker="", alpha=0.6, color=colors[k.rsplit(" ", 1)[0]])
    if k.endswith("train")
    else dict(linestyle="--", color=colors[k.rsplit(" ", 1)[0]])
    for k in curves
  }
  low = min((min(ys) for _, ys in curves.values()), default=0.0)
  common.plot_lines(
    os.path.join(path, f"loss_curves_k{curve_k}.png"),
    curves,
    styles=styles,
    title=f"Loss curves, K={curve_k} (DP baselines for reference)",
    xlabel="step",
    ylabel="loss (nats/byte)",
    ylim=(low - 0.05, low + 1.5),
  )
  print(open(os.path.join(path, "table.md")).read())


if __name__ == "__main__":
  app.run(main)
