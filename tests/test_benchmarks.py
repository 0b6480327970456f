"""The train-step benchmark (`muloco_jax.tools.benchmarks.train_step`) and its peak (`peak.py`);
the table of bytes per sync (`sync_bytes.py`).

Tables 3-5 come from the harness and bare loops run in process on a tiny model (few steps, one
window), where every batch the algorithm's `train_step` is given is recorded: the bare loop
replays the harness's own.  Tables 1-2 come from the command line (`--harness_steps=0`).
"""

import hashlib
import os
import re
import subprocess
import sys
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muloco_jax import runtime
from muloco_jax.tools.benchmarks import peak as peak_lib
from muloco_jax.tools.benchmarks import sync_bytes
from muloco_jax.tools.benchmarks import train_step

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


pytestmark = pytest.mark.usefixtures("shared_compilation_cache")


def test_mfu_over_100_percent_raises():
  assert peak_lib.mfu(0.5e12, 1e12, "step") == 0.5
  with pytest.raises(ValueError, match=r"^DP muon: MFU 120\.0% > 100%"):
    peak_lib.mfu(1.2e12, 1e12, "DP muon")


def test_peak_is_the_datasheet_figure_when_known_else_measured():
  h200 = types.SimpleNamespace(device_kind="NVIDIA H200", platform="gpu")
  known = peak_lib.peak(jnp.bfloat16, h200)
  assert known == peak_lib.Peak(989.4e12, "datasheet (NVIDIA H200)", "gpu")
  assert known.of(8) == 8 * 989.4e12
  cpu = jax.devices()[0]
  measured = peak_lib.peak(jnp.float32, cpu, max_size=256, repeats=2)
  assert measured.source.startswith("measured (float32 256x256 matmuls")
  assert 1e9 < measured.flops < 1e14
  assert measured.of(8) == measured.flops  # virtual CPU devices share the host's cores


def test_bare_loop_replays_the_harness_batches(data_dir, monkeypatch, capsys):
  config = train_step.harness_config(
    "adamw",
    0,
    size="tiny",
    dtype="float32",
    batch_size=1,
    seq_len=16,
    tokenizer="byte",
    vocab_size=4096,
    steps=2,
    windows=1,
    sync_every=30,
  )
  config.data.dir = data_dir
  seen = []  # (step, final, digest of the batch) of every call
  train_step_of = runtime.DataParallel.train_step

  def recording(self, state, batch, step, final):
    tokens = np.asarray(jax.device_get(batch["inputs"]))
    seen.append((step, final, hashlib.sha1(tokens.tobytes()).hexdigest()))
    return train_step_of(self, state, batch, step, final)

  monkeypatch.setattr(runtime.DataParallel, "train_step", recording)
  result = train_step.harness_vs_bare_loop(config, windows=1)
  harness, replay, alternating = seen[:4], seen[4:8], seen[8:]
  assert [s[:2] for s in harness] == [(1, False), (2, False), (3, False), (4, True)]
  assert replay == harness
  # Then a window of the first two batches, and one of uniform tokens, at steps 1 and 2.
  assert alternating[:2] == harness[:2]
  assert [s[:2] for s in alternating[2:]] == [(1, False), (2, False)]
  assert not {s[2] for s in alternating[2:]} & {s[2] for s in harness}
  assert result.tokens_per_step == 8 * 16  # one sequence per device, 8 devices
  assert min(result.harness, result.bare, result.corpus, result.uniform) > 0

  capsys.readouterr()
  peak = peak_lib.peak(jnp.float32, max_size=256, repeats=2)
  train_step.print_harness_tables([("DP adamw", result)], peak.of(8), "kjv")
  out = capsys.readouterr().out
  for header in (
    "| method | harness step (ms) | harness tokens/s | harness MFU | bare loop, same batches",
    "| method | bare step, kjv tokens (ms) | bare step, uniform tokens (ms) | kjv / uniform",
    "| method | input pipeline tokens/s per host (iterator + place_batch) |",
  ):
    assert header in out, out
  assert len(re.findall(r"^\| DP adamw \|", out, re.MULTILINE)) == 3, out
  assert all(0 < float(p) <= 100 for p in re.findall(r"([\d.]+)%", out)), out


def _result(**changes):
  return train_step.HarnessResult(
    **{
      "harness": 0.1,
      "bare": 0.1,
      "corpus": 0.1,
      "uniform": 0.1,
      "pipeline_tokens_per_sec": 1e6,
      "tokens_per_step": 1000,
      "flops_per_token": 1e6,
      **changes,
    }
  )


def test_harness_tables_warn_of_a_slow_pipeline_and_refuse_an_impossible_mfu(capsys):
  # The step consumes 10k tokens/s at 1e10 FLOP/s.
  train_step.print_harness_tables(
    [("fast", _result()), ("slow", _result(pipeline_tokens_per_sec=2.5e4))], 1e11, "kjv"
  )
  warnings = [line for line in capsys.readouterr().out.splitlines() if "WARNING" in line]
  assert len(warnings) == 1 and warnings[0].startswith("WARNING: slow: the input pipeline")
  with pytest.raises(ValueError, match=r"^DP muon harness: MFU 1000\.0% > 100%"):
    train_step.print_harness_tables([("DP muon", _result())], 1e9, "kjv")


@pytest.mark.slow  # the command line end to end (~25 s); the MFU guard is tested above
def test_benchmark_prints_tables_1_and_2(tmp_path):
  env = dict(
    os.environ,
    XLA_FLAGS="--xla_force_host_platform_device_count=1",
    # XLA's cost analysis compiles the programs the timed steps compiled: from this cache.
    JAX_COMPILATION_CACHE_DIR=str(tmp_path / "xla_cache"),
    JAX_PERSISTENT_CACHE_MIN_COMPILE_TIME_SECS="0",
    JAX_PERSISTENT_CACHE_MIN_ENTRY_SIZE_BYTES="0",
  )
  command = [
    sys.executable,
    "-m",
    "muloco_jax.tools.benchmarks.train_step",
    "--size=tiny",
    "--seq_len=16",
    "--batch_size=1",
    "--optimizers=sgd",
    "--workers=1",
    "--steps=1",
    "--repeats=1",
    "--harness_steps=0",
    "--max_matmul_size=256",
  ]
  result = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
  assert result.returncode == 0, result.stderr[-3000:]
  out = result.stdout
  assert "peak " in out and "TFLOP/s per host, measured (float32" in out
  assert "| optimizer | devices | tokens/step | step (ms) | tokens/s | MFU |" in out
  assert "| inner | K (devices) | DP step (ms) | DiLoCo inner step (ms) |" in out
  rows = [line for line in out.splitlines() if re.match(r"\| (DP )?sgd \| 1 \|", line)]
  assert len(rows) == 2, out
  assert all(0 < float(p) <= 100 for row in rows for p in re.findall(r"([\d.]+)%", row)), rows


def test_reduce_scatter_sends_under_0_3x_of_all_gather_on_150m_at_k8():
  """The README's table (python -m muloco_jax.tools.benchmarks.sync_bytes): at K=8, 2 and 4 bits."""
  (row,) = sync_bytes.table("150m", [8], [2, 4], "vectors")
  for bits in (2, 4):
    assert row[f"{bits}-bit reduce_scatter"] <= 0.3 * row[f"{bits}-bit all_gather"]
    assert row[f"{bits}-bit reduce_scatter"] < 0.15 * row["float32 mean"]
