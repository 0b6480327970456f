"""The absl launcher end to end, in subprocesses: `python -m muloco_jax.main`."""

import os
import re

from muloco_jax import metrics as metrics_lib
import launcher

NUMBER = r"[0-9.]+(e[+-][0-9]+)?"  # "%.4g"


def _launch(tmp_path, *overrides, devices=2):
  env = {"MULOCO_DATA_DIR": str(tmp_path / "data")}
  return launcher.run(tmp_path / "workdir", *overrides, devices=devices, env=env)


def test_quickstart_runs_end_to_end(tmp_path):
  """quickstart.py (MuLoCo), shrunk: K=2 workers on 2 devices, H=4, 8 steps, byte tokens."""
  result = _launch(
    tmp_path,
    "--config.train.num_steps=8",
    "--config.train.batch_size=8",
    "--config.data.seq_len=32",
    "--config.data.tokenizer=byte",
    "--config.optimizer.warmup_steps=2",
    "--config.diloco.num_workers=2",
    "--config.diloco.sync_every=4",
    "--config.train.log_every=2",
    "--config.train.eval_every=4",
    "--config.train.eval_steps=2",
    "--config.train.checkpoint_every=4",
  )
  assert result.returncode == 0, result.stderr[-5000:]
  workdir = str(tmp_path / "workdir")
  summary = result.stdout.strip().splitlines()[-1]
  assert re.fullmatch(
    rf"Finished 8 steps in {re.escape(workdir)}: train_loss {NUMBER}, eval_loss {NUMBER}, "
    rf"eval_perplexity {NUMBER}, tokens_per_sec {NUMBER}",
    summary,
  ), summary
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == [2, 4, 6, 8]
  assert [r["step"] for r in records if "eval_loss" in r] == [4, 8]
  assert [r["step"] for r in records if "pseudograd_norm" in r] == [4, 8]
  assert all(len(r["worker_train_loss"]) == 2 for r in records if "pseudograd_norm" in r)
  assert f"eval_loss {records[-1]['eval_loss']:.4g}" in summary
  assert records[-1]["eval_loss"] < records[0]["train_loss"]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["4", "8"]


def test_unknown_config_key_fails(tmp_path):
  result = _launch(tmp_path, "--config.train.bogus=1")
  assert result.returncode != 0
  assert "bogus" in result.stderr and "--config.train.bogus" in result.stderr, result.stderr
  assert "Traceback" not in result.stderr
  assert not os.path.exists(tmp_path / "workdir")


def test_quiet_terminal(tmp_path):
  """20 steps with two checkpoints: progress lines and the summary, no library INFO logs."""
  result = _launch(
    tmp_path,
    "--config.train.num_steps=20",
    "--config.train.batch_size=8",
    "--config.data.seq_len=32",
    "--config.data.tokenizer=byte",
    "--config.optimizer.warmup_steps=2",
    "--config.diloco.num_workers=2",
    "--config.diloco.sync_every=5",
    "--config.train.log_every=5",
    "--config.train.eval_every=10",
    "--config.train.eval_steps=2",
    "--config.train.checkpoint_every=10",
  )
  assert result.returncode == 0, result.stderr[-5000:]
  lines = (result.stdout + result.stderr).splitlines()
  assert len(lines) <= 30, "\n".join(lines)
  progress = [line for line in lines if line.startswith("step ")]
  assert len(progress) == 4, lines
  for line, step in zip(progress, (5, 10, 15, 20)):
    assert re.fullmatch(
      rf"step {step}/20  loss {NUMBER}  [0-9,]+ tokens/s  ETA \d+:\d\d:\d\d", line
    ), line
  assert sorted(os.listdir(tmp_path / "workdir" / "checkpoints")) == ["10", "20"]
