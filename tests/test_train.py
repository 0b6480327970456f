"""End-to-end tests of the training harness (`train.train_and_evaluate`).

Tiny model, byte-level KJV, 32-token sequences, batch 16, tens of steps; the
conftest's 8 CPU devices make the data-parallel mesh 8 wide and the DiLoCo mesh
4 workers wide.  Each run jits fresh closures, so the module shares XLA
executables between runs through a temporary persistent compilation cache
(identical programs, so bitwise-identical results, at a fraction of the compile
time).

Interruption is a simulated preemption: `MetricsWriter.write` raises after
writing a chosen step, i.e. the run dies between two checkpoints with metrics
logged past the last one.  The rerun of the same config must resume from that
checkpoint and reproduce the uninterrupted run bit for bit (the lr schedule and
the data order depend only on the config and the step).
"""

import gc
import glob
import logging
import math
import os
import shutil

import jax
import numpy as np
import orbax.checkpoint as ocp
import pytest

from muloco_jax import metrics as metrics_lib
from muloco_jax import model as model_lib
from muloco_jax import sharding
from muloco_jax import train
from tiny_run import tiny_config

# Fields that depend on the invocation (wall clock; the state bytes of its first record).
TIMING = ("step_time", "tokens_per_sec", "state_bytes_per_device", "live_bytes_per_device")
SYNC_KEYS = (
  "pseudograd_norm",
  "worker_train_loss",
  "worker_train_loss_spread",
  "worker_cosine",
  "sync_bytes",
  "comm_bytes_total",
)
BYTE_VOCAB = 257  # 256 bytes + EOS


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


def _muloco_config(data_dir):
  """K=4 Muon workers, H=4, 10 steps: syncs at 4, 8 and the final step 10."""
  c = tiny_config(data_dir)
  c.train.num_steps = 10
  c.train.log_every = 3  # sync steps 4 and 8 are not log steps
  c.train.eval_every = 5
  c.train.checkpoint_every = 3  # 6 is mid-round
  c.optimizer.name = "muon"
  c.optimizer.learning_rate = 0.02
  c.optimizer.adam_learning_rate = 3e-3
  c.optimizer.ns_dtype = "float32"
  c.diloco.num_workers = 4
  c.diloco.sync_every = 4
  return c


class _Preempted(Exception):
  pass


def _run_and_die_after(monkeypatch, config, workdir, step):
  """Runs `config` in `workdir` until it dies right after logging `step`."""
  write = metrics_lib.MetricsWriter.write

  def write_then_die(self, s, record):
    write(self, s, record)
    if s == step:
      raise _Preempted(f"preempted after step {s}")

  with monkeypatch.context() as m:
    m.setattr(metrics_lib.MetricsWriter, "write", write_then_die)
    with pytest.raises(_Preempted):
      train.train_and_evaluate(config, workdir)


def _records(workdir):
  """metrics.jsonl without the per-invocation fields."""
  return [
    {k: v for k, v in r.items() if k not in TIMING} for r in metrics_lib.read_metrics(workdir)
  ]


def _checkpointed_state(workdir, step):
  with ocp.StandardCheckpointer() as checkpointer:
    state = checkpointer.restore(os.path.join(workdir, "checkpoints", str(step), "state"))
  return jax.tree.map(np.asarray, state)


def _assert_same_state(workdir, reference_workdir, step):
  ours, theirs = _checkpointed_state(workdir, step), _checkpointed_state(reference_workdir, step)
  assert jax.tree.structure(ours) == jax.tree.structure(theirs)
  for a, b in zip(jax.tree.leaves(ours), jax.tree.leaves(theirs)):
    np.testing.assert_array_equal(a, b)


@pytest.fixture(scope="module")
def dp_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("dp"))
  record = train.train_and_evaluate(tiny_config(data_dir), workdir)
  return workdir, record


@pytest.fixture(scope="module")
def muloco_run(data_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("muloco"))
  train.train_and_evaluate(_muloco_config(data_dir), workdir)
  return workdir


# ----------------------------------------------------------------------------
# Data parallel.


