"""Several JAX processes on localhost (gloo CPU collectives) equal one process on as many devices:
a process per "GPU" (4 x 2 devices) and a process per "node" (2 x 4 devices)."""

import os
import socket
import subprocess
import sys

import numpy as np
import pytest

from muloco_jax import metrics as metrics_lib
import launcher
import layout_run

HERE = os.path.dirname(os.path.abspath(__file__))
REPO = os.path.dirname(HERE)
LAYOUTS = {"process_per_gpu": (4, 2), "process_per_node": (2, 4)}
# The launcher's runs, on 8 devices in all.
METHODS = {
  "data_parallel": ["--config.diloco.num_workers=0"],
  "muloco_k2_fsdp4": ["--config.diloco.num_workers=2", "--config.diloco.fsdp=4"],
  "muloco_k4_fsdp2": ["--config.diloco.num_workers=4", "--config.diloco.fsdp=2"],
}
OVERRIDES = [
  "--config.data.tokenizer=byte",
  "--config.data.seq_len=32",
  "--config.train.num_steps=20",
  "--config.train.batch_size=8",
  "--config.train.log_every=5",
  "--config.train.eval_every=10",
  "--config.train.eval_steps=2",
  "--config.train.checkpoint_every=10",
  "--config.optimizer.warmup_steps=2",
  "--config.diloco.sync_every=5",
]


def _free_port():
  with socket.socket() as s:
    s.bind(("localhost", 0))
    return s.getsockname()[1]


def _wait(processes, timeout=600):
  outputs = []
  try:
    for p in processes:
      outputs.append(p.communicate(timeout=timeout)[0])
  finally:
    for p in processes:
      if p.poll() is None:
        p.kill()
  for p, out in zip(processes, outputs):
    assert p.returncode == 0, out[-3000:]
  return outputs


def _distributed(num_processes):
  coordinator = f"localhost:{_free_port()}"
  return [
    [
      f"--coordinator_address={coordinator}",
      f"--num_processes={num_processes}",
      f"--process_id={i}",
    ]
    for i in range(num_processes)
  ]


@pytest.fixture(scope="module")
def one_process_layout_runs():
  """layout_run's methods in this process, on its 8 devices: {method: results}."""
  return {}


def _layout_reference(cache, method):
  if method not in cache:
    cache[method] = layout_run.run(method)
  return cache[method]


@pytest.mark.parametrize(
  "layout, methods",
  [
    ("process_per_gpu", ["muloco_k2_fsdp4"]),
    pytest.param("process_per_gpu", ["data_parallel", "muloco_k4_fsdp2"], marks=pytest.mark.slow),
    pytest.param("process_per_node", list(layout_run.METHODS), marks=pytest.mark.slow),
  ],
)
def test_interleaved_layouts_match_one_process(tmp_path, one_process_layout_runs, layout, methods):
  """Worker rows that mix processes, as on a TPU slice (each process reads rows of several
  workers, not a block of the batch): losses, eval loss and parameters equal one process's."""
  num_processes, devices = LAYOUTS[layout]
  out = tmp_path / "results.npz"
  env = dict(os.environ, XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  command = [sys.executable, os.path.join(HERE, "layout_run.py"), str(out), "--methods", *methods]
  _wait(
    [
      subprocess.Popen(
        command + flags,
        env=env,
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        text=True,
      )
      for flags in _distributed(num_processes)
    ]
  )
  results = np.load(out)
  for method in methods:
    for key, value in _layout_reference(one_process_layout_runs, method).items():
      np.testing.assert_allclose(results[f"{method}/{key}"], value, rtol=1e-5, atol=1e-6)


@pytest.mark.slow  # ~2 min each: a run on 8 devices, then the same on 4 or 2 processes
@pytest.mark.parametrize("layout", list(LAYOUTS))
@pytest.mark.parametrize("method", list(METHODS))
def test_launcher_on_several_processes_matches_one(tmp_path, layout, method):
  num_processes, devices = LAYOUTS[layout]
  data_dir = f"--config.data.dir={tmp_path / 'data'}"
  flags = [data_dir, *OVERRIDES, *METHODS[method]]
  _wait([launcher.start(tmp_path / "single", *flags, devices=8)])  # builds the dataset too
  _wait(
    [
      launcher.start(tmp_path / "multi", *flags, *distributed, devices=devices)
      for distributed in _distributed(num_processes)
    ]
  )
  single = metrics_lib.read_metrics(str(tmp_path / "single"))
  multi = metrics_lib.read_metrics(str(tmp_path / "multi"))
  assert [r["step"] for r in multi] == [r["step"] for r in single]
  for a, b in zip(multi, single):
    for key in ("train_loss", "eval_loss", "pseudograd_norm", "worker_train_loss"):
      if key in b:
        np.testing.assert_allclose(a[key], b[key], rtol=1e-5)
  assert os.path.isdir(tmp_path / "multi" / "checkpoints" / "20")


@pytest.mark.slow  # ~1 min: the launcher on two processes
def test_distributed_reads_the_cluster_from_slurm(tmp_path):
  """`--distributed` under the variables SLURM sets for two tasks on one node: the processes
  find each other through jax.distributed.initialize() alone, and only process 0 reports."""
  flags = [f"--config.data.dir={tmp_path / 'data'}", *OVERRIDES, "--distributed"]
  slurm = {
    "SLURM_JOB_ID": "1",
    "SLURM_STEP_NODELIST": "localhost",
    "SLURM_NTASKS": "2",
    "JAX_COORDINATOR_PORT": str(_free_port()),
  }
  outputs = _wait(
    [
      launcher.start(
        tmp_path / "run",
        *flags,
        devices=4,
        env=dict(slurm, SLURM_PROCID=str(i), SLURM_LOCALID=str(i)),
      )
      for i in range(2)
    ]
  )
  assert [f"Finished 20 steps in {tmp_path / 'run'}" in out for out in outputs] == [True, False]
  assert os.path.isdir(tmp_path / "run" / "checkpoints" / "20")


def test_two_processes_match_single_process():
  """(g) Two JAX processes (gloo) agree bit for bit and match a single-process run."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "multihost_diloco.py"),
      "--num_processes=2",
      "--timeout=150",
    ],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "OK: 2 processes agree" in result.stdout
