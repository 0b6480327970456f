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

Layout.  The functions below work on a ``DiLoCoState`` whose per-worker leaves carry a leading
worker axis of size K; ``inner_step`` is one worker's ``optimizer_step`` vmapped over that axis.
They run as they are on one device, or jitted over a mesh (``muloco_jax.runtime.DiLoCo``), where
XLA partitions them from the shardings (``muloco_jax.sharding``): inner steps never communicate
across workers; the averager in ``exchange`` (the first half of ``outer_sync``) is the only
cross-worker traffic.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import optax

from muloco_jax import compression
from muloco_jax import sharding
from muloco_jax.fragments import Fragment, merge, subtree

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]


class Averager(NamedTuple):
  """How workers agree on one pseudogradient, optax style (``mean_average``,
  ``all_gather_average``, ``reduce_scatter_average``).

  ``init(params, num_workers) -> state``: the averager's own state, a NamedTuple of buffers
  (``optax.EmptyState()`` for none; a buffer its settings leave out is None), each a tree with
  the top-level keys of ``params`` (streaming DiLoCo hands ``update`` one fragment's part of
  each) whose leaves all have a leading axis of size K: the worker, or the owner of a chunk,
  that holds that slice (e.g. error-feedback buffers).
  ``update(deltas, contributes, state) -> (delta, state, metrics)``: ``deltas`` has a leading
  worker axis (zero for workers not in C), ``contributes`` is bool ``[workers]``; ``delta`` is
  the agreed average, ``metrics`` scalars.  Streaming DiLoCo passes the subtrees of one fragment.
  ``coordinatewise``: each coordinate of ``delta`` depends on that coordinate of the ``deltas``
  alone (a mean does; a per-row quantizer does not), so a sharded runtime may gather the workers'
  values at the owner of each shard and run ``update`` there.
  """

  init: Callable[[PyTree, int], PyTree]
  update: Callable[[PyTree, jax.Array, PyTree], "tuple[PyTree, PyTree, dict]"]
  coordinatewise: bool = False


class DiLoCoState(NamedTuple):
  """Training state of DiLoCo.

  Attributes:
    params: ``theta_ref``, the shared parameters.
    outer_opt_state: tuple with the outer optimizer state of each fragment (one entry, for
      the whole tree, without streaming).
    worker_params: ``theta_k``, every leaf with a leading worker axis of size K.
    worker_opt_state: inner optimizer state of every worker, leading worker axis of size K.
    average_state: the averager's state (``Averager.init``: a NamedTuple of buffers, e.g. the
      workers' error-feedback buffers ``e_k``, leading worker axis), ``optax.EmptyState()``
      when it keeps none.
    step: int32 number of inner steps taken.
    exchanged_params: with progress-keeping adoption (``init(..., keep_progress=True)``), the
      workers' parameters of each fragment as its last exchange read them (leading worker
      axis); None otherwise.
  """

  params: PyTree
  outer_opt_state: tuple
  worker_params: PyTree
  worker_opt_state: PyTree
  average_state: PyTree
  step: jax.Array
  exchanged_params: PyTree = None


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
      # Reduced over the trailing axes where they are: a reshape to [workers, -1] made the
      # partitioner replicate a leaf split over other axes than its first.
      finite &= jnp.all(jnp.isfinite(x), axis=tuple(range(1, x.ndim)))
  return finite


def _zeros_like(tree: PyTree) -> PyTree:
  return jax.tree.map(jnp.zeros_like, tree)


