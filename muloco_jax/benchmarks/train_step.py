r"""Train-step benchmark: data-parallel tokens/s and MFU; DiLoCo inner step against it.

  python -m muloco_jax.benchmarks.train_step [--size=small] [--batch_size=8] [--seq_len=128]
  XLA_FLAGS=--xla_force_host_platform_device_count=4 \
    python -m muloco_jax.benchmarks.train_step --workers=1,4   # adds K=4 on a 4-device mesh

Steps are the harness's own (`train.make_loss_fn`, `train.make_optimizer`,
`train.DataParallel`, `diloco.DiLoCo`) on random tokens, in `--dtype` compute
with float32 Newton-Schulz, for AdamW and Muon.

Table 1, the jitted data-parallel step with `--batch_size` sequences per device:
tokens/s and MFU = model FLOPs per token (`model.model_flops_per_token`) x
tokens/s / peak, where the peak is the matmul rate measured in this run (large
square matmuls of the compute dtype) times
the number of devices (once for CPU: virtual CPU devices share the host's cores).

Table 2, for K workers on a K-device mesh with `--batch_size` sequences per
worker: the DiLoCo inner step (all K workers) against the data-parallel step on
the same K devices and global batch K x batch_size, as a tokens/s ratio
(issue 4's target is >= 0.97x; XLA's flop and byte counts of the two compiled
per-device programs give a load-independent check), and the outer sync's time as a share of an
H-step round, sync / (H x inner + sync).  DP and DiLoCo windows alternate so
that drift in a shared machine's speed hits both alike; every figure is the best
of `--repeats` windows (other load on a shared machine only ever adds time).

Table 3, the training harness against a bare jitted loop, same model and batch:
`train.train_and_evaluate` for 2 x `--harness_steps` steps on the embedded corpus
(byte tokens, `--batch_size` x devices sequences; the harness's own `step_time` of
its second log window, i.e. after compilation, with data loading, metrics and the
outer syncs every H steps) against the same algorithm's steps in a Python loop on
one fixed batch (syncs every H steps too), timed over the same number of steps.
Issue 11's goal: <= 1.05x.
"""

import tempfile
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from muloco_jax import config as config_lib
from muloco_jax import diloco as diloco_lib
from muloco_jax import runtime
from muloco_jax import sharding
from muloco_jax import metrics as metrics_lib
from muloco_jax import model as model_lib
from muloco_jax import train

_SIZE = flags.DEFINE_string("size", "small", "Model preset.")
_BATCH = flags.DEFINE_integer("batch_size", 8, "Sequences per device (DP) and per worker.")
_SEQ_LEN = flags.DEFINE_integer("seq_len", 128, "Tokens per sequence.")
_VOCAB = flags.DEFINE_integer("vocab_size", 4096, "Vocabulary (the default BPE's size).")
_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Compute dtype.")
_OPTIMIZERS = flags.DEFINE_list("optimizers", ["adamw", "muon"], "Inner / DP optimizers.")
_WORKERS = flags.DEFINE_list(
  "workers", ["1", "4"], "DiLoCo K values (those needing more devices than there are are skipped)."
)
_SYNC_EVERY = flags.DEFINE_integer("sync_every", 30, "H, for the sync's share of a round.")
_STEPS = flags.DEFINE_integer("steps", 1, "Steps per timed window.")
_REPEATS = flags.DEFINE_integer("repeats", 12, "Timed windows per measurement (best).")
_HARNESS_STEPS = flags.DEFINE_integer(
  "harness_steps", 30, "Steps per timed harness window (table 3; 0 skips it)."
)


def _config(optimizer: str):
  c = config_lib.default_config()
  c.model.size = _SIZE.value
  c.model.max_seq_len = max(c.model.max_seq_len, _SEQ_LEN.value)
  c.model.dtype = _DTYPE.value
  c.data.seq_len = _SEQ_LEN.value
  c.train.num_steps = 10_000  # only shapes the lr schedule
  c.optimizer.name = optimizer
  c.optimizer.ns_dtype = "float32"
  if optimizer == "muon":
    c.optimizer.learning_rate, c.optimizer.adam_learning_rate = 0.02, 3e-3
  return c


