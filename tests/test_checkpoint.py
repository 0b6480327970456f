"""Checkpoints that do not fit the config, unreadable ones and transient I/O errors.

One real run (the launcher in a subprocess: MuLoCo, K=2 workers on 2 devices, tiny model,
20 steps, checkpoints 15 and 20) is shared by the tests that rerun its workdir with another
config; each reruns a copy.  Retries and corruption are tested on small toy checkpoints.
"""

import contextlib
import errno
import importlib.util
import json
import logging
import os
import re
import shutil
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muloco_jax import checkpoint as checkpoint_lib
from muloco_jax import metrics as metrics_lib
from muloco_jax import train
import launcher

REPO = launcher.REPO
RUN = {  # configs/quickstart.py, shrunk
  "train.num_steps": 20,
  "train.batch_size": 8,
  "train.log_every": 5,
  "train.eval_every": 10,
  "train.eval_steps": 1,
  "train.checkpoint_every": 5,
  "train.progress_bar": False,
  "data.seq_len": 32,
  "data.tokenizer": "byte",
  "optimizer.warmup_steps": 2,
  "diloco.num_workers": 2,
  "diloco.sync_every": 5,
}


def _overrides(data_dir, **changes) -> dict:
  return {**RUN, "data.dir": data_dir, **{k.replace("__", "."): v for k, v in changes.items()}}


def _launch(workdir, data_dir, **changes):
  """The launcher on 2 CPU devices; `changes` as model__size="small"."""
  flags = [f"--config.{k}={v}" for k, v in _overrides(data_dir, **changes).items()]
  return launcher.run(workdir, *flags)


def _config(data_dir, **changes):
  """The launcher's config, in this process."""
  spec = importlib.util.spec_from_file_location(
    "quickstart", os.path.join(REPO, "configs/quickstart.py")
  )
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config()
  for dotted, value in _overrides(data_dir, **changes).items():
    section, name = dotted.split(".")
    config[section][name] = value
  return config


def _files(directory) -> dict[str, bytes]:
  """{relative path: bytes} of every file under `directory`."""
  files = {}
  for root, _, names in os.walk(directory):
    for name in names:
      path = os.path.join(root, name)
      with open(path, "rb") as f:
        files[os.path.relpath(path, directory)] = f.read()
  return files


def _no_unreadable(workdir):
  for root, dirs, files in os.walk(workdir):
    assert not [n for n in dirs + files if "unreadable" in n], root


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("data"))  # kjv (byte tokens), built by the first run


@pytest.fixture(scope="module")
def run(data_dir, tmp_path_factory):
  """The workdir of the 20-step run, not to be modified (tests copy it)."""
  workdir = str(tmp_path_factory.mktemp("run") / "workdir")
  result = _launch(workdir, data_dir)
  assert result.returncode == 0, result.stderr[-5000:]
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["15", "20"]
  return workdir


@pytest.fixture
def workdir(run, tmp_path):
  """A copy of the run's workdir."""
  copy = str(tmp_path / "workdir")
  shutil.copytree(run, copy)
  return copy


# ----------------------------------------------------------------------------
# A checkpoint of another config: stop, change nothing, say what differs.


def test_other_model_size_stops_the_launcher_and_changes_nothing(workdir, data_dir):
  before = _files(workdir)
  assert "metrics.jsonl" in before and "config.json" in before
  assert sum(name.startswith("checkpoints/") for name in before) > 10
  result = _launch(workdir, data_dir, model__size="small")
  assert result.returncode != 0
  assert "Traceback" not in result.stderr, result.stderr[-5000:]
  message = result.stderr.strip().splitlines()[-1]
  assert message.startswith("FATAL The checkpoint ") and "checkpoints/20 " in message, message
  assert "model.size is 'tiny' there, 'small' now" in message, message
  assert "Nothing was changed" in message and "another --workdir" in message, message
  assert f"delete {os.path.join(workdir, 'checkpoints')}" in message, message
  assert f"rerun it with the settings in {os.path.join(workdir, 'config.json')}" in message
  # Checkpoints, metrics.jsonl, config.json and TensorBoard files: byte for byte as they were.
  assert _files(workdir) == before
  _no_unreadable(workdir)