def _select(pred: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  return jax.tree.map(lambda t, f: jnp.where(pred, t, f), on_true, on_false)


def _select_workers(mask: jax.Array, on_true: PyTree, on_false: PyTree) -> PyTree:
  """Per worker: leaves of ``on_true`` where ``mask[k]`` else ``on_false`` (leading axis k)."""

  def pick(t, f):
    return jnp.where(mask.reshape(mask.shape + (1,) * (t.ndim - 1)), t, f)

  return jax.tree.map(pick, on_true, on_false)


def init(
  params: PyTree,
  inner_tx: optax.GradientTransformation,
  outer_tx: optax.GradientTransformation,
  num_workers: int,
  fragments: "tuple[Fragment, ...]" = (None,),
  average: Averager | None = None,
  keep_progress: bool = False,
) -> DiLoCoState:
  """Start of training: every worker holds ``params`` and a fresh inner optimizer state.

  One outer optimizer state per fragment; the averager's state (default ``mean_average()``:
  none); ``keep_progress``: ``adopt`` keeps the steps taken since the exchange (the state
  then holds ``exchanged_params``, one more copy of the workers' parameters).
  """
  return DiLoCoState(
    params=params,
    outer_opt_state=tuple(outer_tx.init(subtree(params, f)) for f in fragments),
    worker_params=_stack(params, num_workers),
    worker_opt_state=_stack(inner_tx.init(params), num_workers),
    average_state=(average or mean_average()).init(params, num_workers),
    step=jnp.zeros((), jnp.int32),
    exchanged_params=_stack(params, num_workers) if keep_progress else None,
  )


def optimizer_step(loss_fn: LossFn, tx: optax.GradientTransformation) -> Callable:
  """One optimizer step of one model: ``step(params, opt_state, batch)`` returns the new params
  and state and ``{"loss", "grad_norm"}``.  A DiLoCo worker's inner step, and data
  parallelism's whole step."""

  def step(params, opt_state, batch):
    loss, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = tx.update(grads, opt_state, params)
    metrics = {"loss": loss, "grad_norm": optax.tree.norm(grads)}
    return optax.apply_updates(params, updates), opt_state, metrics

  return step


def inner_step(
  state: DiLoCoState,
  batch: dict,
  loss_fn: LossFn,
  inner_tx: optax.GradientTransformation,
  *,
  active: jax.Array | None = None,
  spmd_axis_name: str | None = None,
) -> tuple[DiLoCoState, dict]:
  """One inner optimizer step of every worker on its own batch: ``optimizer_step`` vmapped.

  ``theta_k, s_k <- InnerOpt(theta_k, s_k, g_k)`` with ``g_k = grad loss_fn(theta_k, batch[k])``.
  ``batch`` leaves have shape ``[workers, per-worker batch, ...]``.  ``active``: optional bool
  ``[workers]``; a lost worker (False) takes no step (its parameters and state stay as they
  are; ``rejoin`` restarts it).  ``spmd_axis_name`` is the mesh axis the worker axis is sharded
  over (under ``jax.jit`` on a mesh), so that sharding constraints inside the step (e.g.
  Muon's) apply per worker.  No communication across workers.

  Returns the new state and ``{"loss": [workers], "grad_norm": [workers]}`` (NaN for a lost
  worker: it took no step).
  """
  step = jax.vmap(optimizer_step(loss_fn, inner_tx), spmd_axis_name=spmd_axis_name)
  worker_params, worker_opt_state, metrics = step(
    state.worker_params, state.worker_opt_state, batch
  )
  if active is not None:
    worker_params = _select_workers(active, worker_params, state.worker_params)
    worker_opt_state = _select_workers(active, worker_opt_state, state.worker_opt_state)
    metrics = {k: jnp.where(active, m, jnp.nan) for k, m in metrics.items()}
  state = state._replace(
    worker_params=worker_params, worker_opt_state=worker_opt_state, step=state.step + 1
  )
  return state, metrics


def overlapped_step(
  state: DiLoCoState,
  batch: dict,
  inner: Callable,
  exchange: Callable,
  adopt: Callable,
  exchanged: "tuple[int, ...]",
  adopted: "tuple[int, ...]",
) -> tuple[DiLoCoState, dict, list, jax.Array]:
  """One step with overlap (tau >= 1, ``fragments.SyncSchedule``): the exchanges of the
  fragments ``exchanged`` (synced at the step before), the inner step, then the adoptions of
  the fragments ``adopted`` (synced tau steps before).

  The exchanges read the state as it was after the sync step and the inner step does not wait
  for them: in one compiled program their collectives may overlap its compute.  Their results
  (shared parameters, outer and averager states, which no inner step reads) join the inner
  step's state before the adoptions.  ``inner(state, batch)``, ``exchange(f, state)`` and
  ``adopt(f, state)`` are ``inner_step``, ``exchange`` and ``adopt`` with their other arguments
  bound.  Returns the state, the inner step's metrics, the exchanges' metrics and the bool
  ``[workers]`` mask of the workers the adoptions reset.
  """
  synced, syncs = state, []
  for f in exchanged:
    synced, metrics = exchange(f, synced)
    syncs.append(metrics)
  state, losses = inner(state, batch)
  state = state._replace(
    params=synced.params,
    outer_opt_state=synced.outer_opt_state,
    average_state=synced.average_state,
    exchanged_params=synced.exchanged_params,
  )
  reset = jnp.zeros(jax.tree.leaves(state.worker_params)[0].shape[:1], bool)
  for f in adopted:
    state, adopted_reset = adopt(f, state)
    reset |= adopted_reset
  return state, losses, syncs, reset


def pseudogradient(theta_ref: PyTree, worker_params: PyTree) -> PyTree:
  """``delta_k = theta_ref - theta_k`` for every worker (leading worker axis kept)."""
  return jax.tree.map(lambda ref, w: ref[None] - w, theta_ref, worker_params)


def _count(contributes: jax.Array) -> tuple[jax.Array, jax.Array]:
  """(|C|, max(|C|, 1) as float32) from the bool ``[workers]`` mask."""
  count = jnp.sum(contributes.astype(jnp.int32))
  return count, jnp.maximum(count, 1).astype(jnp.float32)


def _bytes_per_worker(tree: PyTree) -> int:
  """Bytes of one worker's slice of ``tree`` (leaves with a leading worker axis)."""
  return sum(math.prod(x.shape[1:]) * x.dtype.itemsize for x in jax.tree.leaves(tree))


def mean_average() -> Averager:
  """The uncompressed averager: ``delta = sum_{k in C} delta_k / |C|``, no state.

  On a mesh (``runtime.DiLoCo``) the workers' parameters first move to the owners of the
  shared shards (an all-to-all of (K-1)/K of a worker's float32 copy), the sum is local there,
  and the new parameters go back with an all-gather ((K-1)/K again).

  Metrics: ``num_contributing`` = |C| (0: the caller skips the round; ``delta`` is then 0);
  ``sync_bytes`` = K x one worker's pseudogradient bytes (what the workers hand to the
  exchange); ``sync_bytes_per_worker`` = 2 (K-1)/K x those bytes, what one worker sends over its
  link: the all-to-all and the all-gather.
  """

  def update(deltas, contributes, state):
    count, divisor = _count(contributes)
    num_workers = contributes.shape[0]
    delta = jax.tree.map(lambda d: (jnp.sum(d, axis=0) / divisor).astype(d.dtype), deltas)
    payload = _bytes_per_worker(deltas)
    metrics = {
      "num_contributing": count,
      "sync_bytes": jnp.float32(num_workers * payload),
      "sync_bytes_per_worker": jnp.float32(2 * (num_workers - 1) / num_workers * payload),
    }
    return delta, state, metrics

  return Averager(lambda params, num_workers: optax.EmptyState(), update, coordinatewise=True)


COLLECTIVES = ("all_gather", "reduce_scatter")


class ErrorFeedback(NamedTuple):
  """The workers' error feedback (``compression.TreeCodec.feedback``)::

      e_k <- decay e_k + scale delta_k;   c_k = C(e_k);   e_k <- e_k - D(c_k)

  ``scale`` (finite, > 0) is 1 by default; the authors' outer optimizer uses the outer learning
  rate, which then scales the pseudogradient a second time in the outer step.
  """

  decay: float = 0.9
  scale: float = 1.0


class AllGatherAverageState(NamedTuple):
  """``all_gather_average``'s buffers.

  Attributes:
    worker_error: the workers' error-feedback buffers ``e_k``, float32, the parameters' tree
      with a leading worker axis; None without error feedback.
  """

  worker_error: PyTree


class ReduceScatterAverageState(NamedTuple):
  """``reduce_scatter_average``'s buffers.

  Attributes:
    worker_error: the workers' buffers ``e_k``, as in ``AllGatherAverageState``.
    owner_error: the owners' buffers ``r_j``, float32, ``TreeCodec.split_rows`` of the
      parameters into K chunks (leading axis: the owner j of the chunk); None without the
      owners' error feedback.
  """

  worker_error: PyTree
  owner_error: PyTree


def _check_scale(name: str, scale: float) -> None:
  if not (math.isfinite(scale) and scale > 0):
    raise ValueError(f"{name}={scale} must be finite and > 0")


def _check_error_feedback(error_feedback: ErrorFeedback | None) -> None:
  if error_feedback is not None:
    _check_scale("error_feedback.scale", error_feedback.scale)


def _init_worker_error(
  params: PyTree, num_workers: int, error_feedback: ErrorFeedback | None
) -> PyTree:
  """Zero buffers ``e_k`` with a leading worker axis, or None without error feedback."""
  if error_feedback is None:
    return None
  return _stack(compression.init_error(params), num_workers)


def _one_worker_float32(deltas: PyTree) -> PyTree:
  """Shapes of one worker's float32 pseudogradient (``deltas`` has a leading worker axis)."""
  return jax.tree.map(lambda d: jax.ShapeDtypeStruct(d.shape[1:], jnp.float32), deltas)


class _RowChunks(NamedTuple):
  """One worker's trees (shapes ``like``) cut into ``num_chunks`` chunks of rows
  (``TreeCodec.split_rows``), each chunk sent with ``codec`` on its own: payloads and decoded
  chunks carry a leading chunk axis."""

  codec: compression.TreeCodec
  like: PyTree
  num_chunks: int

  def split(self, tree: PyTree) -> PyTree:
    return self.codec.split_rows(tree, self.num_chunks)

  def join(self, chunks: PyTree) -> PyTree:
    return self.codec.join_rows(chunks, self.like)

  def compress(self, x: PyTree) -> PyTree:
    return jax.vmap(self.codec.compress)(self.split(x))

  def feedback(self, error: PyTree, x: PyTree, decay: float) -> tuple[PyTree, PyTree]:
    """``TreeCodec.feedback`` chunk by chunk; the new error joined."""
    feedback = functools.partial(self.codec.feedback, decay=decay)
    payloads, error = jax.vmap(feedback)(self.split(error), self.split(x))
    return payloads, self.join(error)

  def decode(self, payloads: PyTree) -> PyTree:
    """The decoded chunks, not joined."""
    split = jax.eval_shape(self.split, self.like)
    chunk_like = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], x.dtype), split)
    return jax.vmap(lambda payload: self.codec.decompress(payload, chunk_like))(payloads)


