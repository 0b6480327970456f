"""What K, H and compression buy on a slow network: modelled wall-clock of runs already made.

  python -m muloco_jax.tools.wallclock RUN_DIR... --bandwidth=1e9,1e11 --out=FILE.png \
    [--step_time=S] [--latency=S] [--target_loss=L] [--dp_replicas=N] [--loss=auto]

Each RUN_DIR is a workdir of `train.train_and_evaluate` (its `metrics.jsonl` and `config.json`).
The runs are replayed on an idealized network where every worker (DiLoCo) or replica (data
parallel) sits behind its own link of `--bandwidth` bytes/s (1e9 B/s = 8 Gbit/s) and every
exchange pays `--latency` seconds once.  This is the compute + communication model of "Scaling
Laws for DiLoCo" (Charles et al., arXiv 2503.09799, appendix A: per all-reduce
2 N / W (1 - 1/R) + latency, on top of the compute time) and of the idealized wall-clock
comparisons of the MuLoCo paper (Thérien et al., arXiv 2505.23725), here fed with the bytes each
run actually logged.  The modelled wall-clock after step t is

  seconds(t) = t c + sum over the syncs s <= t of cost(s),
  cost(s)    = max(0, latency + b(s) / bandwidth - tau c),

where
  c     compute time of one step: the median of the run's logged `step_time` (seconds per step,
        measured by train over each log window; the median keeps the few windows that also hold
        the first sync's compilation, an evaluation or a checkpoint save from skewing it), or
        `--step_time` for every run, to model all of them on the same hardware (recommended when
        the runs were measured on different machines or under different load);
  b(s)  bytes one worker sends over its link at the sync of step s (see below);
  tau   `diloco.overlap_steps` (0 when the config lacks it): the exchange runs during the next
        tau inner steps, so only what does not fit under tau c is waited for.  The cost is charged
        at the sync step (the wait really happens tau steps later; totals are the same).

DiLoCo (`diloco.num_workers` = K >= 1) syncs at the steps whose records carry sync bytes (every H
steps, one fragment per sync under streaming DiLoCo, and the final step).  b(s) is the record's
`sync_bytes_per_worker`.  Older runs log only `sync_bytes` (K x one worker's payload); b(s) is
then derived the way the averagers move the payload, with a warning naming the run:
  compression.kind = "none"  all-to-all to the shard owners + all-gather back (a ring all-reduce):
                             2 (K-1)/K x payload = 2 (K-1) / K^2 x sync_bytes;
  compressed                 all-gather of the K packed payloads, each worker sends K-1 of them:
                             (K-1) x payload = (K-1)/K x sync_bytes.
K = 1 has no link to cross: its syncs cost nothing.

Data parallelism (K = 0) all-reduces the float32 gradient every step, not overlapped with compute:
b = 2 (n-1)/n x 4 x parameters (ring all-reduce), paying the latency once per step (the
paper's per-all-reduce latency term).  A run made on
one host has no slow link, so n is the number of replicas it would have across the slow link:
`--dp_replicas`, by default the largest K among the DiLoCo runs given (the same number of sites).
The parameter count comes from `config.json` (`model.size` and the vocabulary: 257 for
`data.tokenizer="byte"`, `data.vocab_size` for "bpe", a SentencePiece .model file's own size),
through `model.param_count`, from shapes alone.  No metrics record holds it (the first record's
`state_bytes_per_device` mixes in optimizer state and depends on the sharding), and the config
is what built the model; for an uncompressed DiLoCo run of the same config it equals
`sync_bytes` / (4 K).  `--param_bytes` overrides it.

Loss: `eval_loss` when every run logged it, else `train_loss` (`--loss` picks one).  Output: a
PNG with one panel per bandwidth, loss against modelled hours, one line per run (labelled by the
run dir's name); on stdout a table per run (K, H, tau, compression, MiB one worker sends per
sync (per step for DP), compute step time, and per bandwidth the modelled total time and the time
to reach `--target_loss`, by default the largest final loss among the runs, so every run reaches
it; "never" if a run does not), and the same as JSON on the last line.  Bad input (a run dir
without metrics.jsonl or config.json, an empty one, bad flag values) fails naming the run or
the flag, with exit status 1.

`model_time` and `time_to_loss` are the pure core (records and config in, seconds out).
"""

from __future__ import annotations

import json
import math
import os
import sys
import warnings
from collections.abc import Mapping, Sequence
from typing import NamedTuple