@pytest.mark.parametrize(
  "changes, setting",
  [
    ({"diloco__num_workers": 4, "train__num_steps": 40}, "diloco.num_workers is 2 there, 4 now"),
    ({"optimizer__name": "adamw"}, "optimizer.name is 'muon' there, 'adamw' now"),
  ],
)
def test_other_layout_is_incompatible_before_anything_changes(workdir, data_dir, changes, setting):
  before = _files(workdir)
  with pytest.raises(checkpoint_lib.IncompatibleCheckpointError) as error:
    train.train_and_evaluate(_config(data_dir, **changes), workdir)
  assert isinstance(error.value, ValueError)
  assert setting in str(error.value)
  if "train__num_steps" in changes:  # every setting that differs is named
    assert "train.num_steps is 20 there, 40 now" in str(error.value)
  else:
    assert "train.num_steps" not in str(error.value)
  assert _files(workdir) == before
  _no_unreadable(workdir)


# ----------------------------------------------------------------------------
# The same state layout: resume.


def test_same_config_resumes_and_rewrites_nothing(workdir, data_dir, caplog):
  before = _files(workdir)
  caplog.set_level(logging.INFO)
  record = train.train_and_evaluate(_config(data_dir), workdir)
  assert "Resumed from the checkpoint at step 20" in caplog.text
  assert record == {"preempted": False}  # nothing left to train
  after = _files(workdir)
  for name, contents in before.items():
    if not name.startswith("tensorboard/"):
      assert after[name] == contents, name
  _no_unreadable(workdir)


def test_longer_run_with_another_learning_rate_resumes(workdir, data_dir):
  metrics_before = _files(workdir)["metrics.jsonl"]
  result = _launch(
    workdir, data_dir, train__num_steps=30, optimizer__learning_rate=0.01, train__eval_every=5
  )
  assert result.returncode == 0, result.stderr[-5000:]
  assert "Finished 30 steps" in result.stdout
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["25", "30"]
  # Resumed at 20: the records of steps 5-20 are those of the first run, byte for byte.
  metrics = _files(workdir)["metrics.jsonl"]
  assert metrics.startswith(metrics_before) and len(metrics) > len(metrics_before)
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)] == [5, 10, 15, 20, 25, 30]
  saved = checkpoint_lib.flatten_config(_config(data_dir, train__num_steps=30))
  written = _config_file(workdir)
  assert written["train.num_steps"] == 30 and written["optimizer.learning_rate"] == 0.01
  assert written.keys() == saved.keys()
  _no_unreadable(workdir)


def _config_file(workdir) -> dict:
  with open(os.path.join(workdir, checkpoint_lib.CONFIG_FILE)) as f:
    return json.load(f)


# ----------------------------------------------------------------------------
# Toy checkpoints: unreadable ones, transient errors.


class ToyState(NamedTuple):
  params: dict
  worker_params: dict
  step: jax.Array


def _toy_state(workers=2, dtype=jnp.float32):
  return ToyState(
    params={"w": jnp.arange(12, dtype=dtype).reshape(4, 3), "b": jnp.ones(3, dtype)},
    worker_params={"w": jnp.zeros((workers, 4, 3), dtype)},
    step=jnp.asarray(7, jnp.int32),
  )


def _toy_checkpointer(directory):
  return checkpoint_lib.Checkpointer(
    str(directory / "checkpoints"),
    keep=5,
    async_save=False,
    config_path=str(directory / "config.json"),
  )


@pytest.fixture
def toy(tmp_path):
  """tmp_path with toy checkpoints 1 and 2 (K=2) and the config of the run that wrote them."""
  checkpointer = _toy_checkpointer(tmp_path)
  for step in (1, 2):
    checkpointer.save(step, _toy_state(), {"position": step})
  checkpointer.write_config({"diloco": {"num_workers": 2}, "train": {"num_steps": 2}})
  checkpointer.close()
  return tmp_path


def _steps(directory):
  return sorted(os.listdir(directory / "checkpoints"))