def _encode_workers(chunks: _RowChunks, deltas, contributes, worker_error, error_feedback):
  """Every worker k's payload ``c_k`` (leading worker axis), its new buffer and what it
  compressed, ``x_k``.  With ``error_feedback`` ``x_k = decay e_k + scale delta_k;  c_k =
  C(x_k);  e_k <- x_k - D(c_k)`` for the workers in C (the others keep ``e_k``); without
  (``worker_error`` None) ``c_k = C(x_k)`` with ``x_k = delta_k``."""

  def encode(error, delta):
    if error is None:
      return chunks.compress(delta), None
    scaled = jax.tree.map(lambda d: error_feedback.scale * d.astype(jnp.float32), delta)
    return chunks.feedback(error, scaled, error_feedback.decay)

  # Pinned where each step happens, so that only the packed payloads cross workers.
  payloads, new_error = sharding.split_over_workers(jax.vmap(encode)(worker_error, deltas))
  if worker_error is None:
    return payloads, None, deltas
  decay, scale = error_feedback
  sent = jax.tree.map(lambda e, d: decay * e + scale * d.astype(jnp.float32), worker_error, deltas)
  return payloads, _select_workers(contributes, new_error, worker_error), sent


def _contributing_mean(contributes: jax.Array, tree: PyTree) -> PyTree:
  """``sum_{k in C} x_k / max(|C|, 1)`` over the leading axis of every leaf."""
  weights, (_, divisor) = contributes.astype(jnp.float32), _count(contributes)
  return jax.tree.map(lambda x: jnp.tensordot(weights, x, axes=1) / divisor, tree)


