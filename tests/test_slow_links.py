"""Which devices the mesh treats as joined by slow links: TPU slices and hosts, not processes."""

import importlib.util
import logging
import types

import pytest

from muloco_jax import sharding

needs_libtpu = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu describes TPU topologies: pip install -e ".[tpu]"',
)


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
