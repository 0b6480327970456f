"""DiLoCo with any optax inner and outer optimizer (MuLoCo when the inner one is Muon).

References: DiLoCo, Douillard et al., arXiv 2311.08105; MuLoCo, arXiv 2505.23725.

One round, for K workers and H inner steps::

    theta_k <- theta_ref                                    (every worker k)
    repeat H times:  theta_k, s_k <- InnerOpt(theta_k, s_k, grad L(theta_k; batch_k))
    delta_k = theta_ref - theta_k                           (pseudogradient)
    delta   = (1 / |C|) sum_{k in C} delta_k                (C: contributing workers)
    theta_ref, u <- OuterOpt(theta_ref, u, delta)           (delta used as a gradient)

With the default outer optimizer ``optax.sgd(lr, mu, nesterov=True)`` the outer step is
``u <- mu u + delta;  theta_ref <- theta_ref - lr (delta + mu u)``.  The inner optimizer state
``s_k`` stays with worker k across rounds.  ``C`` holds the workers that are marked active and whose
pseudogradient is finite; if it is empty the round is skipped (``theta_ref`` and ``u`` unchanged).

Layout.  The pure functions below work on a ``DiLoCoState`` whose per-worker leaves carry a leading
worker axis; they run as they are on one device (all K workers vmapped) or inside ``jax.shard_map``
on the local slice of that axis, where the collectives name the mesh axes.  ``DiLoCo`` owns a mesh
with axes ``("worker", "data")``: each device row of the ``worker`` axis runs ``K / W`` workers with
``vmap``, and a worker's batch is split over the ``data`` axis (gradients ``pmean``-ed over
``data`` only).  Inner steps never communicate across workers; ``outer_sync`` is the only
cross-worker collective.
"""

from __future__ import annotations

import math
import re
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.experimental import mesh_utils
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

from muloco_jax import compression

WORKER_AXIS = "worker"
DATA_AXIS = "data"

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]
# average(deltas, contributes, error, axis_name) -> (mean delta over the contributing workers,
# new error-feedback buffers, scalar metrics); see `psum_average` and `compressed_average`.
Averager = Callable[[PyTree, jax.Array, PyTree, "str | None"], "tuple[PyTree, PyTree, dict]"]
# A fragment: the top-level parameter keys it holds (streaming DiLoCo); None: the whole tree.
Fragment = "tuple[str, ...] | None"


class DiLoCoState(NamedTuple):
  """Training state of DiLoCo.

  Attributes:
    params: ``theta_ref``, the shared parameters (replicated).
    outer_opt_state: tuple with the outer optimizer state of each fragment (one entry, for
      the whole tree, without streaming), replicated.
    worker_params: ``theta_k``, every leaf with a leading worker axis of size K.
    worker_opt_state: inner optimizer state of every worker, leading worker axis of size K.
    error: error-feedback buffers ``e_k`` of every worker (leading worker axis), or ``{}``
      when the averager keeps none.
    step: int32 number of inner steps taken.
  """

  params: PyTree
  outer_opt_state: tuple
  worker_params: PyTree
  worker_opt_state: PyTree
  error: PyTree
  step: jax.Array


def outer_optimizer(
  lr: float = 0.7, momentum: float = 0.9, nesterov: bool = True
) -> optax.GradientTransformation:
  """The DiLoCo outer optimizer: SGD with (Nesterov) momentum on the averaged pseudogradient."""
  return optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)


def _stack(tree: PyTree, num: int) -> PyTree:
  return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + jnp.shape(x)), tree)


def _tree_dot(a: PyTree, b: PyTree) -> jax.Array:
  return sum(
    jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
    for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b))
  )


