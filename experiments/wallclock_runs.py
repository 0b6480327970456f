"""Modelled wall-clock of DP Muon, DiLoCo and MuLoCo fp32 / 4-bit / 2-bit at 1 and 100 Gbit/s.

  python experiments/wallclock_runs.py                # trains the 5 runs (resumable), the figure
  python experiments/wallclock_runs.py --report_only  # the figure from the runs finished so far
  python experiments/wallclock_runs.py --smoke --out=/tmp/x --runs=/tmp/y   # a quick check

Five runs of 300 steps (10 syncs of H=30) at the sweeps' CPU scale: tiny model, byte-level KJV,
global batch 32 x 64 tokens, outer Nesterov SGD lr 0.7 / momentum 0.9, the sweeps' best inner
learning rates, evaluated every 10 steps.  DP Muon; DiLoCo (AdamW inner) K=8; MuLoCo (Muon
inner) K=8 in float32; MuLoCo K=8 with row-wise statistical 4-bit and 2-bit pseudogradients,
error feedback on (decay 0.9) and the wide-area collective `compression.collective=
"reduce_scatter"` (owners' error feedback on).

The runs are then replayed by `muloco_jax.tools.wallclock` on links of `--bandwidth` bytes/s per
worker (1.25e8 = 1 Gbit/s, 1.25e10 = 100 Gbit/s).  The loss curves are the tiny runs'; the bytes
and the compute step time are modelled for the `--model_size` preset (150m, float32 parameters):

  * bytes: `muloco_jax.tools.wallclock` takes a DiLoCo run's bytes from its logged
    `sync_bytes_per_worker` (the tiny model's payloads; `--param_bytes` only sets the float32
    gradient of a data-parallel run).  So this script writes a copy of each run's metrics.jsonl
    under OUT/wallclock/runs_<size>/<run>/ in which every sync's `sync_bytes_per_worker` is the
    library's closed form (`diloco.compressed_sync_bytes`, or 2 (K-1)/K x 4 x parameters for the
    uncompressed mean) on the preset's parameter shapes with the run's own K, compressor, bits,
    collective and exclusions.  It first checks that the same closed form on the tiny model's
    shapes equals what the run logged, so the substitution swaps the model and nothing else (the
    logged values stay beside it as `logged_sync_bytes_per_worker`).  Data parallelism
    all-reduces the preset's float32 gradient (`--param_bytes`) over 8 replicas (the largest K).
  * step time: one value for every run, the compute of one worker's (or one DP replica's) share of
    a step on one accelerator: model FLOPs per token of the preset (`model.model_flops_per_token`
    at `--model_seq_len`) x the runs' sequences per worker (32 / 8 = 4) x `--model_seq_len` tokens,
    divided by `--peak_flops` x `--mfu` (H100 bf16 dense peak, 40% MFU by default), unless
    `--step_time` gives it.  It ignores the optimizers' own cost (Newton-Schulz, quantization).

Outputs under OUT/wallclock/: wallclock.png (one panel per bandwidth: eval loss against
modelled hours), table.md, results.json (the wallclock report plus the modelling inputs),
runs_<size>/ (the runs as the wallclock CLI reads them; table.md gives the equivalent CLI
command) and cells/ (one summary per finished run: the resume marker).
"""

import json
import math
import os
import shlex
import shutil
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top

SWEEP = "wallclock"
K = 8
NUM_STEPS = 300
SYNC_EVERY = 30
# The inner learning rates the first (issue 6) sweep chose, which these runs were made with.
LRS = {"dp_muon": 0.04, "diloco": 6e-3, "muloco": 0.04}


def _compressed(bits):
  return {
    "compression.kind": "statistical",
    "compression.bits": bits,
    "compression.error_feedback": True,
    "compression.collective": "reduce_scatter",
    "compression.requantize_error_feedback": True,
  }


# (cell / run name, method, K, extra overrides, description)
CELLS = (
  ("DP-Muon", "dp_muon", 0, {}, "DP Muon"),
  ("DiLoCo-K8-fp32", "diloco", K, {}, "DiLoCo (AdamW inner) K=8, float32"),
  ("MuLoCo-K8-fp32", "muloco", K, {}, "MuLoCo (Muon inner) K=8, float32"),
  ("MuLoCo-K8-4bit", "muloco", K, _compressed(4), "MuLoCo K=8, statistical 4-bit, EF, RS"),
  ("MuLoCo-K8-2bit", "muloco", K, _compressed(2), "MuLoCo K=8, statistical 2-bit, EF, RS"),
)