def test_dp_run_learns_and_logs(dp_run):
  workdir, final = dp_run
  records = metrics_lib.read_metrics(workdir)
  assert [r["step"] for r in records] == list(range(2, 25, 2))  # log steps (evals are on them)
  for r in records:
    for key in ("train_loss", "lr", "grad_norm", "tokens_per_sec", "step_time"):
      assert np.isfinite(r[key]), (r["step"], key)
    assert ("eval_loss" in r) == (r["step"] % 8 == 0), r["step"]
    assert not any(key in r for key in SYNC_KEYS)
  evals = [r["eval_loss"] for r in records if "eval_loss" in r]
  train_losses = [r["train_loss"] for r in records]
  assert train_losses[0] > math.log(BYTE_VOCAB) - 0.5  # starts near uniform
  assert evals[-1] < evals[0] - 0.2
  assert np.mean(train_losses[-3:]) < np.mean(train_losses[:3]) - 1.0
  lrs = [r["lr"] for r in records]
  assert max(lrs) == pytest.approx(3e-3, rel=0.05) and lrs[-1] < 0.25 * max(lrs)
  assert final.pop("preempted") is False
  assert final == {k: v for k, v in records[-1].items() if k != "step"}
  events = glob.glob(os.path.join(workdir, "tensorboard", "events.out.tfevents.*"))
  assert events and all(os.path.getsize(e) > 0 for e in events)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24"]


def test_dp_resume_after_preemption_matches_uninterrupted_run(
  dp_run, data_dir, tmp_path, monkeypatch
):
  reference, _ = dp_run
  workdir = str(tmp_path)
  _run_and_die_after(monkeypatch, tiny_config(data_dir), workdir, step=14)
  assert metrics_lib.read_metrics(workdir)[-1]["step"] == 14  # logged past checkpoint 8
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["8"]
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert _records(workdir) == _records(reference)
  _assert_same_state(workdir, reference, 24)
  # Each invocation's first record holds the state bytes on the fullest device: params and two
  # AdamW moments split 8 ways (replicated, the state would be 3x the params).
  param_bytes = 4 * model_lib.param_count(model_lib.model_config("tiny", vocab_size=257))
  first_of_resumed = next(r for r in metrics_lib.read_metrics(workdir) if r["step"] > 8)
  for first in (metrics_lib.read_metrics(reference)[0], first_of_resumed):
    assert 3 * param_bytes / 8 <= first["state_bytes_per_device"] < 0.4 * param_bytes