def _norm_ratio(numerator: PyTree, denominator: PyTree) -> jax.Array:
  return optax.tree.norm(numerator) / jnp.maximum(optax.tree.norm(denominator), 1e-30)


def _compression_metrics(contributes, sent, decoded, worker_error, payload, per_worker) -> dict:
  """The compressed averagers' metrics (``all_gather_average``) from ``x_k`` (``sent``),
  ``D(C(x_k))`` (``decoded``), the new buffers and the bytes of one worker's payload and of what
  it sends over its link."""
  num_workers = contributes.shape[0]
  count, divisor = _count(contributes)
  mean_over_contributing = lambda x: jnp.sum(jnp.where(contributes, x, 0.0)) / divisor
  error_norm = 0.0
  if worker_error is not None:
    error_norm = jnp.sqrt(jax.vmap(_tree_dot)(worker_error, worker_error))
  return {
    "num_contributing": count,
    "sync_bytes": jnp.float32(num_workers * payload),
    "sync_bytes_per_worker": jnp.float32(per_worker),
    "compression_error": mean_over_contributing(
      jax.vmap(compression.relative_error)(sent, decoded)
    ),
    "compression_norm_ratio": mean_over_contributing(jax.vmap(_norm_ratio)(decoded, sent)),
    "error_buffer_norm": jnp.sum(error_norm) / num_workers,
  }


def all_gather_average(
  codec: compression.TreeCodec,
  *,
  error_feedback: ErrorFeedback | None = ErrorFeedback(),
  requantize_average: bool = False,
) -> Averager:
  """An averager that all-gathers compressed pseudogradients (MuLoCo's 2-8 bit sync).

  Every worker k compresses what it sends with ``codec``, with error feedback (on by default,
  ``ErrorFeedback``): ``e_k <- beta e_k + s delta_k;  c_k = C(e_k);  e_k <- e_k - D(c_k)``;
  without it (None) ``c_k = C(delta_k)``.  A worker left out of the round keeps its buffer
  unchanged.  Then every worker gathers all K packed payloads (uint8 codes and side data, never
  decoded floats), decodes them and averages the contributing ones: ``delta = sum_{k in C}
  D(c_k) / |C|``.  One worker sends K - 1 payloads and decodes K float32 trees.
  ``requantize_average`` applies ``D(C(.))`` to the average once more, as the authors' runs do
  to stand in for a compressed reduce-scatter (``reduce_scatter_average``).

  State: ``AllGatherAverageState(worker_error)``.

  Metrics: ``num_contributing``; ``sync_bytes`` = K x the bytes of one worker's payload;
  ``sync_bytes_per_worker`` = K - 1 payloads, what one worker sends over its link per sync;
  ``compression_error`` = mean over contributing workers of ||x_k - D(C(x_k))|| / ||x_k|| for
  the compressed input x_k (e_k or delta_k); ``compression_norm_ratio``, the same mean of
  ||D(C(x_k))|| / ||x_k|| (how much the compressor alone shrinks the step);
  ``error_buffer_norm`` = mean over workers of ||e_k|| after the step.
  """
  _check_error_feedback(error_feedback)

  def init(params, num_workers):
    return AllGatherAverageState(_init_worker_error(params, num_workers, error_feedback))

  def update(deltas, contributes, state):
    num_workers = contributes.shape[0]
    # The whole tree as one chunk of rows: the encode ``reduce_scatter_average`` runs on K.
    whole = _RowChunks(codec, _one_worker_float32(deltas), 1)
    payloads, worker_error, sent = _encode_workers(
      whole, deltas, contributes, state.worker_error, error_feedback
    )
    decode = jax.vmap(lambda payload: whole.join(whole.decode(payload)))
    decoded = sharding.gather_workers(decode(sharding.gather_workers(payloads)))
    delta = _contributing_mean(contributes, decoded)
    if requantize_average:
      delta = codec.roundtrip(delta)
    payload = compression.payload_nbytes(payloads) // num_workers
    metrics = _compression_metrics(
      contributes, sent, decoded, worker_error, payload, (num_workers - 1) * payload
    )
    return sharding.like_one_worker(delta), AllGatherAverageState(worker_error), metrics

  return Averager(init, update)


