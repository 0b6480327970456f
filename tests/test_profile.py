"""`train.profile_steps`: a jax.profiler trace of chosen steps in WORKDIR/profile."""

import glob
import os

import jax
import pytest

from muloco_jax import config as config_lib
from muloco_jax import metrics as metrics_lib
from muloco_jax import train
from tiny_run import tiny_config


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


def _config(data_dir, num_steps):
  """Logs every step, checkpoints every 2; traces step 3 alone (no save or eval in it)."""
  c = tiny_config(data_dir)
  c.train.update(
    num_steps=num_steps,
    log_every=1,
    eval_every=num_steps,
    eval_steps=1,
    checkpoint_every=2,
    profile_steps="3:4",
  )
  c.optimizer.warmup_steps = 1
  return c


def _traces(workdir):
  """{file name: bytes} of each trace written under WORKDIR/profile, oldest first."""
  runs = sorted(glob.glob(os.path.join(workdir, "profile", "plugins", "profile", "*")))
  return [
    {name: os.path.getsize(os.path.join(run, name)) for name in os.listdir(run)} for run in runs
  ]


def _viewable(trace):
  """TensorBoard's profile plugin reads the XPlane, Perfetto the JSON trace."""
  xplanes = [name for name in trace if name.endswith(".xplane.pb")]
  return (
    bool(xplanes) and all(trace[n] > 0 for n in xplanes) and trace["perfetto_trace.json.gz"] > 0
  )


class _Died(Exception):
  pass


def test_profile_steps_trace_this_run_and_stop_on_an_early_exit(data_dir, tmp_path, monkeypatch):
  workdir = str(tmp_path)
  write = metrics_lib.MetricsWriter.write

  def die_at_step_3(self, step, record):
    write(self, step, record)
    if step == 3:
      raise _Died()

  # Dies inside the window, after the checkpoint of step 2: the trace is written all the same.
  with monkeypatch.context() as m:
    m.setattr(metrics_lib.MetricsWriter, "write", die_at_step_3)
    with pytest.raises(_Died):
      train.train_and_evaluate(_config(data_dir, 4), workdir)
  with pytest.raises(RuntimeError, match="No profile started"):
    jax.profiler.stop_trace()
  (died,) = _traces(workdir)
  assert _viewable(died), died
  # Resumed at step 2, before the window: traced.
  train.train_and_evaluate(_config(data_dir, 4), workdir)
  assert len(_traces(workdir)) == 2 and _viewable(_traces(workdir)[1])
  # Resumed at step 4, past it: nothing.
  train.train_and_evaluate(_config(data_dir, 6), workdir)
  assert len(_traces(workdir)) == 2
  assert metrics_lib.read_metrics(workdir)[-1]["step"] == 6


@pytest.mark.parametrize("spec", ["5", "a:b", "1:2:3", "3:3", "4:2", "0:2", "2:26"])
def test_bad_profile_steps_are_refused_naming_the_key(spec):
  config = tiny_config("unused")  # 24 steps: END may be 25
  config.train.profile_steps = spec
  with pytest.raises(ValueError, match=r"^train\.profile_steps="):
    config_lib.validate(config)
  config.train.profile_steps = "1:25"
  config_lib.validate(config)