def _workers_all_finite(tree: PyTree, num_workers: int) -> jax.Array:
  """Bool ``[workers]``: every floating-point entry of the worker's slice of ``tree`` is finite."""
  finite = jnp.ones((num_workers,), bool)
  for x in jax.tree.leaves(tree):
    if jnp.issubdtype(x.dtype, jnp.inexact):
      finite &= jnp.all(jnp.isfinite(x).reshape(num_workers, -1), axis=1)
  return finite


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def _select_workers(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Per worker: leaves of ``on_true`` where ``mask[k]`` else ``on_false`` (leading axis k)."""

  def pick(t, f):
    return jnp.where(mask.reshape(mask.shape + (1,) * (t.ndim - 1)), t, f)

  return jax.tree.map(pick, on_true, on_false)


def _subtree(tree: PyTree, fragment: Fragment) -> PyTree:
  return tree if fragment is None else {key: tree[key] for key in fragment}


def _merge(tree: PyTree, part: PyTree, fragment: Fragment) -> PyTree:
  return part if fragment is None else {**tree, **part}


def split_into_fragments(params: dict, num_fragments: int) -> tuple[tuple[str, ...], ...]:
  """Streaming DiLoCo's fragments: contiguous ranges of the blocks ``layers_0 .. layers_{L-1}``.

  Fragment f holds blocks ``[f L / F, (f + 1) L / F)``; the embedding goes with the first
  fragment and every other top-level parameter (final norm, output head) with the last.
  """
  layers = sorted(
    (k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1])
  )
  if num_fragments < 1:
    raise ValueError(f"diloco.num_fragments={num_fragments} must be >= 1")
  if num_fragments > max(len(layers), 1):
    raise ValueError(
      f"diloco.num_fragments={num_fragments} exceeds the {len(layers)} "
      "unscanned layers (model.scan_layers must be False for streaming)"
    )
  if num_fragments == 1:
    return (tuple(params),)
  fragments = [[] for _ in range(num_fragments)]
  for i, key in enumerate(layers):
    fragments[i * num_fragments // len(layers)].append(key)
  for key in params:
    if key not in layers:
      fragments[0 if "embed" in key else -1].append(key)
  return tuple(tuple(f) for f in fragments)


def init(
  params: PyTree,
  inner_tx: optax.GradientTransformation,
  outer_tx: optax.GradientTransformation,
  num_workers: int,
  fragments: "tuple[Fragment, ...]" = (None,),
  error_feedback: bool = False,
) -> DiLoCoState:
  """Start of training: every worker holds ``params`` and a fresh inner optimizer state.

  One outer optimizer state per fragment; zero error-feedback buffers if ``error_feedback``.
  """
  return DiLoCoState(
    params=params,
    outer_opt_state=tuple(outer_tx.init(_subtree(params, f)) for f in fragments),
    worker_params=_stack(params, num_workers),
    worker_opt_state=_stack(inner_tx.init(params), num_workers),
    error=(_stack(compression.init_error(params), num_workers) if error_feedback else {}),
    step=jnp.zeros((), jnp.int32),
  )


def inner_step(
  state: DiLoCoState,
  batch: dict,
  loss_fn: LossFn,
  inner_tx: optax.GradientTransformation,
  data_axis: str | None = None,
) -> tuple[DiLoCoState, dict]:
  """One inner optimizer step of every worker on its own batch, ``vmap``-ped over workers.

  ``theta_k, s_k <- InnerOpt(theta_k, s_k, g_k)`` with ``g_k = grad loss_fn(theta_k, batch[k])``.
  ``batch`` leaves have shape ``[workers, per-worker batch, ...]``.  Inside ``shard_map`` with a
  worker spread over several devices, pass ``data_axis``: the loss and gradient are then
  ``pmean``-ed over that axis (the mean over the worker's whole batch, as shards are equal).
  No communication across workers.

  Returns the new state and ``{"loss": [workers], "grad_norm": [workers]}``.
  """

  def one_worker(params, opt_state, worker_batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, worker_batch)
    if data_axis is not None:
      loss, grads = jax.lax.pmean((loss, grads), data_axis)
    updates, opt_state = inner_tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state, loss, optax.tree.norm(grads)

  worker_params, worker_opt_state, loss, grad_norm = jax.vmap(one_worker)(
    state.worker_params, state.worker_opt_state, batch
  )
  state = state._replace(
    worker_params=worker_params, worker_opt_state=worker_opt_state, step=state.step + 1
  )
  return state, {"loss": loss, "grad_norm": grad_norm}


def pseudogradient(theta_ref: PyTree, worker_params: PyTree) -> PyTree:
  """``delta_k = theta_ref - theta_k`` for every worker (leading worker axis kept)."""
  return jax.tree.map(lambda ref, w: ref[None] - w, theta_ref, worker_params)


def _worker_count(contributes: jax.Array, axis_name: str | None) -> tuple[jax.Array, int]:
  """(|C| over all workers, K) from the local workers' ``contributes`` mask."""
  count = jnp.sum(contributes.astype(jnp.int32))
  num_workers = contributes.shape[0]
  if axis_name is not None:
    count = jax.lax.psum(count, axis_name)
    num_workers *= jax.lax.axis_size(axis_name)
  return count, num_workers


def psum_average(
  deltas: PyTree, contributes: jax.Array, error: PyTree, axis_name: str | None = None
) -> tuple[PyTree, PyTree, dict]:
  """Default averager: ``delta = sum_{k in C} delta_k / |C|`` with one ``psum`` over workers.

  Args:
    deltas: pseudogradients of the local workers (leading local-worker axis), already zero for
      workers that do not contribute.
    contributes: bool ``[local workers]``, which local workers are in ``C``.
    error: error-feedback buffers (unused here, returned as they are).
    axis_name: mesh axis along which the other workers live (``None``: all workers are local).

  Returns ``(delta, error, metrics)`` with ``delta`` identical on every worker and scalars:
    ``num_contributing``: ``|C|`` (0 means the caller must skip the round; ``delta`` is then 0).
    ``sync_bytes``: bytes each worker hands to the collective (its pseudogradient leaves, in their
      own dtype, contributing or not) summed over all K workers.  When several workers share a
      device they are summed locally before the collective; that simulation shortcut is not
      counted, nor is the collective's internal traffic (e.g. a ring all-reduce's 2(n-1)/n).
  """
  local_sum = jax.tree.map(lambda d: jnp.sum(d, axis=0), deltas)
  if axis_name is not None:
    local_sum = jax.lax.psum(local_sum, axis_name)
  count, num_workers = _worker_count(contributes, axis_name)
  divisor = jnp.maximum(count, 1)
  delta = jax.tree.map(lambda s: s / divisor.astype(s.dtype), local_sum)
  bytes_per_worker = sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(deltas))
  metrics = {
    "num_contributing": count,
    "sync_bytes": jnp.asarray(float(num_workers * bytes_per_worker), jnp.float32),
  }
  return delta, error, metrics


def compressed_average(
  spec: compression.CompressionSpec,
  error_feedback: bool = True,
  error_decay: float = 0.9,
  exclude: compression.ExcludeFn = compression.exclude_vectors,
  requantize_average: bool = False,
) -> Averager:
  """An averager that exchanges compressed pseudogradients (MuLoCo's 2-8 bit sync).

  Per worker k (error feedback on):  e_k <- beta e_k + delta_k;  c_k = C(e_k);
  e_k <- e_k - D(c_k).  Off:  c_k = C(delta_k).  The packed payloads ``c_k`` are
  ``all_gather``-ed over the worker axis; every worker decodes all K and averages the
  contributing ones: ``delta = sum_{k in C} D(c_k) / |C|``.  ``requantize_average`` applies
  ``D(C(.))`` once more to the average, as the authors' runs do to stand in for a compressed
  reduce-scatter + all-gather.  A worker left out keeps its error buffer unchanged.

  Metrics: ``num_contributing``; ``sync_bytes`` = K x the bytes of one worker's payload
  (the packed arrays handed to the all-gather); ``compression_error`` = mean over contributing
  workers of ||x_k - D(C(x_k))|| / ||x_k|| for the compressed input x_k (e_k or delta_k);
  ``error_buffer_norm`` = mean over workers of ||e_k|| after the step.
  """

  def average(deltas, contributes, error, axis_name=None):
    def one_worker(e, d):
      return compression.error_feedback_tree(
        e, d, spec, error_decay, exclude, use_ef=error_feedback
      )

    like = jax.tree.map(lambda d: jax.ShapeDtypeStruct(d.shape[1:], jnp.float32), deltas)
    payloads, new_error = jax.vmap(one_worker)(error, deltas)
    sent = (
      jax.tree.map(lambda e, d: error_decay * e + d.astype(jnp.float32), error, deltas)
      if error_feedback
      else deltas
    )
    decode_all = jax.vmap(lambda p: compression.decompress_tree(p, spec, like, exclude))
    decoded_local = decode_all(payloads)
    if error_feedback:
      new_error = _select_workers(contributes, new_error, error)
    else:
      new_error = error

    decoded, all_contributes = decoded_local, contributes
    if axis_name is not None:  # every worker decodes the other workers' payloads too
      gathered, all_contributes = jax.lax.all_gather((payloads, contributes), axis_name, tiled=True)
      decoded = decode_all(gathered)
    count, num_workers = _worker_count(contributes, axis_name)
    weights = all_contributes.astype(jnp.float32)
    divisor = jnp.maximum(count, 1).astype(jnp.float32)
    delta = jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1) / divisor, decoded)
    if requantize_average:
      delta = compression.roundtrip_tree(delta, spec, exclude)
    delta = jax.tree.map(lambda x, d: x.astype(d.dtype), delta, like)

    rel_error = jax.vmap(compression.relative_error)(sent, decoded_local)
    local_stats = jnp.stack(
      [
        jnp.sum(jnp.where(contributes, rel_error, 0.0)),
        jnp.sum(jnp.sqrt(jax.vmap(_tree_dot)(new_error, new_error))) if error_feedback else 0.0,
      ]
    )
    if axis_name is not None:
      local_stats = jax.lax.psum(local_stats, axis_name)
    payload_bytes = compression.payload_nbytes(payloads) // contributes.shape[0]
    metrics = {
      "num_contributing": count,
      "sync_bytes": jnp.asarray(float(num_workers * payload_bytes), jnp.float32),
      "compression_error": local_stats[0] / divisor,
      "error_buffer_norm": local_stats[1] / num_workers,
    }
    return delta, new_error, metrics

  return average


