"""Tests of `python -m muloco_jax.tools.wallclock`: the closed forms of the wall-clock model on
synthetic runs, the CLI end to end, and one real tiny run of `train.train_and_evaluate`."""

import json
import os
import subprocess
import sys
import warnings

import numpy as np
import pytest

from muloco_jax import metrics as metrics_lib
from muloco_jax import train
from muloco_jax.tools import wallclock
from tiny_run import tiny_config

PNG_MAGIC = b"\x89PNG\r\n\x1a\n"


def _config(num_workers=4, sync_every=10, **extra):
  config = {
    "model.size": "tiny",
    "model.max_seq_len": 2048,
    "data.tokenizer": "byte",
    "data.vocab_size": 4096,
    "data.seq_len": 32,
    "train.batch_size": 16,
    "diloco.num_workers": num_workers,
    "diloco.sync_every": sync_every,
    "diloco.num_fragments": 1,
    "compression.kind": "none",
    "compression.bits": 2,
  }
  config.update(extra)
  return config


def _records(num_steps=100, sync_every=10, step_time=0.5, per_worker=1e9, sync_bytes=None):
  """A record every step: a loss falling 1/step, step_time, and sync bytes every H steps."""
  records = []
  for step in range(1, num_steps + 1):
    r = {"step": step, "train_loss": 10.0 / step, "step_time": step_time}
    if step % 10 == 0:
      r["eval_loss"] = 10.0 / step
    if sync_every and step % sync_every == 0:
      if per_worker is not None:
        r["sync_bytes_per_worker"] = per_worker
      if sync_bytes is not None:
        r["sync_bytes"] = sync_bytes
    records.append(r)
  return records


def _write_run(path, records, config):
  os.makedirs(path, exist_ok=True)
  with open(os.path.join(path, "metrics.jsonl"), "w") as f:
    f.writelines(json.dumps(r) + "\n" for r in records)
  with open(os.path.join(path, "config.json"), "w") as f:
    json.dump(config, f)
  return str(path)


# ----------------------------------------------------------------------------
# Closed forms.


def test_diloco_closed_form():
  steps, seconds = wallclock.model_time(_records(), _config(), 1e9, latency=0.1)
  assert steps.tolist() == list(range(1, 101))
  assert seconds[-1] == pytest.approx(100 * 0.5 + 10 * (1 + 0.1))
  # Before the first sync only compute; the sync of step 10 is charged at step 10.
  assert seconds[8] == pytest.approx(9 * 0.5)
  assert seconds[9] == pytest.approx(10 * 0.5 + 1.1)
  # `step_time` replaces the measured median.
  _, seconds = wallclock.model_time(_records(), _config(), 1e9, latency=0.1, step_time=2.0)
  assert seconds[-1] == pytest.approx(100 * 2.0 + 10 * 1.1)


def test_overlap_hides_tau_steps_of_the_exchange():
  config = _config(**{"diloco.overlap_steps": 2})
  _, seconds = wallclock.model_time(_records(), config, 1e9, latency=0.1)
  assert seconds[-1] == pytest.approx(100 * 0.5 + 10 * max(0.0, 1.1 - 1.0))
  # An exchange shorter than tau steps costs nothing.
  _, seconds = wallclock.model_time(_records(), config, 1e10, latency=0.1)
  assert seconds[-1] == pytest.approx(100 * 0.5)


def test_single_worker_crosses_no_link():
  _, seconds = wallclock.model_time(_records(), _config(num_workers=1), 1e9, latency=0.1)
  assert seconds[-1] == pytest.approx(100 * 0.5)


def test_data_parallel_closed_form():
  config = _config(num_workers=0)
  records = _records(sync_every=0)
  param_bytes = 3e8
  steps, seconds = wallclock.model_time(
    records, config, 1e9, latency=0.01, dp_replicas=4, param_bytes=param_bytes
  )
  per_step = 0.5 + 0.01 + 2 * 3 / 4 * param_bytes / 1e9
  np.testing.assert_allclose(seconds, steps * per_step)
  with pytest.raises(wallclock.WallclockError, match="dp_replicas"):
    wallclock.model_time(records, config, 1e9)


def test_param_bytes_from_config_is_float32_param_count():
  from muloco_jax import model as model_lib

  count = model_lib.param_count(model_lib.model_config("tiny", vocab_size=257))
  assert wallclock.param_bytes_from_config(_config(num_workers=0)) == 4 * count
  bpe = _config(**{"data.tokenizer": "bpe", "data.vocab_size": 1000})
  count = model_lib.param_count(model_lib.model_config("tiny", vocab_size=1000))
  assert wallclock.param_bytes_from_config(bpe) == 4 * count
  deeper = _config(num_workers=0, **{"model.num_layers": 4})
  count = model_lib.param_count(model_lib.model_config("tiny", vocab_size=257, num_layers=4))
  assert wallclock.param_bytes_from_config(deeper) == 4 * count