from absl import app
from absl import flags
import numpy as np

FLOAT32_BYTES = 4
LOSS_KEYS = ("eval_loss", "train_loss")


class WallclockError(ValueError):
  """Bad input: the message names the run dir or the flag."""


class FallbackWarning(UserWarning):
  """A run without `sync_bytes_per_worker`: bytes per worker derived from `sync_bytes`."""


class ReportOptions(NamedTuple):
  """What `report` models and reports every run under: the CLI's flags besides the run dirs,
  --bandwidth and --out, with the same names and defaults (see the module docstring)."""

  step_time: float | None = None  # c for every run; None: each run's median
  latency: float = 0.0  # seconds each exchange pays once
  target_loss: float | None = None  # None: the largest final loss among the runs
  dp_replicas: int | None = None  # n of a data-parallel run; None: the largest K given
  param_bytes: float | None = None  # float32 parameter bytes for DP; None: from config.json
  loss: str = "auto"  # a key of LOSS_KEYS, or "auto"


# ----------------------------------------------------------------------------
# Reading runs.


def merge_records(records: Sequence[Mapping]) -> list[dict]:
  """One record per step, in step order (a step written twice: the later fields win)."""
  by_step: dict[int, dict] = {}
  for r in records:
    by_step.setdefault(int(r["step"]), {}).update(r)
  return [by_step[s] for s in sorted(by_step)]


def load_run(run_dir: str) -> tuple[list[dict], dict]:
  """(records, config) of a workdir; WallclockError naming it when unusable.  The config is
  `config.json` as `checkpoint.Checkpointer.write_config` writes it: the dotted keys of the
  flattened config ({"diloco.num_workers": 4, ...})."""
  if not os.path.isdir(run_dir):
    raise WallclockError(f"{run_dir}: no such run directory.")
  path = os.path.join(run_dir, "metrics.jsonl")
  if not os.path.isfile(path):
    raise WallclockError(f"{run_dir}: no metrics.jsonl (not a train_and_evaluate workdir?).")
  records = []
  with open(path) as f:
    for number, line in enumerate(f, 1):
      if not line.strip():
        continue
      try:
        record = json.loads(line)
      except json.JSONDecodeError as e:
        raise WallclockError(f"{path}:{number}: not JSON ({e}).") from None
      if not isinstance(record, dict) or "step" not in record:
        raise WallclockError(f"{path}:{number}: a record without 'step'.")
      records.append(record)
  if not records:
    raise WallclockError(f"{run_dir}: metrics.jsonl is empty.")
  config_path = os.path.join(run_dir, "config.json")
  if not os.path.isfile(config_path):
    raise WallclockError(f"{run_dir}: no config.json.")
  try:
    with open(config_path) as f:
      config = json.load(f)
  except json.JSONDecodeError as e:
    raise WallclockError(f"{config_path}: not a JSON config ({e}).") from None
  if not isinstance(config, dict):
    raise WallclockError(f"{config_path}: not a JSON config (a {type(config).__name__}).")
  return merge_records(records), config


def _get(config: Mapping, key: str, default=None, *, run: str = "run"):
  value = config.get(key, default)
  if value is None:
    raise WallclockError(f"{run}: config.json has no {key}.")
  return value


def num_workers(config: Mapping, run: str = "run") -> int:
  return int(_get(config, "diloco.num_workers", run=run))


def sync_every(config: Mapping, run: str = "run") -> int:
  """H (1 for data parallelism: it exchanges every step)."""
  return int(_get(config, "diloco.sync_every", 1, run=run)) if num_workers(config, run) else 1


def overlap_steps(config: Mapping) -> int:
  """tau: `diloco.overlap_steps`, 0 in configs older than it (and for data parallelism)."""
  return int(config.get("diloco.overlap_steps") or 0) if config.get("diloco.num_workers") else 0


def compression_name(config: Mapping) -> str:
  kind = config.get("compression.kind", "none")
  if kind == "none" or not config.get("diloco.num_workers"):
    return "none"
  if kind == "topk":
    return f"topk {config.get('compression.topk_fraction')}"
  return f"{kind} {config.get('compression.bits')}b"


