"""Training and evaluation: `train_and_evaluate(config, workdir)`.

One loop serves every method: a `muloco_jax.runtime` object owns the mesh, the
jitted step(s) and the state layout.  `runtime.DataParallel` is synchronous data
parallelism (AdamW, Muon or SGD baselines); `runtime.DiLoCo` runs K DiLoCo
workers with an outer sync every H steps (MuLoCo when the inner optimizer is Muon).
"""

from __future__ import annotations

import contextlib
import datetime
import functools
import os
import signal
import sys
import threading
import time
from typing import Any, Callable, NamedTuple

from absl import logging
import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import tqdm
from jax.experimental import multihost_utils

from muloco_jax import checkpoint as checkpoint_lib
from muloco_jax import config as config_lib
from muloco_jax import data as data_lib
from muloco_jax import diloco as diloco_lib
from muloco_jax import layout
from muloco_jax import loss as loss_lib
from muloco_jax import metrics as metrics_lib
from muloco_jax import model as model_lib
from muloco_jax import fragments as fragments_lib
from muloco_jax import optim
from muloco_jax import runtime
from muloco_jax import sharding


# ----------------------------------------------------------------------------
# Model, loss and optimizer from the config.


def make_model(config: ml_collections.ConfigDict, vocab_size: int) -> model_lib.Transformer:
  return model_lib.Transformer(
    model_lib.model_config(
      config.model.size,
      vocab_size=vocab_size,
      max_seq_len=config.model.max_seq_len,
      scan_layers=config.model.scan_layers,
      remat=config.model.remat,
      loss_chunk_len=config.model.loss_chunk_len,
      dtype=jnp.dtype(config.model.dtype),
      **config_lib.model_overrides(config),
    )
  )


def make_loss_fn(model: model_lib.Transformer):
  """Mean next-token cross-entropy (nats per token) of a batch {inputs, targets}, with the
  logits formed `model.config.loss_chunk_len` positions at a time (`loss.chunked_cross_entropy`)."""

  def loss_fn(params, batch):
    hidden, head_kernel = model.apply({"params": params}, batch["inputs"], return_hidden=True)
    return loss_lib.chunked_cross_entropy(
      model.config, hidden, head_kernel, batch["targets"], chunk_len=model.config.loss_chunk_len
    )

  return loss_fn


def make_schedule(opt: ml_collections.ConfigDict, num_steps: int) -> optax.Schedule:
  """Linear warmup to the peak, then cosine decay to `min_lr_ratio` of it."""
  return optax.warmup_cosine_decay_schedule(
    init_value=0.0,
    peak_value=opt.learning_rate,
    warmup_steps=opt.warmup_steps,
    decay_steps=num_steps,
    end_value=opt.learning_rate * opt.min_lr_ratio,
  )