# H100 SXM, dense bf16 matmul peak (FLOP/s).
H100_BF16_PEAK = 989e12

common.define_flags()
# 10 syncs of H=30 (the sweeps' 180 steps give 6); the 5 runs took about 10 min on 2 cores.
flags.FLAGS.set_default("num_steps", NUM_STEPS)
flags.DEFINE_list("bandwidth", ["1.25e8", "1.25e10"], "Link bandwidths, bytes/s per worker.")
flags.DEFINE_string("model_size", "150m", "Preset whose bytes and step time are modelled.")
flags.DEFINE_integer("model_seq_len", 2048, "Sequence length of the modelled step.")
flags.DEFINE_float("peak_flops", H100_BF16_PEAK, "Accelerator peak FLOP/s of the modelled step.")
flags.DEFINE_float("mfu", 0.4, "Model FLOPs utilization of the modelled step.")
flags.DEFINE_float("step_time", 0.0, "Compute seconds per step (0: derived, see the docstring).")
flags.DEFINE_float("latency", 0.0, "Seconds each exchange pays once.")
flags.DEFINE_list("cells", [c[0] for c in CELLS], "Runs to make and plot (a subset for tests).")


def cell_overrides(method, k, extra, smoke):
  overrides = common.method_overrides(method, k, LRS[method])
  # Eval every log window: DP's loss moves every step; DiLoCo's shared parameters change only at
  # syncs, so its eval loss is a staircase (and time to target lands on sync steps).
  overrides["train.eval_every"] = common.scale(smoke)["log_every"]
  if not smoke:
    overrides["diloco.sync_every"] = SYNC_EVERY  # the reproduction's base config uses H=15
  overrides.update(extra)
  return overrides


# ----------------------------------------------------------------------------
# The modelled bytes.


def _shapes(size, vocab, scan_layers):
  import jax

  from muloco_jax import model as model_lib

  config = model_lib.model_config(size, vocab_size=vocab, scan_layers=scan_layers)
  return jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))


def sync_bytes(config, size, vocab):
  """(payload, per_worker) of one sync of the run's averager, on the parameters of `size`."""
  from muloco_jax import compression
  from muloco_jax import config as config_lib
  from muloco_jax import diloco

  k = int(config["diloco.num_workers"])
  shapes = _shapes(size, vocab, bool(config.get("model.scan_layers", False)))
  kind = config.get("compression.kind", "none")
  if kind == "none":
    payload = 4.0 * sum(math.prod(x.shape) for x in _leaves(shapes))
    return payload, 2 * (k - 1) / k * payload
  spec = compression.CompressionSpec(
    kind=kind,
    bits=int(config["compression.bits"]),
    per_row=bool(config["compression.per_row"]),
    topk_fraction=float(config["compression.topk_fraction"]),
    table_dtype=config["compression.table_dtype"],
  )
  sent = diloco.compressed_sync_bytes(
    shapes,
    spec,
    k,
    collective=config.get("compression.collective", "all_gather"),
    exclude=config_lib.EXCLUDE_RULES[config["compression.exclude"]],
  )
  return float(sent["payload"]), float(sent["per_worker"])


def _leaves(tree):
  import jax

  return jax.tree.leaves(tree)


def param_bytes(size):
  """Float32 bytes of the preset's parameters (its own vocabulary)."""
  from muloco_jax import model as model_lib

  return 4 * model_lib.param_count(model_lib.model_config(size))


def derived_step_time(size, seq_len, sequences, peak, mfu):
  from muloco_jax import model as model_lib

  flops = model_lib.model_flops_per_token(model_lib.model_config(size), seq_len)
  return flops * sequences * seq_len / (peak * mfu)