def _batch(rng: np.random.Generator, rows: int) -> dict:
  tokens = rng.integers(0, _VOCAB.value, (rows, _SEQ_LEN.value + 1), dtype=np.int32)
  return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}


class _Runner:
  """A state and a step function advancing it; `window()` times `--steps` steps."""

  def __init__(self, step, state, batch):
    self.step, self.state, self.batch = step, state, batch
    self.window()  # compile and warm up

  def window(self) -> float:
    jax.block_until_ready(self.state)
    start = time.perf_counter()
    for _ in range(_STEPS.value):
      self.state = self.step(self.state, self.batch)
    jax.block_until_ready(self.state)
    return (time.perf_counter() - start) / _STEPS.value


def _interleaved(*runners) -> list[float]:
  """Best seconds per step of each runner, their windows taken in turn."""
  times = [[] for _ in runners]
  for _ in range(_REPEATS.value):
    for t, runner in zip(times, runners):
      t.append(runner.window())
  return [min(t) for t in times]


def _best_seconds(fn, state, repeats):
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


def matmul_rate(dtype, repeats: int) -> float:
  """Best measured flop/s of a square matmul (sizes 512..2048) on the default device.

  A simpler probe than newton_schulz.py's floor (one call at a time, so it can
  read low on a shared machine, which only raises the MFU reported here).
  """
  best = 0.0
  matmul = jax.jit(lambda x: x @ x)
  for n in (512, 1024, 2048):
    a = jnp.ones((n, n), dtype)
    jax.block_until_ready(matmul(a))
    times = []
    for _ in range(repeats):
      start = time.perf_counter()
      jax.block_until_ready(matmul(a))
      times.append(time.perf_counter() - start)
    best = max(best, 2 * n**3 / min(times))
  return best


def harness_vs_bare_loop(optimizer: str, num_workers: int) -> tuple[float, float]:
  """(harness seconds/step, bare loop seconds/step) over `--harness_steps` steps."""
  steps, devices = _HARNESS_STEPS.value, jax.device_count()
  config = _config(optimizer)
  config.data.tokenizer = "byte"
  config.train.update(
    num_steps=2 * steps,
    batch_size=_BATCH.value * devices,
    log_every=steps,
    eval_every=2 * steps,
    eval_steps=1,
    checkpoint_every=2 * steps,
    progress_bar=False,
  )
  config.optimizer.warmup_steps = 1
  config.diloco.update(num_workers=num_workers, sync_every=min(_SYNC_EVERY.value, steps))
  with tempfile.TemporaryDirectory() as workdir:
    train.train_and_evaluate(config, workdir)
    harness = metrics_lib.read_metrics(workdir)[-1]["step_time"]

  vocab = 257  # byte tokens
  mesh = train.make_mesh(config)
  model = train.make_model(config, vocab)
  params = jax.jit(lambda key: model_lib.init_params(model.config, key))(jax.random.key(0))
  algorithm = train.make_algorithm(
    config, train.make_loss_fn(model), train.make_optimizer(config), params, mesh
  )
  tokens = np.random.default_rng(0).integers(
    0, vocab, (config.train.batch_size, _SEQ_LEN.value + 1)
  )
  batch = algorithm.place_batch(
    {"inputs": tokens[:, :-1].astype(np.int32), "targets": tokens[:, 1:].astype(np.int32)},
    config.train.batch_size,
  )
  state = algorithm.init(params)

  def run(state, first_step):
    for step in range(first_step, first_step + steps):
      state = algorithm.train_step(state, batch, step, final=False)[0]
    return jax.block_until_ready(state)

  state = run(state, 1)  # compile, as the harness's first window does
  start = time.perf_counter()
  run(state, steps + 1)
  return harness, (time.perf_counter() - start) / steps


