r"""Train-state bytes per device: the FSDP layout against the replicated one, from shapes alone.

  python -m muloco_jax.tools.benchmarks.state_bytes [--devices=64] [--workers=2] \
    [--sizes=150m,914m,3.1b,15b]

For each model preset (scanned layers, the preset's vocabulary) it builds the abstract train
state of MuLoCo (Muon inner, Nesterov SGD outer, K = `--workers`) and of data-parallel Muon on
`--devices` virtual CPU devices (nothing is allocated or compiled) and prints the bytes on the
fullest device (`sharding.state_bytes_per_device`) of two layouts of the same state:

  fsdp        this code: a worker's leaves split over its `fsdp` devices, the shared parameters
              and outer state over all devices (each worker row owns 1/W);
  replicated  the 0.2 layout: per-worker leaves split over worker rows only, the shared
              parameters, outer state (and data parallelism's whole state) on every device.
"""

import functools
import os
import sys

if __name__ == "__main__":  # virtual devices before jax starts (a flag parsed by hand)
  devices = next((a.split("=")[1] for a in sys.argv if a.startswith("--devices=")), "64")
  os.environ["XLA_FLAGS"] = f"--xla_force_host_platform_device_count={devices}"
  os.environ.setdefault("JAX_PLATFORMS", "cpu")

from absl import app
from absl import flags
import jax
from jax.sharding import PartitionSpec as P

from muloco_jax import diloco
from muloco_jax import model as model_lib
from muloco_jax import optim
from muloco_jax import runtime
from muloco_jax import sharding

_DEVICES = flags.DEFINE_integer("devices", 64, "Virtual devices (set before jax starts).")
_WORKERS = flags.DEFINE_integer("workers", 2, "DiLoCo workers K.")
_SIZES = flags.DEFINE_list("sizes", ["150m", "914m", "3.1b", "15b"], "Model presets.")

GIB = 2**30


def replicated_layout(state, mesh):
  """The same abstract state with the 0.2 layout: leading worker axis over `worker`, the rest
  on every device."""

  def relayout(x):
    spec = x.sharding.spec
    worker_split = len(spec) and spec[0] == sharding.WORKER_AXIS and len(x.shape) > 1
    new = P(sharding.WORKER_AXIS) if worker_split else P()
    return jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=jax.NamedSharding(mesh, new))

  return jax.tree.map(relayout, state)


def main(argv):
  del argv
  devices = jax.devices()
  if len(devices) != _DEVICES.value:
    raise app.UsageError(f"--devices must be given as --devices=N; jax sees {len(devices)}")
  print(f"{len(devices)} devices; MuLoCo K={_WORKERS.value}; bytes on the fullest device")
  print("| preset | method | mesh | fsdp GiB | replicated GiB | fsdp / replicated |")
  print("|---|---|---|---|---|---|")
  inner = optim.muon(0.02, shard_axis=sharding.FSDP_AXIS, param_specs=sharding.fsdp_specs)
  for size in _SIZES.value:
    config = model_lib.model_config(size, scan_layers=True)
    shapes = jax.eval_shape(functools.partial(model_lib.init_params, config), jax.random.key(0))
    for method, workers in (("MuLoCo", _WORKERS.value), ("DP Muon", 0)):
      mesh = sharding.mesh_for_workers(workers, devices)
      if workers:
        algorithm = runtime.DiLoCo(None, inner, diloco.outer_optimizer(), workers, mesh)
      else:
        algorithm = runtime.DataParallel(None, inner, mesh)
      state = algorithm.abstract_state(shapes)
      fsdp = sharding.state_bytes_per_device(state)
      replicated = sharding.state_bytes_per_device(replicated_layout(state, mesh))
      grid = f"{mesh.shape[sharding.WORKER_AXIS]} x {mesh.shape[sharding.FSDP_AXIS]}"
      print(
        f"| {size} | {method} | {grid} | {fsdp / GIB:.2f} | {replicated / GIB:.2f} "
        f"| {fsdp / replicated:.4f} |",
        flush=True,
      )


if __name__ == "__main__":
  app.run(main)
