"""A few steps of each method on a mesh whose rows interleave processes, as a TPU slice's do.

  python tests/layout_run.py OUT.npz [--methods ...] [--coordinator_address=HOST:PORT --num_processes=N
    --process_id=I]

Every process reads only the rows of each global batch its devices hold (`batch_rows`) and
places them (`place_batch`); the evaluation batch likewise.  Each method's worker row mixes
devices of several processes, and each process has devices in several rows, so a process's rows
are not a block of the batch.  Process 0 writes the losses and the final parameters to OUT.npz;
one process on as many devices must write the same (`tests/test_multihost.py`).
"""

import argparse

import numpy as np

# name: (K, fsdp); K = 0 is data parallelism.
METHODS = {"data_parallel": (0, 4), "muloco_k2_fsdp4": (2, 4), "muloco_k4_fsdp2": (4, 2)}
BATCH, STEPS, SYNC_EVERY = 16, 4, 2


def interleaved_mesh(workers, fsdp):
  """Device d of process p at position p + d P of the grid (rows of workers x fsdp)."""
  import jax

  by_process = sorted(jax.devices(), key=lambda d: (d.process_index, d.id))
  grid = np.array(by_process).reshape(jax.process_count(), -1).T.reshape(workers, fsdp)
  return jax.sharding.Mesh(grid, ("worker", "fsdp"))


def run(method):
  """{losses, eval_loss, params...} of `STEPS` steps of `method`."""
  import jax
  from jax.experimental import multihost_utils

  from muloco_jax import diloco, optim, runtime, sharding
  from scanned_mlp import ScannedMLP

  model = ScannedMLP(vocab=64, width=32, hidden=64)
  num_workers, fsdp = METHODS[method]
  mesh = interleaved_mesh(len(jax.devices()) // fsdp, fsdp)
  muon = optim.muon(0.02, shard_axis=sharding.FSDP_AXIS, param_specs=sharding.fsdp_specs)
  if num_workers:
    algorithm = runtime.DiLoCo(
      model.loss, muon, diloco.outer_optimizer(0.7, 0.9), num_workers, mesh, sync_every=SYNC_EVERY
    )
  else:
    algorithm = runtime.DataParallel(model.loss, muon, mesh)
  rows = algorithm.batch_rows(BATCH)
  state = algorithm.init(model.params())
  losses = []
  for step in range(1, STEPS + 1):
    local = {k: v[rows] for k, v in model.batch(step, BATCH).items()}
    state, metrics, _ = algorithm.train_step(
      state, algorithm.place_batch(local, BATCH), step, step == STEPS
    )
    losses.append(multihost_utils.process_allgather(metrics["train_loss"], tiled=True))
  eval_sharding = sharding.rows_over_devices(mesh)
  eval_rows = sharding.rows_held(eval_sharding, (BATCH,))
  eval_batch = {
    k: sharding.place_rows(v[eval_rows], eval_sharding, v.shape)
    for k, v in model.batch(0, BATCH).items()
  }
  params = algorithm.params(state)
  eval_loss = jax.jit(model.loss)(params, eval_batch)
  gathered = multihost_utils.process_allgather(params, tiled=True)
  return {
    "losses": np.asarray(losses),
    "eval_loss": np.asarray(eval_loss),
    **{jax.tree_util.keystr(p): np.asarray(x) for p, x in jax.tree.leaves_with_path(gathered)},
  }


def main():
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("out")
  parser.add_argument("--coordinator_address")
  parser.add_argument("--num_processes", type=int, default=1)
  parser.add_argument("--process_id", type=int, default=0)
  parser.add_argument("--methods", nargs="+", default=list(METHODS), choices=list(METHODS))
  args = parser.parse_args()
  import jax

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator_address, args.num_processes, args.process_id)
  results = {f"{m}/{k}": v for m in args.methods for k, v in run(m).items()}
  if jax.process_index() == 0:
    np.savez(args.out, **results)


if __name__ == "__main__":
  main()
