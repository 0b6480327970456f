"""`python -m muloco_jax.tools.aot`: the training programs compiled for TPU topologies on this
CPU host."""

import importlib.util
import json
import os
import subprocess
import sys

import pytest

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
GIB = 2**30

pytestmark = pytest.mark.skipif(
  importlib.util.find_spec("libtpu") is None,
  reason='libtpu compiles for TPU topologies: pip install -e ".[tpu]"',
)


def _aot(config, topology, *overrides, timeout=600):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  command = [
    sys.executable,
    "-m",
    "muloco_jax.tools.aot",
    f"--config=configs/{config}.py",
    f"--topology={topology}",
    *overrides,
  ]
  result = subprocess.run(
    command, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout
  )
  print(result.stdout)
  return result


def _summary(result):
  return json.loads(result.stdout.strip().splitlines()[-1])


TINY = [
  "--config.model.size=tiny",
  "--config.model.dtype=bfloat16",
  "--config.optimizer.ns_dtype=bfloat16",
  "--config.train.batch_size=8",
  "--config.data.seq_len=64",
]


def test_muloco_fits_and_syncs_across_workers():
  """MuLoCo K=2 on 4 v5p chips (2 workers x fsdp 2): both programs fit, the train state is 1/4
  of a replicated one, and the outer sync moves each worker's float32 parameters to the owners
  of the shared shards (all-to-all) and gathers the new shared parameters back (all-gather),
  both across workers; nothing parameter-sized is all-reduced."""
  result = _aot("muloco", "v5p:2x2x1", *TINY, "--config.diloco.num_workers=2")
  assert result.returncode == 0, result.stderr[-5000:]
  summary = _summary(result)
  assert summary["fits"] is True and summary["topology"] == "v5p:2x2x1"
  assert 90 * GIB < summary["hbm_bytes"] < 100 * GIB  # v5p: 95.74 GiB per chip
  programs = summary["programs"]
  assert set(programs) == {"init", "inner_step", "outer_sync", "eval_step", "restore"}
  for program in programs.values():
    assert program["fits"] is True
    assert 0 < program["peak_bytes"] < summary["hbm_bytes"]
  for name in ("inner_step", "outer_sync"):  # the state is donated
    assert programs[name]["argument_bytes"] > 0 and programs[name]["alias_bytes"] > 0
  assert summary["peak_bytes_per_device"] == max(p["peak_bytes"] for p in programs.values())
  # A resume holds the state once; a fresh run's init holds its parameters beside it.
  assert programs["restore"]["peak_bytes"] == summary["state_bytes_per_device"]
  assert programs["init"]["peak_bytes"] > summary["state_bytes_per_device"]
  # Every state leaf is split over the 4 chips (per-worker ones over worker x fsdp, the shared
  # ones over fsdp and the worker axis), up to the replicated scalars.
  assert 0.25 < summary["state_bytes_per_device"] / summary["state_bytes_total"] < 0.251
  # The tiny model: 1.5M float32 parameters, 5.9 MB; a worker's shard is half, an owned quarter.
  params = 4 * 1475328
  collectives = summary["programs"]["outer_sync"]["collectives"]
  for kind, share in (("all-to-all", 1 / 2), ("all-gather", 1 / 4)):
    assert collectives[kind]["cross_worker"] >= 1
    assert 0.9 * share < collectives[kind]["operand_bytes"] / params < 1.1 * share, kind
  assert collectives["all-reduce"]["operand_bytes"] < 0.01 * params  # counts, norms, gains
  assert "outer_sync: peak" in result.stdout and "all-to-all:" in result.stdout
  # The inner step never crosses workers on TPU either (the loss picks target logits with a
  # masked sum: the TPU partitioner made the gather it replaced an all-to-all across workers).
  inner = summary["programs"]["inner_step"]["collectives"]
  assert inner and all(c["cross_worker"] == 0 for c in inner.values()), inner