def outer_step(
  theta_ref: PyTree,
  outer_opt_state: PyTree,
  worker_params: PyTree,
  outer_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  axis_name: str | None = None,
  average: Averager = psum_average,
  error: PyTree = None,
) -> tuple[PyTree, PyTree, PyTree, dict]:
  """Outer optimizer step on any subtree of the parameters (the whole tree, or one fragment).

  ``C = {k : active[k] and delta_k is finite}``; ``delta = average(delta_k, k in C)``;
  ``theta, u = OuterOpt(theta_ref, u, delta)`` if ``C`` is non-empty, else ``theta_ref, u``.

  Args:
    theta_ref: the shared parameters of the subtree.
    outer_opt_state: the outer optimizer state for that subtree.
    worker_params: the same subtree of every local worker (leading local-worker axis).
    outer_tx: the outer optimizer.
    active: optional bool ``[local workers]``; ``False`` leaves a worker out of the average.
    axis_name: mesh axis of the workers (``None`` when all workers are local).
    average: the averager (``psum_average``, or ``compressed_average(...)``).
    error: the local workers' error-feedback buffers for the subtree (if the averager keeps any).

  Returns the new ``theta``, outer state, error buffers and metrics: the averager's scalars plus
  ``pseudograd_norm`` (norm of ``delta``) and, per local worker, ``worker_pseudograd_norm``,
  ``worker_cosine`` (cosine of ``delta_k`` with ``delta``) and ``worker_contributed``.
  """
  deltas = pseudogradient(theta_ref, worker_params)
  finite = _workers_all_finite(deltas, jax.tree.leaves(deltas)[0].shape[0])
  contributes = finite if active is None else finite & active
  clean = _select_workers(contributes, deltas, jax.tree.map(jnp.zeros_like, deltas))
  delta, error, metrics = average(clean, contributes, error, axis_name)

  updates, new_outer_state = outer_tx.update(delta, outer_opt_state, theta_ref)
  new_theta = optax.apply_updates(theta_ref, updates)
  skip = metrics["num_contributing"] == 0
  new_theta = _select(skip, theta_ref, new_theta)
  new_outer_state = _select(skip, outer_opt_state, new_outer_state)

  delta_norm = optax.tree.norm(delta)
  worker_norm = jax.vmap(optax.tree.norm)(clean)
  worker_dot = jax.vmap(_tree_dot, in_axes=(0, None))(clean, delta)
  metrics = dict(
    metrics,
    pseudograd_norm=delta_norm,
    worker_pseudograd_norm=jnp.where(contributes, worker_norm, jnp.nan),
    worker_cosine=jnp.where(
      contributes, worker_dot / jnp.maximum(worker_norm * delta_norm, 1e-30), jnp.nan
    ),
    worker_contributed=contributes,
  )
  return new_theta, new_outer_state, error, metrics


