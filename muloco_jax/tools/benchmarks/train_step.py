r"""Train-step benchmark: DP tokens/s and MFU, DiLoCo's inner step, the harness against a bare loop.

  python -m muloco_jax.tools.benchmarks.train_step [--size=small] [--batch_size=8] [--seq_len=128]
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python -m muloco_jax.tools.benchmarks.train_step --workers=1,4   # adds K=4 on a 4-device mesh

Steps are the harness's own (`train.make_loss_fn`, `train.make_optimizer`,
`runtime.DataParallel`, `runtime.DiLoCo`) in `--dtype` compute with float32
Newton-Schulz.  MFU = model FLOPs per token (`model.model_flops_per_token`) x
tokens/s / peak, the peak from `peak.py` (the device's datasheet bf16 figure where
known, else measured with large square matmuls of the compute dtype) times the
number of devices (once on CPU: virtual CPU devices share the host's cores).  An
MFU over 100% raises.

Table 1, the jitted data-parallel step on uniform random tokens of `--vocab_size`,
`--batch_size` sequences per device, for each of `--optimizers`: tokens/s and MFU.

Table 2, for K workers on a K-device mesh with `--batch_size` sequences per
worker: the DiLoCo inner step (all K workers) against the data-parallel step on
the same K devices and global batch K x batch_size, as a tokens/s ratio
(issue 4's target is >= 0.97x; XLA's flop and byte counts of the two compiled
per-device programs give a load-independent check), and the outer sync's time as a share of an
H-step round, sync / (H x inner + sync).  DP and DiLoCo windows alternate so
that drift in a shared machine's speed hits both alike; every figure is the best
of `--repeats` windows (other load on a shared machine only ever adds time).

Tables 3-5 run the training harness on the embedded corpus (KJV, `--tokenizer`,
`--batch_size` x devices sequences) for DP and DiLoCo (K = min(4, devices)) with each optimizer:
`train.train_and_evaluate` for (1 + `--harness_windows`) x `--harness_steps` steps,
logging every `--harness_steps` (the first window compiles).  Then, with the same
config, initial parameters and algorithm, the harness's own batches (its iterator,
`algorithm.place_batch`) are read and placed on the devices beforehand.

Table 3, harness against a bare jitted loop: the harness's `step_time` (with data
loading, metrics and the outer syncs every H steps) against the algorithm's
`train_step` in a Python loop over the same batches in the same order at the same
steps (so the same syncs), both the best of their timed windows.  Issue 11's goal: <= 1.05x.

Table 4, data dependence: the bare step on the corpus's batches against uniform random
tokens of the same shape over the vocabulary, windows alternating, best of
`--harness_windows` each.  A data-dependent cost (e.g. a contended scatter-add in the
embedding gradient) shows here rather than as harness overhead.

Table 5, the input pipeline: tokens/s per host of the iterator plus `place_batch`
(until the placed batch is ready), one batch after another, against the tokens/s per
host the harness's step consumes; a warning when the pipeline is within 3x of it.
"""

import functools
import itertools
import tempfile
import time
from typing import NamedTuple

from absl import app
from absl import flags
import jax
import ml_collections
import numpy as np

from muloco_jax import config as config_lib
from muloco_jax import data as data_lib
from muloco_jax import diloco as diloco_lib
from muloco_jax import metrics as metrics_lib
from muloco_jax import model as model_lib
from muloco_jax import runtime
from muloco_jax import sharding
from muloco_jax import train
from muloco_jax.tools.benchmarks import peak as peak_lib

PIPELINE_MARGIN = 3  # the input pipeline should outrun the step's consumption this many times


def _config(optimizer: str, size: str, dtype: str, seq_len: int) -> ml_collections.ConfigDict:
  c = config_lib.default_config()
  c.model.size = size
  c.model.max_seq_len = max(c.model.max_seq_len, seq_len)
  c.model.dtype = dtype
  c.data.seq_len = seq_len
  c.train.num_steps = 10_000  # only shapes the lr schedule
  c.optimizer.name = optimizer
  c.optimizer.ns_dtype = "float32"
  if optimizer == "muon":
    c.optimizer.learning_rate, c.optimizer.adam_learning_rate = 0.02, 3e-3
  return c