def test_corrupt_latest_checkpoint_falls_back_to_previous(dp_run, data_dir, tmp_path, caplog):
  reference, _ = dp_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  latest = os.path.join(workdir, "checkpoints", "24")
  for root, _, files in os.walk(latest):  # truncate every file of the newest checkpoint
    for name in files:
      path = os.path.join(root, name)
      os.truncate(path, os.path.getsize(path) // 2)
  caplog.set_level(logging.INFO)
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  assert "Checkpoint at step 24 could not be restored" in caplog.text
  assert "Resumed from the checkpoint at step 16" in caplog.text
  assert _records(workdir) == _records(reference)
  # The unreadable checkpoint is kept aside and step 24 was saved again.
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["16", "24", "24.unreadable"]
  _assert_same_state(workdir, reference, 24)


def test_resume_at_another_batch_size_continues_after_the_last_example(dp_run, data_dir, tmp_path):
  """Saved after 24 batches of 16, resumed at batch 24: step 25 reads examples 384..407 of the
  stream (not 576.., 24 batches of 24), and its logged loss is the saved parameters' on them."""
  from muloco_jax import data as data_lib

  reference, _ = dp_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  config = tiny_config(data_dir)
  config.train.batch_size, config.train.num_steps = 24, 25
  train.train_and_evaluate(config, workdir)
  resumed = metrics_lib.read_metrics(workdir)[-1]
  assert resumed["step"] == 25
  batch = next(
    data_lib.get_dataset(config.data).train_iterator(24, config.seed, start_example=24 * 16)
  )
  model = train.make_model(config, BYTE_VOCAB)
  saved = _checkpointed_state(reference, 24)
  expected = jax.jit(train.make_loss_fn(model))(saved["params"], batch)
  np.testing.assert_allclose(resumed["train_loss"], expected, rtol=1e-5)
  with ocp.CheckpointManager(os.path.join(workdir, "checkpoints")) as manager:
    data_state = manager.restore(25, args=ocp.args.Composite(data=ocp.args.JsonRestore())).data
  assert data_state["data_iterator"] == {"examples": 24 * 16 + 24}


def test_resume_holds_the_state_once(dp_run, data_dir, tmp_path):
  """Restored straight into the state's layout: once the state is restored, the run holds it
  and nothing else (restored into a fresh state, it held both: 2x)."""
  reference, _ = dp_run
  workdir = str(tmp_path / "run")
  shutil.copytree(reference, workdir)
  shutil.rmtree(os.path.join(workdir, "checkpoints", "24"))
  # Earlier tests' runs in this process leave arrays in reference cycles; freed mid-run they
  # would count against this run.
  gc.collect()
  before = sharding.live_bytes_per_device()  # what this test process holds already
  train.train_and_evaluate(tiny_config(data_dir), workdir)
  first = next(r for r in metrics_lib.read_metrics(workdir) if r["step"] > 16)
  state_bytes = first["state_bytes_per_device"]
  assert state_bytes <= first["live_bytes_per_device"] - before < 1.05 * state_bytes


def test_older_checkpoints_count_batches_of_their_batch_size():
  config = tiny_config("unused")
  assert train.examples_consumed({"examples": 100}, None, config) == 100
  assert train.examples_consumed({"step": 8}, {"train.batch_size": 32}, config) == 256
  assert train.examples_consumed({"step": 8}, None, config) == 8 * config.train.batch_size


# ----------------------------------------------------------------------------
# DiLoCo (MuLoCo: Muon inner optimizer).


def test_muloco_logs_sync_metrics_at_sync_steps(muloco_run):
  records = {r["step"]: r for r in metrics_lib.read_metrics(muloco_run)}
  assert sorted(records) == [3, 4, 5, 6, 8, 9, 10]  # log 3, 6, 9, 10; eval 5, 10; sync 4, 8, 10
  params = model_lib.param_count(model_lib.model_config("tiny", vocab_size=BYTE_VOCAB))
  comm_total = 0.0
  for step, r in records.items():
    synced = step in (4, 8, 10)
    assert all((key in r) == synced for key in SYNC_KEYS), (step, sorted(r))
    assert ("train_loss" in r) == (step in (3, 6, 9, 10)), step
    if not synced:
      continue
    assert r["sync_bytes"] == 4 * 4 * params  # K float32 pseudogradients, uncompressed
    comm_total += r["sync_bytes"]
    assert r["comm_bytes_total"] == comm_total
    assert len(r["worker_train_loss"]) == len(r["worker_cosine"]) == 4
    spread = max(r["worker_train_loss"]) - min(r["worker_train_loss"])
    assert r["worker_train_loss_spread"] == pytest.approx(spread)
    assert r["pseudograd_norm"] > 0 and all(0 < c <= 1 + 1e-6 for c in r["worker_cosine"])
  assert records[10]["eval_loss"] < min(records[5]["eval_loss"], math.log(BYTE_VOCAB) - 1)


def test_muloco_resume_mid_round_matches_uninterrupted_run(
  muloco_run, data_dir, tmp_path, monkeypatch
):
  workdir = str(tmp_path)
  # Dies after logging step 9 (and the sync of step 8), before checkpointing step 9.
  _run_and_die_after(monkeypatch, _muloco_config(data_dir), workdir, step=9)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["3", "6"]  # 6: mid-round
  assert [r["step"] for r in metrics_lib.read_metrics(workdir)][-2:] == [8, 9]
  train.train_and_evaluate(_muloco_config(data_dir), workdir)
  assert _records(workdir) == _records(muloco_run)  # incl. sync metrics and comm_bytes_total
  _assert_same_state(workdir, muloco_run, 10)


def _overlap_config(data_dir, overlap_steps=2):
  """The MuLoCo run with the exchange of the syncs at 4 and 8 in the programs of steps 5 and 9,
  adopted after 6 and 10 (tau = 2); checkpoints at 5, between an exchange and its adoption."""
  c = _muloco_config(data_dir)
  c.diloco.overlap_steps = overlap_steps
  c.train.checkpoint_every = 5
  return c


def test_overlapped_resume_between_exchange_and_adoption_matches_uninterrupted_run(
  data_dir, tmp_path, monkeypatch
):
  reference, workdir = str(tmp_path / "reference"), str(tmp_path / "resumed")
  train.train_and_evaluate(_overlap_config(data_dir), reference)
  records = {r["step"]: r for r in metrics_lib.read_metrics(reference)}
  # Sync records come with the program that ran the exchange, and with the final sync.
  # (The final step adopts the sync of 8 and has nothing left to sync.)
  assert [s for s, r in records.items() if "pseudograd_norm" in r] == [5, 9]
  _run_and_die_after(monkeypatch, _overlap_config(data_dir), workdir, step=6)
  assert sorted(os.listdir(os.path.join(workdir, "checkpoints"))) == ["5"]
  # The exchange of the sync at 4 is in flight at 5: another tau would adopt it never.
  records, config_json = _records(workdir), open(os.path.join(workdir, "config.json")).read()
  with pytest.raises(ValueError, match=r"^diloco.overlap_steps=1 differs"):
    train.train_and_evaluate(_overlap_config(data_dir, overlap_steps=1), workdir)
  assert _records(workdir) == records
  assert open(os.path.join(workdir, "config.json")).read() == config_json
  train.train_and_evaluate(_overlap_config(data_dir), workdir)
  assert _records(workdir) == _records(reference)
  _assert_same_state(workdir, reference, 10)
  longer = _overlap_config(data_dir)
  longer.train.num_steps = 12
  with pytest.raises(ValueError, match=r"^train.num_steps=12 extends a run that finished"):
    train.train_and_evaluate(longer, workdir)


def test_overlap_of_one_step_learns_as_well(data_dir, tmp_path):
  """tau = 1 against tau = 0: K=4 Muon workers, H=6, 60 steps, mixing 0.5 (with mixing 0 the
  step made during the exchange is dropped on adoption, as in the authors' code: 1 in 6 here);
  final eval losses within 0.05."""
  losses = []
  for tau in (0, 1):
    c = _overlap_config(data_dir, tau)
    c.train.num_steps, c.diloco.sync_every, c.diloco.mixing = 60, 6, 0.5
    c.train.eval_every = c.train.checkpoint_every = 60
    record = train.train_and_evaluate(c, str(tmp_path / f"tau{tau}"))
    losses.append(record["eval_loss"])
  assert losses[0] < math.log(BYTE_VOCAB) - 1  # it learned
  assert abs(losses[1] - losses[0]) < 0.05, losses


# ----------------------------------------------------------------------------
# Errors: raised before anything is compiled.


@pytest.fixture
def no_compilation():
  """Fails the test if JAX traces, lowers or compiles anything."""
  events = []

  def listener(event, duration, **kwargs):
    del duration
    if event.startswith("/jax/core/compile/"):
      events.append((event, kwargs.get("fun_name")))

  jax.monitoring.register_event_duration_secs_listener(listener)
  yield events
  jax.monitoring.unregister_event_duration_listener(listener)
  assert not events, events


def _set(config, dotted, value):
  section, name = dotted.split(".")
  config[section][name] = value


@pytest.mark.parametrize(
  "overrides, setting",
  [
    ({"model.size": "huge"}, "model.size"),
    ({"optimizer.name": "adam"}, "optimizer.name"),
    ({"optimizer.warmup_steps": 24}, "optimizer.warmup_steps"),
    ({"data.seq_len": 4096}, "data.seq_len"),
    (
      {"diloco.num_workers": 4, "diloco.fsdp": 2, "train.batch_size": 12},
      "train.batch_size",
    ),
    ({"diloco.num_workers": 4, "diloco.sync_every": 0}, "diloco.sync_every"),
    (
      {"diloco.num_workers": 2, "diloco.sync_every": 1, "diloco.num_fragments": 2},
      "diloco.num_fragments",
    ),
    ({"diloco.num_workers": 4, "diloco.fsdp": 3}, "diloco.fsdp"),
    (
      {"diloco.num_workers": 4, "diloco.sync_every": 4, "diloco.overlap_steps": 4},
      "diloco.overlap_steps",
    ),
    ({"diloco.num_workers": 4, "diloco.mixing": 1.5}, "diloco.mixing"),
    (
      {
        "diloco.num_workers": 4,
        "compression.kind": "linear",
        "compression.error_feedback_scale": "lr",
      },
      "compression.error_feedback_scale",
    ),
    ({"diloco.num_workers": 0, "diloco.fsdp": 3}, "diloco.fsdp"),
  ],
)
def test_bad_setting_raises_before_compiling(
  overrides, setting, data_dir, tmp_path, no_compilation
):
  config = tiny_config(data_dir)
  for dotted, value in overrides.items():
    _set(config, dotted, value)
  with pytest.raises(ValueError, match=rf"^{setting}="):
    train.train_and_evaluate(config, str(tmp_path))
  assert not os.listdir(tmp_path)


def test_missing_dataset_fails_at_once(tmp_path, no_compilation):
  config = tiny_config(str(tmp_path / "empty"))
  config.data.name = "lm1b"
  with pytest.raises(ValueError, match="lm1b") as error:
    train.train_and_evaluate(config, str(tmp_path / "workdir"))
  assert str(tmp_path / "empty") in str(error.value)
  assert not os.path.exists(tmp_path / "workdir")
