"""Fault tolerance: preemption by SIGTERM, lost workers, bad settings caught before compiling."""

import os
import signal
import subprocess
import time

import jax
import numpy as np
import optax
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
    losses = np.asarray(r["worker_train_loss"], np.float64)  # a lost worker reports no loss
    assert np.isnan(losses[1]) == lost and np.isfinite(np.delete(losses, 1)).all()
    if "train_loss" in r:
      np.testing.assert_allclose(r["train_loss"], np.nanmean(losses), rtol=1e-6)


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


@pytest.mark.parametrize("workers_after", [2, pytest.param(8, marks=pytest.mark.slow)])
def test_an_elastic_restart_carries_the_shared_state_to_other_k(tmp_path, workers_after):
  """A K=4 run's checkpoint (step 10, a sync step) resumed with K'=2 or 8 and
  diloco.elastic_resume: the shared parameters, outer state and step are the checkpoint's;
  every worker holds the shared parameters, a fresh inner state at worker 0's schedule
  positions; the run then trains on.  Without diloco.elastic_resume the other K is refused by
  name, nothing changed."""
  config = _tiny_diloco_config(tmp_path)
  config.diloco.drop_workers = ""
  workdir = str(tmp_path / "run")
  train.train_and_evaluate(config, workdir)
  saved = train._start_run(config, workdir)  # the K=4 state at step 10
  saved.checkpointer.close()
  config.diloco.num_workers = workers_after
  with pytest.raises(ValueError, match=f"diloco.num_workers is 4 there, {workers_after} now"):
    train._start_run(config, workdir)
  config.diloco.elastic_resume = True
  run = train._start_run(config, workdir)
  run.checkpointer.close()
  before, after = jax.device_get(saved.state), jax.device_get(run.state)
  assert run.start_step == 10 and int(after.step) == int(before.step) == 10
  same = lambda a, b: jax.tree.map(np.testing.assert_array_equal, a, b)
  same(after.params, before.params)
  same(after.outer_opt_state, before.outer_opt_state)
  same(after.worker_params, jax.tree.map(lambda x: np.stack([x] * workers_after), before.params))
  is_schedule = lambda node: isinstance(node, optax.ScaleByScheduleState)
  positions = lambda s: [
    np.asarray(n.count) for n in jax.tree.leaves(s, is_leaf=is_schedule) if is_schedule(n)
  ]
  assert positions(before.worker_opt_state)
  for now, then in zip(positions(after.worker_opt_state), positions(before.worker_opt_state)):
    np.testing.assert_array_equal(now, np.full(workers_after, then[0]))
  config.train.num_steps = 14
  record = train.train_and_evaluate(config, workdir)
  assert np.isfinite(record["train_loss"])


def test_elastic_resume_refuses_overlap_by_name(tmp_path):
  config = _tiny_diloco_config(tmp_path)
  config.diloco.update(elastic_resume=True, overlap_steps=1)
  with pytest.raises(ValueError, match=r"^diloco\.elastic_resume=True cannot resume"):
    config_lib.validate(config)