def outer_sync(
  state: DiLoCoState,
  inner_tx: optax.GradientTransformation,
  outer_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  axis_name: str | None = None,
  average: Averager = psum_average,
  fragments: "tuple[Fragment, ...]" = (None,),
  fragment_index: int = 0,
) -> tuple[DiLoCoState, dict]:
  """Sync of one fragment (the whole tree without streaming): ``outer_step``, then every
  worker restarts that fragment from the new theta.

  Every worker (contributing or not) takes the new ``theta`` of the fragment; a worker keeps its
  inner optimizer state unless that state holds a non-finite value or the worker is inactive
  (a lost worker comes back without its state), in which case it restarts from
  ``inner_tx.init(theta)`` with the schedule positions of its old state (see
  ``restart_inner_state``; reported as ``worker_opt_state_reset``).
  ``step`` is unchanged.  See ``outer_step`` for ``active``, ``axis_name``, ``average`` and the
  metrics.
  """
  fragment = fragments[fragment_index]
  error = _subtree(state.error, fragment) if state.error != {} else {}
  theta, fragment_outer_state, error, metrics = outer_step(
    _subtree(state.params, fragment),
    state.outer_opt_state[fragment_index],
    _subtree(state.worker_params, fragment),
    outer_tx,
    active=active,
    axis_name=axis_name,
    average=average,
    error=error,
  )
  num_local = jax.tree.leaves(state.worker_params)[0].shape[0]
  params = _merge(state.params, theta, fragment)
  worker_params = _merge(state.worker_params, _stack(theta, num_local), fragment)
  reset = ~_workers_all_finite(state.worker_opt_state, num_local)
  if active is not None:
    reset |= ~active
  fresh = restart_inner_state(inner_tx.init(params), state.worker_opt_state, num_local)
  worker_opt_state = _select_workers(reset, fresh, state.worker_opt_state)
  outer_opt_state = tuple(
    fragment_outer_state if i == fragment_index else s for i, s in enumerate(state.outer_opt_state)
  )
  state = state._replace(
    params=params,
    outer_opt_state=outer_opt_state,
    worker_params=worker_params,
    worker_opt_state=worker_opt_state,
    error=_merge(state.error, error, fragment) if error != {} else {},
  )
  return state, dict(metrics, worker_opt_state_reset=reset)