@pytest.fixture
def fast_retries(monkeypatch):
  monkeypatch.setattr(checkpoint_lib, "RETRIES", 3)
  monkeypatch.setattr(checkpoint_lib, "BACKOFF_S", 0.001)


@contextlib.contextmanager
def _opened(directory):
  checkpointer = _toy_checkpointer(directory)
  try:
    yield checkpointer
  finally:
    checkpointer.close()


def test_toy_checkpoint_restores(toy):
  with _opened(toy) as checkpointer:
    step, state, data = checkpointer.restore_latest(_toy_state())
  assert (step, data) == (2, {"position": 2})
  np.testing.assert_array_equal(state.params["w"], np.arange(12).reshape(4, 3))


class _Buffers(NamedTuple):
  worker_error: dict | None
  owner_error: dict | None


def test_containers_that_changed_type_restore_by_array_names(tmp_path):
  # Before the averagers' NamedTuple states, their buffers were a dict holding only the
  # buffers a run kept ({} without error feedback): such checkpoints restore by array names.
  errors = {"w": jnp.full((2, 4, 3), 0.5)}
  cases = [({"worker_error": errors}, _Buffers(errors, None)), ({}, _Buffers(None, None))]
  for index, (saved_buffers, buffers) in enumerate(cases):
    directory = tmp_path / str(index)
    with _opened(directory) as checkpointer:
      checkpointer.save(1, {"state": _toy_state(), "buffers": saved_buffers}, {"position": 1})
    with _opened(directory) as checkpointer:
      abstract = jax.eval_shape(lambda: {"state": _toy_state(), "buffers": buffers})
      step, restored, _ = checkpointer.restore_latest(abstract)
    assert step == 1 and isinstance(restored["buffers"], _Buffers)
    assert jax.tree.structure(restored) == jax.tree.structure(abstract)
    np.testing.assert_array_equal(restored["state"].params["w"], np.arange(12).reshape(4, 3))
    if buffers.worker_error is not None:
      np.testing.assert_array_equal(restored["buffers"].worker_error["w"], errors["w"])
    assert _steps(directory) == ["1"]  # nothing set aside


@pytest.mark.parametrize(
  "other, difference",
  [
    (
      lambda: _toy_state(workers=4),
      "worker_params.w: [2, 4, 3] float32 in the checkpoint, [4, 4, 3]",
    ),
    (
      lambda: _toy_state(dtype=jnp.bfloat16),
      "params.b: [3] float32 in the checkpoint, [3] bfloat16",
    ),
    (
      lambda: _toy_state()._replace(params={"w": jnp.zeros((4, 3))}),
      "params.b: only in the checkpoint",
    ),
    (
      lambda: _toy_state()._replace(step=(jnp.zeros(()), jnp.zeros(()))),
      "step.1: only in this run",
    ),
  ],
)
def test_toy_structure_mismatch_is_incompatible(toy, other, difference):
  before = _files(toy)
  with _opened(toy) as checkpointer:
    with pytest.raises(
      checkpoint_lib.IncompatibleCheckpointError, match=re.escape(difference)
    ) as error:
      checkpointer.restore_latest(
        other(), {"diloco": {"num_workers": 4}, "train": {"num_steps": 2}}
      )
  assert "diloco.num_workers is 2 there, 4 now" in str(error.value)
  assert "train.num_steps" not in str(error.value)
  assert _files(toy) == before


def test_incompatible_without_saved_config_says_so(toy):
  os.remove(toy / "config.json")
  with _opened(toy) as checkpointer:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="unknown") as error:
      checkpointer.restore_latest(_toy_state(workers=4), {"diloco": {"num_workers": 4}})
  assert "another --workdir" in str(error.value)
  assert _steps(toy) == ["1", "2"]


