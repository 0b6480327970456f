"""Launcher: python -m muloco_jax.main --config=configs/NAME.py --workdir=DIR [--config.a.b=v].

On several hosts, pass --coordinator_address, --num_processes and --process_id, or
--distributed where the cluster (SLURM, Open MPI, Cloud TPU, GKE) tells
`jax.distributed.initialize()` who is who.
"""

import sys

from absl import app
from absl import flags
from absl import logging
import jax
import tensorflow_datasets as tfds
from ml_collections import config_flags

from muloco_jax import checkpoint
from muloco_jax import config as config_lib
from muloco_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_WORKDIR = flags.DEFINE_string("workdir", None, "Checkpoints, metrics and TensorBoard go here.")
_COORDINATOR = flags.DEFINE_string("coordinator_address", None, "host:port of process 0.")
_NUM_PROCESSES = flags.DEFINE_integer("num_processes", None, "Number of processes (hosts).")
_PROCESS_ID = flags.DEFINE_integer("process_id", None, "This process's index.")
_DISTRIBUTED = flags.DEFINE_bool(
  "distributed",
  False,
  "One of several processes that SLURM, Open MPI or a Cloud TPU / GKE job describes: "
  "jax.distributed.initialize() reads who is who from there (docs/cluster.md).",
)
flags.mark_flags_as_required(["config", "workdir"])


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  if not flags.FLAGS["verbosity"].present:  # library INFO and progress bars only on request
    logging.set_verbosity(logging.WARNING)
    tfds.disable_progress_bar()
  if _COORDINATOR.value is not None or _DISTRIBUTED.value:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")  # CPU hosts; no-op elsewhere
    jax.distributed.initialize(_COORDINATOR.value, _NUM_PROCESSES.value, _PROCESS_ID.value)
  try:
    train.train_and_evaluate(_CONFIG.value, _WORKDIR.value)
  except checkpoint.IncompatibleCheckpointError as e:
    sys.exit(f"FATAL {e}")  # the message says what differs and what to do: no traceback


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