def _uniform_batch(rng: np.random.Generator, rows: int, seq_len: int, vocab: int) -> dict:
  tokens = rng.integers(0, vocab, (rows, seq_len + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


class _Runner:
  """A state and a step function advancing it; `window()` times `steps` steps."""

  def __init__(self, step, state, batch, steps: int):
    self.step, self.state, self.batch, self.steps = step, state, batch, steps
    self.window()  # compile and warm up

  def window(self) -> float:
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(self.steps):
      self.state = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / self.steps


def _interleaved(runners, repeats: int) -> list[float]:
  """Best seconds per step of each runner, their windows taken in turn."""
  times = [[] for _ in runners]
  for _ in range(repeats):
    for t, runner in zip(times, runners):
      t.append(runner.window())
  return [min(t) for t in times]


def _best_seconds(fn, state, repeats: int) -> float:
  state = jax.block_until_ready(fn(state))  # compile
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    state = jax.block_until_ready(fn(state))
    times.append(time.perf_counter() - start)
  return min(times)


def _xla_cost(jitted, *args) -> dict:
  """XLA's cost analysis (flops, bytes accessed) of the compiled per-device program."""
  cost = jitted.lower(*args).compile().cost_analysis()
  return cost[0] if isinstance(cost, list) else cost


# ----------------------------------------------------------------------------
# Tables 3-5: the harness on the corpus, and a bare loop on its batches.


def harness_config(
  optimizer: str,
  num_workers: int,
  *,
  size: str,
  dtype: str,
  batch_size: int,
  seq_len: int,
  tokenizer: str,
  vocab_size: int,
  steps: int,
  windows: int,
  sync_every: int,
) -> ml_collections.ConfigDict:
  """A harness run of (1 + windows) x steps steps logging every `steps` (the first window
  compiles), evaluating and checkpointing only at the end; `batch_size` sequences per device."""
  num_steps = (1 + windows) * steps
  config = _config(optimizer, size, dtype, seq_len)
  config.data.tokenizer, config.data.vocab_size = tokenizer, vocab_size
  config.train.update(
    num_steps=num_steps,
    batch_size=batch_size * jax.device_count(),
    log_every=steps,
    eval_every=num_steps,
    eval_steps=1,
    checkpoint_every=num_steps,
    progress_bar=False,
  )
  config.optimizer.warmup_steps = 1
  config.diloco.update(num_workers=num_workers, sync_every=min(sync_every, steps))
  return config


class HarnessResult(NamedTuple):
  """Seconds per step (best window) and rates of one method on the harness's data."""

  harness: float  # `train_and_evaluate`'s step_time
  bare: float  # the bare loop over the harness's batches
  corpus: float  # the bare loop on corpus batches, alternating with...
  uniform: float  # ... uniform random tokens of the same shape
  pipeline_tokens_per_sec: float  # per host: the iterator plus `place_batch`
  tokens_per_step: int  # global
  flops_per_token: float


def harness_vs_bare_loop(config: ml_collections.ConfigDict, windows: int) -> HarnessResult:
  """Runs `config` (see `harness_config`) in the harness, then its steps in a bare loop."""
  tc = config.train
  steps = tc.log_every
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    records = metrics_lib.read_metrics(workdir)
  harness = min(r["step_time"] for r in records[1:])  # the first window compiles

  # What `train.train_and_evaluate` builds, from the same config.
  data = data_lib.get_dataset(config.data)
  model = train.make_model(config, data.vocab_size)
  init_params = jax.jit(functools.partial(model_lib.init_params, model.config))
  rng = jax.random.key(config.seed)
  algorithm = train.make_algorithm(
    config,
    train.make_loss_fn(model),
    train.make_optimizer(config),
    jax.eval_shape(init_params, rng),
    train.make_mesh(config),
  )
  state = algorithm.init(init_params(rng))
  rows = algorithm.batch_rows(tc.batch_size)  # this host's rows of each global batch
  iterator = data.train_iterator(tc.batch_size, config.seed, rows)

  def next_batch():
    return jax.block_until_ready(algorithm.place_batch(next(iterator), tc.batch_size))

  # The harness's batches, step 1's first; all but the first timed as the input pipeline.
  batches = [next_batch()]
  start = time.perf_counter()
  batches += [next_batch() for _ in range(tc.num_steps - 1)]
  pipeline_seconds = time.perf_counter() - start

  def window(batches, first_step: int) -> float:
    """Seconds per step of the harness's steps `first_step`, ... on `batches`."""
    nonlocal state
    jax.block_until_ready(state)
    start = time.perf_counter()
    for step, batch in enumerate(batches, first_step):
      state = algorithm.train_step(state, batch, step, step == tc.num_steps)[0]
    jax.block_until_ready(state)
    return (time.perf_counter() - start) / len(batches)

  replay = [window(batches[w * steps : (w + 1) * steps], w * steps + 1) for w in range(1 + windows)]
  # Corpus against uniform tokens: the first window's batches and steps (compiled by now).
  uniform_rng = np.random.default_rng(0)
  uniform = [
    algorithm.place_batch(
      _uniform_batch(uniform_rng, len(rows), config.data.seq_len, data.vocab_size), tc.batch_size
    )
    for _ in range(steps)
  ]
  alternating = [(window(batches[:steps], 1), window(uniform, 1)) for _ in range(windows)]
  return HarnessResult(
    harness=harness,
    bare=min(replay[1:]),
    corpus=min(c for c, _ in alternating),
    uniform=min(u for _, u in alternating),
    pipeline_tokens_per_sec=(tc.num_steps - 1) * len(rows) * config.data.seq_len / pipeline_seconds,
    tokens_per_step=tc.batch_size * config.data.seq_len,
    flops_per_token=model_lib.model_flops_per_token(model.config, config.data.seq_len),
  )


def main(argv):
  del argv
  devices = jax.devices()
  peak = peak_lib.peak(_DTYPE.value, devices[0], max_size=_MATMUL_SIZE.value)
  per = "host" if peak.platform == "cpu" else "device"
  model_config = model_lib.model_config(
    _SIZE.value, vocab_size=_VOCAB.value, max_seq_len=max(2048, _SEQ_LEN.value)
  )
  flops_per_token = model_lib.model_flops_per_token(model_config, _SEQ_LEN.value)
  print(
    f"device: {devices[0].device_kind} x{len(devices)} ({devices[0].platform}); model "
    f"{_SIZE.value} ({model_lib.param_count(model_config) / 1e6:.1f}M params, "
    f"{flops_per_token / 1e6:.1f} MFLOP/token); {_DTYPE.value} compute; "
    f"batch {_BATCH.value} x seq {_SEQ_LEN.value} per device/worker; peak "
    f"{peak.flops / 1e12:.4g} TFLOP/s per {per}, {peak.source}",
    flush=True,
  )
  rng = np.random.default_rng(0)
  dp_rows, diloco_rows = [], []
  for optimizer in _OPTIMIZERS.value:
    config = _config(optimizer, _SIZE.value, _DTYPE.value, _SEQ_LEN.value)
    model = train.make_model(config, _VOCAB.value)
    loss_fn = train.make_loss_fn(model)
    tx = train.make_optimizer(config)
    params = jax.jit(lambda key: model_lib.init_params(model.config, key))(jax.random.key(0))
    for k in map(int, _WORKERS.value):
      if k > len(devices):
        print(f"skipping K={k}: only {len(devices)} devices", flush=True)
        continue
      global_batch = _uniform_batch(rng, k * _BATCH.value, _SEQ_LEN.value, _VOCAB.value)
      dp = runtime.DataParallel(loss_fn, tx, sharding.make_mesh(1, k))
      dp_runner = _Runner(
        lambda s, b, dp=dp: dp.train_step(s, b, 0, False)[0],
        dp.init(params),
        dp.place_batch(global_batch, k * _BATCH.value),
        _STEPS.value,
      )
      dl = runtime.DiLoCo(
        loss_fn, tx, diloco_lib.outer_optimizer(), k, mesh=sharding.make_mesh(k, 1)
      )
      dl_runner = _Runner(
        lambda s, b, dl=dl: dl.inner_step(s, b)[0],
        dl.init(params),
        dl.shard_batch(global_batch),
        _STEPS.value,
      )
      t_dp, t_inner = _interleaved((dp_runner, dl_runner), _REPEATS.value)
      dp_cost = _xla_cost(dp._step, dp_runner.state, dp_runner.batch)  # pylint: disable=protected-access
      dl_cost = _xla_cost(dl._inner_step, dl_runner.state, dl_runner.batch)  # pylint: disable=protected-access
      flops_ratio = dl_cost["flops"] / dp_cost["flops"]
      bytes_ratio = dl_cost["bytes accessed"] / dp_cost["bytes accessed"]
      t_sync = _best_seconds(lambda s, dl=dl: dl.outer_sync(s)[0], dl_runner.state, _REPEATS.value)
      tokens = k * _BATCH.value * _SEQ_LEN.value
      mfu = peak_lib.mfu(flops_per_token * tokens / t_dp, peak.of(k), f"DP {optimizer} K={k}")
      dp_rows.append((optimizer, k, t_dp, tokens / t_dp, mfu))
      h = _SYNC_EVERY.value
      diloco_rows.append(
        (
          optimizer,
          k,
          t_dp,
          t_inner,
          t_dp / t_inner,
          flops_ratio,
          bytes_ratio,
          t_sync,
          t_sync / (h * t_inner + t_sync),
        )
      )
      print(
        f"  {optimizer} K={k}: DP {1e3 * t_dp:.1f} ms, DiLoCo inner {1e3 * t_inner:.1f} ms, "
        f"sync {1e3 * t_sync:.1f} ms",
        flush=True,
      )

  harness_rows = []
  if _HARNESS_STEPS.value:
    for optimizer, k in itertools.product(_OPTIMIZERS.value, (0, min(4, len(devices)))):
      config = harness_config(
        optimizer,
        k,
        size=_SIZE.value,
        dtype=_DTYPE.value,
        batch_size=_BATCH.value,
        seq_len=_SEQ_LEN.value,
        tokenizer=_TOKENIZER.value,
        vocab_size=_VOCAB.value,
        steps=_HARNESS_STEPS.value,
        windows=_HARNESS_WINDOWS.value,
        sync_every=_SYNC_EVERY.value,
      )
      method = f"DP {optimizer}" if k == 0 else f"DiLoCo K={k} ({optimizer})"
      harness_rows.append((method, harness_vs_bare_loop(config, _HARNESS_WINDOWS.value)))

  print("\n| optimizer | devices | tokens/step | step (ms) | tokens/s | MFU |")
  print("|---|---|---|---|---|---|")
  for optimizer, k, t, tps, mfu in dp_rows:
    print(
      f"| DP {optimizer} | {k} | {k * _BATCH.value * _SEQ_LEN.value} | {1e3 * t:.1f} | "
      f"{tps:,.0f} | {100 * mfu:.1f}% |"
    )
  print(
    f"\n| inner | K (devices) | DP step (ms) | DiLoCo inner step (ms) | DiLoCo / DP tokens/s "
    f"| XLA flops, bytes DiLoCo / DP | outer sync (ms) | sync share of an "
    f"H={_SYNC_EVERY.value} round |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for optimizer, k, t_dp, t_inner, ratio, flops, bytes_, t_sync, share in diloco_rows:
    print(
      f"| {optimizer} | {k} | {1e3 * t_dp:.1f} | {1e3 * t_inner:.1f} | {ratio:.3f}x | "
      f"{flops:.4f}, {bytes_:.4f} | {1e3 * t_sync:.1f} | {100 * share:.2f}% |"
    )
  if not harness_rows:
    return
  print(
    f"\nHarness on {config.data.name} ({_TOKENIZER.value} tokens), "
    f"{_BATCH.value * len(devices)} x {_SEQ_LEN.value} tokens a step; best of "
    f"{_HARNESS_WINDOWS.value} windows of {_HARNESS_STEPS.value} steps."
  )
  print_harness_tables(harness_rows, peak.of(len(devices)), config.data.name)


def print_harness_tables(rows: list[tuple[str, HarnessResult]], peak_flops: float, corpus: str):
  """Tables 3-5 of (method, result) rows; `peak_flops`: of all the devices the harness uses.
  Raises ValueError for an MFU over 100%."""
  print(
    "\n| method | harness step (ms) | harness tokens/s | harness MFU | bare loop, same batches "
    "(ms) | bare tokens/s | bare MFU | harness / bare (goal <= 1.05x) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  for method, r in rows:
    mfu = {
      name: peak_lib.mfu(r.flops_per_token * r.tokens_per_step / t, peak_flops, f"{method} {name}")
      for name, t in (("harness", r.harness), ("bare loop", r.bare))
    }
    print(
      f"| {method} | {1e3 * r.harness:.1f} | {r.tokens_per_step / r.harness:,.0f} | "
      f"{100 * mfu['harness']:.1f}% | {1e3 * r.bare:.1f} | {r.tokens_per_step / r.bare:,.0f} | "
      f"{100 * mfu['bare loop']:.1f}% | {r.harness / r.bare:.3f}x |"
    )
  print(
    f"\n| method | bare step, {corpus} tokens (ms) | bare step, uniform tokens (ms) | "
    f"{corpus} / uniform (goal <= 1.05x) |"
  )
  print("|---|---|---|---|")
  for method, r in rows:
    print(
      f"| {method} | {1e3 * r.corpus:.1f} | {1e3 * r.uniform:.1f} | {r.corpus / r.uniform:.3f}x |"
    )
  print(
    "\n| method | input pipeline tokens/s per host (iterator + place_batch) | harness step "
    "consumes, tokens/s per host | pipeline / consumption |"
  )
  print("|---|---|---|---|")
  warnings = []
  for method, r in rows:
    consumption = r.tokens_per_step / r.harness / jax.process_count()
    margin = r.pipeline_tokens_per_sec / consumption
    print(f"| {method} | {r.pipeline_tokens_per_sec:,.0f} | {consumption:,.0f} | {margin:.1f}x |")
    if margin < PIPELINE_MARGIN:
      warnings.append(
        f"WARNING: {method}: the input pipeline ({r.pipeline_tokens_per_sec:,.0f} tokens/s per "
        f"host) is within {PIPELINE_MARGIN}x of what the step consumes ({consumption:,.0f}): "
        "it may leave the devices waiting."
      )
  for warning in warnings:
    print(warning)


if __name__ == "__main__":  # flags only here: tests import this module beside other benchmarks
  _SIZE = flags.DEFINE_string("size", "small", "Model preset.")
  _BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per device (DP) and per worker.")
  _SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
  _VOCAB = flags.DEFINE_integer(
    "vocab_size", 4096, "Vocabulary of tables 1-2 and of the harness's BPE (the default BPE's)."
  )
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
  _OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "muon"], "Inner / DP optimizers.")
  _WORKERS = flags.DEFINE_list(
    "workers",
    ["1", "4"],
    "DiLoCo K values (those needing more devices than there are are skipped).",
  )
  _SYNC_EVERY = flags.DEFINE_integer("sync_every", 30, "H, for the sync's share of a round.")
  _STEPS = flags.DEFINE_integer("steps", 1, "Steps per timed window (tables 1-2).")
  _REPEATS = flags.DEFINE_integer("repeats", 12, "Timed windows per measurement (best).")
  _HARNESS_STEPS = flags.DEFINE_integer(
    "harness_steps", 30, "Steps per timed harness window (tables 3-5; 0 skips them)."
  )
  _HARNESS_WINDOWS = flags.DEFINE_integer(
    "harness_windows",
    3,
    "Timed windows of the harness and of the bare loops (best).",
    lower_bound=1,
  )
  _TOKENIZER = flags.DEFINE_enum(
    "tokenizer", "byte", ["byte", "bpe"], "The harness corpus's tokenizer (bpe: --vocab_size)."
  )
  _MATMUL_SIZE = flags.DEFINE_integer(
    "max_matmul_size", 0, "Largest matmul of a measured peak (0: 8192, on CPU 2048)."
  )
  app.run(main)