@pytest.mark.parametrize(
  "kind, expected_per_worker",
  [("statistical", 3 / 4 * 8e9), ("none", 2 * 3 / 16 * 8e9)],  # all-gather / ring all-reduce
)
def test_fallback_from_sync_bytes_warns(kind, expected_per_worker):
  records = _records(per_worker=None, sync_bytes=8e9)
  config = _config(**{"compression.kind": kind})
  with pytest.warns(wallclock.FallbackWarning, match="my_run.*sync_bytes_per_worker"):
    _, sent = wallclock.exchanges(records, config, run="my_run")
  np.testing.assert_allclose(sent, expected_per_worker)
  with pytest.warns(wallclock.FallbackWarning):
    _, seconds = wallclock.model_time(records, config, 1e9, run="my_run")
  assert seconds[-1] == pytest.approx(50 + 10 * expected_per_worker / 1e9)


def test_per_worker_field_wins_without_warning(recwarn):
  wallclock.exchanges(_records(sync_bytes=8e9), _config())
  assert not [w for w in recwarn if issubclass(w.category, wallclock.FallbackWarning)]


def test_time_to_loss_first_step_at_or_below_target_and_never():
  records = _records()
  steps, seconds = wallclock.model_time(records, _config(), 1e9)
  # train_loss = 10 / step: <= 0.5 first at step 20 (after 2 syncs of 1 s each).
  assert wallclock.time_to_loss(steps, seconds, records, 0.5, "train_loss") == pytest.approx(12.0)
  # eval_loss is logged every 10 steps: <= 0.45 first at step 30.
  assert wallclock.time_to_loss(steps, seconds, records, 0.45, "eval_loss") == pytest.approx(18.0)
  assert wallclock.time_to_loss(steps, seconds, records, 0.01, "train_loss") is None


def test_duplicate_steps_merge():
  records = _records(num_steps=10)
  records.insert(5, {"step": 10, "sync_bytes_per_worker": 1e9})  # written before its log record
  steps, seconds = wallclock.model_time(records, _config(), 1e9)
  assert steps.tolist() == list(range(1, 11))
  assert seconds[-1] == pytest.approx(10 * 0.5 + 1)


# ----------------------------------------------------------------------------
# The CLI.


def _two_runs(tmp_path):
  slow = _write_run(tmp_path / "k4_h10", _records(), _config())
  fast_records = [
    dict(r, eval_loss=r["eval_loss"] * 1.5) if "eval_loss" in r else r
    for r in _records(sync_every=50, per_worker=2.5e8)
  ]
  fast = _write_run(
    tmp_path / "k4_h50_2bit",
    fast_records,
    _config(sync_every=50, **{"compression.kind": "statistical", "compression.bits": 2}),
  )
  return slow, fast


def test_cli_end_to_end(tmp_path, capsys):
  runs = _two_runs(tmp_path)
  out = tmp_path / "plots" / "wallclock.png"
  code = wallclock.cli(runs, "1e9,1e11", str(out), wallclock.ReportOptions(latency=0.1))
  assert code == 0
  assert out.read_bytes()[:8] == PNG_MAGIC
  stdout = capsys.readouterr().out
  print(stdout)
  result = json.loads(stdout.strip().splitlines()[-1])
  assert set(result) >= {"bandwidths", "latency", "loss", "target_loss", "runs", "dp_replicas"}
  assert result["loss"] == "eval_loss"
  assert result["bandwidths"] == [1e9, 1e11]
  # Default target: the largest final loss (k4_h50_2bit's 0.15), so every run reaches it.
  assert result["target_loss"] == pytest.approx(0.15)
  by_name = {r["run"]: r for r in result["runs"]}
  assert set(by_name) == {"k4_h10", "k4_h50_2bit"}
  slow = by_name["k4_h10"]
  assert (slow["K"], slow["H"], slow["overlap_steps"]) == (4, 10, 0)
  assert slow["bytes_per_worker_per_sync"] == 1e9
  assert slow["total_seconds"]["1e+09"] == pytest.approx(50 + 10 * 1.1)
  assert slow["total_seconds"]["1e+11"] == pytest.approx(50 + 10 * 0.11)
  for r in result["runs"]:
    assert all(v is not None for v in r["seconds_to_target"].values())
  assert "k4_h10" in stdout and "MiB/worker/sync" in stdout


def test_cli_target_never_and_data_parallel(tmp_path, capsys):
  runs = _two_runs(tmp_path)
  dp = _write_run(tmp_path / "dp", _records(sync_every=0), _config(num_workers=0))
  out = tmp_path / "w.png"
  options = wallclock.ReportOptions(target_loss=0.12, param_bytes=1e8)
  code = wallclock.cli([*runs, dp], "1e9", str(out), options)
  assert code == 0
  result = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
  by_name = {r["run"]: r for r in result["runs"]}
  assert by_name["k4_h50_2bit"]["seconds_to_target"]["1e+09"] is None  # final 0.15 > 0.12
  assert by_name["k4_h10"]["seconds_to_target"]["1e+09"] is not None
  assert result["dp_replicas"] == 4  # the largest K given
  assert by_name["dp"]["bytes_per_worker_per_sync"] == pytest.approx(1.5 * 1e8)
  assert by_name["dp"]["total_seconds"]["1e+09"] == pytest.approx(100 * (0.5 + 0.15))


