"""Shared driver of the reproduction sweeps.

Every sweep script (reproduce.py, directional_correctness.py, wallclock_runs.py) uses:
  * `define_flags()`       -- the flags they all take (--out, --runs, --smoke, ...);
  * `base_config(smoke)`   -- the CPU-sized run every cell starts from;
  * `cell_config(...)`     -- a cell's config: the base plus dotted overrides;
  * `claim`/`release`      -- a lock per cell, so that several processes share a sweep;
  * `run_cell(...)`        -- trains one cell resumably and returns its summary
                              (skipped when the cell's result file exists);
  * `write_results(...)`   -- JSON + CSV + markdown table of a sweep;
  * `plot_lines(...)`      -- the one matplotlib helper (small PNGs).

Layout of a sweep's outputs: RESULTS/<sweep>/cells/<cell>.json (one per finished cell; the resume
marker), RESULTS/<sweep>/results.{json,csv}, table.md and *.png.  Training workdirs (checkpoints,
metrics.jsonl, TensorBoard) go under RUNS/<sweep>/<cell>/, outside the repository by default, so an
interrupted cell resumes from its last checkpoint.
"""

from __future__ import annotations

import csv
import json
import os
import re
import shutil
import time
from typing import Any, Iterable, Sequence

from absl import flags
from absl import logging

HERE = os.path.dirname(os.path.abspath(__file__))
DEFAULT_RESULTS = os.path.join(HERE, "results")
DEFAULT_RUNS = os.environ.get("MULOCO_RUNS_DIR", "/tmp/muloco_runs")

# The CPU-friendly scale of every sweep: 24 outer rounds of H=15 (see README.md for the cost).
FULL = dict(
  num_steps=360,
  sync_every=15,
  warmup_steps=30,
  eval_every=120,
  log_every=15,
  eval_steps=8,
  seq_len=64,
  batch_size=32,
)
# --smoke: a few steps of every cell (H=4 so that syncs and compression still run).
SMOKE = dict(
  num_steps=8,
  sync_every=4,
  warmup_steps=2,
  eval_every=4,
  log_every=2,
  eval_steps=1,
  seq_len=16,
  batch_size=16,
)

# Good defaults (paper.md's reference run): AdamW 3e-3; Muon 0.02 with its AdamW part at 3e-3;
# outer Nesterov SGD lr 0.7, momentum 0.9; H = 30.
ADAMW_LR = 3e-3
MUON_LR = 0.02
MUON_ADAM_LR = 3e-3
OUTER_LR = 0.7
OUTER_MOMENTUM = 0.9


def define_flags() -> None:
  """Flags shared by every sweep script (at import of the script; a second call does nothing,
  for scripts that import another's functions)."""
  if "out" in flags.FLAGS:
    return
  flags.DEFINE_string("out", DEFAULT_RESULTS, "Results root; the sweep writes OUT/<sweep>/.")
  flags.DEFINE_string("runs", DEFAULT_RUNS, "Root of the training workdirs (checkpoints).")
  flags.DEFINE_bool("smoke", False, "A few steps of every cell, one learning rate each.")
  flags.DEFINE_bool(
    "keep_checkpoints",
    False,
    "Keep a finished cell's checkpoints (else only its metrics.jsonl stays).",
  )
  flags.DEFINE_integer("num_steps", 0, "Override the steps per run (0: the sweep's default).")
  flags.DEFINE_string("data_dir", None, "data.dir override (default: the library's cache).")
  flags.DEFINE_bool(
    "report_only", False, "Train nothing: tables and plots from the cells finished so far."
  )


def scale(smoke: bool) -> dict:
  s = dict(SMOKE if smoke else FULL)
  if not smoke and flags.FLAGS.is_parsed() and flags.FLAGS["num_steps"].value:
    s["num_steps"] = flags.FLAGS["num_steps"].value
  return s


