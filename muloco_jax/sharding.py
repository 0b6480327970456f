"""The device mesh and how every array of a run is laid over it.

Mesh axes ``("worker", "fsdp")``.  A DiLoCo worker is one row of the ``worker`` axis (or part of
one: with K > W rows, K / W workers share a row, vmapped); inside a worker, ``fsdp`` splits both
the batch and every parameter, optimizer-state and error-feedback leaf (ZeRO-3: XLA gathers a
layer's weights where the forward and backward passes need them and reduce-scatters gradients,
from the shardings alone).  Per-worker shardings come from one rule, ``fsdp_spec``; DiLoCo
prepends the worker axis to them (``per_worker``).  With the mean averager it shards the shared
parameters and the outer optimizer state over the worker axis too (``owned_spec``), so each
worker row owns 1/W of them; with a compressing one every worker row keeps them (FSDP inside).
Data parallelism (K = 0) uses the same rule, with the ``worker`` axis as plain replicas.

Everything here works from shapes (``jax.ShapeDtypeStruct``) as well as arrays, so programs can
be compiled for a topology that is not attached (``muloco_jax.tools.aot``).
"""

from __future__ import annotations

import collections
import functools
import math
from typing import Any

import jax
import numpy as np
from absl import logging
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muloco_jax import layout

WORKER_AXIS = "worker"
FSDP_AXIS = "fsdp"
AXES = (WORKER_AXIS, FSDP_AXIS)

PyTree = Any


# ----------------------------------------------------------------------------
# The mesh.


def slow_link_group(device) -> int:
  """The group of devices joined by fast links that ``device`` is in: its TPU slice, else its
  host.  Processes on one host (one per GPU, say) share that host's links.

  jax numbers the groups with ``slice_index``: a TPU slice; elsewhere a host (by boot id), or
  the ``partition_index`` a process gave ``jax.distributed.initialize`` (or
  ``JAX_PARTITION_INDEX``), which is how to name other groups, e.g. an NVLink domain across
  hosts.  Devices with none (a compile-only TPU topology of one slice, one process's devices,
  a device list made up for planning) are one group.
  """
  return getattr(device, "slice_index", 0)


def _warn_if_fsdp_crosses_slow_links(mesh: Mesh) -> None:
  """A worker row spanning slow-link groups gathers its weights over them every step."""
  spans = max(len({slow_link_group(d) for d in row}) for row in mesh.devices)
  if spans > 1:
    groups = len({slow_link_group(d) for d in mesh.devices.flat})
    logging.warning(
      "mesh worker=%d x fsdp=%d: each worker's fsdp axis spans %d of the %d slices/hosts, so "
      "its FSDP gathers and reduce-scatters cross the slow links between them every step; "
      "a diloco.num_workers that is a multiple of %d (or, with data parallelism, diloco.fsdp "
      "<= the devices of one slice/host) keeps them inside one.",
      *mesh.devices.shape,
      spans,
      groups,
      groups,
    )