def reduce_scatter_average(
  codec: compression.TreeCodec,
  *,
  error_feedback: ErrorFeedback | None = ErrorFeedback(),
  owner_error_decay: float | None = 0.9,
) -> Averager:
  """An averager that reduce-scatters and all-gathers compressed pseudogradients.

  Each tensor's rows are cut into K chunks (``codec.split_rows``; chunk j is owned by worker
  j), and every worker compresses every chunk on its own, with ``error_feedback`` as in
  ``all_gather_average`` (``c_k = C(e_k)`` chunk by chunk).  One all-to-all hands chunk j of
  every payload to worker j, which decodes its K chunks, averages them in float32 (``a_j``),
  compresses the average again, with error feedback of its own unless ``owner_error_decay``
  (``beta``) is None (``r_j <- beta r_j + a_j;  q_j = C(r_j);  r_j <- r_j - D(q_j)``; neither
  the authors' code nor torchft keeps this buffer), and the packed ``q_j`` are all-gathered:
  ``delta = concat_j D(q_j)``.  An owner not in C (a lost worker) holds no buffer: a live
  worker averages its chunk with ``r_j = 0`` and ``r_j`` stays zero until the owner is back.
  One worker sends 2 (K-1)/K payloads and holds one float32 tree of decoded chunks.  With
  per-row statistics every chunk is quantized exactly as in the whole tensor, so without the
  owners' error feedback this is ``all_gather_average`` with ``requantize_average`` (to
  float32 round-off); per-tensor statistics and top-k's k become per chunk (padding rows
  included).

  State: ``ReduceScatterAverageState(worker_error, owner_error)``.

  Metrics: those of ``all_gather_average``, with ``sync_bytes_per_worker`` = (K-1)/K of a
  worker's payload in the all-to-all plus K - 1 re-quantized chunks in the all-gather, and
  ``average_compression_error``, the relative error of the owners' second compression.
  """
  _check_error_feedback(error_feedback)

  def init(params, num_workers):
    owner_error = None
    if owner_error_decay is not None:
      chunks = jax.eval_shape(lambda p: codec.split_rows(p, num_workers), params)
      owner_error = compression.init_error(chunks)
    worker_error = _init_worker_error(params, num_workers, error_feedback)
    return ReduceScatterAverageState(worker_error, owner_error)

  def update(deltas, contributes, state):
    num_workers = contributes.shape[0]
    chunks = _RowChunks(codec, _one_worker_float32(deltas), num_workers)
    payloads, worker_error, sent = _encode_workers(
      chunks, deltas, contributes, state.worker_error, error_feedback
    )
    at_owners = sharding.split_over_workers(payloads, dim=1)
    decoded = sharding.split_over_workers(jax.vmap(chunks.decode)(at_owners), 1)
    average = _contributing_mean(contributes, decoded)
    # An owner not in C (lost) holds no buffer: a live worker averages its chunk, without one,
    # and the chunk's buffer restarts at zero.
    owner_buffer = state.owner_error
    if owner_buffer is not None:
      owner_buffer = _select_workers(contributes, owner_buffer, _zeros_like(owner_buffer))
    owner_feedback = functools.partial(codec.feedback, decay=owner_error_decay)
    owner_payloads, owner_error = jax.vmap(owner_feedback)(owner_buffer, average)
    owner_sent = average
    if owner_error is not None:
      owner_sent = jax.tree.map(lambda r, a: owner_error_decay * r + a, owner_buffer, average)
      owner_error = _select_workers(contributes, owner_error, owner_buffer)
      owner_error = _select(_count(contributes)[0] > 0, owner_error, state.owner_error)
    owner_payloads = sharding.split_over_workers(owner_payloads)
    gathered = chunks.decode(sharding.gather_workers(owner_payloads))
    delta = chunks.join(sharding.gather_workers(gathered))
    # Each worker decodes its own payload (for compression_error).  This decode also anchors
    # the workers' encode on their own rows: computing the error from the EF residual instead
    # let XLA move the residual's arithmetic to the chunk owners and all-to-all float32 back
    # (tests/test_diloco.py's compiled-traffic test catches it).
    own = jax.vmap(lambda payload: chunks.join(chunks.decode(payload)))(payloads)
    payload = compression.payload_nbytes(payloads) // num_workers
    chunk_bytes = compression.payload_nbytes(owner_payloads) / num_workers
    per_worker = (num_workers - 1) / num_workers * payload + (num_workers - 1) * chunk_bytes
    metrics = _compression_metrics(contributes, sent, own, worker_error, payload, per_worker)
    metrics["average_compression_error"] = compression.relative_error(
      owner_sent, chunks.decode(owner_payloads)
    )
    state = ReduceScatterAverageState(worker_error, owner_error)
    return sharding.like_one_worker(delta), state, metrics

  return Averager(init, update)


