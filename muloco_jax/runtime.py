"""Methods on a mesh: jitted, sharded steps of data parallelism and of DiLoCo.

Both classes take a loss and optax optimizers, lay their state over a ``("worker", "fsdp")``
mesh (``muloco_jax.sharding``) and offer what the training loop needs: ``init``,
``place_batch``, ``train_step(state, batch, step, final) -> (state, metrics, syncs)``,
``params`` (what is evaluated) and ``programs`` (the jitted functions with abstract arguments,
for compiling ahead of time).  Layouts are built from the parameters' shapes at ``init`` (or
``abstract_state``), so nothing touches a device before then and every program can be lowered
from shapes alone (e.g. for a compile-only TPU topology).

Every traced function runs with the mesh in context, so sharding constraints inside the step
(Muon's all-to-all, the compressed exchange's gather) can name mesh axes.
"""

from __future__ import annotations

import functools
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import optax
from absl import logging
from jax.sharding import Mesh
from jax.sharding import PartitionSpec as P

from muloco_jax import diloco
from muloco_jax import fragments as fragments_lib
from muloco_jax import sharding
from muloco_jax.sharding import FSDP_AXIS, WORKER_AXIS

PyTree = Any


def _on_mesh(mesh: Mesh, fn: Callable) -> Callable:
  """``fn`` traced with ``mesh`` in context (for sharding constraints naming its axes)."""

  @functools.wraps(fn)
  def traced(*args):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return fn(*args)

  return traced


def _jit(mesh: Mesh, fn: Callable, in_shardings, out_shardings, **kwargs) -> Callable:
  """``jax.jit`` of ``fn`` traced on ``mesh`` (``_on_mesh``)."""
  return jax.jit(
    _on_mesh(mesh, fn), in_shardings=in_shardings, out_shardings=out_shardings, **kwargs
  )


def _shapes(tree: PyTree) -> PyTree:
  return jax.tree.map(lambda x: jax.ShapeDtypeStruct(np.shape(x), x.dtype), tree)


def _abstract(shapes: PyTree, shardings: PyTree) -> PyTree:
  return jax.tree.map(
    lambda x, s: jax.ShapeDtypeStruct(x.shape, x.dtype, sharding=s), shapes, shardings
  )


def _place(params: PyTree, shardings: PyTree) -> PyTree:
  """Host arrays (the same on every process) or global arrays -> arrays with ``shardings``."""
  return jax.tree.map(
    lambda x, s: x if isinstance(x, jax.Array) else sharding.place_rows(x, s, np.shape(x)),
    params,
    shardings,
  )


class _Layout:
  """Builds a method's programs once per parameter shapes (lazily, at ``init``)."""

  mesh: Mesh

  def _build(self, param_shapes: PyTree) -> None:
    raise NotImplementedError

  def _ensure_built(self, params: PyTree) -> None:
    shapes = _shapes(params)
    if getattr(self, "_built_for", None) != shapes:
      self._build(shapes)
      self._built_for = shapes

  def abstract_state(self, param_shapes: PyTree) -> PyTree:
    """The state's ``ShapeDtypeStruct``s, with their shardings, for params of these shapes."""
    self._ensure_built(param_shapes)
    return _abstract(jax.eval_shape(self._init, param_shapes), self.state_sharding)

  def init(self, params: PyTree) -> PyTree:
    """The state on the mesh; ``params`` is a host pytree (the same on every process) or a tree
    of global arrays."""
    self._ensure_built(params)
    return self._init(_place(params, self.init_sharding))


class TrainState(NamedTuple):
  """Data-parallel training state."""

  params: Any
  opt_state: Any
  step: jax.Array


