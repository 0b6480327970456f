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
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from jax.sharding import Mesh, NamedSharding
from jax.sharding import PartitionSpec as P

WORKER_AXIS = "worker"
DATA_AXIS = "data"

PyTree = Any
LossFn = Callable[[PyTree, dict], jax.Array]
# average(deltas, contributes, axis_name) -> (mean delta over all contributing workers, metrics).
Averager = Callable[[PyTree, jax.Array, "str | None"], "tuple[PyTree, dict]"]


class DiLoCoState(NamedTuple):
    """Training state of DiLoCo.

    Attributes:
      params: ``theta_ref``, the shared parameters (replicated).
      outer_opt_state: state of the outer optimizer for ``params`` (replicated).
      worker_params: ``theta_k``, every leaf with a leading worker axis of size K.
      worker_opt_state: inner optimizer state of every worker, leading worker axis of size K.
      step: int32 number of inner steps taken.
    """

    params: PyTree
    outer_opt_state: PyTree
    worker_params: PyTree
    worker_opt_state: PyTree
    step: jax.Array


def outer_optimizer(lr: float = 0.7, momentum: float = 0.9,
                    nesterov: bool = True) -> optax.GradientTransformation:
    """The DiLoCo outer optimizer: SGD with (Nesterov) momentum on the averaged pseudogradient."""
    return optax.sgd(lr, momentum=momentum or None, nesterov=nesterov)


def _stack(tree: PyTree, num: int) -> PyTree:
    return jax.tree.map(lambda x: jnp.broadcast_to(x, (num,) + jnp.shape(x)), tree)


def _tree_dot(a: PyTree, b: PyTree) -> jax.Array:
    return sum(jnp.vdot(x.astype(jnp.float32), y.astype(jnp.float32))
               for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)))


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


def init(params: PyTree, inner_tx: optax.GradientTransformation,
         outer_tx: optax.GradientTransformation, num_workers: int) -> DiLoCoState:
    """Start of training: every worker holds ``params`` and a fresh inner optimizer state."""
    return DiLoCoState(
        params=params,
        outer_opt_state=outer_tx.init(params),
        worker_params=_stack(params, num_workers),
        worker_opt_state=_stack(inner_tx.init(params), num_workers),
        step=jnp.zeros((), jnp.int32),
    )


def inner_step(state: DiLoCoState, batch: dict, loss_fn: LossFn,
               inner_tx: optax.GradientTransformation,
               data_axis: str | None = None) -> tuple[DiLoCoState, dict]:
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
        state.worker_params, state.worker_opt_state, batch)
    state = state._replace(worker_params=worker_params, worker_opt_state=worker_opt_state,
                           step=state.step + 1)
    return state, {"loss": loss, "grad_norm": grad_norm}


def pseudogradient(theta_ref: PyTree, worker_params: PyTree) -> PyTree:
    """``delta_k = theta_ref - theta_k`` for every worker (leading worker axis kept)."""
    return jax.tree.map(lambda ref, w: ref[None] - w, theta_ref, worker_params)


def psum_average(deltas: PyTree, contributes: jax.Array,
                 axis_name: str | None = None) -> tuple[PyTree, dict]:
    """Default averager: ``delta = sum_{k in C} delta_k / |C|`` with one ``psum`` over workers.

    Args:
      deltas: pseudogradients of the local workers (leading local-worker axis), already zero for
        workers that do not contribute.
      contributes: bool ``[local workers]``, which local workers are in ``C``.
      axis_name: mesh axis along which the other workers live (``None``: all workers are local).

    Returns ``(delta, metrics)`` with ``delta`` identical on every worker and scalar metrics:
      ``num_contributing``: ``|C|`` (0 means the caller must skip the round; ``delta`` is then 0).
      ``sync_bytes``: bytes each worker hands to the collective (its pseudogradient leaves, in their
        own dtype, contributing or not) summed over all K workers.  When several workers share a
        device they are summed locally before the collective; that simulation shortcut is not
        counted, nor is the collective's internal traffic (e.g. a ring all-reduce's 2(n-1)/n).
    """
    local_sum = jax.tree.map(lambda d: jnp.sum(d, axis=0), deltas)
    count = jnp.sum(contributes.astype(jnp.int32))
    num_workers = contributes.shape[0]
    if axis_name is not None:
        local_sum, count = jax.lax.psum((local_sum, count), axis_name)
        num_workers *= jax.lax.axis_size(axis_name)
    divisor = jnp.maximum(count, 1)
    delta = jax.tree.map(lambda s: s / divisor.astype(s.dtype), local_sum)
    bytes_per_worker = sum(math.prod(x.shape[1:]) * x.dtype.itemsize
                           for x in jax.tree.leaves(deltas))
    metrics = {"num_contributing": count,
               "sync_bytes": jnp.asarray(float(num_workers * bytes_per_worker), jnp.float32)}
    return delta, metrics