def compressed_average(
  spec: compression.CompressionSpec,
  *,
  collective: str = "all_gather",
  error_feedback: bool = True,
  error_decay: float = 0.9,
  exclude: compression.ExcludeFn = compression.exclude_vectors,
  requantize_average: bool = False,
  requantize_error_feedback: bool = True,
  error_feedback_scale: float = 1.0,
  row_axis: compression.RowAxisFn = compression.flax_row_axis,
) -> Averager:
  """``all_gather_average`` or ``reduce_scatter_average`` (``collective``, one of
  ``COLLECTIVES``) over ``compression.TreeCodec(spec, exclude, row_axis=row_axis)``: every
  leaf sent with ``spec`` but those ``exclude`` picks (sent in float32), quantizer rows along
  ``row_axis`` (``compression.flax_row_axis``: a kernel's output units).

  ``error_feedback`` turns on the workers' ``ErrorFeedback(error_decay, error_feedback_scale)``;
  ``requantize_error_feedback`` the reduce-scatter owners' error feedback, with the same decay.
  """
  if collective not in COLLECTIVES:
    raise ValueError(f"collective={collective!r} is not one of {COLLECTIVES}")
  _check_scale("error_feedback_scale", error_feedback_scale)
  if error_feedback_scale != 1.0 and not error_feedback:
    raise ValueError(
      f"error_feedback_scale={error_feedback_scale} scales what enters the error-feedback "
      "buffer; with error_feedback=False the pseudogradient is sent unscaled"
    )
  codec = compression.TreeCodec(spec, exclude, row_axis=row_axis)
  workers = ErrorFeedback(error_decay, error_feedback_scale) if error_feedback else None
  if collective == "all_gather":
    return all_gather_average(codec, error_feedback=workers, requantize_average=requantize_average)
  if requantize_average:
    raise ValueError(
      "requantize_average=True simulates a compressed reduce-scatter on top of "
      "collective='all_gather'; collective='reduce_scatter' re-quantizes the average itself"
    )
  owners = error_decay if requantize_error_feedback else None
  return reduce_scatter_average(codec, error_feedback=workers, owner_error_decay=owners)


def compressed_sync_bytes(
  params: PyTree,
  spec: compression.CompressionSpec,
  num_workers: int,
  *,
  collective: str = "all_gather",
  exclude: compression.ExcludeFn = compression.exclude_vectors,
  row_axis: compression.RowAxisFn = compression.flax_row_axis,
) -> dict:
  """Closed form of ``compressed_average``'s traffic for parameters of these shapes.

  ``payload``: bytes of one worker's packed pseudogradient (reduce_scatter: its K chunks, each
  padded to ``ceil(R / K)`` rows and compressed on its own); ``per_worker``: bytes one worker
  sends over its link per sync: all_gather (K-1) payloads, reduce_scatter (K-1)/K of its
  payload in the all-to-all and (K-1) re-quantized chunks (a payload / K each) in the
  all-gather, 2 (K-1)/K payloads in all.
  """
  if collective not in COLLECTIVES:
    raise ValueError(f"collective={collective!r} is not one of {COLLECTIVES}")
  codec = compression.TreeCodec(spec, exclude, row_axis=row_axis)
  chunks = num_workers if collective == "reduce_scatter" else 1
  split = jax.eval_shape(lambda p: codec.split_rows(p, chunks), params)
  one_chunk = jax.tree.map(lambda x: jax.ShapeDtypeStruct(x.shape[1:], jnp.float32), split)
  payload = chunks * codec.nbytes(one_chunk)
  k = num_workers
  per_worker = (k - 1) * payload if chunks == 1 else 2 * (k - 1) / k * payload
  return {"payload": payload, "per_worker": per_worker}