class DataParallel(_Layout):
  """Synchronous data parallelism: the gradient of the global batch, every device.

  Parameters and optimizer state are FSDP-sharded over the mesh's ``fsdp`` axis and replicated
  over its ``worker`` axis (plain replicas here); the batch is split over both.
  """

  def __init__(self, loss_fn, tx: optax.GradientTransformation, mesh: Mesh):
    self.mesh, self._tx = mesh, tx
    self._step_fn = diloco.optimizer_step(loss_fn, tx)
    self.batch_sharding = sharding.rows_over_devices(mesh)

  def _build(self, param_shapes):
    mesh, tx = self.mesh, self._tx
    param_specs = sharding.fsdp_specs(param_shapes, mesh.shape[FSDP_AXIS])
    opt_specs = sharding.state_specs(
      jax.eval_shape(tx.init, param_shapes), param_shapes, param_specs
    )
    self.init_sharding = sharding.named(mesh, param_specs)
    self.state_sharding = sharding.named(mesh, TrainState(param_specs, opt_specs, P()))

    def train_step(state, batch):
      params, opt_state, metrics = self._step_fn(state.params, state.opt_state, batch)
      return TrainState(params, opt_state, state.step + 1), {
        "train_loss": metrics["loss"],
        "grad_norm": metrics["grad_norm"],
      }

    self._init = jax.jit(
      lambda p: TrainState(p, tx.init(p), jnp.zeros((), jnp.int32)),
      out_shardings=self.state_sharding,
    )
    self._step = _jit(
      mesh,
      train_step,
      (self.state_sharding, self.batch_sharding),
      (self.state_sharding, jax.NamedSharding(mesh, P())),
      donate_argnums=0,
    )

  def batch_rows(self, global_batch_size: int) -> np.ndarray:
    """The rows of every global batch this process reads: those its devices hold."""
    return sharding.rows_held(self.batch_sharding, (global_batch_size,))

  def place_batch(self, local_batch: dict, global_batch_size: int) -> dict:
    """This process's rows of the global batch (``batch_rows``, or all of them) -> global
    arrays split over every device."""
    return {
      k: sharding.place_rows(v, self.batch_sharding, (global_batch_size,) + v.shape[1:])
      for k, v in local_batch.items()
    }

  def train_step(self, state, batch, step: int, final: bool):
    del step, final
    state, metrics = self._step(state, batch)
    return state, metrics, []

  def programs(self, param_shapes: PyTree, global_batch: dict, num_steps: int = 1) -> dict:
    """{name: (jitted function, abstract arguments)} of every program a run executes: ``init``
    (a fresh run) and ``train_step``; ``global_batch``: ShapeDtypeStructs."""
    del num_steps  # every step runs the same program
    state = self.abstract_state(param_shapes)
    batch = _abstract(global_batch, {n: self.batch_sharding for n in global_batch})
    return {
      "init": (self._init, (_abstract(param_shapes, self.init_sharding),)),
      "train_step": (self._step, (state, batch)),
    }

  @staticmethod
  def params(state):
    return state.params