def make_optimizer(config: ml_collections.ConfigDict) -> optax.GradientTransformation:
  """The (inner) optimizer of `config.optimizer`, with clipping and the lr schedule.

  Weight decay is decoupled (p <- p (1 - lr wd), never through momentum or Adam's
  moments) and applies where `layout.matrix_mask` is True (per-layer rank >= 2, so
  scanned and unscanned models decay the same leaves).  With
  `diloco.weight_decay_reference_batch` = R > 0 it is rescaled by the per-worker
  batch, wd * (B / K) / R, as in the paper.  SGD: m <- mu m + g (Nesterov:
  d = g + mu m, else d = m); p <- p - lr (d + wd p).
  """
  opt = config.optimizer
  schedule = make_schedule(opt, config.train.num_steps)
  weight_decay = opt.weight_decay
  if config.diloco.weight_decay_reference_batch:
    per_worker = config.train.batch_size / max(config.diloco.num_workers, 1)
    weight_decay *= per_worker / config.diloco.weight_decay_reference_batch
  if opt.name == "adamw":
    core = optax.adamw(
      schedule,
      b1=opt.b1,
      b2=opt.b2,
      eps=opt.eps,
      weight_decay=weight_decay,
      mask=layout.matrix_mask,
    )
  elif opt.name == "muon":
    adam_lr = None
    if opt.adam_learning_rate:
      adam_opt = ml_collections.ConfigDict(opt.to_dict())
      adam_opt.learning_rate = opt.adam_learning_rate
      adam_lr = make_schedule(adam_opt, config.train.num_steps)
    core = optim.muon(
      schedule,
      beta=opt.momentum,
      nesterov=opt.nesterov,
      weight_decay=weight_decay,
      adam_b1=opt.b1,
      adam_b2=opt.b2,
      adam_eps=opt.eps,
      adam_learning_rate=adam_lr,
      ns_coeffs=opt.ns_schedule,
      ns_steps=opt.ns_steps,
      ns_method=opt.ns_method,
      compute_dtype=jnp.dtype(opt.ns_dtype),
      scale=opt.muon_scale,
      # Newton-Schulz spread over the devices sharding one worker (see `runtime`).
      shard_axis=sharding.FSDP_AXIS,
      param_specs=sharding.fsdp_specs,
    )
  elif opt.name == "sgd":
    core = optax.chain(
      optax.trace(decay=opt.momentum, nesterov=opt.nesterov),
      optax.add_decayed_weights(weight_decay, layout.matrix_mask),
      optax.scale_by_learning_rate(schedule),
    )
  else:
    raise ValueError(f"optimizer.name={opt.name!r} is not one of {config_lib.OPTIMIZERS}.")
  if opt.grad_clip > 0:
    return optax.chain(optax.clip_by_global_norm(opt.grad_clip), core)
  return core


def make_mesh(config: ml_collections.ConfigDict, devices=None) -> jax.sharding.Mesh:
  """The run's ("worker", "fsdp") mesh over every device of `devices` (default: all; see
  `sharding.mesh_for_workers`); raises a ValueError naming `train.batch_size` or
  `train.eval_batch_size` when a batch does not split evenly over it."""
  d, tc = config.diloco, config.train
  names = ("diloco.num_workers", "diloco.fsdp")
  mesh = sharding.mesh_for_workers(d.num_workers, devices, d.fsdp, names=names)
  workers = d.num_workers or mesh.shape[sharding.WORKER_AXIS]
  sharding.check_batch_size("train.batch_size", tc.batch_size, workers, mesh)
  sharding.check_batch_size(
    "train.eval_batch_size",
    tc.eval_batch_size or tc.batch_size,
    mesh.shape[sharding.WORKER_AXIS],
    mesh,
  )
  return mesh


def make_algorithm(config: ml_collections.ConfigDict, loss_fn, tx, param_shapes, mesh):
  """`runtime.DataParallel` (diloco.num_workers = 0) or `runtime.DiLoCo` from the config."""
  d, c = config.diloco, config.compression
  if d.num_workers == 0:
    return runtime.DataParallel(loss_fn, tx, mesh)
  average = None  # the mean
  if c.kind != "none":
    average = diloco_lib.compressed_average(
      config_lib.compression_spec(config),
      error_feedback=c.error_feedback,
      error_decay=c.error_decay,
      exclude=config_lib.EXCLUDE_RULES[c.exclude],
      collective=c.collective,
      requantize_average=c.requantize_average,
      requantize_error_feedback=c.requantize_error_feedback,
      error_feedback_scale=d.outer_lr if c.error_feedback_scale == "outer_lr" else 1.0,
    )
  return runtime.DiLoCo(
    loss_fn,
    tx,
    diloco_lib.outer_optimizer(d.outer_lr, d.outer_momentum, d.outer_nesterov),
    d.num_workers,
    mesh,
    average=average,
    fragments=(
      fragments_lib.split_into_fragments(param_shapes, d.num_fragments)
      if d.num_fragments > 1
      else (None,)
    ),
    sync_every=d.sync_every,
    drops=config_lib.drop_schedule(config),
    overlap_steps=d.overlap_steps,
    mixing=d.mixing,
    adoption=d.adoption,
  )