def make_mesh(worker_parallelism: int, fsdp: int = 1, devices=None) -> Mesh:
  """A ``("worker", "fsdp")`` mesh of exactly ``worker_parallelism x fsdp`` devices.

  ``devices`` defaults to ``jax.devices()`` and must hold at least that many; the first ones
  are used (``mesh_for_workers`` uses all of them).  The grid comes from jax's mesh utilities:
  across slices or hosts (``slow_link_group``; ``mesh_utils.create_hybrid_device_mesh``) the
  ``worker`` axis takes the slow links and ``fsdp`` the fast ones inside a slice or host;
  ``fsdp`` spans the slow links only when the ``worker`` axis cannot (it is smaller than the
  number of slices or hosts), and a warning says so.
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (worker_parallelism, fsdp)
  needed = math.prod(shape)
  if min(shape) < 1 or needed > len(devices):
    raise ValueError(
      f"mesh worker={worker_parallelism} x fsdp={fsdp} needs {needed} devices, "
      f"{len(devices)} available"
    )
  devices = devices[:needed]
  groups = len({slow_link_group(d) for d in devices})
  if groups == 1:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    if worker_parallelism % groups == 0:
      dcn = (groups, 1)
    elif fsdp % groups == 0:
      dcn = (1, groups)
    else:
      raise ValueError(
        f"mesh worker={worker_parallelism} x fsdp={fsdp} cannot be laid over "
        f"{groups} slices/hosts: one axis must be a multiple of {groups}"
      )
    ici = tuple(n // g for n, g in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(ici, dcn, devices, allow_split_physical_axes=True)
  mesh = Mesh(grid, AXES)
  _warn_if_fsdp_crosses_slow_links(mesh)
  return mesh


def mesh_for_workers(
  num_workers: int, devices=None, fsdp: int = 0, *, names=("num_workers", "fsdp")
) -> Mesh:
  """The mesh over EVERY device of ``devices`` (default ``jax.devices()``) for K workers.

  ``fsdp`` = F devices per worker row (0: automatic).  K >= 1 DiLoCo workers: automatic takes
  W = gcd(K, n) worker rows of F = n / W devices (K=4 on 8 devices: 4 x 2; K=3 on 8: 1 x 8, the
  3 workers vmapped over one row of 8; K=16 on 8: 8 x 1, two workers per device); a given F
  must divide n and n / F must divide K.  K = 0 (data parallelism): F = n by default; a smaller
  F makes the ``worker`` axis n / F replicas of an F-way sharded model (HSDP).  Otherwise a
  ValueError says what to set, naming the two settings ``names`` (the config passes its keys).
  """
  workers_name, fsdp_name = names
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if num_workers < 0:
    raise ValueError(f"{workers_name}={num_workers} must be >= 0")
  unit = num_workers or n  # the worker rows must divide K (any divisor of n for K = 0)
  if fsdp == 0:
    fsdp = n // math.gcd(unit, n) if num_workers else n
  elif fsdp < 0 or n % fsdp or unit % (n // fsdp):
    fits = [f for f in range(1, n + 1) if n % f == 0 and unit % (n // f) == 0]
    raise ValueError(
      f"{fsdp_name}={fsdp} does not lay {workers_name}={num_workers} "
      f"over all {n} devices (it must divide {n}"
      + (f", and {n} / it must divide {num_workers}" if num_workers else "")
      + f"); set it to one of {fits} or to 0 (automatic)"
    )
  return make_mesh(n // fsdp, fsdp, devices)


def check_batch_size(name: str, batch_size: int, num_workers: int, mesh: Mesh) -> None:
  """Raises a ValueError naming ``name`` unless ``batch_size`` splits over the mesh.

  The batch is split into K worker batches (K = ``num_workers``; pass the mesh's ``worker``
  size for a batch split over every device, as data parallelism and evaluation do), and each
  worker's rows over the ``fsdp`` axis: every device gets the same number of rows.
  """
  fsdp = mesh.shape[FSDP_AXIS]
  if batch_size < 1 or batch_size % (num_workers * fsdp):
    raise ValueError(
      f"{name}={batch_size} must be a positive multiple of {num_workers * fsdp} "
      f"({num_workers} worker batches, each split over the {fsdp} devices "
      f"of the mesh's 'fsdp' axis)"
    )


# ----------------------------------------------------------------------------
# Partition specs.


def axis_size(name: str) -> int:
  """Size of axis ``name`` of the mesh in context (``jax.set_mesh``); 1 if there is none."""
  return dict(jax.sharding.get_abstract_mesh().shape).get(name, 1)


def fsdp_spec(
  path, leaf, fsdp: int, *, axis: str = FSDP_AXIS, stacked_axes=layout.stacked_axes
) -> P:
  """One worker's sharding of a leaf: its largest per-layer dimension divisible by ``fsdp``.

  Stacked layer axes (``layout.stacked_axes``) are never sharded: a scanned model then gathers
  one layer's weights per scan iteration, not the whole stack.  Leaves with no such dimension
  (or ``fsdp`` = 1) are replicated.
  """
  shape = np.shape(leaf)
  first = len(shape) - len(layout.layer_shape(path, leaf, stacked_axes=stacked_axes))
  fits = [i for i in range(first, len(shape)) if shape[i] % fsdp == 0]
  if fsdp == 1 or not fits:
    return P()
  dim = max(fits, key=lambda i: (shape[i], -i))
  return P(*(axis if i == dim else None for i in range(dim + 1)))


def fsdp_specs(params: PyTree, fsdp: int | None = None, **kwargs) -> PyTree:
  """``fsdp_spec`` of every leaf; ``fsdp`` None: the ``fsdp`` size of the mesh in context."""
  fsdp = axis_size(FSDP_AXIS) if fsdp is None else fsdp
  return jax.tree_util.tree_map_with_path(lambda p, x: fsdp_spec(p, x, fsdp, **kwargs), params)


def per_worker(spec: P) -> P:
  """The spec of a leaf with a leading worker axis, from the spec of one worker's leaf."""
  return P(WORKER_AXIS, *spec)