def _truncate_all(path):
  for root, _, files in os.walk(path):
    for name in files:
      os.truncate(os.path.join(root, name), os.path.getsize(os.path.join(root, name)) // 2)


def test_unreadable_metadata_is_set_aside(toy, caplog):
  _truncate_all(toy / "checkpoints" / "2")
  with _opened(toy) as checkpointer:
    step, _, data = checkpointer.restore_latest(_toy_state())
  assert (step, data) == (1, {"position": 1})
  assert "Checkpoint at step 2 could not be restored" in caplog.text
  assert _steps(toy) == ["1", "2.unreadable"]


def test_unreadable_data_is_set_aside(toy):
  os.remove(toy / "checkpoints" / "2" / "data" / "metadata")  # metadata fine, restore fails
  with _opened(toy) as checkpointer:
    assert checkpointer.restore_latest(_toy_state())[0] == 1
  assert _steps(toy) == ["1", "2.unreadable"]


def test_every_checkpoint_unreadable_starts_afresh(toy):
  _truncate_all(toy / "checkpoints")
  with _opened(toy) as checkpointer:
    assert checkpointer.restore_latest(_toy_state()) is None
  assert _steps(toy) == ["1.unreadable", "2.unreadable"]


def test_unreadable_newest_then_incompatible_renames_nothing(toy):
  _truncate_all(toy / "checkpoints" / "2")
  before = _files(toy)
  with _opened(toy) as checkpointer:
    with pytest.raises(checkpoint_lib.IncompatibleCheckpointError, match="checkpoints/1 "):
      checkpointer.restore_latest(_toy_state(workers=4), {})
  assert _files(toy) == before


TRANSIENT = [
  TimeoutError("timed out"),
  ConnectionResetError("connection reset by peer"),
  PermissionError(errno.EACCES, "permission denied"),
  OSError(errno.EIO, "input/output error"),
  ValueError('UNAVAILABLE: Error reading "params.w/.zarray" in OCDBT database'),
]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_classification(error):
  assert checkpoint_lib.is_transient(error) and not checkpoint_lib.is_unreadable(error)


@pytest.mark.parametrize(
  "error",
  [
    FileNotFoundError("no such file"),
    ValueError("Expecting value: line 1 column 1 (char 0)"),
    ValueError('DATA_LOSS: Error opening "zarr" driver'),
    KeyError("state"),
  ],
  ids=lambda e: type(e).__name__,
)
def test_unreadable_classification(error):
  assert checkpoint_lib.is_unreadable(error) and not checkpoint_lib.is_transient(error)
  wrapped = ValueError("restore failed")
  wrapped.__cause__ = TimeoutError()
  assert checkpoint_lib.is_transient(wrapped)


def _failing(monkeypatch, checkpointer, method, error, times):
  """Makes the manager's `method` raise `error` the first `times` calls; returns the count."""
  calls = []
  original = getattr(checkpointer._manager, method)

  def flaky(*args, **kwargs):
    calls.append(1)
    if len(calls) <= times:
      raise error
    return original(*args, **kwargs)

  monkeypatch.setattr(checkpointer._manager, method, flaky)
  return calls


@pytest.mark.parametrize("method", ["restore", "metadata"])
def test_transient_error_is_retried_then_resumes(toy, monkeypatch, fast_retries, caplog, method):
  with _opened(toy) as checkpointer:
    calls = _failing(monkeypatch, checkpointer, method, TimeoutError("timed out"), times=2)
    step, _, _ = checkpointer.restore_latest(_toy_state())
  assert step == 2 and len(calls) == 3
  assert caplog.text.count("retrying in") == 2
  assert _steps(toy) == ["1", "2"]


@pytest.mark.parametrize("error", TRANSIENT, ids=lambda e: type(e).__name__)
def test_persistent_transient_error_fails_and_renames_nothing(
  toy, monkeypatch, fast_retries, error
):
  before = _files(toy)
  with _opened(toy) as checkpointer:
    calls = _failing(monkeypatch, checkpointer, "restore", error, times=100)
    with pytest.raises(type(error)):
      checkpointer.restore_latest(_toy_state())
  assert len(calls) == 1 + checkpoint_lib.RETRIES  # the newest only: never falls back
  assert _files(toy) == before


def test_other_errors_propagate_and_rename_nothing(toy, monkeypatch):
  with _opened(toy) as checkpointer:
    calls = _failing(monkeypatch, checkpointer, "restore", TypeError("a bug"), times=100)
    with pytest.raises(TypeError):
      checkpointer.restore_latest(_toy_state())
  assert len(calls) == 1 and _steps(toy) == ["1", "2"]