@pytest.mark.parametrize(
  "bandwidth, options, message",
  [
    ("0", {}, "--bandwidth=0"),
    ("1e9,-5", {}, "--bandwidth=-5"),
    ("fast", {}, "--bandwidth: 'fast'"),
    ("1e9", dict(step_time=0.0), "--step_time"),
    ("1e9", dict(latency=-1.0), "--latency"),
  ],
)
def test_cli_bad_flags_name_the_flag(tmp_path, capsys, bandwidth, options, message):
  runs = _two_runs(tmp_path)
  with pytest.raises(SystemExit) as e:
    wallclock.cli(runs, bandwidth, str(tmp_path / "x.png"), wallclock.ReportOptions(**options))
  assert e.value.code not in (0, None)
  assert message in str(e.value.code)
  assert not (tmp_path / "x.png").exists()


def test_cli_bad_run_dirs_name_the_run(tmp_path):
  good, _ = _two_runs(tmp_path)
  empty = tmp_path / "empty_run"
  empty.mkdir()
  (empty / "metrics.jsonl").write_text("")
  no_metrics = tmp_path / "no_metrics"
  no_metrics.mkdir()
  for bad, why in [
    (tmp_path / "missing", "no such run directory"),
    (empty, "metrics.jsonl is empty"),
    (no_metrics, "no metrics.jsonl"),
  ]:
    with pytest.raises(SystemExit) as e:
      wallclock.cli([good, str(bad)], "1e9", str(tmp_path / "x.png"))
    assert str(bad) in str(e.value.code) and why in str(e.value.code)


def test_cli_module_entry_point(tmp_path):
  """`python -m muloco_jax.tools.wallclock`: exit 0 with a PNG; a missing run dir exits 1
  naming it."""
  runs = _two_runs(tmp_path)
  out = tmp_path / "w.png"
  command = [
    sys.executable,
    "-m",
    "muloco_jax.tools.wallclock",
    *runs,
    "--bandwidth=1e9",
    f"--out={out}",
  ]
  done = subprocess.run(command, capture_output=True, text=True)
  assert done.returncode == 0, done.stderr
  assert json.loads(done.stdout.splitlines()[-1])["runs"]
  assert out.read_bytes()[:8] == PNG_MAGIC
  missing = str(tmp_path / "nope")
  done = subprocess.run(command + [missing], capture_output=True, text=True)
  assert done.returncode == 1 and missing in done.stderr


# ----------------------------------------------------------------------------
# A real run.


def test_real_tiny_diloco_run(tmp_path, capsys):
  """K=2, H=2 MuLoCo-style DiLoCo for 6 steps; whichever bytes field train writes, the model
  charges one exchange per sync and, uncompressed, 2 (K-1)/K x the float32 parameters."""
  c = tiny_config(str(tmp_path / "data"))
  c.train.num_steps = 6
  c.train.eval_every = 3
  c.train.eval_steps = 1
  c.train.checkpoint_every = 6
  c.optimizer.warmup_steps = 1
  c.diloco.num_workers = 2
  c.diloco.sync_every = 2
  workdir = str(tmp_path / "k2_h2")
  train.train_and_evaluate(c, workdir)
  records = metrics_lib.read_metrics(workdir)
  config = json.load(open(os.path.join(workdir, "config.json")))
  syncs = [r for r in records if "sync_bytes" in r]
  assert [r["step"] for r in syncs] == [2, 4, 6]
  param_bytes = wallclock.param_bytes_from_config(config)
  assert syncs[0]["sync_bytes"] == pytest.approx(2 * param_bytes)  # K x the float32 params

  with warnings.catch_warnings(record=True) as caught:
    warnings.simplefilter("always")
    sync_steps, sent = wallclock.exchanges(records, config, run="k2_h2")
  assert sync_steps.tolist() == [2, 4, 6]
  np.testing.assert_allclose(sent, 2 * (2 - 1) / 2 * param_bytes, rtol=1e-6)
  # The fallback (with its warning) only while train predates sync_bytes_per_worker.
  fallback = [w for w in caught if issubclass(w.category, wallclock.FallbackWarning)]
  assert bool(fallback) == ("sync_bytes_per_worker" not in syncs[0])

  steps, seconds = wallclock.model_time(records, config, 1e6, step_time=0.1, latency=0.05)
  assert seconds[-1] == pytest.approx(6 * 0.1 + 3 * (0.05 + param_bytes / 1e6), rel=1e-6)

  out = tmp_path / "real.png"
  assert wallclock.cli([workdir], "1e6,1e9", str(out)) == 0
  stdout = capsys.readouterr().out
  print(stdout)
  result = json.loads(stdout.strip().splitlines()[-1])
  assert result["loss"] == "eval_loss"
  (run,) = result["runs"]
  assert (run["K"], run["H"], run["syncs"]) == (2, 2, 3)
  assert run["seconds_to_target"]["1e+06"] == pytest.approx(run["total_seconds"]["1e+06"])
  assert out.read_bytes()[:8] == PNG_MAGIC