# Optimizer-state nodes that hold a schedule's position (the inner step count the learning rate
# or an injected hyperparameter is a function of).
_SCHEDULE_STATES = (optax.ScaleByScheduleState,)
_INJECTED_STATES = (optax.InjectHyperparamsState, optax.InjectStatefulHyperparamsState)


def restart_inner_state(fresh: PyTree, old: PyTree, num_workers: int) -> PyTree:
  """Per worker: ``fresh`` (an ``inner_tx.init`` result) with the schedule positions of ``old``.

  A worker that rejoins, or whose state went non-finite, loses its moments (momentum, Adam's
  moments and bias-correction counts, error of its own) but not its place in the learning-rate
  schedule: it must use the same learning rate as the other workers at the next step, not
  redo warmup out of phase with them.  Kept from ``old``: ``ScaleByScheduleState`` nodes
  (``optax.scale_by_learning_rate`` with a schedule, ``optax.sgd``/``adamw``/... given one)
  and the count, hyperparameters and schedule states of ``optax.inject_hyperparams`` states,
  whose inner state is restarted the same way.  ``old`` has
  a leading worker axis of size ``num_workers``; ``fresh`` has none.
  """

  def restart(new, prev):
    if isinstance(new, _SCHEDULE_STATES):
      return prev
    if isinstance(new, _INJECTED_STATES):
      return new._replace(
        count=prev.count,
        hyperparams=prev.hyperparams,
        inner_state=restart_inner_state(new.inner_state, prev.inner_state, num_workers),
        **(
          {"hyperparams_states": prev.hyperparams_states}
          if hasattr(new, "hyperparams_states")
          else {}
        ),
      )
    return _stack(new, num_workers)

  is_node = lambda x: isinstance(x, _SCHEDULE_STATES + _INJECTED_STATES)
  return jax.tree.map(restart, fresh, old, is_leaf=is_node)


def _granules(devices) -> tuple[int, bool]:
  """(number of groups joined by slow links, whether those groups are processes).

  TPU slices (``slice_index``) are joined by the data-centre network, while the hosts of one
  slice share its chip-to-chip links; elsewhere (GPU, CPU) each process (host) is a group.
  """
  if all(hasattr(d, "slice_index") for d in devices):
    return len({d.slice_index for d in devices}), False
  processes = {d.process_index for d in devices}
  return len(processes), len(processes) > 1