class DiLoCo(_Layout):
  """K DiLoCo workers on a ``("worker", "fsdp")`` mesh (MuLoCo when the inner optimizer is Muon).

  Each worker runs ``diloco.optimizer_step`` on its own batch; ``inner_step`` vmaps it over the
  leading worker axis (``spmd_axis_name="worker"``), so the per-worker layout is the worker axis
  prepended to one worker's FSDP sharding.  ``outer_sync`` is ``diloco.outer_sync``: it
  averages the pseudogradients into the shared parameters, which each worker row owns 1/W of
  with the mean averager (``sharding.owned_spec``; the workers' parameters move to the owners
  in one all-to-all) and keeps whole with a compressing one (whose packed payloads travel).
  Which fragment syncs at a step is ``fragments.SyncSchedule.at``; lost workers (``drops``) are
  decided in ``train_step``.

  Args:
    loss_fn: ``loss_fn(params, batch) -> scalar``; batch is a dict of arrays with a leading
      batch axis (one worker's rows).
    inner_tx, outer_tx: optax optimizers (``diloco.outer_optimizer()`` is the usual outer one).
    num_workers: K.
    mesh: a ``("worker", "fsdp")`` mesh; K must be divisible by its ``worker`` size.  None:
      ``sharding.mesh_for_workers(K, devices, fsdp)``, which uses every device.
    average: the averager (default ``diloco.mean_average()``, or
      ``diloco.compressed_average(...)``, whose error-feedback buffers it keeps in the state).
    fragments: streaming DiLoCo's fragments (``fragments.split_into_fragments``); default one
      fragment, the whole tree.
    sync_every: H, inner steps between two syncs of a fragment.
    drops: ``(worker, start, end)`` triples: the worker is lost for steps ``[start, end)`` and
      misses the syncs in that window.
    overlap_steps: tau, the authors' ``fragment_sync_delay`` (see ``fragments.SyncSchedule``):
      0 syncs right after the sync step; tau >= 1 runs the exchange (``diloco.exchange``) in
      the same compiled program as the next inner step, which does not depend on it, so XLA
      may overlap its collectives with that step's compute, and the workers adopt the result
      (``diloco.adopt``) tau steps after the sync step.  Must be < ``sync_every``.
    mixing: alpha, the authors' ``fragment_update_alpha``: on adoption
      ``theta_k <- (1 - alpha) theta + alpha theta_k``; 0 takes theta.
    adoption: ``"replace"`` (the above) or ``"keep_progress"``: the worker also keeps the tau
      steps it took since the exchange (``diloco.adopt``; one more copy of the workers'
      parameters in the state).  The same as replacing without overlap.

  Batches have leaves ``[K, B/K, ...]`` sharded ``P("worker", "fsdp")`` (``shard_batch`` makes
  them from rows); ``active`` masks (``[K]`` bools) are replicated: split over ``worker``,
  their broadcast against a leaf split over other axes made the partitioner replicate the
  leaf.  ``inner_step``, ``outer_sync`` and the overlapped step donate the state.
  """

  def __init__(
    self,
    loss_fn: diloco.LossFn,
    inner_tx: optax.GradientTransformation,
    outer_tx: optax.GradientTransformation,
    num_workers: int,
    mesh: Mesh | None = None,
    *,
    devices=None,
    fsdp: int = 0,
    average: diloco.Averager | None = None,
    fragments: "tuple[fragments_lib.Fragment, ...]" = (None,),
    sync_every: int = 30,
    drops: tuple = (),
    overlap_steps: int = 0,
    mixing: float = 0.0,
    adoption: str = "replace",
  ):
    if mesh is None:
      mesh = sharding.mesh_for_workers(num_workers, devices, fsdp)
    if tuple(mesh.axis_names) != sharding.AXES:
      raise ValueError(f"mesh axes must be {sharding.AXES}, got {mesh.axis_names}")
    worker_size = mesh.shape[WORKER_AXIS]
    if num_workers < 1 or num_workers % worker_size:
      raise ValueError(
        f"num_workers={num_workers} must be a positive multiple of the "
        f"mesh 'worker' axis size {worker_size}"
      )
    self.loss_fn, self.inner_tx, self.outer_tx = loss_fn, inner_tx, outer_tx
    self.num_workers, self.mesh, self.fragments = num_workers, mesh, tuple(fragments)
    self.average, self.drops = average or diloco.mean_average(), tuple(drops)
    self.schedule = fragments_lib.SyncSchedule(sync_every, len(self.fragments), overlap_steps)
    if not 0.0 <= mixing <= 1.0:
      raise ValueError(f"mixing={mixing} must be in [0, 1]")
    self.mixing = float(mixing)
    if adoption not in diloco.ADOPTIONS:
      raise ValueError(f"adoption={adoption!r} is not one of {diloco.ADOPTIONS}")
    self.keep_progress = adoption == "keep_progress"
    self._everyone = None  # the placed all-active mask (`_active`)
    self.batch_sharding = jax.NamedSharding(mesh, P(WORKER_AXIS, FSDP_AXIS))
    self.active_sharding = jax.NamedSharding(mesh, P())  # see the class docstring
    self.per_worker_sharding = jax.NamedSharding(mesh, P(WORKER_AXIS))  # [K] outputs

  def _specs(self, param_shapes) -> diloco.DiLoCoState:
    """The state's PartitionSpecs: the worker axis prepended to one worker's FSDP specs; the
    shared parameters and outer states split over the rows too with a coordinatewise averager
    (each row owns 1/W of them), kept whole by every row with a compressing one (which hands
    every row the same decoded average: only packed payloads then cross workers)."""
    mesh, fragments = self.mesh, self.fragments
    worker_specs = sharding.fsdp_specs(param_shapes, mesh.shape[FSDP_AXIS])
    owned = worker_specs
    if self.average.coordinatewise:
      owned = sharding.owned_specs(param_shapes, worker_specs, mesh)
    inner_specs = sharding.state_specs(
      jax.eval_shape(self.inner_tx.init, param_shapes), param_shapes, worker_specs
    )
    outer_specs = tuple(
      sharding.state_specs(
        jax.eval_shape(self.outer_tx.init, fragments_lib.subtree(param_shapes, f)),
        fragments_lib.subtree(param_shapes, f),
        fragments_lib.subtree(owned, f),
      )
      for f in fragments
    )
    stacked = lambda specs: jax.tree.map(
      sharding.per_worker, specs, is_leaf=lambda s: isinstance(s, P)
    )
    average_shapes = jax.eval_shape(
      functools.partial(self.average.init, num_workers=self.num_workers), param_shapes
    )
    return diloco.DiLoCoState(
      params=owned,
      outer_opt_state=outer_specs,
      worker_params=stacked(worker_specs),
      worker_opt_state=stacked(inner_specs),
      average_state=sharding.leading_axis_specs(average_shapes, mesh.shape[FSDP_AXIS]),
      step=P(),
      exchanged_params=stacked(worker_specs) if self.keep_progress else None,
    )

  def _build(self, param_shapes):
    inner_tx, outer_tx, fragments = self.inner_tx, self.outer_tx, self.fragments
    specs = self._specs(param_shapes)
    self.state_sharding = sharding.named(self.mesh, specs)
    self.init_sharding = self.state_sharding.params
    # The mean: the workers' parameters move to the owners of the shared shards (one
    # all-to-all) and the average is local there.  A compressing averager encodes each worker's
    # pseudogradient where it is, and its packed payloads travel.
    to_owners = sharding.named(self.mesh, jax.tree.map(lambda s: P(None, *s), specs.params))

    def regroup(f):
      if not self.average.coordinatewise:
        return None
      target = fragments_lib.subtree(to_owners, fragments[f])
      return lambda worker_params: jax.lax.with_sharding_constraint(worker_params, target)

    def init(params):
      return diloco.init(
        params,
        inner_tx,
        outer_tx,
        self.num_workers,
        fragments,
        self.average,
        keep_progress=self.keep_progress,
      )

    def inner(state, batch, active):
      # Only a run that loses workers masks its steps (a select XLA fuses, moving round-off).
      active = active if self.drops else None
      return diloco.inner_step(
        state, batch, self.loss_fn, inner_tx, active=active, spmd_axis_name=WORKER_AXIS
      )

    def exchange(f, state, active):
      return diloco.exchange(state, outer_tx, active, self.average, fragments, f, regroup(f))

    def adopt(f, state, active):
      return diloco.adopt(state, inner_tx, active, fragments, f, self.mixing)

    def outer(f, state, active):
      sync = functools.partial(diloco.outer_sync, mixing=self.mixing, regroup=regroup(f))
      return sync(state, inner_tx, outer_tx, active, self.average, fragments, f)

    def overlapped(exchanged, adopted, state, batch, active, exchange_active, adopt_active):
      inner_f = lambda state, batch: inner(state, batch, active)
      exchange_f = lambda f, state: exchange(f, state, exchange_active)
      adopt_f = lambda f, state: adopt(f, state, adopt_active)
      return diloco.overlapped_step(state, batch, inner_f, exchange_f, adopt_f, exchanged, adopted)

    state, batch, active = self.state_sharding, self.batch_sharding, self.active_sharding
    per_worker = self.per_worker_sharding
    replicated = jax.NamedSharding(self.mesh, P())
    jit = functools.partial(_jit, self.mesh)
    per_fragment = lambda fn, out: tuple(
      jit(functools.partial(fn, f), (state, active), out, donate_argnums=0)
      for f in range(len(fragments))
    )
    self._init = jax.jit(init, out_shardings=state)
    self._inner_step = jit(inner, (state, batch, active), (state, per_worker), donate_argnums=0)
    self._rejoin = jit(
      lambda state, rejoining: diloco.rejoin(state, inner_tx, rejoining),
      (state, active),
      state,
      donate_argnums=0,
    )
    self._outer_syncs = per_fragment(outer, (state, replicated))
    self._adoptions = per_fragment(adopt, (state, per_worker))
    self._overlapped = jit(
      overlapped,
      (state, batch, active, active, active),
      (state, per_worker, replicated, replicated),  # reset masks replicated, as outer_sync's
      static_argnums=(0, 1),
      donate_argnums=2,
    )

  def programs(
    self, param_shapes: PyTree, global_batch: dict, num_steps: int | None = None
  ) -> dict:
    """{name: (jitted function, abstract arguments)} of every program ``train_step`` runs in
    ``num_steps`` steps (default: a sync period and the final step), and ``init`` (a fresh
    run): ``inner_step`` (a step without syncs), ``outer_sync[f]`` per fragment synced, and with
    overlap each ``overlapped_step[exchange f, adopt g]`` the schedule brings and the final
    step's ``adoption[f]`` (fragment numbers only with several); ``global_batch``:
    ShapeDtypeStructs of ``[B, ...]`` rows."""
    state = self.abstract_state(param_shapes)
    k, schedule = self.num_workers, self.schedule
    batch = _abstract(
      {
        n: jax.ShapeDtypeStruct((k, x.shape[0] // k) + x.shape[1:], x.dtype)
        for n, x in global_batch.items()
      },
      {n: self.batch_sharding for n in global_batch},
    )
    active = jax.ShapeDtypeStruct((k,), jnp.bool_, sharding=self.active_sharding)
    fragment = lambda name, f, form="{}[{}]": (
      name if len(self.fragments) == 1 else form.format(name, f)
    )
    programs = {"init": (self._init, (_abstract(param_shapes, self.init_sharding),))}
    # Every step after the first adoption repeats one H steps earlier: the steps up to then,
    # a period and the final step bring every combination.
    period_end = schedule.sync_every + schedule.overlap_steps + 1
    num_steps = num_steps or period_end
    for step in [*range(1, min(num_steps, period_end)), num_steps]:
      syncs = schedule.at(step, final=step == num_steps)
      if schedule.overlap_steps:
        parts = [fragment("exchange", f, "{} {}") for f in syncs.exchanged]
        parts += [fragment("adopt", f, "{} {}") for f in syncs.adopted]
        name = f"overlapped_step[{', '.join(parts)}]" if parts else "inner_step"
        args = (syncs.exchanged, syncs.adopted, state, batch, active, active, active)
        programs[name] = (self._overlapped, args)
      else:
        programs["inner_step"] = (self._inner_step, (state, batch, active))
      for _, f in syncs.settled:
        programs[fragment("adoption", f)] = (self._adoptions[f], (state, active))
      for f in syncs.synced:
        programs[fragment("outer_sync", f)] = (self._outer_syncs[f], (state, active))
    if self.drops:
      programs["rejoin"] = (self._rejoin, (state, active))
    return programs

  def batch_rows(self, global_batch_size: int) -> np.ndarray:
    """The rows of every global batch this process reads: those its devices hold (worker k's
    row j is row ``k B/K + j``)."""
    k = self.num_workers
    return sharding.rows_held(self.batch_sharding, (k, global_batch_size // k))

  def shard_batch(self, batch: dict, global_batch_size: int | None = None) -> dict:
    """Rows ``[B, ...]`` -> ``[K, B/K, ...]`` on the mesh (worker k gets rows
    ``[k B/K, (k+1) B/K)`` of the global batch).

    ``global_batch_size`` None: ``batch`` is the whole global batch (every process passes the
    same one and places its own shards).  Otherwise ``batch`` holds this process's rows of a
    global batch of that size (``batch_rows``).
    """
    sizes = {np.shape(x)[0] for x in jax.tree.leaves(batch)}
    if len(sizes) != 1:
      raise ValueError(f"batch leaves disagree on the batch size: {sorted(sizes)}")
    global_batch_size = sizes.pop() if global_batch_size is None else global_batch_size
    sharding.check_batch_size("global_batch_size", global_batch_size, self.num_workers, self.mesh)
    k = self.num_workers
    return jax.tree.map(
      lambda x: sharding.place_rows(
        x, self.batch_sharding, (k, global_batch_size // k) + np.shape(x)[1:], row_dims=2
      ),
      batch,
    )

  place_batch = shard_batch

  def inner_step(self, state: diloco.DiLoCoState, batch: dict) -> tuple[diloco.DiLoCoState, dict]:
    """One inner step of all K workers (see ``diloco.inner_step``); ``batch`` leaves are
    ``[K, B/K, ...]`` (see ``shard_batch``).  Metrics: ``loss``, ``grad_norm``, each ``[K]``."""
    for x in jax.tree.leaves(batch):
      if x.ndim < 2 or x.shape[0] != self.num_workers:
        raise ValueError(
          f"batch leaves must be [num_workers={self.num_workers}, "
          f"B/K, ...], got shape {x.shape}; use shard_batch"
        )
      sharding.check_batch_size("batch size", x.shape[0] * x.shape[1], self.num_workers, self.mesh)
    return self._inner_step(state, batch, self._placed(None))

  def outer_sync(
    self, state: diloco.DiLoCoState, active=None, fragment_index: int = 0
  ) -> tuple[diloco.DiLoCoState, dict]:
    """Outer sync of one fragment (default: the only one) over all K workers (see
    ``diloco.outer_sync``); ``active`` is an optional bool ``[K]`` mask.  Metrics:
    ``pseudograd_norm``, ``num_contributing``, ``sync_bytes`` (scalars) and
    ``worker_pseudograd_norm``, ``worker_cosine``, ``worker_contributed``,
    ``worker_opt_state_reset`` (``[K]``)."""
    return self._outer_syncs[fragment_index](state, self._placed(active))

  def _placed(self, active) -> jax.Array:
    """A bool ``[K]`` mask (None: every worker) on the mesh."""
    if isinstance(active, jax.Array):
      return active
    active = np.ones(self.num_workers, bool) if active is None else np.asarray(active, bool)
    if active.shape != (self.num_workers,):
      raise ValueError(f"active must have shape ({self.num_workers},), got {active.shape}")
    if active.all():  # placed once: every step passes a mask
      if self._everyone is None:
        self._everyone = sharding.place_rows(active, self.active_sharding, active.shape)
      return self._everyone
    return sharding.place_rows(active, self.active_sharding, active.shape)

  def active_workers(self, step: int) -> np.ndarray:
    """Bool [K]: the workers not lost at ``step`` (see ``drops``)."""
    active = np.ones(self.num_workers, bool)
    for worker, start, end in self.drops:
      if start <= step < end:
        active[worker] = False
    return active

  def rejoining_workers(self, step: int) -> np.ndarray:
    """Bool [K]: the workers whose loss ends at ``step`` (they rejoin before it)."""
    rejoining = np.zeros(self.num_workers, bool)
    for worker, _, end in self.drops:
      rejoining[worker] |= end == step
    return rejoining & self.active_workers(step)

  def _active(self, step: int, syncing=True, warn=True):
    """The placed ``active`` mask of the workers at sync step ``step`` (everyone when not
    ``syncing``); with ``warn``, logs the lost ones."""
    active = self.active_workers(step) if syncing else np.ones(self.num_workers, bool)
    if warn and not active.all():
      logging.warning(
        "Step %d: workers %s are lost and miss this sync; averaging over the %d survivors.",
        step,
        np.flatnonzero(~active).tolist(),
        active.sum(),
      )
    return self._placed(active)

  def train_step(self, state, batch, step: int, final: bool):
    """The inner step and the syncs of ``step`` (``fragments.SyncSchedule.at``): without
    overlap, the inner step then the syncs due after it; with overlap, one program with the
    inner step, the exchanges of the syncs at ``step - 1`` and the adoptions of those at
    ``step - tau``.  A worker lost at ``step`` (``drops``) takes no inner step and misses the
    syncs; it rejoins (``diloco.rejoin``) before the step its loss ends at.  Per-worker ``[K]``
    metrics stay on the device (NaN for a lost worker); the loop averages them when it logs."""
    tau, syncs = self.schedule.overlap_steps, self.schedule.at(step, final)
    metrics, stepping = [], self._active(step, warn=False)
    rejoining = self.rejoining_workers(step)
    if rejoining.any():
      logging.warning("Step %d: workers %s rejoin.", step, np.flatnonzero(rejoining).tolist())
      state = self._rejoin(state, self._placed(rejoining))
    if tau:
      state, losses, exchanges, reset = self._overlapped(
        syncs.exchanged,
        syncs.adopted,
        state,
        batch,
        stepping,
        self._active(step - 1, bool(syncs.exchanged)),
        self._active(step - tau, bool(syncs.adopted), warn=False),
      )
      metrics = [dict(m, worker_opt_state_reset=reset) for m in exchanges]
    else:
      state, losses = self._inner_step(state, batch, stepping)
    for sync_step, f in syncs.settled:  # nothing may stay in flight at the end
      state, _ = self._adoptions[f](state, self._active(sync_step, warn=False))
    for f in syncs.synced:
      state, sync_metrics = self.outer_sync(state, self._active(step), f)
      metrics.append(sync_metrics)
    step_metrics = {"train_loss": losses["loss"], "grad_norm": losses["grad_norm"]}
    return state, step_metrics, [dict(m, worker_train_loss=losses["loss"]) for m in metrics]

  @staticmethod
  def params(state):
    return state.params