def base_config(smoke: bool = False):
  """Tiny Llama-style model (d=128, 2 layers), byte-level KJV, float32, fixed token budget."""
  from muloco_jax.config import default_config

  s = scale(smoke)
  c = default_config()
  c.model.size = "tiny"
  c.model.dtype = "float32"  # bf16 matmuls are slow on CPUs
  c.data.name = "kjv"
  c.data.tokenizer = "byte"  # vocab 257: the output head stays cheap on a CPU
  c.data.seq_len = s["seq_len"]
  if flags.FLAGS.is_parsed() and flags.FLAGS["data_dir"].value:
    c.data.dir = flags.FLAGS["data_dir"].value
  c.train.num_steps = s["num_steps"]
  c.train.batch_size = s["batch_size"]
  c.train.log_every = s["log_every"]
  c.train.eval_every = s["eval_every"]
  c.train.eval_steps = s["eval_steps"]
  c.train.checkpoint_every = max(s["num_steps"] // 2, 1)
  c.train.keep_checkpoints = 1
  c.train.progress_bar = False
  c.optimizer.warmup_steps = s["warmup_steps"]
  c.optimizer.ns_dtype = "float32"  # bf16 Newton-Schulz is slow on CPUs
  c.diloco.sync_every = s["sync_every"]
  c.diloco.outer_lr = OUTER_LR
  c.diloco.outer_momentum = OUTER_MOMENTUM
  # The paper's weight decay rescaling, wd * (B / K) / R, with R = the global batch: data-parallel
  # runs keep the base weight decay.
  c.diloco.weight_decay_reference_batch = s["batch_size"]
  return c


def method_overrides(method: str, num_workers: int = 0, lr: float | None = None) -> dict:
  """Overrides of one of the four methods: dp_adamw, dp_muon, diloco (AdamW inner), muloco."""
  muon = method in ("dp_muon", "muloco")
  out = {
    "optimizer.name": "muon" if muon else "adamw",
    "optimizer.learning_rate": lr if lr is not None else (MUON_LR if muon else ADAMW_LR),
    "diloco.num_workers": 0 if method.startswith("dp_") else num_workers,
  }
  if muon:
    out["optimizer.adam_learning_rate"] = MUON_ADAM_LR
  return out


def cell_config(overrides: dict, smoke: bool = False):
  """`base_config(smoke)` with dotted overrides {"optimizer.learning_rate": 0.01, ...}."""
  c = base_config(smoke)
  for key, value in overrides.items():
    node = c
    *parents, leaf = key.split(".")
    for p in parents:
      node = node[p]
    node[leaf] = value
  return c


def cell_name(*parts: Any) -> str:
  """A file-system-safe cell id from its parts, e.g. ('muloco', 'K8', 'lr0.02')."""
  return re.sub(r"[^A-Za-z0-9_.+-]", "_", "_".join(str(p) for p in parts))


def sweep_dir(sweep: str, out: str | None = None) -> str:
  path = os.path.join(out or flags.FLAGS.out, sweep)
  os.makedirs(os.path.join(path, "cells"), exist_ok=True)
  return path


def load_json(path: str):
  with open(path) as f:
    return json.load(f)


def save_json(path: str, obj) -> None:
  tmp = path + ".tmp"
  with open(tmp, "w") as f:
    json.dump(obj, f, indent=1, sort_keys=True)
  os.replace(tmp, path)


def summarize(records: list[dict]) -> dict:
  """Curves and final numbers of a run's metrics.jsonl records."""
  train = [(r["step"], r["train_loss"]) for r in records if "train_loss" in r]
  evals = [(r["step"], r["eval_loss"]) for r in records if "eval_loss" in r]
  syncs = [r for r in records if "sync_bytes" in r]
  times = [r["step_time"] for r in records if "step_time" in r]
  final = records[-1] if records else {}
  out = {
    "final_eval_loss": final.get("eval_loss"),
    "final_train_loss": final.get("train_loss"),
    "train_curve": train,
    "eval_curve": evals,
    "num_syncs": len(syncs),
    "comm_bytes_total": syncs[-1]["comm_bytes_total"] if syncs else 0.0,
    "median_step_time": sorted(times)[len(times) // 2] if times else None,
  }
  for key in (
    "worker_cosine_mean",
    "compression_error",
    "compression_norm_ratio",
    "pseudograd_norm",
  ):
    vals = [r[key] for r in syncs if key in r and r[key] is not None]
    if vals:
      out[f"mean_{key}"] = sum(vals) / len(vals)
  return out


def claim(result_path: str) -> bool:
  """Takes `result_path`.lock for this process; False while another live process holds it.

  Lets several processes of one sweep share its cells.  A lock whose process died (a killed
  sweep) is taken over, and its cell resumes from the checkpoint.
  """
  lock = result_path + ".lock"
  while True:
    try:
      fd = os.open(lock, os.O_CREAT | os.O_EXCL | os.O_WRONLY)
    except FileExistsError:
      try:
        with open(lock) as f:
          pid = int(f.read().strip() or 0)
      except (FileNotFoundError, ValueError):
        pid = 0
      if _alive(pid) if pid else _younger_than(lock, 60.0):  # no pid yet: being written
        return False
      try:
        os.remove(lock)  # its process is gone
      except FileNotFoundError:
        pass
      continue
    with os.fdopen(fd, "w") as f:
      f.write(str(os.getpid()))
    return True


def release(result_path: str) -> None:
  try:
    os.remove(result_path + ".lock")
  except FileNotFoundError:
    pass


def _younger_than(path: str, seconds: float) -> bool:
  try:
    return time.time() - os.path.getmtime(path) < seconds
  except FileNotFoundError:
    return True  # released meanwhile: look again


def _alive(pid: int) -> bool:
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True
  return True


def run_cell(
  sweep: str,
  name: str,
  overrides: dict,
  *,
  smoke: bool = False,
  out: str | None = None,
  runs: str | None = None,
  keep_checkpoints: bool | None = None,
  info: dict | None = None,
) -> dict | None:
  """Trains one cell unless OUT/<sweep>/cells/<name>.json exists; returns its summary
  (None for an unfinished cell under --report_only).

  The workdir RUNS/<sweep>/<name> keeps the checkpoints, so a killed run resumes where it stopped
  (`train_and_evaluate` restores the latest checkpoint).  `info` is stored with the summary.
  """
  from muloco_jax import metrics as metrics_lib
  from muloco_jax import train

  fl = flags.FLAGS
  out = out or fl.out
  runs = runs or fl.runs
  keep = fl.keep_checkpoints if keep_checkpoints is None else keep_checkpoints
  result_path = os.path.join(sweep_dir(sweep, out), "cells", name + ".json")
  if os.path.exists(result_path):
    print(f"{sweep}/{name}: done already, skipped.", flush=True)
    return load_json(result_path)
  if fl.report_only:
    return None
  config = cell_config(overrides, smoke)
  workdir = os.path.join(runs, ("smoke_" if smoke else "") + sweep, name)
  print(f"[{time.strftime('%H:%M:%S')}] {sweep}/{name} -> {workdir}", flush=True)
  start, cpu_start = time.perf_counter(), time.process_time()
  train.train_and_evaluate(config, workdir)
  wall, cpu = time.perf_counter() - start, time.process_time() - cpu_start
  records = metrics_lib.read_metrics(workdir)
  if not records or records[-1]["step"] != config.train.num_steps:
    # e.g. a SIGTERM made train_and_evaluate checkpoint and return early: no result file, so
    # the next invocation resumes this cell.
    raise RuntimeError(
      f"{sweep}/{name} stopped before step {config.train.num_steps}; "
      "run the sweep again to resume it."
    )
  summary = summarize(records)
  summary.update(
    cell=name,
    sweep=sweep,
    overrides=overrides,
    wall_seconds=wall,
    cpu_seconds=cpu,  # this process's CPU time, all threads (a resumed cell: since the resume)
    smoke=smoke,
    tokens=config.train.num_steps * config.train.batch_size * config.data.seq_len,
    **(info or {}),
  )
  save_json(result_path, summary)
  if not keep:
    shutil.rmtree(os.path.join(workdir, "checkpoints"), ignore_errors=True)
  print(f"    eval_loss {summary['final_eval_loss']:.4f}  ({wall:.0f} s)", flush=True)
  return summary


def write_results(
  sweep: str,
  rows: Sequence[dict],
  columns: Sequence[str],
  table_rows: Sequence[Sequence[Any]],
  table_header: Sequence[str],
  title: str,
  out: str | None = None,
  notes: Iterable[str] = (),
) -> str:
  """results.json (full rows), results.csv (`columns` of each row) and table.md of a sweep."""
  path = sweep_dir(sweep, out)
  save_json(os.path.join(path, "results.json"), list(rows))
  with open(os.path.join(path, "results.csv"), "w", newline="") as f:
    w = csv.writer(f)
    w.writerow(columns)
    for r in rows:
      w.writerow([_fmt(r.get(c)) for c in columns])
  lines = [
    f"## {title}",
    "",
    "| " + " | ".join(table_header) + " |",
    "|" + "---|" * len(table_header),
  ]
  lines += ["| " + " | ".join(_fmt(v) for v in row) + " |" for row in table_rows]
  lines += [""] + [f"{n}" for n in notes]
  with open(os.path.join(path, "table.md"), "w") as f:
    f.write("\n".join(lines) + "\n")
  return path


def _fmt(v: Any) -> str:
  if v is None:
    return ""
  if isinstance(v, float):
    return f"{v:.4f}" if abs(v) < 1e4 else f"{v:.3g}"
  return str(v)


def plot_lines(
  path: str,
  series: dict,
  *,
  title: str,
  xlabel: str,
  ylabel: str,
  logx: bool = False,
  xticks: Sequence | None = None,
  xticklabels=None,
  ylim=None,
  styles: dict | None = None,
) -> str:
  """One figure of named lines: series = {label: (xs, ys)} or {label: (xs, ys, yerr)} (error
  bars); a small PNG at `path`."""
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  fig, ax = plt.subplots(figsize=(6, 4))
  for label, (xs, ys, *yerr) in series.items():
    kw = dict(marker="o", markersize=3)
    kw.update((styles or {}).get(label, {}))
    if yerr:
      ax.errorbar(xs, ys, yerr=yerr[0], label=label, capsize=3, **kw)
    else:
      ax.plot(xs, ys, label=label, **kw)
  if logx:
    ax.set_xscale("log", base=2)
  if xticks is not None:
    ax.set_xticks(list(xticks))
    ax.set_xticklabels(xticklabels if xticklabels is not None else [str(x) for x in xticks])
  if ylim is not None:
    ax.set_ylim(*ylim)
  ax.set_title(title, fontsize=10)
  ax.set_xlabel(xlabel)
  ax.set_ylabel(ylabel)
  ax.grid(alpha=0.3)
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)
  return path


def setup_jax() -> None:
  """CPU defaults for the sweeps: float32 everywhere, a persistent compilation cache."""
  import jax

  logging.set_verbosity(logging.WARNING)  # orbax logs every checkpoint at INFO
  jax.config.update("jax_compilation_cache_dir", os.path.join(DEFAULT_RUNS, "jax_cache"))
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 2.0)