def make_mesh(worker_parallelism: int, data_parallelism: int = 1, devices=None) -> Mesh:
  """A ``("worker", "data")`` mesh of exactly ``worker_parallelism x data_parallelism`` devices.

  ``devices`` defaults to ``jax.devices()`` and must hold at least that many; the first ones
  are used (use ``mesh_for_workers`` to use all of them).  The grid comes from jax's mesh
  utilities: across slices or hosts (``mesh_utils.create_hybrid_device_mesh``) the ``worker``
  axis takes the slow links and ``data`` the fast ones inside a slice or host; the ``data``
  axis spans the slow links only when the ``worker`` axis cannot (it is smaller than the number
  of slices or hosts).
  """
  devices = list(jax.devices() if devices is None else devices)
  shape = (worker_parallelism, data_parallelism)
  needed = math.prod(shape)
  if min(shape) < 1 or needed > len(devices):
    raise ValueError(
      f"mesh worker={worker_parallelism} x data={data_parallelism} needs {needed} devices, "
      f"{len(devices)} available"
    )
  devices = devices[:needed]
  granules, process_is_granule = _granules(devices)
  if granules == 1:
    grid = mesh_utils.create_device_mesh(shape, devices, allow_split_physical_axes=True)
  else:
    if worker_parallelism % granules == 0:
      dcn = (granules, 1)
    elif data_parallelism % granules == 0:
      dcn = (1, granules)
    else:
      raise ValueError(
        f"mesh worker={worker_parallelism} x data={data_parallelism} cannot be laid over "
        f"{granules} slices/hosts: one axis must be a multiple of {granules}"
      )
    ici = tuple(n // g for n, g in zip(shape, dcn))
    grid = mesh_utils.create_hybrid_device_mesh(
      ici, dcn, devices, process_is_granule=process_is_granule, allow_split_physical_axes=True
    )
  return Mesh(grid, (WORKER_AXIS, DATA_AXIS))


def mesh_for_workers(num_workers: int, devices=None, data_parallelism: int = 0) -> Mesh:
  """The mesh of K DiLoCo workers over EVERY device of ``devices`` (default ``jax.devices()``).

  ``data_parallelism`` = D devices per worker row (0: automatic).  Automatic: the worker axis
  is W = gcd(K, n) for n devices and D = n / W, so surplus devices split each worker's batch
  (K=4 on 8 devices: 4 x 2; K=3 on 8: 1 x 8, each device runs the 3 workers on 1/8 of their
  batches; K=16 on 8: 8 x 1, two workers per device).  A given D must divide n and n / D must
  divide K; otherwise a ValueError says what to set.
  """
  devices = list(jax.devices() if devices is None else devices)
  n = len(devices)
  if num_workers < 1:
    raise ValueError(f"diloco.num_workers={num_workers} must be >= 1")
  if data_parallelism == 0:
    worker_parallelism = math.gcd(num_workers, n)
    data_parallelism = n // worker_parallelism
  elif n % data_parallelism or num_workers % (n // data_parallelism):
    fits = [d for d in range(1, n + 1) if n % d == 0 and num_workers % (n // d) == 0]
    raise ValueError(
      f"diloco.data_parallelism={data_parallelism} does not lay diloco.num_workers={num_workers} "
      f"workers over all {n} devices (it must divide {n}, and {n} / it must divide "
      f"{num_workers}); set it to one of {fits} or to 0 (automatic)"
    )
  else:
    worker_parallelism = n // data_parallelism
  return make_mesh(worker_parallelism, data_parallelism, devices)


def check_batch_size(name: str, batch_size: int, num_workers: int, mesh: Mesh) -> None:
  """Raises a ValueError naming ``name`` unless ``batch_size`` splits over the mesh.

  The batch is split into K worker batches (K = ``num_workers``; pass the mesh's ``worker``
  size for a batch split over every device, as data parallelism and evaluation do), and each
  worker's rows over the ``data`` axis: every device gets the same number of rows.
  """
  data = mesh.shape[DATA_AXIS]
  if batch_size < 1 or batch_size % (num_workers * data):
    raise ValueError(
      f"{name}={batch_size} must be a positive multiple of {num_workers * data} "
      f"(diloco.num_workers={num_workers} worker batches, each split over the {data} devices "
      f"of the mesh's 'data' axis)"
    )


def place_rows(rows: Any, sharding: NamedSharding, global_shape: tuple[int, ...]) -> jax.Array:
  """A global array of ``global_shape`` from this process's consecutive rows of it.

  With several processes each passes its own block of rows (along the leading axis); a
  process that passes the whole ``global_shape`` (every process the same) places its shards.
  """
  return jax.make_array_from_process_local_data(sharding, np.asarray(rows), global_shape)


class DiLoCo:
  """DiLoCo on a ``("worker", "data")`` mesh: jitted, sharded ``init``/``inner_step``/``outer_sync``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; batch is a dict of arrays with a leading
      batch axis (one worker's rows, or one ``data`` shard of them).
    inner_tx, outer_tx: optax optimizers (``outer_optimizer()`` is the usual outer one).
    num_workers: K, the number of DiLoCo workers.
    mesh: a mesh with axes ``("worker", "data")``; K must be divisible by its ``worker`` size.
    devices, data_parallelism: used when ``mesh`` is None: ``mesh_for_workers(K, devices,
      data_parallelism)``, which uses every device (``data_parallelism`` 0: automatic).
    average: the averager used by ``outer_sync`` (``psum_average`` by default, or
      ``compressed_average(...)``).
    fragments: streaming DiLoCo's fragments (see ``split_into_fragments``); the default is
      one fragment, the whole tree.
    error_feedback: keep per-worker error-feedback buffers in the state (for an averager
      built with ``compressed_average(error_feedback=True)``).

  Sharding of ``DiLoCoState``: ``params``, ``outer_opt_state``, ``step`` replicated;
  ``worker_params``, ``worker_opt_state``, ``error`` split over ``worker`` along their leading K axis
  (``P("worker")``, replicated over ``data``).  Batches have leaves ``[K, B/K, ...]``
  sharded ``P("worker", "data")`` (``shard_batch`` makes them from ``[B, ...]`` rows);
  the ``active`` mask is ``[K]`` sharded ``P("worker")``.  ``inner_step`` and ``outer_sync``
  donate the state.  Nothing is placed on the devices at construction, so the jitted steps
  can be lowered from shapes alone (e.g. for a compile-only TPU topology).
  """

  def __init__(
    self,
    loss_fn: LossFn,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_workers: int,
    mesh: Mesh | None = None,
    *,
    devices=None,
    data_parallelism: int = 0,
    average: Averager = psum_average,
    fragments: "tuple[Fragment, ...]" = (None,),
    error_feedback: bool = False,
  ):
    if mesh is None:
      mesh = mesh_for_workers(num_workers, devices, data_parallelism)
    if tuple(mesh.axis_names) != (WORKER_AXIS, DATA_AXIS):
      raise ValueError(f"mesh axes must be {(WORKER_AXIS, DATA_AXIS)}, got {mesh.axis_names}")
    worker_size = mesh.shape[WORKER_AXIS]
    if num_workers < 1 or num_workers % worker_size:
      raise ValueError(
        f"diloco.num_workers={num_workers} must be a positive multiple of the "
        f"mesh 'worker' axis size {worker_size}"
      )
    self.loss_fn, self.inner_tx, self.outer_tx = loss_fn, inner_tx, outer_tx
    self.num_workers, self.mesh, self.fragments = num_workers, mesh, tuple(fragments)
    self.data_parallelism = mesh.shape[DATA_AXIS]

    def sharding(spec):
      return NamedSharding(mesh, spec)

    self.state_specs = DiLoCoState(
      params=P(),
      outer_opt_state=P(),
      worker_params=P(WORKER_AXIS),
      worker_opt_state=P(WORKER_AXIS),
      error=P(WORKER_AXIS),
      step=P(),
    )
    self.state_sharding = jax.tree.map(sharding, self.state_specs)
    self.batch_sharding = sharding(P(WORKER_AXIS, DATA_AXIS))
    self.active_sharding = sharding(P(WORKER_AXIS))
    self.replicated = sharding(P())
    data_axis = DATA_AXIS if self.data_parallelism > 1 else None

    def local_inner(state, batch):
      return inner_step(state, batch, loss_fn, inner_tx, data_axis)

    def local_outer(state, active, fragment_index):
      state, metrics = outer_sync(
        state, inner_tx, outer_tx, active, WORKER_AXIS, average, self.fragments, fragment_index
      )
      per_worker = {k: v for k, v in metrics.items() if k.startswith("worker_")}
      return state, {k: v for k, v in metrics.items() if k not in per_worker}, per_worker

    sharded_inner = jax.shard_map(
      local_inner,
      mesh=mesh,
      in_specs=(self.state_specs, P(WORKER_AXIS, DATA_AXIS)),
      out_specs=(self.state_specs, P(WORKER_AXIS)),
      check_vma=False,
    )

    def outer_fn(fragment_index):
      sharded_outer = jax.shard_map(
        lambda state, active: local_outer(state, active, fragment_index),
        mesh=mesh,
        in_specs=(self.state_specs, P(WORKER_AXIS)),
        out_specs=(self.state_specs, P(), P(WORKER_AXIS)),
        check_vma=False,
      )

      def sync(state, active):
        state, scalars, per_worker = sharded_outer(state, active)
        return state, {**scalars, **per_worker}

      return jax.jit(
        sync, donate_argnums=0, in_shardings=(self.state_sharding, self.active_sharding)
      )

    self._init = jax.jit(
      lambda params: init(params, inner_tx, outer_tx, num_workers, self.fragments, error_feedback),
      in_shardings=self.replicated,
      out_shardings=self.state_sharding,
    )
    self._inner_step = jax.jit(
      sharded_inner,
      donate_argnums=0,
      in_shardings=(self.state_sharding, self.batch_sharding),
      out_shardings=(self.state_sharding, self.active_sharding),
    )
    self._outer_syncs = tuple(outer_fn(f) for f in range(len(self.fragments)))

  def init(self, params: PyTree) -> DiLoCoState:
    """``init`` on the mesh; ``params`` is a host pytree (the same on every process) or a
    tree of global arrays."""
    params = jax.tree.map(
      lambda x: x if isinstance(x, jax.Array) else place_rows(x, self.replicated, np.shape(x)),
      params,
    )
    return self._init(params)

  def shard_batch(self, batch: dict, global_batch_size: int | None = None) -> dict:
    """Rows ``[B, ...]`` -> ``[K, B/K, ...]`` on the mesh (worker k gets rows
    ``[k B/K, (k+1) B/K)`` of the global batch).

    ``global_batch_size`` None: ``batch`` is the whole global batch (every process passes the
    same one and places its own shards).  Otherwise ``batch`` holds this process's consecutive
    rows of a global batch of that size (processes in order).
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
    rows = sizes.pop()
    global_batch_size = rows if global_batch_size is None else global_batch_size
    check_batch_size("train.batch_size", global_batch_size, self.num_workers, self.mesh)
    k = self.num_workers
    per_worker = global_batch_size // k

    def place(x):
      x = np.asarray(x)
      # This process's rows split into whole workers, or (fewer rows) part of one worker's.
      local = x.reshape((-1, per_worker) + x.shape[1:]) if rows >= per_worker else x[None]
      return place_rows(local, self.batch_sharding, (k, per_worker) + x.shape[1:])

    return jax.tree.map(place, batch)

  def inner_step(self, state: DiLoCoState, batch: dict) -> tuple[DiLoCoState, dict]:
    """One inner step of all K workers (see ``inner_step``); ``batch`` leaves are
    ``[K, B/K, ...]`` (see ``shard_batch``).  Metrics: ``loss``, ``grad_norm``, each ``[K]``."""
    for x in jax.tree.leaves(batch):
      if x.ndim < 2 or x.shape[0] != self.num_workers:
        raise ValueError(
          f"batch leaves must be [diloco.num_workers={self.num_workers}, "
          f"B/K, ...], got shape {x.shape}; use shard_batch"
        )
      check_batch_size("train.batch_size", x.shape[0] * x.shape[1], self.num_workers, self.mesh)
    return self._inner_step(state, batch)

  def outer_sync(
    self, state: DiLoCoState, active: np.ndarray | jax.Array | None = None, fragment_index: int = 0
  ) -> tuple[DiLoCoState, dict]:
    """Outer sync of one fragment (default: the only one) over all K workers (see
    ``outer_sync``); ``active`` is an optional bool ``[K]`` mask.  Metrics: ``pseudograd_norm``, ``num_contributing``, ``sync_bytes``
    (scalars) and ``worker_pseudograd_norm``, ``worker_cosine``, ``worker_contributed``,
    ``worker_opt_state_reset`` (``[K]``)."""
    if not isinstance(active, jax.Array):
      active = np.ones(self.num_workers, bool) if active is None else np.asarray(active, bool)
      if active.shape != (self.num_workers,):
        raise ValueError(f"active must have shape ({self.num_workers},), got {active.shape}")
      active = place_rows(active, self.active_sharding, active.shape)
    return self._outer_syncs[fragment_index](state, active)