def vocab_size(config: Mapping, run: str = "run") -> int:
  """The vocabulary the run's model was built with (see the module docstring)."""
  spec = _get(config, "data.tokenizer", run=run)
  if spec == "byte":
    return 257
  if spec == "bpe":
    return int(_get(config, "data.vocab_size", run=run))
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise WallclockError(
      f"{run}: data.tokenizer={spec!r} is no longer a file; pass --param_bytes for its model."
    )
  from muloco_jax import tokenizer as tokenizer_lib

  return tokenizer_lib.SentencePieceTokenizer(path).vocab_size


def param_bytes_from_config(config: Mapping, run: str = "run") -> int:
  """Float32 bytes of the run's parameters: 4 x `model.param_count` of `model.size` (with its
  `model.num_layers` if set) and its vocab."""
  from muloco_jax import model as model_lib  # imports jax and flax: only when a DP run needs it

  size = _get(config, "model.size", run=run)
  try:
    model_config = model_lib.model_config(
      size,
      vocab_size=vocab_size(config, run),
      max_seq_len=int(config.get("model.max_seq_len", 2048)),
      **({"num_layers": int(config["model.num_layers"])} if config.get("model.num_layers") else {}),
    )
  except ValueError as e:
    raise WallclockError(f"{run}: model.size={size!r}: {e}") from None
  return FLOAT32_BYTES * model_lib.param_count(model_config)


# ----------------------------------------------------------------------------
# The model.


def compute_step_time(records: Sequence[Mapping], step_time: float | None = None, run="run"):
  """c: `step_time` if given, else the median of the run's logged `step_time` values."""
  if step_time is not None:
    return float(step_time)
  times = [float(r["step_time"]) for r in records if r.get("step_time") is not None]
  if not times:
    raise WallclockError(f"{run}: no step_time in metrics.jsonl; pass --step_time.")
  return float(np.median(times))


def exchanges(
  records: Sequence[Mapping],
  config: Mapping,
  *,
  dp_replicas: int | None = None,
  param_bytes: float | None = None,
  run: str = "run",
) -> tuple[np.ndarray, np.ndarray]:
  """(steps, bytes one worker sends over its link at each): the run's syncs (DiLoCo) or every
  step (data parallelism).  Warns (FallbackWarning, naming `run`) when derived from `sync_bytes`."""
  records = merge_records(records)
  last = int(records[-1]["step"])
  k = num_workers(config, run)
  if k == 0:
    if dp_replicas is None or dp_replicas < 1:
      raise WallclockError(f"{run}: a data-parallel run needs dp_replicas >= 1, got {dp_replicas}.")
    if param_bytes is None:
      param_bytes = param_bytes_from_config(config, run)
    per_step = 2 * (dp_replicas - 1) / dp_replicas * float(param_bytes)
    return np.arange(1, last + 1), np.full(last, per_step)
  steps, sent, derived = [], [], 0
  compressed = config.get("compression.kind", "none") != "none"
  for r in records:
    if r.get("sync_bytes_per_worker") is not None:
      b = float(r["sync_bytes_per_worker"])
    elif r.get("sync_bytes") is not None:
      total = float(r["sync_bytes"])
      b = total * (k - 1) / k if compressed else total * 2 * (k - 1) / k**2
      derived += 1
    else:
      continue
    steps.append(int(r["step"]))
    sent.append(b)
  if not steps:
    raise WallclockError(
      f"{run}: a DiLoCo run (diloco.num_workers={k}) without sync_bytes in metrics.jsonl."
    )
  if derived:
    how = "an all-gather of K payloads" if compressed else "a ring all-reduce of the payload"
    warnings.warn(
      f"{run}: no sync_bytes_per_worker in {derived} of {len(steps)} sync records; derived "
      f"from sync_bytes and K={k} as {how}.",
      FallbackWarning,
      stacklevel=2,
    )
  return np.asarray(steps), np.asarray(sent, np.float64)