@pytest.mark.parametrize("scan_layers", [False, True])
def test_overlapped_exchange_runs_under_the_inner_steps_matmuls(scan_layers):
  """K=2 on two v5p slices (a worker each), tau=1: the workers' exchange goes over the
  data-centre network as async send/recv pairs; in the overlapped step the inner step's matrix
  multiplies are scheduled between their starts and dones, in the plain outer sync none are.
  The overlapped step sends what the outer sync sends, and its inner step nothing."""
  result = _aot(
    "muloco",
    "v5p:2x2x1",
    *TINY,
    "--num_slices=2",
    "--config.diloco.num_workers=2",
    "--config.diloco.overlap_steps=1",
    f"--config.model.scan_layers={scan_layers}",  # scanned: the matmuls sit in a loop body
  )
  assert result.returncode == 0, result.stderr[-5000:]
  programs = _summary(result)["programs"]
  # tau = 1: the step after a sync exchanges it and adopts it; the final step syncs at once.
  overlapped = "overlapped_step[exchange, adopt]"
  assert set(programs) == {"init", "inner_step", overlapped, "outer_sync", "eval_step", "restore"}
  assert not any(k.startswith("dcn") for k in programs["inner_step"]["collectives"])
  for kind in ("send", "recv"):
    assert programs[overlapped]["overlap"][kind]["with_matmuls"] >= 1
    assert programs["outer_sync"]["overlap"][kind]["with_matmuls"] == 0
  dcn = lambda name: sum(
    c["operand_bytes"]
    for kind, c in programs[name]["collectives"].items()
    if kind.startswith("dcn")
  )
  assert dcn(overlapped) == dcn("outer_sync") > 0
  assert "send start..done:" in result.stdout


@pytest.mark.slow  # ~40 s of CPU: eight programs compiled
def test_every_program_of_a_streaming_overlapped_run():
  """Streaming MuLoCo (2 fragments, H=4, tau=2) for 9 steps: fragment 0 syncs at 2 and 6,
  fragment 1 at 4 and 8, each exchanged a step later and adopted two steps after its sync;
  the final step 9 adopts fragment 1's exchange in flight and syncs fragment 0 at once.  Every
  one of those programs is compiled and the summary's peak is the largest."""
  result = _aot(
    "muloco",
    "v5p:2x2x1",
    *TINY,
    "--config.diloco.num_workers=2",
    "--config.diloco.num_fragments=2",
    "--config.diloco.sync_every=4",
    "--config.diloco.overlap_steps=2",
    "--config.train.num_steps=9",
    "--config.optimizer.warmup_steps=1",
  )
  assert result.returncode == 0, result.stderr[-5000:]
  summary = _summary(result)
  programs = summary["programs"]
  assert set(programs) == {
    "init",
    "inner_step",
    "overlapped_step[exchange 0]",
    "overlapped_step[adopt 0]",
    "overlapped_step[exchange 1]",
    "overlapped_step[adopt 1]",
    "adoption[1]",
    "outer_sync[0]",
    "eval_step",
    "restore",
  }
  assert all(p["fits"] and p["peak_bytes"] > 0 for p in programs.values())
  assert summary["peak_bytes_per_device"] == max(p["peak_bytes"] for p in programs.values())


def test_data_parallel_fits():
  result = _aot("dp_muon", "v5e:2x2", *TINY)
  assert result.returncode == 0, result.stderr[-5000:]
  summary = _summary(result)
  assert set(summary["programs"]) == {"init", "train_step", "eval_step", "restore"}
  assert summary["fits"] is True
  assert 15 * GIB < summary["hbm_bytes"] < 16 * GIB  # v5e: 15.75 GiB per chip
  assert 0 < summary["peak_bytes_per_device"] < summary["hbm_bytes"]


def test_too_large_batch_does_not_fit():
  """4096 sequences of 2048 tokens on 4 v5e chips: the compiler refuses; exit 1 with advice."""
  result = _aot(
    "dp_muon",
    "v5e:2x2",
    "--config.model.size=tiny",
    "--config.train.batch_size=4096",
    # libtpu 0.0.42 crashes (SIGSEGV) compiling the chunked loss's eval step of 1024 or more
    # such sequences; a small eval batch keeps this test on the train step.
    "--config.train.eval_batch_size=8",
    "--config.data.seq_len=2048",
  )
  assert result.returncode == 1, result.stderr[-5000:]
  summary = _summary(result)
  assert summary["fits"] is False
  assert summary["peak_bytes_per_device"] > summary["hbm_bytes"]
  assert "train_step does not fit" in result.stderr
  for advice in ("model.remat=True", "model.scan_layers=True", "train.batch_size"):
    assert advice in result.stderr, result.stderr