def main(argv):
  del argv
  devices = jax.devices()
  rate = matmul_rate(jnp.dtype(_DTYPE.value), repeats=5)
  model_config = model_lib.model_config(
    _SIZE.value, vocab_size=_VOCAB.value, max_seq_len=max(2048, _SEQ_LEN.value)
  )
  flops_per_token = model_lib.model_flops_per_token(model_config, _SEQ_LEN.value)
  print(
    f"device: {devices[0].device_kind} x{len(devices)} ({devices[0].platform}); model "
    f"{_SIZE.value} ({model_lib.param_count(model_config) / 1e6:.1f}M params, "
    f"{flops_per_token / 1e6:.1f} MFLOP/token); {_DTYPE.value} compute; "
    f"batch {_BATCH.value} x seq {_SEQ_LEN.value} per device/worker; measured "
    f"{_DTYPE.value} matmul rate {rate / 1e9:.1f} GFLOP/s",
    flush=True,
  )
  per_host_peak = 1 if devices[0].platform == "cpu" else None
  rng = np.random.default_rng(0)
  dp_rows, diloco_rows = [], []
  for optimizer in _OPTIMIZERS.value:
    config = _config(optimizer)
    model = train.make_model(config, _VOCAB.value)
    loss_fn = train.make_loss_fn(model)
    tx = train.make_optimizer(config)
    params = jax.jit(lambda key: model_lib.init_params(model.config, key))(jax.random.key(0))
    for k in map(int, _WORKERS.value):
      if k > len(devices):
        print(f"skipping K={k}: only {len(devices)} devices", flush=True)
        continue
      global_batch = _batch(rng, k * _BATCH.value)
      dp = runtime.DataParallel(loss_fn, tx, sharding.make_mesh(1, k))
      dp_runner = _Runner(
        lambda s, b, dp=dp: dp.train_step(s, b, 0, False)[0],
        dp.init(params),
        dp.place_batch(global_batch, k * _BATCH.value),
      )
      dl = runtime.DiLoCo(
        loss_fn, tx, diloco_lib.outer_optimizer(), k, mesh=sharding.make_mesh(k, 1)
      )
      dl_runner = _Runner(
        lambda s, b, dl=dl: dl.inner_step(s, b)[0], dl.init(params), dl.shard_batch(global_batch)
      )
      t_dp, t_inner = _interleaved(dp_runner, dl_runner)
      dp_cost = _xla_cost(dp._step, dp_runner.state, dp_runner.batch)  # pylint: disable=protected-access
      dl_cost = _xla_cost(dl._inner_step, dl_runner.state, dl_runner.batch)  # pylint: disable=protected-access
      flops_ratio = dl_cost["flops"] / dp_cost["flops"]
      bytes_ratio = dl_cost["bytes accessed"] / dp_cost["bytes accessed"]
      t_sync = _best_seconds(lambda s, dl=dl: dl.outer_sync(s)[0], dl_runner.state, _REPEATS.value)
      tokens = k * _BATCH.value * _SEQ_LEN.value
      peak = rate * (per_host_peak or k)
      dp_rows.append((optimizer, k, t_dp, tokens / t_dp, flops_per_token * tokens / t_dp / peak))
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
    for optimizer, k in (("muon", 0), ("muon", min(4, len(devices)))):
      harness_rows.append((optimizer, k, *harness_vs_bare_loop(optimizer, k)))

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

  if harness_rows:
    print(
      "\n| method | harness step (ms) | bare jitted loop step (ms) | harness / bare "
      "(goal <= 1.05x) |"
    )
    print("|---|---|---|---|")
    for optimizer, k, harness, bare in harness_rows:
      method = f"DP {optimizer}" if k == 0 else f"DiLoCo K={k} ({optimizer})"
      print(f"| {method} | {1e3 * harness:.1f} | {1e3 * bare:.1f} | {harness / bare:.3f}x |")


if __name__ == "__main__":
  app.run(main)