def sync_schedule(config: ml_collections.ConfigDict, final: bool) -> dict:
  """What a checkpoint records of the sync schedule: with overlap, which exchanges are in flight
  at a step follows from these settings (and the final step settles them all)."""
  d = config.diloco
  return {
    "sync_every": d.sync_every,
    "num_fragments": d.num_fragments,
    "overlap_steps": d.overlap_steps,
    "final": final,
  }


def check_resumable_schedule(saved: dict | None, config: ml_collections.ConfigDict, step: int):
  """Raises a ValueError naming the setting when an overlapped run cannot resume from the
  checkpoint of `step` (saved with the schedule `saved`; None: older checkpoints, no check).

  Between an exchange and its adoption the shared parameters already hold the exchange while
  the workers do not: resuming with another H, F or tau would adopt it at another step or never.
  After the final step everything is settled, and the next step would exchange its sync again.
  """
  now = sync_schedule(config, final=False)
  if saved is None or not (saved["overlap_steps"] or now["overlap_steps"]):
    return
  for key in ("sync_every", "num_fragments", "overlap_steps"):
    if saved[key] != now[key]:
      raise ValueError(
        f"diloco.{key}={now[key]} differs from the {saved[key]} the checkpoint of step {step} was "
        "saved with, and exchanges overlap inner steps (diloco.overlap_steps): set it back, or "
        "start in another workdir"
      )
  if saved["final"] and step < config.train.num_steps:
    raise ValueError(
      f"train.num_steps={config.train.num_steps} extends a run that finished at step {step} "
      "with diloco.overlap_steps > 0, whose final step settled every exchange: start in another "
      "workdir"
    )


def examples_consumed(data_state: dict, saved_config: dict | None, config) -> int:
  """Where a checkpoint's data iterator stands: the examples its run had read, whatever its
  batch size (a run resumed with another `train.batch_size` continues right after them).
  Older checkpoints count batches, of the `train.batch_size` in the config saved beside them
  (`saved_config`; without one, this run's)."""
  if "examples" in data_state:
    return int(data_state["examples"])
  batch_size = (saved_config or {}).get("train.batch_size", config.train.batch_size)
  return int(data_state["step"]) * batch_size


def fetch(tree):
  """Host copies of metric arrays, gathering those split across processes (per-worker ones)."""

  def one(x):
    if isinstance(x, jax.Array) and not x.is_fully_addressable:
      return np.asarray(multihost_utils.process_allgather(x, tiled=True))
    return np.asarray(x)

  return jax.tree.map(one, tree)


def _present(values) -> np.ndarray:
  """The per-worker values of the workers that stepped (a lost worker's value is NaN)."""
  values = np.asarray(values, np.float64)
  return values[~np.isnan(values)]


def _mean_of_present(values) -> float:
  """The mean of `_present(values)`; NaN if no worker stepped."""
  present = _present(values)
  return float(present.mean()) if present.size else float("nan")


def _sync_record(syncs: list[dict]) -> dict:
  """Summary of a step's syncs (host values, one per fragment synced): the last sync's metrics,
  per-worker lists with their mean/spread, and the bytes of all of them."""
  m = dict(syncs[-1])
  losses = np.asarray(m.pop("worker_train_loss"), np.float64)
  cosine = np.asarray(m["worker_cosine"], np.float64)
  present = _present(losses)
  return dict(
    m,
    worker_train_loss=losses,
    worker_train_loss_spread=float(np.ptp(present)) if present.size else float("nan"),
    worker_cosine_mean=np.nanmean(cosine),
    **{key: sum(float(s[key]) for s in syncs) for key in ("sync_bytes", "sync_bytes_per_worker")},
  )


# ----------------------------------------------------------------------------
# Evaluation and the loop.


def make_eval_step(loss_fn, mesh: jax.sharding.Mesh):
  """The jitted loss of the state's parameters on a batch whose rows are split over every
  device.  The parameters take one worker's FSDP layout first (`sharding.like_one_worker`),
  as in training: from the shared layout XLA gathered a scanned model's whole stack at once
  (15b MuLoCo K=2 on a v5p-128: 38 GiB a chip; 2.3 so, under the inner step's 11)."""

  def eval_loss(params, batch):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh):
      return loss_fn(sharding.like_one_worker(params), batch)

  return jax.jit(eval_loss)