def model_time(
  records: Sequence[Mapping],
  config: Mapping,
  bandwidth: float,
  *,
  step_time: float | None = None,
  latency: float = 0.0,
  dp_replicas: int | None = None,
  param_bytes: float | None = None,
  run: str = "run",
) -> tuple[np.ndarray, np.ndarray]:
  """Modelled wall-clock of a run on links of `bandwidth` bytes/s (see the module docstring).

  Args:
    records: the run's metrics records (`metrics.read_metrics`); a step written twice is merged.
    config: its config (`config.json`'s dotted keys, see `load_run`).
    bandwidth: bytes per second of each worker's link (> 0).
    step_time: compute seconds per step c; None: the median of the logged `step_time`.
    latency: seconds each exchange pays once.
    dp_replicas: n, replicas across the slow link for a data-parallel run (needed for K = 0).
    param_bytes: float32 parameter bytes for data parallelism; None: from the config.
    run: the run's name, for messages.

  Returns (steps, seconds): the records' steps, ascending, and the modelled seconds after each.
  """
  if not bandwidth > 0:
    raise WallclockError(f"bandwidth={bandwidth!r} must be > 0 (bytes per second).")
  if latency < 0:
    raise WallclockError(f"latency={latency!r} must be >= 0 (seconds).")
  records = merge_records(records)
  if not records:
    raise WallclockError(f"{run}: no metrics records.")
  c = compute_step_time(records, step_time, run)
  sync_steps, sent = exchanges(
    records, config, dp_replicas=dp_replicas, param_bytes=param_bytes, run=run
  )
  k = num_workers(config, run)
  linked = (dp_replicas or 1) > 1 if k == 0 else k > 1
  cost = np.maximum(0.0, latency + sent / bandwidth - overlap_steps(config) * c)
  cumulative = np.concatenate([[0.0], np.cumsum(cost if linked else np.zeros_like(cost))])
  steps = np.asarray([int(r["step"]) for r in records])
  return steps, steps * c + cumulative[np.searchsorted(sync_steps, steps, side="right")]


def loss_series(records: Sequence[Mapping], loss_key: str) -> tuple[np.ndarray, np.ndarray]:
  """(steps, losses) of the records that logged `loss_key`, in step order."""
  kept = [r for r in merge_records(records) if r.get(loss_key) is not None]
  return np.asarray([int(r["step"]) for r in kept]), np.asarray([float(r[loss_key]) for r in kept])


def time_to_loss(
  steps: np.ndarray,
  seconds: np.ndarray,
  records: Sequence[Mapping],
  target: float,
  loss_key: str = "eval_loss",
) -> float | None:
  """Modelled seconds (from `model_time`'s steps and seconds) at the first logged step whose
  `loss_key` is <= `target`; None when no step reaches it."""
  at = dict(zip(np.asarray(steps).tolist(), np.asarray(seconds).tolist()))
  for step, loss in zip(*loss_series(records, loss_key)):
    if loss <= target:
      return float(at[int(step)])
  return None


def pick_loss_key(runs: Mapping[str, Sequence[Mapping]], requested: str = "auto") -> str:
  """`requested`, or for "auto" eval_loss when every run logged it, else train_loss; raises
  WallclockError naming a run without it."""
  key = requested
  if requested == "auto":
    has_eval = all(len(loss_series(r, "eval_loss")[0]) for r in runs.values())
    key = "eval_loss" if has_eval else "train_loss"
  for name, records in runs.items():
    if not len(loss_series(records, key)[0]):
      raise WallclockError(f"{name}: no {key} in metrics.jsonl.")
  return key


# ----------------------------------------------------------------------------
# The report.


def duration(seconds: float | None) -> str:
  """Seconds as a short human figure (s, min, h or d); None: "never"."""
  if seconds is None:
    return "never"
  if seconds < 120:
    return f"{seconds:.3g} s"
  if seconds < 2 * 3600:
    return f"{seconds / 60:.3g} min"
  if seconds < 2 * 86400:
    return f"{seconds / 3600:.3g} h"
  return f"{seconds / 86400:.3g} d"


def _labels(run_dirs: Sequence[str]) -> list[str]:
  names = [os.path.basename(os.path.normpath(d)) for d in run_dirs]
  return [n if names.count(n) == 1 else os.path.normpath(d) for n, d in zip(names, run_dirs)]


