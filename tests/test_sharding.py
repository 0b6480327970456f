"""Tests of muloco_jax.sharding: meshes that use every device and put the slow links (between
TPU slices, between hosts) between workers, not processes; and batch placement on multi-host TPU
slices, from their topology descriptions (nothing runs).

Each process reads the rows of every global batch that its devices hold (`sharding.rows_held`,
`LMIterator`'s `rows`) and builds its shards from them (`sharding.shard_of_rows`, what
`place_rows` hands `jax.make_array_from_callback`).  Checked here for every process of real
TPU layouts, where one host's chips sit in several worker rows.
"""

import importlib.util
import logging
import types

import jax
import numpy as np
import optax
import pytest

from muloco_jax import diloco, runtime, sharding
from toy_models import loss_fn

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu describes TPU topologies: pip install -e ".[tpu]"',
)


@pytest.mark.parametrize(
  "num_workers, fsdp, shape",
  [(4, 0, (4, 2)), (3, 0, (1, 8)), (16, 0, (8, 1)), (2, 0, (2, 4)), (4, 4, (2, 4)), (1, 0, (1, 8))],
)
def test_mesh_for_workers_uses_every_device(num_workers, fsdp, shape):
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1),
    diloco.outer_optimizer(),
    num_workers,
    fsdp=fsdp,
  )
  assert trainer.mesh.size == len(jax.devices()) == 8
  assert (trainer.mesh.shape["worker"], trainer.mesh.shape["fsdp"]) == shape
  assert set(trainer.mesh.devices.flat) == set(jax.devices())


def test_mesh_for_workers_refuses_a_layout_that_leaves_devices_out():
  with pytest.raises(ValueError, match=r"^fsdp=3 .* one of \[2, 4, 8\]"):
    sharding.mesh_for_workers(4, fsdp=3)
  names = ("diloco.num_workers", "diloco.fsdp")  # as the config's run passes them
  with pytest.raises(ValueError, match=r"^diloco.fsdp=1 .* one of \[2, 4, 8\]"):
    sharding.mesh_for_workers(4, fsdp=1, names=names)


# ----------------------------------------------------------------------------
# Slow links.


class FakeGpu(types.SimpleNamespace):
  """A GPU as jax lists it, on no machine: ``slice_index`` as jax numbers hosts, if given."""

  def __hash__(self):
    return self.id


def _gpus(nodes, gpus_per_node, processes_per_node, numbered_hosts=True):
  per_process = gpus_per_node // processes_per_node
  return [
    FakeGpu(
      id=i,
      process_index=i // per_process,
      platform="gpu",
      device_kind="NVIDIA H100 80GB HBM3",
      **({"slice_index": i // gpus_per_node} if numbered_hosts else {}),
    )
    for i in range(nodes * gpus_per_node)
  ]


def _rows(mesh, key):
  return [sorted({key(d) for d in row}) for row in mesh.devices]


def _slow_link_warnings(caplog):
  return [r for r in caplog.records if "cross the slow links" in r.getMessage()]


@needs_libtpu
def test_hosts_of_one_tpu_slice_share_its_links(caplog):
  """15b MuLoCo K=8 on one v5p-128 slice (16 hosts): 8 worker rows of 8 chips, no warning."""
  from muloco_jax.tools import aot

  devices = aot.topology_devices("v5p:4x4x4", 1)
  with caplog.at_level(logging.WARNING):
    mesh = sharding.mesh_for_workers(8, devices, 8)
  assert dict(mesh.shape) == {"worker": 8, "fsdp": 8}
  assert not _slow_link_warnings(caplog)


@needs_libtpu
def test_workers_take_the_links_between_slices(caplog):
  """Two v5p:2x2x1 slices: K=2 puts a worker on each slice; K=1 must stretch fsdp over both,
  and says so."""
  from muloco_jax.tools import aot

  devices = aot.topology_devices("v5p:2x2x1", 2)
  with caplog.at_level(logging.WARNING):
    mesh = sharding.mesh_for_workers(2, devices)
  assert _rows(mesh, sharding.slow_link_group) == [[0], [1]]
  assert not _slow_link_warnings(caplog)
  with caplog.at_level(logging.WARNING):
    sharding.mesh_for_workers(1, devices)
  (warning,) = _slow_link_warnings(caplog)
  assert "fsdp axis spans 2 of the 2 slices/hosts" in warning.getMessage()


@pytest.mark.parametrize("processes_per_node", [8, 1], ids=["process_per_gpu", "process_per_node"])
def test_processes_on_one_node_share_its_links(processes_per_node, caplog):
  """2 nodes x 8 GPUs (SLURM: a process per GPU or per node): 2 workers x fsdp 8 put a worker
  on each node; fsdp 16 crosses the nodes and warns."""
  devices = _gpus(2, 8, processes_per_node)
  with caplog.at_level(logging.WARNING):
    mesh = sharding.mesh_for_workers(2, devices, 8)
  assert _rows(mesh, sharding.slow_link_group) == [[0], [1]]
  assert not _slow_link_warnings(caplog)
  with caplog.at_level(logging.WARNING):
    sharding.mesh_for_workers(1, devices, 16)
  assert len(_slow_link_warnings(caplog)) == 1


def test_devices_without_hosts_are_one_group():
  """A made-up list of 16 single-GPU processes with no host numbering is not 16 slow-link
  groups: 2 x 8 lays consecutive processes in a worker row."""
  mesh = sharding.mesh_for_workers(2, _gpus(2, 8, 8, numbered_hosts=False), 8)
  assert _rows(mesh, lambda d: d.process_index) == [list(range(8)), list(range(8, 16))]


# ----------------------------------------------------------------------------
# Batch placement.


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


@needs_libtpu
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


@needs_libtpu
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