def outer_step(
  theta_ref: PyTree,
  outer_opt_state: PyTree,
  worker_params: PyTree,
  outer_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  average: Averager | None = None,
  average_state: PyTree = optax.EmptyState(),
  regroup: Callable[[PyTree], PyTree] | None = None,
) -> tuple[PyTree, PyTree, PyTree, dict]:
  """Outer optimizer step on any subtree of the parameters (the whole tree, or one fragment).

  ``C = {k : active[k] and delta_k is finite}``; ``delta = average(delta_k, k in C)``;
  ``theta, u = OuterOpt(theta_ref, u, delta)`` if ``C`` is non-empty, else ``theta_ref, u``.

  Args:
    theta_ref: the shared parameters of the subtree.
    outer_opt_state: the outer optimizer state for that subtree.
    worker_params: the same subtree of every worker (leading worker axis).
    outer_tx: the outer optimizer.
    active: optional bool ``[workers]``; ``False`` leaves a worker out of the average.
    average: the averager (default ``mean_average()``, or ``compressed_average(...)``).
    average_state: its state for the subtree (``optax.EmptyState()`` if it keeps none).
    regroup: applied to ``worker_params`` before anything else.  On a mesh it moves them into
      the shared parameters' layout (one all-to-all over workers), so that pseudogradients, their
      average and the outer step are local to the owner of each shard; None: as they are.

  Returns the new ``theta``, outer state, averager state and metrics: the averager's scalars plus
  ``pseudograd_norm`` (norm of ``delta``) and, per worker, ``worker_pseudograd_norm``,
  ``worker_cosine`` (cosine of ``delta_k`` with ``delta``) and ``worker_contributed``.
  """
  if regroup is not None:
    worker_params = regroup(worker_params)
  deltas = pseudogradient(theta_ref, worker_params)
  finite = _workers_all_finite(deltas, jax.tree.leaves(deltas)[0].shape[0])
  contributes = finite if active is None else finite & active
  clean = _select_workers(contributes, deltas, _zeros_like(deltas))
  delta, average_state, metrics = (average or mean_average()).update(
    clean, contributes, average_state
  )

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
  return new_theta, new_outer_state, average_state, metrics


def _map_buffers(fn: Callable, average_state: PyTree, *others: PyTree) -> PyTree:
  """``fn`` applied to each buffer of an averager's state (and the same buffer of ``others``);
  an absent (None) buffer stays None."""
  buffers = zip(average_state, *others)
  return type(average_state)(*(None if b[0] is None else fn(*b) for b in buffers))


def exchange(
  state: DiLoCoState,
  outer_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  average: Averager | None = None,
  fragments: "tuple[Fragment, ...]" = (None,),
  fragment_index: int = 0,
  regroup: Callable[[PyTree], PyTree] | None = None,
) -> tuple[DiLoCoState, dict]:
  """The first half of a sync of one fragment: ``outer_step`` on the workers' current
  parameters, which updates the shared parameters, the outer state and the averager's state.
  The workers' parameters are left as they are (``adopt`` hands them the new theta).  See
  ``outer_step`` for ``active``, ``average``, ``regroup`` (given the fragment's subtree) and
  the metrics.
  """
  fragment = fragments[fragment_index]
  average_state = _map_buffers(lambda buffer: subtree(buffer, fragment), state.average_state)
  theta, fragment_outer_state, average_state, metrics = outer_step(
    subtree(state.params, fragment),
    state.outer_opt_state[fragment_index],
    subtree(state.worker_params, fragment),
    outer_tx,
    active=active,
    average=average,
    average_state=average_state,
    regroup=regroup,
  )
  outer_opt_state = tuple(
    fragment_outer_state if i == fragment_index else s for i, s in enumerate(state.outer_opt_state)
  )
  exchanged_params = state.exchanged_params
  if exchanged_params is not None:  # what adopt measures the progress since from
    exchanged_params = merge(exchanged_params, subtree(state.worker_params, fragment), fragment)
  state = state._replace(
    params=merge(state.params, theta, fragment),
    outer_opt_state=outer_opt_state,
    exchanged_params=exchanged_params,
    average_state=_map_buffers(
      lambda buffer, part: merge(buffer, part, fragment), state.average_state, average_state
    ),
  )
  return state, metrics


# How workers take a synced fragment (``adopt``): the shared parameters in place of their own,
# or the shared parameters plus the steps they took since the exchange.
ADOPTIONS = ("replace", "keep_progress")