def make_evaluate(loss_fn, mesh, data: data_lib.LMData, config: ml_collections.ConfigDict):
  """evaluate(params) -> {eval_loss, eval_perplexity} over train.eval_steps batches."""
  batch_size = config.train.eval_batch_size or config.train.batch_size
  rows = sharding.rows_over_devices(mesh)
  eval_loss = make_eval_step(loss_fn, mesh)

  def evaluate(params):
    iterator = data.eval_iterator(
      batch_size, sharding.rows_held(rows, (batch_size,)), num_steps=config.train.eval_steps
    )
    losses = [
      eval_loss(
        params,
        {k: sharding.place_rows(v, rows, (batch_size,) + v.shape[1:]) for k, v in batch.items()},
      )
      for batch in iterator
    ]
    loss = float(np.mean(jax.device_get(losses)))
    return {"eval_loss": loss, "eval_perplexity": float(np.exp(loss))}

  return evaluate


class Preemption:
  """Turns SIGTERM into a request the loop honours after the current step.

  Every process must stop at the same step, so with several processes the
  request is all-gathered, but only at the steps the loop already waits for
  the device (log and checkpoint steps): a collective every step would stop the
  host from dispatching ahead.
  """

  def __init__(self):
    self._requested = False
    self._previous = None

  def __enter__(self) -> "Preemption":
    if threading.current_thread() is threading.main_thread():
      self._previous = signal.signal(signal.SIGTERM, self._handle)
    return self

  def __exit__(self, *exc) -> None:
    if self._previous is not None:
      signal.signal(signal.SIGTERM, self._previous)

  def _handle(self, signum, frame) -> None:
    del signum, frame
    logging.warning("SIGTERM: saving a checkpoint after the current step, then exiting.")
    self._requested = True

  def requested(self, agree: bool) -> bool:
    """Whether to stop now; with several processes only when `agree` (a step all poll at)."""
    if jax.process_count() == 1:
      return self._requested
    if not agree:
      return False
    return bool(np.any(multihost_utils.process_allgather(np.asarray(self._requested))))


class Console:
  """What a run shows: a tqdm bar on a terminal, otherwise one line every `log_every` steps.

  Only the primary process shows anything; library INFO logs are the launcher's business
  (off unless `--verbosity` asks).
  """

  def __init__(self, tc: ml_collections.ConfigDict, start_step: int, enabled: bool):
    self._total, self._enabled = tc.num_steps, enabled
    self._bar = tqdm.tqdm(
      total=tc.num_steps,
      initial=start_step,
      unit="step",
      dynamic_ncols=True,
      disable=not (tc.progress_bar and enabled and sys.stderr.isatty()),
    )

  def step(self) -> None:
    self._bar.update(1)

  def log(self, step: int, loss: float, step_time: float, tokens_per_sec: float) -> None:
    if not self._bar.disable:
      self._bar.set_postfix(loss=f"{loss:.3f}")
    elif self._enabled:
      eta = datetime.timedelta(seconds=round(step_time * (self._total - step)))
      print(
        f"step {step}/{self._total}  loss {loss:.4f}  {tokens_per_sec:,.0f} tokens/s  ETA {eta}",
        flush=True,
      )

  def close(self) -> None:
    self._bar.close()


class _Run(NamedTuple):
  """A run ready for its first step (`_start_run`)."""

  algorithm: runtime.DataParallel | runtime.DiLoCo
  data: data_lib.LMData
  loss_fn: Callable
  checkpointer: checkpoint_lib.Checkpointer
  state: Any
  iterator: Any  # the training batches, from the examples the run has read
  start_step: int
  comm_bytes_total: float  # the bytes the run's syncs have sent so far
  live_bytes: int  # per device, when the state was the only thing allocated


