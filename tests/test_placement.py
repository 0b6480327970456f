"""Batch placement on multi-host TPU slices, from their topology descriptions (nothing runs).

Each process reads the rows of every global batch that its devices hold (`sharding.rows_held`,
`LMIterator`'s `rows`) and builds its shards from them (`sharding.shard_of_rows`, what
`place_rows` hands `jax.make_array_from_callback`).  Checked here for every process of real
TPU layouts, where one host's chips sit in several worker rows.
"""

import importlib.util

import jax
import numpy as np
import optax
import pytest

from muloco_jax import runtime, sharding

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu describes TPU topologies: pip install -e ".[tpu]"',
)


def _devices(topology):
  from muloco_jax.tools import aot  # imports libtpu's topologies

  return aot.topology_devices(topology, 1)


def _check_every_process(batch_sharding, row_shape, trailing=(3,)):
  """Every process's rows, given in `rows_held` order, make exactly its devices' shards of the
  global batch; the processes' rows partition the batch, equally."""
  global_shape = tuple(row_shape) + trailing
  num_rows = int(np.prod(row_shape))
  batch = np.arange(num_rows * int(np.prod(trailing))).reshape(global_shape)
  flat_rows = batch.reshape((num_rows,) + trailing)
  indices = batch_sharding.devices_indices_map(global_shape)
  processes = sorted({d.process_index for d in indices})
  held = {p: sharding.rows_held(batch_sharding, row_shape, p) for p in processes}
  for p in processes:
    local = flat_rows[held[p]]  # what the process's iterator yields
    for device, index in indices.items():
      if device.process_index == p:
        shard = sharding.shard_of_rows(local, held[p], index, global_shape, len(row_shape))
        np.testing.assert_array_equal(shard, batch[index], err_msg=f"{device} of process {p}")
  np.testing.assert_array_equal(np.sort(np.concatenate(list(held.values()))), np.arange(num_rows))
  assert {len(rows) for rows in held.values()} == {num_rows // len(processes)}


@pytest.mark.parametrize(
  "topology, num_workers",
  [("v5p:4x4x4", 2), ("v5p:4x4x4", 4), ("v5p:4x4x4", 16), ("v6e:8x8", 4), ("v5e:4x8", 2)],
)
def test_every_process_places_its_rows(topology, num_workers):
  """MuLoCo's worker batches [K, B/K] and the evaluation batches [B], two rows a device."""
  devices = _devices(topology)
  mesh = sharding.mesh_for_workers(num_workers, devices)
  algorithm = runtime.DiLoCo(None, optax.sgd(0.1), optax.sgd(1.0), num_workers, mesh)
  batch_size = 2 * len(devices)
  _check_every_process(algorithm.batch_sharding, (num_workers, batch_size // num_workers))
  _check_every_process(sharding.rows_over_devices(mesh), (batch_size,))


@pytest.mark.parametrize("fsdp", [0, 4])
def test_data_parallel_places_its_rows(fsdp):
  """Data parallelism on a v5p-128 slice: FSDP over all 64 chips, or 16 replicas x fsdp 4."""
  devices = _devices("v5p:4x4x4")
  mesh = sharding.mesh_for_workers(0, devices, fsdp)
  algorithm = runtime.DataParallel(None, optax.sgd(0.1), mesh)
  _check_every_process(algorithm.batch_sharding, (2 * len(devices),))


def test_this_process_reads_every_row_on_one_host():
  """On the 8 local CPU devices the one process reads every row, in order."""
  mesh = sharding.mesh_for_workers(4, jax.devices())
  algorithm = runtime.DiLoCo(None, optax.sgd(0.1), optax.sgd(1.0), 4, mesh)
  np.testing.assert_array_equal(algorithm.batch_rows(16), np.arange(16))