def adopt(
  state: DiLoCoState,
  inner_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  fragments: "tuple[Fragment, ...]" = (None,),
  fragment_index: int = 0,
  mixing: float = 0.0,
) -> tuple[DiLoCoState, jax.Array]:
  """The second half of a sync: every worker takes the fragment's shared parameters,
  ``theta_k <- (1 - alpha) theta + alpha theta_k`` with ``alpha = mixing`` (0: theta itself;
  the authors' ``fragment_update_alpha``, torchft's lerp towards the local parameters).  With
  progress-keeping adoption (``state.exchanged_params`` set, ``init(..., keep_progress=True)``)
  the worker keeps the steps it took since the exchange read ``theta_k^x``:
  ``theta_k <- (1 - alpha) (theta + theta_k - theta_k^x) + alpha theta_k`` (the same as
  replacing when the adoption follows the exchange at once).

  A worker whose inner optimizer state or fragment parameters hold a non-finite value, or that
  is inactive (a lost worker comes back without its state), takes theta itself and restarts its
  inner state from ``inner_tx.init(theta)`` with the schedule positions of its old state (see
  ``restart_inner_state``).  Returns the state and that bool ``[workers]`` reset mask.
  """
  fragment = fragments[fragment_index]
  theta, local = subtree(state.params, fragment), subtree(state.worker_params, fragment)
  num_workers = jax.tree.leaves(state.worker_params)[0].shape[0]
  reset = ~_workers_all_finite(state.worker_opt_state, num_workers)
  reset |= ~_workers_all_finite(local, num_workers)
  if active is not None:
    reset |= ~active
  mixed = target = _stack(theta, num_workers)
  if state.exchanged_params is not None:
    since = subtree(state.exchanged_params, fragment)
    target = jax.tree.map(lambda t, w, x: t + (w - x), mixed, local, since)
  if mixing:
    target = jax.tree.map(lambda t, w: (1 - mixing) * t + mixing * w, target, local)
  if target is not mixed:  # a worker to reset takes theta itself
    mixed = _select_workers(reset, mixed, target)
  fresh = restart_inner_state(inner_tx.init(state.params), state.worker_opt_state, num_workers)
  state = state._replace(
    worker_params=merge(state.worker_params, mixed, fragment),
    worker_opt_state=_select_workers(reset, fresh, state.worker_opt_state),
  )
  return state, reset


def rejoin(
  state: DiLoCoState, inner_tx: optax.GradientTransformation, rejoining: jax.Array
) -> DiLoCoState:
  """Workers back from a loss (bool ``[workers]`` mask ``rejoining``) restart from the shared
  parameters: ``theta_k <- theta`` (every fragment), a fresh inner state with the schedule
  positions of the old one (``restart_inner_state``), and their slices of every averager buffer
  (error feedback, a chunk owner's buffer) at zero: what they held was lost with them, never
  replayed.  The others are unchanged."""
  num_workers = rejoining.shape[0]
  shared = _stack(state.params, num_workers)
  fresh = restart_inner_state(inner_tx.init(state.params), state.worker_opt_state, num_workers)
  zero_slices = lambda buffer: _select_workers(rejoining, _zeros_like(buffer), buffer)
  exchanged = state.exchanged_params
  if exchanged is not None:
    exchanged = _select_workers(rejoining, shared, exchanged)
  return state._replace(
    worker_params=_select_workers(rejoining, shared, state.worker_params),
    worker_opt_state=_select_workers(rejoining, fresh, state.worker_opt_state),
    average_state=_map_buffers(zero_slices, state.average_state),
    exchanged_params=exchanged,
  )


def with_workers(
  state: DiLoCoState,
  num_workers: int,
  inner_tx: optax.GradientTransformation,
  average: Averager | None = None,
) -> DiLoCoState:
  """An elastic restart: the state of ``num_workers`` (K') workers that resumes ``state`` (of
  any K).  Carried: the shared parameters, the outer optimizer states and the step.  Every
  worker restarts from the shared parameters with a fresh inner state at the schedule positions
  of worker 0's (the workers share them, ``restart_inner_state``); the averager's buffers
  restart at zero (``average.init``), as does progress-keeping's record.  What the workers did
  since their last sync is dropped: a restart at a sync step loses nothing."""
  first = jax.tree.map(lambda x: x[:1], state.worker_opt_state)
  one = restart_inner_state(inner_tx.init(state.params), first, 1)
  exchanged = None if state.exchanged_params is None else _stack(state.params, num_workers)
  return DiLoCoState(
    params=state.params,
    outer_opt_state=state.outer_opt_state,
    worker_params=_stack(state.params, num_workers),
    worker_opt_state=jax.tree.map(lambda x: _stack(x[0], num_workers), one),
    average_state=(average or mean_average()).init(state.params, num_workers),
    step=state.step,
    exchanged_params=exchanged,
  )


def outer_sync(
  state: DiLoCoState,
  inner_tx: optax.GradientTransformation,
  outer_tx: optax.GradientTransformation,
  active: jax.Array | None = None,
  average: Averager | None = None,
  fragments: "tuple[Fragment, ...]" = (None,),
  fragment_index: int = 0,
  *,
  mixing: float = 0.0,
  regroup: Callable[[PyTree], PyTree] | None = None,
) -> tuple[DiLoCoState, dict]:
  """Sync of one fragment (the whole tree without streaming): ``exchange``, then ``adopt``
  at once (no overlap).  ``step`` is unchanged.  Metrics: ``exchange``'s plus
  ``worker_opt_state_reset``, the ``[workers]`` mask of ``adopt``.
  """
  state, metrics = exchange(state, outer_tx, active, average, fragments, fragment_index, regroup)
  state, reset = adopt(state, inner_tx, active, fragments, fragment_index, mixing)
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