def owned_spec(shape: tuple[int, ...], spec: P, workers: int, fsdp: int) -> P:
  """The shared (outer) copy of a leaf: ``spec``, further split over the ``worker`` axis.

  The worker axis goes on the largest unsharded dimension divisible by ``workers``, else
  beside ``fsdp`` on the sharded one when it divides by ``workers x fsdp``; a leaf with
  neither stays replicated over workers (norm gains and biases: a few KiB).  Averaging the
  workers' parameters into this layout is a reduce-scatter over ``worker``, and handing the
  result back to the workers an all-gather.
  """
  if workers == 1:
    return spec
  axes = list(spec) + [None] * (len(shape) - len(spec))
  free = [i for i, a in enumerate(axes) if a is None and shape[i] % workers == 0]
  if free:
    axes[max(free, key=lambda i: (shape[i], -i))] = WORKER_AXIS
  else:
    for i, a in enumerate(axes):
      if a == FSDP_AXIS and shape[i] % (workers * fsdp) == 0:
        axes[i] = (FSDP_AXIS, WORKER_AXIS)
  return P(*axes)


def owned_specs(params: PyTree, specs: PyTree, mesh: Mesh) -> PyTree:
  w, f = mesh.shape[WORKER_AXIS], mesh.shape[FSDP_AXIS]
  return jax.tree.map(lambda x, s: owned_spec(np.shape(x), s, w, f), params, specs)


def state_specs(state: PyTree, params: PyTree, param_specs: PyTree) -> PyTree:
  """Specs of an optimizer state (or any tree holding copies of ``params``).

  A state leaf takes the spec of the parameter whose path ends its own path and whose shape it
  has (optax states hold param-shaped subtrees: momentum, Adam's moments); every other leaf
  (counts, scalars) is replicated.
  """
  by_path = {
    jax.tree_util.keystr(path): (np.shape(x), spec)
    for (path, x), spec in zip(
      jax.tree_util.tree_flatten_with_path(params)[0], jax.tree.leaves(param_specs)
    )
  }

  def spec_of(path, leaf):
    for suffix_start in range(len(path)):
      match = by_path.get(jax.tree_util.keystr(path[suffix_start:]))
      if match is not None and match[0] == np.shape(leaf):
        return match[1]
    return P()

  return jax.tree_util.tree_map_with_path(spec_of, state)


def rows_over_devices(mesh: Mesh) -> NamedSharding:
  """A batch's rows split over every device of the mesh (data parallelism, evaluation)."""
  return NamedSharding(mesh, P(AXES))


def named(mesh: Mesh, specs: PyTree) -> PyTree:
  """NamedShardings of a tree of PartitionSpecs."""
  return jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=lambda s: isinstance(s, P))


def _constrain_worker_axis(tree: PyTree, dim: int | None) -> PyTree:
  if axis_size(WORKER_AXIS) == 1:
    return tree

  def constrain(x):
    spec = [P.UNCONSTRAINED] * x.ndim
    spec[dim or 0] = None if dim is None else WORKER_AXIS
    return jax.lax.with_sharding_constraint(x, P(*spec))

  return jax.tree.map(constrain, tree)


def split_over_workers(tree: PyTree, dim: int = 0) -> PyTree:
  """``tree`` constrained to be split over ``worker`` along dimension ``dim`` of every leaf
  (other dimensions as XLA likes).  Moving the split from dimension 0 (one slice per worker) to
  dimension 1 (``[workers, K chunks, ...]``: worker row j holds chunk j of every worker) is an
  all-to-all of exactly these arrays.  A no-op without a mesh in context."""
  return _constrain_worker_axis(tree, dim)


def gather_workers(tree: PyTree) -> PyTree:
  """``tree`` (leading worker axis) constrained to be whole on every worker row: an all-gather
  over ``worker`` of exactly these arrays (e.g. packed payloads, not their decoded floats).
  Other dimensions keep the sharding XLA gives them; a no-op without a mesh in context."""
  return _constrain_worker_axis(tree, None)


def like_one_worker(tree: PyTree) -> PyTree:
  """``tree`` (shaped like the parameters) constrained to one worker's layout, ``fsdp_spec``:
  the same on every worker row.  A no-op without a mesh in context."""
  if axis_size(WORKER_AXIS) * axis_size(FSDP_AXIS) == 1:
    return tree
  specs = fsdp_specs(tree)
  return jax.tree.map(jax.lax.with_sharding_constraint, tree, specs)


def leading_axis_specs(tree: PyTree, fsdp: int) -> PyTree:
  """Specs of buffers whose leaves have a leading axis of K (one slice per worker or owner,
  e.g. ``diloco.Averager`` states): that axis over ``worker``, the rest as ``fsdp_spec``
  shards one slice."""
  return jax.tree_util.tree_map_with_path(
    lambda path, x: per_worker(
      fsdp_spec(path, jax.ShapeDtypeStruct(np.shape(x)[1:], x.dtype), fsdp)
    ),
    tree,
  )