def report(
  run_dirs: Sequence[str], bandwidths: Sequence[float], options: ReportOptions = ReportOptions()
) -> dict:
  """Everything the CLI prints and plots, as a JSON-able dict (plus "curves" for the plot)."""
  if not run_dirs:
    raise WallclockError("no RUN_DIR given.")
  if not bandwidths:
    raise WallclockError("--bandwidth: no value given.")
  for b in bandwidths:
    if not (math.isfinite(b) and b > 0):
      raise WallclockError(f"--bandwidth={b:g} must be > 0 (bytes per second).")
  if not (math.isfinite(options.latency) and options.latency >= 0):
    raise WallclockError(f"--latency={options.latency:g} must be >= 0 (seconds).")
  if options.step_time is not None and not (
    math.isfinite(options.step_time) and options.step_time > 0
  ):
    raise WallclockError(f"--step_time={options.step_time:g} must be > 0 (seconds).")
  if options.param_bytes is not None and not options.param_bytes > 0:
    raise WallclockError(f"--param_bytes={options.param_bytes:g} must be > 0.")
  labels = _labels(run_dirs)
  loaded = {name: load_run(d) for name, d in zip(labels, run_dirs)}
  ks = {name: num_workers(config, name) for name, (_, config) in loaded.items()}
  dp_replicas = options.dp_replicas
  if any(k == 0 for k in ks.values()):
    if dp_replicas is None:
      dp_replicas = max(ks.values())
      if dp_replicas < 1:
        raise WallclockError(
          "--dp_replicas: only data-parallel runs given, no DiLoCo K to take it from; pass it."
        )
    elif dp_replicas < 1:
      raise WallclockError(f"--dp_replicas={dp_replicas} must be >= 1.")
  loss_key = pick_loss_key({n: r for n, (r, _) in loaded.items()}, options.loss)
  finals = {n: float(loss_series(r, loss_key)[1][-1]) for n, (r, _) in loaded.items()}
  target = max(finals.values()) if options.target_loss is None else float(options.target_loss)
  runs, curves = [], {}
  for name, (records, config) in loaded.items():
    k = ks[name]
    c = compute_step_time(records, options.step_time, name)
    common = dict(dp_replicas=dp_replicas, param_bytes=options.param_bytes, run=name)
    if k == 0 and options.param_bytes is None:
      common["param_bytes"] = param_bytes_from_config(config, name)
    sync_steps, sent = exchanges(records, config, **common)
    entry = {
      "run": name,
      "dir": os.path.abspath(run_dirs[labels.index(name)]),
      "K": k,
      "H": sync_every(config, name),
      "overlap_steps": overlap_steps(config),
      "compression": compression_name(config),
      "dp_replicas": dp_replicas if k == 0 else None,
      "steps": int(records[-1]["step"]),
      "syncs": int(len(sync_steps)),
      "bytes_per_worker_per_sync": float(np.mean(sent)),
      "step_time": c,
      "final_loss": finals[name],
      "total_seconds": {},
      "seconds_to_target": {},
    }
    loss_steps, losses = loss_series(records, loss_key)
    curves[name] = {}
    for bw in bandwidths:
      with warnings.catch_warnings():  # `exchanges` above warned once already
        warnings.simplefilter("ignore", FallbackWarning)
        steps, seconds = model_time(
          records, config, bw, step_time=c, latency=options.latency, **common
        )
      key = f"{bw:g}"
      entry["total_seconds"][key] = float(seconds[-1])
      entry["seconds_to_target"][key] = time_to_loss(steps, seconds, records, target, loss_key)
      at = dict(zip(steps.tolist(), seconds.tolist()))
      curves[name][key] = (np.asarray([at[int(s)] for s in loss_steps]) / 3600, losses)
    runs.append(entry)
  return {
    "bandwidths": [float(b) for b in bandwidths],
    "latency": float(options.latency),
    "step_time": options.step_time,
    "dp_replicas": dp_replicas,
    "loss": loss_key,
    "target_loss": target,
    "runs": runs,
    "curves": curves,
  }


def format_table(result: dict) -> str:
  """The stdout table of `report`'s result."""
  header = ["run", "K", "H", "tau", "compression", "MiB/worker/sync", "step s"]
  for bw in result["bandwidths"]:
    header += [f"total @{bw:g}B/s", f"to target @{bw:g}B/s"]
  rows = [header]
  for r in result["runs"]:
    k = f"DP x{r['dp_replicas']}" if r["K"] == 0 else str(r["K"])
    row = [
      r["run"],
      k,
      str(r["H"]),
      str(r["overlap_steps"]),
      r["compression"],
      f"{r['bytes_per_worker_per_sync'] / 2**20:.4g}",
      f"{r['step_time']:.3g}",
    ]
    for bw in result["bandwidths"]:
      key = f"{bw:g}"
      row += [duration(r["total_seconds"][key]), duration(r["seconds_to_target"][key])]
    rows.append(row)
  widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
  lines = ["  ".join(cell.ljust(w) for cell, w in zip(row, widths)).rstrip() for row in rows]
  step = (
    "measured (median per run)" if result["step_time"] is None else f"{result['step_time']:g} s"
  )
  title = (
    f"Modelled wall-clock: latency {result['latency']:g} s, compute step time {step}, "
    f"target {result['loss']} <= {result['target_loss']:.4g}"
  )
  if result["dp_replicas"] is not None:
    title += f"; DP: a ring all-reduce over {result['dp_replicas']} replicas every step"
  return "\n".join([title, *lines])