@pytest.mark.parametrize(
  "topology, overrides, message",
  [
    ("v9:2x2", [], "--topology='v9:2x2'"),
    ("v5p", [], "--topology='v5p' is not GENERATION:SHAPE"),
    ("v5e:2x2", ["--config.train.batch_size=6"], "train.batch_size=6"),
    ("v5e:2x2", ["--config.diloco.fsdp=3"], "diloco.fsdp=3"),
    ("v5e:2x2", ["--config.diloco.num_workers=2", "--config.train.batch_size=2"], "batch_size=2"),
    ("v5e:2x2", ["--config.model.size=2b"], "model.size='2b'"),
  ],
)
def test_bad_settings_fail_before_compiling(topology, overrides, message):
  result = _aot("muloco", topology, "--config.model.size=tiny", *overrides, timeout=120)
  assert result.returncode != 0
  assert message in result.stderr, result.stderr[-3000:]
  assert "Traceback" not in result.stderr
  assert "peak" not in result.stdout


@pytest.mark.slow
def test_15b_muloco_on_v5p_4x4x4():
  """The paper's 15B, K=2 on a v5p-128 slice (64 chips, one sequence each) fits: FSDP over a
  worker's 32 chips and the shared state owned 1/64 per chip (0.2's replicated layout needed
  313 GiB a chip)."""
  result = _aot(
    "muloco",
    "v5p:4x4x4",
    "--config.model.size=15b",
    "--config.model.scan_layers=True",
    "--config.model.remat=True",
    "--config.model.dtype=bfloat16",
    "--config.optimizer.ns_dtype=bfloat16",
    "--config.diloco.num_workers=2",
    "--config.train.batch_size=64",
    "--config.data.seq_len=2048",
    "--config.model.max_seq_len=2048",
    timeout=1800,
  )
  summary = _summary(result)
  assert result.returncode == 0, result.stderr[-3000:]
  assert summary["fits"] is True and summary["peak_bytes_per_device"] < 16 * GIB
  assert summary["state_bytes_per_device"] < 1.01 * summary["state_bytes_total"] / 64


def test_collectives_parser():
  """Counts, operand bytes and worker crossing from compiled-HLO lines (2 workers x 2 devices)."""
  from muloco_jax.tools import aot

  hlo = "\n".join(
    [
      "  %p = f32[8,128]{1,0:T(8,128)} parameter(0)",
      "  %q = bf16[64]{0} parameter(1)",
      # iota groups [2,2]<=[2,2]T(1,0): {0,2},{1,3}: across the worker rows.
      "  %ar = f32[8,128]{1,0} all-reduce(%p), channel_id=1, replica_groups=[2,2]<=[2,2]T(1,0), "
      "use_global_device_ids=true, to_apply=%add",
      # {0,1},{2,3}: inside each worker row.
      "  %ags = (bf16[64]{0}, bf16[128]{0}) all-gather-start(%q), channel_id=2, "
      "replica_groups={{0,1},{2,3}}, dimensions={0}",
      "  %agd = bf16[128]{0} all-gather-done(%ags)",
      # Mesh-axes groups: 'axis_1' of [2,4]T(1,0) as 4 x 2 = {0,4},{1,5},..: across the worker
      # rows; 'axis_1' of a plain 2 x 2 iota = {0,1},{2,3}: inside them.
      "  %a2a = f32[8,128]{1,0} all-to-all(%p), channel_id=4, replica_groups=mesh['axis_0'=4,"
      "'axis_1'=2], device_ids=([2,4]T(1,0)) {'axis_1'}, dimensions={0}",
      "  %cp = f32[8,128]{1,0} all-to-all(%p), channel_id=5, replica_groups=mesh['axis_0'=2,"
      "'axis_1'=2] {'axis_1'}, dimensions={0}",
      '  %s = (f32[8,128]{1,0}, u32[], token[]) send(%p, %tok), channel_id=3, frontend_attributes='
      '{_xla_megascale_transfer_type="ALL_REDUCE"}',
      "  ROOT %t = (f32[8,128]{1,0}) tuple(%ar)",
    ]
  )
  found = aot.collectives(hlo, fsdp=2, dcn_crosses_workers=True)
  assert found["collectives"] == {
    "all-reduce": {"count": 1, "operand_bytes": 4096, "cross_worker": 1},
    "all-to-all": {"count": 2, "operand_bytes": 8192, "cross_worker": 1},
    "all-gather": {"count": 1, "operand_bytes": 128, "cross_worker": 0},
    "dcn-all-reduce": {"count": 1, "operand_bytes": 4096, "cross_worker": 1},
  }
  assert found["async_pairs"] == {"all-gather": 1}