# ----------------------------------------------------------------------------
# Placement and bytes.


def _rows_of(index: tuple, row_shape: tuple[int, ...]) -> np.ndarray:
  """The rows of a shard's ``index``: its leading ``len(row_shape)`` dimensions' positions,
  flattened in C order (worker k's row j of a ``[K, B/K]`` batch is row ``k B/K + j``)."""
  ranges = [np.arange(n)[s] for s, n in zip(index, row_shape)]
  return np.ravel_multi_index(np.ix_(*ranges), row_shape).ravel()


@functools.lru_cache(maxsize=64)
def _rows_held(sharding: NamedSharding, row_shape: tuple[int, ...], process: int) -> np.ndarray:
  indices = sharding.devices_indices_map(row_shape)
  held = [_rows_of(i, row_shape) for d, i in indices.items() if d.process_index == process]
  rows = np.unique(np.concatenate(held)) if held else np.zeros(0, int)
  rows.flags.writeable = False  # cached
  return rows


def rows_held(
  sharding: NamedSharding, row_shape: tuple[int, ...], process_index: int | None = None
) -> np.ndarray:
  """The rows of a batch that the devices of process ``process_index`` (default this one)
  hold, sorted: what that process reads of every global batch.

  ``row_shape``: the leading dimensions ``sharding`` splits, ``(B,)`` or ``(K, B/K)``, whose
  positions flattened in C order number the rows.  Which rows a process holds follows from
  the mesh, not from its index: on a TPU slice one host's chips may sit in several worker rows.
  """
  process = jax.process_index() if process_index is None else process_index
  return _rows_held(sharding, tuple(row_shape), process)


def shard_of_rows(
  local: np.ndarray, held: np.ndarray, index: tuple, global_shape: tuple[int, ...], row_dims: int
) -> np.ndarray:
  """The shard at ``index`` of a global array of ``global_shape``, from the rows ``held`` of
  it (``rows_held``) in ``local`` (``[len(held), ...]``, in that order)."""
  row_shape = tuple(global_shape[:row_dims])
  rows = local[np.searchsorted(held, _rows_of(index, row_shape))]
  rows = rows[(slice(None),) + tuple(index[row_dims:])]
  return rows.reshape(
    tuple(len(range(*s.indices(n))) for s, n in zip(index, row_shape)) + rows.shape[1:]
  )


def place_rows(
  rows: Any, sharding: NamedSharding, global_shape: tuple[int, ...], row_dims: int = 1
) -> jax.Array:
  """A global array of ``global_shape`` from this process's rows of it.

  The rows are the positions of the leading ``row_dims`` dimensions (``rows_held``): each
  process passes those its devices hold, in order, as ``[rows, ...]``.  A process that passes
  every row, or the whole array (every process the same), places its shards of it.
  """
  data = np.asarray(rows)
  global_shape = tuple(global_shape)
  row_shape = global_shape[:row_dims]
  if data.shape != global_shape and data.shape[:1] == (math.prod(row_shape),):
    data = data.reshape(global_shape)
  if data.shape == global_shape:
    return jax.make_array_from_callback(global_shape, sharding, lambda index: data[index])
  held = rows_held(sharding, row_shape)
  if data.shape != (len(held),) + global_shape[row_dims:]:
    raise ValueError(
      f"process {jax.process_index()} holds {len(held)} rows of a global {global_shape} array "
      f"(sharding.rows_held), but was given {data.shape}"
    )
  return jax.make_array_from_callback(
    global_shape,
    sharding,
    lambda index: shard_of_rows(data, held, index, global_shape, row_dims),
  )


def bytes_per_device(tree: PyTree) -> dict:
  """Bytes of ``tree`` (arrays or ShapeDtypeStructs with a sharding) held by each device."""
  held = collections.Counter()
  for x in jax.tree.leaves(tree):
    itemsize = np.dtype(x.dtype).itemsize
    for device, index in x.sharding.devices_indices_map(tuple(x.shape)).items():
      held[device] += itemsize * math.prod(
        len(range(*s.indices(n))) for s, n in zip(index, x.shape)
      )
  return dict(held)


def live_bytes_per_device() -> int:
  """The bytes of every live array on this process's fullest device."""
  held = collections.Counter()
  for x in jax.live_arrays():
    for shard in x.addressable_shards:
      held[shard.device] += shard.data.nbytes
  return max(held.values(), default=0)


def state_bytes_per_device(tree: PyTree) -> int:
  """The bytes of ``tree`` on its fullest device."""
  return max(bytes_per_device(tree).values(), default=0)