def _saved_workers(checkpointer: checkpoint_lib.Checkpointer, config) -> int | None:
  """K of the newest checkpoint's state (its workers' parameters' leading axis), when
  `diloco.elastic_resume` asks to resume it with this config's other K; else None."""
  if not (config.diloco.elastic_resume and config.diloco.num_workers):
    return None
  arrays = checkpointer.latest_arrays() or {}
  workers = {shape[0] for name, (shape, _) in arrays.items() if name.startswith("worker_params.")}
  return workers.pop() if len(workers) == 1 and config.diloco.num_workers not in workers else None


def _restore_workers(checkpointer, algorithm, param_shapes, config, saved_workers: int):
  """An elastic restart: the checkpoint restored into the layout of its own K workers (on a
  mesh of this run's devices), then `diloco.with_workers` and this run's layout."""
  then = ml_collections.ConfigDict(config.to_dict())
  then.diloco.update(num_workers=saved_workers, fsdp=0, drop_workers="")
  loss_fn, inner_tx = algorithm.loss_fn, algorithm.inner_tx
  before = make_algorithm(then, loss_fn, inner_tx, param_shapes, make_mesh(then))
  restored = checkpointer.restore_latest(before.abstract_state(param_shapes), then)
  if restored is None:
    return None
  step, state, meta = restored
  resize = functools.partial(
    diloco_lib.with_workers,
    num_workers=config.diloco.num_workers,
    inner_tx=inner_tx,
    average=algorithm.average,
  )
  layout = jax.tree.map(lambda x: x.sharding, algorithm.abstract_state(param_shapes))
  state = jax.device_put(jax.jit(resize)(state), layout)
  logging.warning(
    "Resumed the checkpoint of step %d, saved by %d workers, with %d: every worker restarts "
    "from the shared parameters.",
    step,
    saved_workers,
    config.diloco.num_workers,
  )
  return step, state, meta


def _restore(checkpointer: checkpoint_lib.Checkpointer, algorithm, param_shapes, config):
  """`checkpointer.restore_latest` into the algorithm's state layout, checked for a resumable
  sync schedule; closes the checkpointer when either raises."""
  try:
    # Before anything under the workdir changes: a checkpoint of another state layout (model
    # size, K, optimizer...) raises IncompatibleCheckpointError here, leaving it all in place.
    # Restored straight into the state's layout: no other copy of the state is allocated, so a
    # resume fits wherever training does.
    saved_workers = _saved_workers(checkpointer, config)
    if saved_workers:
      restored = _restore_workers(checkpointer, algorithm, param_shapes, config, saved_workers)
    else:
      restored = checkpointer.restore_latest(algorithm.abstract_state(param_shapes), config)
  except BaseException:
    checkpointer.close()
    raise
  if restored is not None:
    try:
      check_resumable_schedule(restored[2].get("sync_schedule"), config, restored[0])
    except ValueError:
      checkpointer.close()
      raise
  return restored


def _start_run(config: ml_collections.ConfigDict, workdir: str) -> _Run:
  """Validates the config and builds the run: its state restored from WORKDIR's latest good
  checkpoint (the data iterator after the examples that run had read), or initialised."""
  config_lib.validate(config)
  tc = config.train
  mesh = make_mesh(config)
  data = data_lib.get_dataset(config.data)
  model = make_model(config, data.vocab_size)
  loss_fn = make_loss_fn(model)
  tx = make_optimizer(config)
  init_params = functools.partial(model_lib.init_params, model.config)
  rng = jax.random.key(config.seed)
  param_shapes = jax.eval_shape(init_params, rng)
  algorithm = make_algorithm(config, loss_fn, tx, param_shapes, mesh)
  os.makedirs(workdir, exist_ok=True)
  checkpointer = checkpoint_lib.Checkpointer(
    os.path.join(workdir, "checkpoints"),
    tc.keep_checkpoints,
    config_path=os.path.join(workdir, checkpoint_lib.CONFIG_FILE),
  )
  restored = _restore(checkpointer, algorithm, param_shapes, config)
  start_step, comm_bytes_total = 0, 0.0
  if restored is None:
    # Jitted (eager init would compile every op of every layer's initialiser separately), and
    # laid out as the state holds them (not whole on one device).
    state = algorithm.init(jax.jit(init_params, out_shardings=algorithm.init_sharding)(rng))
  else:
    start_step, state, meta = restored
  live_bytes = sharding.live_bytes_per_device()  # the state, restored or initialised, alone
  saved_config = checkpointer.saved_config()  # before this run's replaces it
  checkpointer.write_config(config)
  iterator = data.train_iterator(tc.batch_size, config.seed, algorithm.batch_rows(tc.batch_size))
  if restored is not None:
    iterator.set_state({"examples": examples_consumed(meta["data_iterator"], saved_config, config)})
    comm_bytes_total = meta["comm_bytes_total"]
    logging.info("Resumed from the checkpoint at step %d.", start_step)
  return _Run(
    algorithm,
    data,
    loss_fn,
    checkpointer,
    state,
    iterator,
    start_step,
    comm_bytes_total,
    live_bytes,
  )