def write_modelled_run(workdir, dest, size):
  """Copies the run's config.json and metrics.jsonl to `dest`, each sync's bytes replaced by
  the closed form on `size`'s parameters; returns the bytes of one sync (logged, tiny, size)."""
  from muloco_jax.tools import wallclock

  records, config = wallclock.load_run(workdir)
  info = {"workdir": os.path.abspath(workdir), "model_size": size}
  if config["diloco.num_workers"]:
    small = sync_bytes(config, config["model.size"], wallclock.vocab_size(config, workdir))
    big = sync_bytes(config, size, None)
    info.update(
      run_payload_bytes=small[0],
      run_per_worker_bytes=small[1],
      payload_bytes=big[0],
      per_worker_bytes=big[1],
    )
    total = 0.0
    for r in records:
      if r.get("sync_bytes_per_worker") is None:
        continue
      logged = float(r["sync_bytes_per_worker"])
      n = round(logged / small[1])  # syncs summed into this record (fragments)
      if n < 1 or abs(logged - n * small[1]) > 1e-5 * logged + 1:
        raise ValueError(
          f"{workdir}: step {r['step']} logged sync_bytes_per_worker={logged:g}, not a multiple "
          f"of the closed form {small[1]:g}; the bytes cannot be rescaled to {size}."
        )
      r["logged_sync_bytes_per_worker"] = logged
      r["sync_bytes_per_worker"] = n * big[1]
      if r.get("sync_bytes") is not None:
        r["logged_sync_bytes"] = r["sync_bytes"]
        r["sync_bytes"] = n * config["diloco.num_workers"] * big[0]
        total += r["sync_bytes"]
      if r.get("comm_bytes_total") is not None:
        r["logged_comm_bytes_total"] = r["comm_bytes_total"]
        r["comm_bytes_total"] = total
  os.makedirs(dest, exist_ok=True)
  shutil.copyfile(os.path.join(workdir, "config.json"), os.path.join(dest, "config.json"))
  with open(os.path.join(dest, "metrics.jsonl"), "w") as f:
    for r in records:
      f.write(json.dumps(r, sort_keys=True) + "\n")
  common.save_json(os.path.join(dest, "modelled.json"), info)
  return info


# ----------------------------------------------------------------------------
# The report.


def _gbit(bw):
  return f"{bw * 8 / 1e9:g} Gbit/s"


def target_step(run_dir, loss_key, target):
  """First logged step whose `loss_key` is <= `target` (None: never)."""
  from muloco_jax.tools import wallclock

  records, _ = wallclock.load_run(run_dir)
  steps, losses = wallclock.loss_series(records, loss_key)
  return next((int(s) for s, x in zip(steps, losses) if x <= target), None)


def markdown_table(result, descriptions):
  from muloco_jax.tools import wallclock

  bws = result["bandwidths"]
  header = ["run", "K", "H", "compression", "MiB/worker/sync", "final eval loss", "target at step"]
  for bw in bws:
    header += [f"total @{_gbit(bw)}", f"to target @{_gbit(bw)}"]
  lines = ["| " + " | ".join(header) + " |", "|" + "---|" * len(header)]
  for r in result["runs"]:
    k = f"DP x{r['dp_replicas']}" if r["K"] == 0 else str(r["K"])
    comp = r["compression"]
    if comp != "none":
      comp += " EF, reduce_scatter"
    row = [
      descriptions.get(r["run"], r["run"]),
      k,
      str(r["H"]),
      comp,
      f"{r['bytes_per_worker_per_sync'] / 2**20:.1f}" + (" (per step)" if r["K"] == 0 else ""),
      f"{r['final_loss']:.4f}",
      str(target_step(r["dir"], result["loss"], result["target_loss"])),
    ]
    for bw in bws:
      key = f"{bw:g}"
      row += [
        wallclock.duration(r["total_seconds"][key]),
        wallclock.duration(r["seconds_to_target"][key]),
      ]
    lines.append("| " + " | ".join(row) + " |")
  return lines


def cli_command(dirs, result, png, param_bytes_value):
  args = ["python", "-m", "muloco_jax.tools.wallclock", *[os.path.relpath(d) for d in dirs]]
  args += [
    "--bandwidth=" + ",".join(f"{b:g}" for b in result["bandwidths"]),
    f"--step_time={result['step_time']!r}",
    f"--param_bytes={param_bytes_value}",
    f"--latency={result['latency']:g}",
    f"--out={os.path.relpath(png)}",
  ]
  return " ".join(shlex.quote(a) for a in args)