def outer_step(theta_ref: PyTree, outer_opt_state: PyTree, worker_params: PyTree,
               outer_tx: optax.GradientTransformation, active: jax.Array | None = None,
               axis_name: str | None = None,
               average: Averager = psum_average) -> tuple[PyTree, PyTree, dict]:
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
      average: the averager (see ``psum_average``); the hook for compressed averaging.

    Returns the new ``theta``, the new outer state and metrics: the averager's scalars plus
    ``pseudograd_norm`` (norm of ``delta``) and, per local worker, ``worker_pseudograd_norm``,
    ``worker_cosine`` (cosine of ``delta_k`` with ``delta``) and ``worker_contributed``.
    """
    deltas = pseudogradient(theta_ref, worker_params)
    finite = _workers_all_finite(deltas, jax.tree.leaves(deltas)[0].shape[0])
    contributes = finite if active is None else finite & active
    clean = _select_workers(contributes, deltas, jax.tree.map(jnp.zeros_like, deltas))
    delta, metrics = average(clean, contributes, axis_name)

    updates, new_outer_state = outer_tx.update(delta, outer_opt_state, theta_ref)
    new_theta = optax.apply_updates(theta_ref, updates)
    skip = metrics["num_contributing"] == 0
    new_theta = _select(skip, theta_ref, new_theta)
    new_outer_state = _select(skip, outer_opt_state, new_outer_state)

    delta_norm = optax.tree.norm(delta)
    worker_norm = jax.vmap(optax.tree.norm)(deltas)
    worker_dot = jax.vmap(_tree_dot, in_axes=(0, None))(deltas, delta)
    metrics = dict(metrics,
                   pseudograd_norm=delta_norm,
                   worker_pseudograd_norm=worker_norm,
                   worker_cosine=worker_dot / jnp.maximum(worker_norm * delta_norm, 1e-30),
                   worker_contributed=contributes)
    return new_theta, new_outer_state, metrics


def outer_sync(state: DiLoCoState, inner_tx: optax.GradientTransformation,
               outer_tx: optax.GradientTransformation, active: jax.Array | None = None,
               axis_name: str | None = None,
               average: Averager = psum_average) -> tuple[DiLoCoState, dict]:
    """End of a round: ``outer_step`` on all parameters, then every worker restarts from theta.

    Every worker (contributing or not) takes the new ``theta``; a worker keeps its inner optimizer
    state unless that state holds a non-finite value, in which case it is re-initialised with
    ``inner_tx.init(theta)`` (reported as ``worker_opt_state_reset``).  ``step`` is unchanged.
    See ``outer_step`` for ``active``, ``axis_name``, ``average`` and the metrics.
    """
    theta, outer_opt_state, metrics = outer_step(
        state.params, state.outer_opt_state, state.worker_params, outer_tx,
        active=active, axis_name=axis_name, average=average)
    num_local = jax.tree.leaves(state.worker_params)[0].shape[0]
    reset = ~_workers_all_finite(state.worker_opt_state, num_local)
    worker_opt_state = _select_workers(reset, _stack(inner_tx.init(theta), num_local),
                                       state.worker_opt_state)
    state = state._replace(params=theta, outer_opt_state=outer_opt_state,
                           worker_params=_stack(theta, num_local),
                           worker_opt_state=worker_opt_state)
    return state, dict(metrics, worker_opt_state_reset=reset)


def make_mesh(worker_parallelism: int, data_parallelism: int = 1, devices=None) -> Mesh:
    """A ``("worker", "data")`` mesh over the first ``worker_parallelism * data_parallelism``
    devices (default ``jax.devices()``); a worker row holds consecutive devices."""
    devices = list(jax.devices() if devices is None else devices)
    needed = worker_parallelism * data_parallelism
    if needed > len(devices):
        raise ValueError(f"mesh worker={worker_parallelism} x data={data_parallelism} needs "
                         f"{needed} devices, only {len(devices)} available")
    grid = np.asarray(devices[:needed], dtype=object).reshape(worker_parallelism, data_parallelism)
    return Mesh(grid, (WORKER_AXIS, DATA_AXIS))


def _global_array(host: np.ndarray, sharding: NamedSharding) -> jax.Array:
    """A global array from a host array every process holds (each process places its shards)."""
    return jax.make_array_from_callback(host.shape, sharding, lambda index: host[index])


class DiLoCo:
    """DiLoCo on a ``("worker", "data")`` mesh: jitted, sharded ``init``/``inner_step``/``outer_sync``.

    Args:
      loss_fn: ``loss_fn(params, batch) -> scalar``; batch is a dict of arrays with a leading
        batch axis (one worker's rows, or one ``data`` shard of them).
      inner_tx, outer_tx: optax optimizers (``outer_optimizer()`` is the usual outer one).
      num_workers: K, the number of DiLoCo workers.
      mesh: a mesh with axes ``("worker", "data")``; K must be divisible by its ``worker`` size.
      devices, data_parallelism: used when ``mesh`` is None: ``data_parallelism`` devices per
        worker, and the largest worker-axis size W that divides K and fits ``devices``.
      average: the averager used by ``outer_sync`` (``psum_average`` by default).

    Sharding of ``DiLoCoState``: ``params``, ``outer_opt_state``, ``step`` replicated;
    ``worker_params``, ``worker_opt_state`` split over ``worker`` along their leading K axis
    (``P("worker")``, replicated over ``data``).  Batches have leaves ``[K, B/K, ...]``
    sharded ``P("worker", "data")`` (``shard_batch`` makes them from a global ``[B, ...]`` batch);
    the ``active`` mask is ``[K]`` sharded ``P("worker")``.  ``inner_step`` and ``outer_sync``
    donate the state.
    """

    def __init__(self, loss_fn: LossFn, inner_tx: optax.GradientTransformation,
                 outer_tx: optax.GradientTransformation, num_workers: int, mesh: Mesh | None = None,
                 *, devices=None, data_parallelism: int = 1, average: Averager = psum_average):
        if mesh is None:
            devices = list(jax.devices() if devices is None else devices)
            mesh = make_mesh(math.gcd(num_workers, len(devices) // data_parallelism),
                             data_parallelism, devices)
        if tuple(mesh.axis_names) != (WORKER_AXIS, DATA_AXIS):
            raise ValueError(f"mesh axes must be {(WORKER_AXIS, DATA_AXIS)}, got {mesh.axis_names}")
        worker_size = mesh.shape[WORKER_AXIS]
        if num_workers < 1 or num_workers % worker_size:
            raise ValueError(f"diloco.num_workers={num_workers} must be a positive multiple of the "
                             f"mesh 'worker' axis size {worker_size}")
        self.loss_fn, self.inner_tx, self.outer_tx = loss_fn, inner_tx, outer_tx
        self.num_workers, self.mesh = num_workers, mesh
        self.data_parallelism = mesh.shape[DATA_AXIS]

        def sharding(spec):
            return NamedSharding(mesh, spec)

        self.state_specs = DiLoCoState(params=P(), outer_opt_state=P(), worker_params=P(WORKER_AXIS),
                                       worker_opt_state=P(WORKER_AXIS), step=P())
        self.state_sharding = jax.tree.map(sharding, self.state_specs)
        self.batch_sharding = sharding(P(WORKER_AXIS, DATA_AXIS))
        self.active_sharding = sharding(P(WORKER_AXIS))
        self.replicated = sharding(P())
        data_axis = DATA_AXIS if self.data_parallelism > 1 else None

        def local_inner(state, batch):
            return inner_step(state, batch, loss_fn, inner_tx, data_axis)

        def local_outer(state, active):
            state, metrics = outer_sync(state, inner_tx, outer_tx, active, WORKER_AXIS, average)
            per_worker = {k: v for k, v in metrics.items() if k.startswith("worker_")}
            return state, {k: v for k, v in metrics.items() if k not in per_worker}, per_worker

        sharded_inner = jax.shard_map(
            local_inner, mesh=mesh, in_specs=(self.state_specs, P(WORKER_AXIS, DATA_AXIS)),
            out_specs=(self.state_specs, P(WORKER_AXIS)), check_vma=False)
        sharded_outer = jax.shard_map(
            local_outer, mesh=mesh, in_specs=(self.state_specs, P(WORKER_AXIS)),
            out_specs=(self.state_specs, P(), P(WORKER_AXIS)), check_vma=False)

        def outer_fn(state, active):
            state, scalars, per_worker = sharded_outer(state, active)
            return state, {**scalars, **per_worker}

        self._init = jax.jit(lambda params: init(params, inner_tx, outer_tx, num_workers),
                             in_shardings=self.replicated, out_shardings=self.state_sharding)
        self._inner_step = jax.jit(sharded_inner, donate_argnums=0,
                                   in_shardings=(self.state_sharding, self.batch_sharding),
                                   out_shardings=(self.state_sharding, self.active_sharding))
        self._outer_sync = jax.jit(outer_fn, donate_argnums=0,
                                   in_shardings=(self.state_sharding, self.active_sharding))
        self._all_active = _global_array(np.ones(num_workers, bool), self.active_sharding)

    def init(self, params: PyTree) -> DiLoCoState:
        """``init`` on the mesh; ``params`` is a host pytree (the same on every process)."""
        params = jax.tree.map(lambda x: _global_array(np.asarray(x), self.replicated), params)
        return self._init(params)

    def _check_batch_size(self, batch_size: int, per_worker: bool) -> None:
        k, d = self.num_workers, self.data_parallelism
        rows = batch_size if per_worker else batch_size // k
        if not per_worker and batch_size % k:
            raise ValueError(f"train.batch_size={batch_size} must be divisible by "
                             f"diloco.num_workers={k}")
        if rows % d:
            raise ValueError(f"train.batch_size / diloco.num_workers = {rows} rows per worker must "
                             f"be divisible by the mesh 'data' axis size {d}")

    def shard_batch(self, batch: dict) -> dict:
        """Global host batch ``[B, ...]`` -> ``[K, B/K, ...]`` on the mesh (worker k gets rows
        ``[k B/K, (k+1) B/K)``).  Every process passes the same global batch and places only
        its own shards; alternatively build the arrays with ``batch_sharding`` directly."""
        sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
        if len(sizes) != 1:
            raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
        self._check_batch_size(sizes.pop(), per_worker=False)
        k = self.num_workers

        def place(x):
            x = np.asarray(x)
            return _global_array(x.reshape((k, x.shape[0] // k) + x.shape[1:]), self.batch_sharding)
        return jax.tree.map(place, batch)

    def inner_step(self, state: DiLoCoState, batch: dict) -> tuple[DiLoCoState, dict]:
        """One inner step of all K workers (see ``inner_step``); ``batch`` leaves are
        ``[K, B/K, ...]`` (see ``shard_batch``).  Metrics: ``loss``, ``grad_norm``, each ``[K]``."""
        for x in jax.tree.leaves(batch):
            if x.ndim < 2 or x.shape[0] != self.num_workers:
                raise ValueError(f"batch leaves must be [diloco.num_workers={self.num_workers}, "
                                 f"B/K, ...], got shape {x.shape}; use shard_batch")
            self._check_batch_size(x.shape[1], per_worker=True)
        return self._inner_step(state, batch)

    def outer_sync(self, state: DiLoCoState,
                   active: np.ndarray | jax.Array | None = None) -> tuple[DiLoCoState, dict]:
        """Outer sync over all K workers (see ``outer_sync``); ``active`` is an optional bool
        ``[K]`` mask.  Metrics: ``pseudograd_norm``, ``num_contributing``, ``sync_bytes``
        (scalars) and ``worker_pseudograd_norm``, ``worker_cosine``, ``worker_contributed``,
        ``worker_opt_state_reset`` (``[K]``)."""
        if active is None:
            active = self._all_active
        elif not isinstance(active, jax.Array):
            active = np.asarray(active, bool)
            if active.shape != (self.num_workers,):
                raise ValueError(f"active must have shape ({self.num_workers},), got {active.shape}")
            active = _global_array(active, self.active_sharding)
        return self._outer_sync(state, active)