def plot(result: dict, path: str) -> str:
  """One panel per bandwidth: loss against modelled hours, one line per run; a PNG at `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  bandwidths = result["bandwidths"]
  fig, axes = plt.subplots(
    1, len(bandwidths), figsize=(5 * len(bandwidths), 4), squeeze=False, sharey=True
  )
  for ax, bw in zip(axes[0], bandwidths):
    key = f"{bw:g}"
    totals = [r["total_seconds"][key] for r in result["runs"]]
    for name, by_bw in result["curves"].items():
      hours, losses = by_bw[key]
      ax.plot(hours, losses, marker="o", markersize=2, label=name)
    if min(totals) > 0 and max(totals) / min(totals) > 20:
      ax.set_xscale("log")
    ax.axhline(result["target_loss"], color="gray", linestyle="--", linewidth=0.8)
    ax.set_title(f"{bw:g} B/s ({bw * 8 / 1e9:g} Gbit/s), latency {result['latency']:g} s")
    ax.set_xlabel("modelled wall-clock (hours)")
    ax.grid(alpha=0.3)
  axes[0][0].set_ylabel(result["loss"])
  axes[0][-1].legend(fontsize=7)
  fig.tight_layout()
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fig.savefig(path, dpi=90, format="png")
  plt.close(fig)
  return path


# ----------------------------------------------------------------------------
# CLI.


def _bandwidths(text: str) -> list[float]:
  result = []
  for v in filter(None, (v.strip() for v in text.split(","))):
    try:
      result.append(float(v))
    except ValueError:
      raise WallclockError(f"--bandwidth: {v!r} is not a number (bytes per second).") from None
  return result


def cli(
  run_dirs: Sequence[str], bandwidth: str, out: str, options: ReportOptions = ReportOptions()
) -> int:
  """The CLI with its flags as arguments (`bandwidth` comma separated, as on the command line);
  returns 0, or exits with status 1 (bad input: "FATAL ..." on stderr)."""
  import jax  # the parameter count only traces shapes: no accelerator to look for

  jax.config.update("jax_platforms", "cpu")
  try:
    with warnings.catch_warnings(record=True) as caught:
      warnings.simplefilter("always", FallbackWarning)
      result = report(run_dirs, _bandwidths(bandwidth), options)
    plot(result, out)
  except WallclockError as e:
    sys.exit(f"FATAL {e}")
  for w in caught:
    print(f"WARNING {w.message}", file=sys.stderr)
  print(format_table(result))
  print(f"Wrote {out}")
  print(json.dumps({k: v for k, v in result.items() if k != "curves"}), flush=True)
  return 0


def main(argv):
  if len(argv) < 2:
    raise app.UsageError("Give at least one RUN_DIR (a train_and_evaluate workdir).")
  f = flags.FLAGS
  options = ReportOptions(**{name: f[name].value for name in ReportOptions._fields})
  return cli(argv[1:], f.bandwidth, f.out, options)


if __name__ == "__main__":  # flags only here: experiments/wallclock_runs.py has its own
  flags.DEFINE_string(
    "bandwidth", None, "Bytes per second of each worker's link, comma separated (1e9 = 8 Gbit/s)."
  )
  flags.DEFINE_string("out", None, "The PNG to write.")
  flags.DEFINE_float(
    "step_time", None, "Compute seconds per step for every run (default: each run's median)."
  )
  flags.DEFINE_float("latency", 0.0, "Seconds each exchange pays once.")
  flags.DEFINE_float("target_loss", None, "Loss to reach (default: the largest final loss).")
  flags.DEFINE_integer(
    "dp_replicas", None, "Replicas of a data-parallel run across the link (default: largest K)."
  )
  flags.DEFINE_float(
    "param_bytes", None, "Float32 parameter bytes for data parallelism (default: config.json)."
  )
  flags.DEFINE_enum("loss", "auto", ["auto", *LOSS_KEYS], "Loss to plot and reach.")
  flags.mark_flags_as_required(["bandwidth", "out"])
  app.run(main)