def main(argv):
  del argv
  fl = flags.FLAGS
  common.setup_jax()
  from muloco_jax.tools import wallclock

  chosen = [c for c in CELLS if c[0] in fl.cells]
  unknown = set(fl.cells) - {c[0] for c in CELLS}
  if unknown or not chosen:
    raise app.UsageError(f"--cells: unknown {sorted(unknown)}; choose from {[c[0] for c in CELLS]}")
  bandwidths = [float(b) for b in fl.bandwidth]
  s = common.scale(fl.smoke)
  path = common.sweep_dir(SWEEP)
  size = fl.model_size
  modelled_root = os.path.join(path, f"runs_{size}")
  summaries, dirs, modelled = {}, [], {}
  for name, method, k, extra, _ in chosen:
    overrides = cell_overrides(method, k, extra, fl.smoke)
    r = common.run_cell(
      SWEEP, name, overrides, smoke=fl.smoke, info=dict(method=method, K=k, lr=LRS[method])
    )
    workdir = os.path.join(fl.runs, ("smoke_" if fl.smoke else "") + SWEEP, name)
    dest = os.path.join(modelled_root, name)
    if r is not None and os.path.isfile(os.path.join(workdir, "metrics.jsonl")):
      modelled[name] = write_modelled_run(workdir, dest, size)
    elif os.path.isfile(os.path.join(dest, "modelled.json")):  # workdir gone: the saved copy
      modelled[name] = common.load_json(os.path.join(dest, "modelled.json"))
    else:
      print(f"{SWEEP}/{name}: no run yet, left out of the report.", flush=True)
      continue
    summaries[name] = r
    dirs.append(dest)
  if not dirs:
    return

  sequences = s["batch_size"] // K
  step_time = fl.step_time or derived_step_time(
    size, fl.model_seq_len, sequences, fl.peak_flops, fl.mfu
  )
  pbytes = param_bytes(size)
  options = wallclock.ReportOptions(step_time=step_time, latency=fl.latency, param_bytes=pbytes)
  result = wallclock.report(dirs, bandwidths, options)
  png = wallclock.plot(result, os.path.join(path, "wallclock.png"))
  print(wallclock.format_table(result))

  descriptions = {c[0]: c[4] for c in CELLS}
  command = cli_command(dirs, result, png, pbytes)
  step_note = (
    f"`--step_time={fl.step_time:g}` s"
    if fl.step_time
    else (
      f"{step_time * 1e3:.2f} ms = {size} model FLOPs/token at seq {fl.model_seq_len} x "
      f"{sequences} sequences x {fl.model_seq_len} tokens / ({fl.peak_flops:g} FLOP/s x "
      f"{fl.mfu:g} MFU)"
    )
  )
  notes = [
    "",
    f"Loss: {result['loss']} of the tiny runs ({s['num_steps']} steps x {s['batch_size']} seqs "
    f"x {s['seq_len']} tokens, H={s['sync_every']}, eval every {s['log_every']} steps); target "
    f"= {result['target_loss']:.4f}, the largest final loss of the runs. Bytes and compute are "
    f"modelled for the {size} preset: bytes per worker per sync = the library's closed form on "
    f"its parameters ({pbytes / 2**20:.1f} MiB float32) with each run's K, compressor and "
    f"collective (DP: a ring all-reduce of the float32 gradient over "
    f"{result['dp_replicas']} replicas every step); compute step time {step_note}, the same "
    f"for every run; latency {result['latency']:g} s; no overlap.",
    "",
    "The same numbers from the wallclock CLI:",
    "",
    "```bash",
    command,
    "```",
  ]
  common.save_json(
    os.path.join(path, "results.json"),
    {
      **{k: v for k, v in result.items() if k != "curves"},
      "model_size": size,
      "param_bytes": pbytes,
      "step_time_derivation": None
      if fl.step_time
      else dict(
        seq_len=fl.model_seq_len,
        sequences_per_worker=sequences,
        peak_flops=fl.peak_flops,
        mfu=fl.mfu,
      ),
      "modelled_bytes": modelled,
      "train_wall_seconds": {n: (r or {}).get("wall_seconds") for n, r in summaries.items()},
      "smoke": fl.smoke,
      "command": command,
    },
  )
  title = f"Modelled wall-clock to eval loss {result['target_loss']:.4f} ({size} bytes and step)"
  with open(os.path.join(path, "table.md"), "w") as f:
    f.write("\n".join([f"## {title}", "", *markdown_table(result, descriptions), *notes]) + "\n")
  print(open(os.path.join(path, "table.md")).read())
  print(f"Wrote {png}")


if __name__ == "__main__":
  app.run(main)