class _Records:
  """The run's metric records, written to `metrics.MetricsWriter` (truncated after
  `start_step`), the first one with `first` merged in.

  The records of steps whose device values are not read yet wait in a list: reading them makes
  the host wait for the device, so the loop drains it at log, eval and checkpoint steps only.
  `comm_bytes_total` counts the bytes of every sync read so far.
  """

  def __init__(
    self, workdir: str, start_step: int, enabled: bool, comm_bytes_total: float, first: dict
  ):
    self._writer = metrics_lib.MetricsWriter(workdir, enabled=enabled)
    self._writer.truncate_after(start_step)
    self._first = first
    self._pending: list[tuple[int, dict]] = []
    self.comm_bytes_total = comm_bytes_total

  def add(self, step: int, device_record: dict) -> None:
    if device_record:
      self._pending.append((step, device_record))

  def drain(self, current_step: int | None = None) -> dict:
    """Reads the pending records and writes them, except `current_step`'s, which it returns."""
    current = {}
    for logged_step, device_record in fetch(self._pending):
      host_record = self._host_record(device_record)
      if logged_step == current_step:
        current = host_record
      else:
        self.write(logged_step, host_record)
    self._pending.clear()
    return current

  def _host_record(self, device_record: dict) -> dict:
    host_record = {k: v for k, v in device_record.items() if k != "syncs"}
    if device_record.get("syncs"):
      host_record.update(_sync_record(device_record["syncs"]))
      self.comm_bytes_total += float(host_record["sync_bytes"])
      host_record["comm_bytes_total"] = self.comm_bytes_total
    for name in ("train_loss", "grad_norm"):  # per-worker vectors under DiLoCo, NaN if lost
      if name in host_record:
        host_record[name] = _mean_of_present(host_record[name])
    return host_record

  def write(self, step: int, host_record: dict) -> None:
    self._writer.write(step, {**host_record, **self._first})
    self._first = {}

  def close(self) -> None:
    self._writer.close()


class _Timer:
  """Seconds per step, and tokens per second, over the steps since `restart`."""

  def __init__(self, step: int, tokens_per_step: int):
    self._tokens_per_step = tokens_per_step
    self.restart(step)

  def restart(self, step: int) -> None:
    self._step, self._start = step, time.perf_counter()

  def speed(self, step: int) -> dict:
    step_time = (time.perf_counter() - self._start) / (step - self._step)
    return {"step_time": step_time, "tokens_per_sec": self._tokens_per_step / step_time}


def _save(run: _Run, records: _Records, config, step: int, state, data_state: dict, force: bool):
  """Saves the checkpoint of `step`, with every sync of the steps so far in `comm_bytes_total`."""
  records.drain()
  run.checkpointer.save(
    step,
    state,
    {
      "data_iterator": data_state,
      "comm_bytes_total": records.comm_bytes_total,
      "sync_schedule": sync_schedule(config, final=step == config.train.num_steps),
    },
    force=force,
  )


