"""Fault tolerance: preemption by SIGTERM, lost workers, bad settings caught before compiling."""

import os
import signal
import subprocess
import time

import numpy as np
import pytest

from muloco_jax import config as config_lib
from muloco_jax import metrics as metrics_lib
from muloco_jax import train
import launcher

OVERRIDES = [
  "--config.model.size=tiny",
  "--config.data.tokenizer=byte",
  "--config.data.seq_len=32",
  "--config.train.num_steps=16",
  "--config.train.batch_size=8",
  "--config.train.log_every=1",
  "--config.train.eval_every=8",
  "--config.train.eval_steps=2",
  "--config.train.checkpoint_every=100",
  "--config.optimizer.warmup_steps=2",
  "--config.diloco.num_workers=2",
  "--config.diloco.sync_every=4",
]


def _launch(workdir, data_dir):
  return launcher.start(workdir, f"--config.data.dir={data_dir}", *OVERRIDES)


def _finish(process, timeout=300):
  try:
    output, _ = process.communicate(timeout=timeout)
  except subprocess.TimeoutExpired:
    process.kill()
    raise
  assert process.returncode == 0, output
  return output


def _deterministic(records):
  return [
    {
      k: v
      for k, v in r.items()
      if k not in ("step_time", "tokens_per_sec", "state_bytes_per_device", "live_bytes_per_device")
    }
    for r in records
  ]


def test_sigterm_saves_and_resume_matches_uninterrupted_run(tmp_path):
  data_dir = tmp_path / "data"
  reference = _launch(tmp_path / "reference", data_dir)
  _finish(reference)  # also builds the dataset the next runs share

  workdir = tmp_path / "preempted"
  process = _launch(workdir, data_dir)
  deadline = time.time() + 240
  while len(metrics_lib.read_metrics(str(workdir))) < 6:  # mid-round: H=4
    assert process.poll() is None and time.time() < deadline, "the run ended before SIGTERM"
    time.sleep(0.2)
  process.send_signal(signal.SIGTERM)
  output = _finish(process)
  assert "Preempted: saved the checkpoint of step" in output
  stopped_at = int(output.split("checkpoint of step ")[1].split()[0])
  assert 6 <= stopped_at < 16
  assert os.path.isdir(workdir / "checkpoints" / str(stopped_at))

  output = _finish(_launch(workdir, data_dir))
  assert "Finished 16 steps" in output
  assert _deterministic(metrics_lib.read_metrics(str(workdir))) == _deterministic(
    metrics_lib.read_metrics(str(tmp_path / "reference"))
  )


def _tiny_diloco_config(tmp_path):
  c = config_lib.default_config()
  c.model.dtype = "float32"
  c.data.dir = str(tmp_path / "data")
  c.data.tokenizer = "byte"
  c.data.seq_len = 16
  c.train.update(
    num_steps=10,
    batch_size=8,
    log_every=2,
    eval_every=10,
    eval_steps=1,
    checkpoint_every=10,
    progress_bar=False,
  )
  c.optimizer.warmup_steps = 2
  c.diloco.update(num_workers=4, sync_every=2, drop_workers="1:3-7")
  return c


def test_lost_workers_are_left_out_and_rejoin(tmp_path):
  config = _tiny_diloco_config(tmp_path)
  record = train.train_and_evaluate(config, str(tmp_path / "run"))
  assert np.isfinite(record["eval_loss"])
  syncs = [r for r in metrics_lib.read_metrics(str(tmp_path / "run")) if "sync_bytes" in r]
  assert [r["step"] for r in syncs] == [2, 4, 6, 8, 10]
  for r in syncs:
    lost = 3 <= r["step"] < 7
    assert r["num_contributing"] == (3 if lost else 4)
    assert r["worker_contributed"] == [True, not lost, True, True]
    assert r["worker_opt_state_reset"] == [False, lost, False, False]


@pytest.mark.parametrize(
  "setting, value",
  [
    ("compression.bits", 3),
    ("compression.kind", "zip"),
    ("diloco.num_fragments", 3),  # the tiny model has 2 layers
    ("model.num_layers", -1),
    ("diloco.drop_workers", "7:1-2"),  # only 4 workers
    ("diloco.sync_every", 0),
    ("diloco.adoption", "keep"),
    ("optimizer.name", "lion"),
  ],
)
def test_bad_settings_name_themselves(setting, value, tmp_path):
  config = _tiny_diloco_config(tmp_path)
  section, field = setting.split(".")
  config[section][field] = value
  with pytest.raises(ValueError, match=setting.replace(".", r"\.")):
    config_lib.validate(config)