def _train(config, workdir: str, run: _Run, records: _Records, console: Console, evaluate):
  """Steps from `run.start_step` to train.num_steps, or until every process agrees on a
  preemption; returns (the last logged record, the last step, whether preempted)."""
  tc, algorithm, iterator = config.train, run.algorithm, run.iterator
  schedule = make_schedule(config.optimizer, tc.num_steps)
  # The first step donates run.state's buffers: no second copy of the state stays allocated.
  state, step, record, preempted = run.state, run.start_step, {}, False
  timer = _Timer(run.start_step, tc.batch_size * config.data.seq_len)
  profiled = config_lib.profile_steps(config)
  batch = algorithm.place_batch(next(iterator), tc.batch_size)
  with Preemption() as preemption, contextlib.ExitStack() as cleanup:
    # On any exit, exceptions included: finish the checkpoint saves already started.
    cleanup.callback(records.close)
    cleanup.callback(run.checkpointer.close)
    cleanup.callback(run.checkpointer.wait)
    cleanup.callback(console.close)
    # Open while the profiler records `profiled`: closed after its last step or on any exit.
    tracing = cleanup.enter_context(contextlib.ExitStack())
    for step in range(run.start_step + 1, tc.num_steps + 1):
      final = step == tc.num_steps
      log_step = step % tc.log_every == 0 or final
      eval_step = step % tc.eval_every == 0 or final
      save_step = step % tc.checkpoint_every == 0 or final
      if step == profiled.start:
        jax.block_until_ready(state)  # earlier steps stay out of the trace
        jax.profiler.start_trace(os.path.join(workdir, "profile"), create_perfetto_trace=True)
        tracing.callback(jax.profiler.stop_trace)
      state, metrics, syncs = algorithm.train_step(state, batch, step, final)
      data_state = iterator.get_state()  # the position after this step's batch
      if not final:  # prepare the next batch while the device runs this step
        batch = algorithm.place_batch(next(iterator), tc.batch_size)
      device_record = {"syncs": syncs} if syncs else {}
      if log_step:
        device_record.update(metrics)
      records.add(step, device_record)
      if log_step or eval_step:
        record = records.drain(step)
        if log_step:
          record.update(lr=float(schedule(step - 1)), **timer.speed(step))
          console.log(step, record["train_loss"], record["step_time"], record["tokens_per_sec"])
        if eval_step:
          record.update(evaluate(algorithm.params(state)))
        records.write(step, record)
      preempted = preemption.requested(agree=log_step or save_step)
      if save_step or preempted:
        _save(run, records, config, step, state, data_state, force=preempted)
      if preempted:
        break
      if step == profiled.stop - 1:
        jax.block_until_ready(state)
        tracing.close()  # writes the trace
      if log_step or step == run.start_step + 1:
        jax.block_until_ready(state)  # time the next window without compilation, eval or saves
        timer.restart(step)
      console.step()
  return record, step, preempted


def _print_summary(config, workdir: str, record: dict, step: int, preempted: bool) -> None:
  """The run's last line: where to resume after a preemption, else the final metrics."""
  if jax.process_index() != 0:
    return
  if preempted:
    print(
      f"Preempted: saved the checkpoint of step {step} in {workdir}; run the same command "
      "again to resume.",
      flush=True,
    )
  elif record:
    summary = ", ".join(
      f"{k} {record[k]:.4g}"
      for k in ("train_loss", "eval_loss", "eval_perplexity", "tokens_per_sec")
      if k in record
    )
    print(f"Finished {config.train.num_steps} steps in {workdir}: {summary}", flush=True)


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str) -> dict:
  """Trains (resuming from WORKDIR's latest good checkpoint), evaluates, logs.

  Returns the last logged record (train and eval metrics of the final step).
  """
  run = _start_run(config, workdir)
  primary = jax.process_index() == 0
  # Goes into the first record this run writes.
  first = {
    "state_bytes_per_device": sharding.state_bytes_per_device(run.state),
    "live_bytes_per_device": run.live_bytes,
  }
  records = _Records(workdir, run.start_step, primary, run.comm_bytes_total, first)
  evaluate = make_evaluate(run.loss_fn, run.algorithm.mesh, run.data, config)
  console = Console(config.train, run.start_step, primary)
  record, step, preempted = _train(config, workdir, run, records, console, evaluate)
  _print_summary(config, workdir, record, step, preempted)
  return dict(record, preempted=preempted)
