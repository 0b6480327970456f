"""The launcher on two JAX processes (localhost, gloo CPU collectives) equals one process."""

import os
import socket

import numpy as np
import pytest

from muloco_jax import metrics as metrics_lib
import launcher

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


def _start(workdir, data_dir, devices, *flags):
  return launcher.start(
    workdir, f"--config.data.dir={data_dir}", *OVERRIDES, *flags, devices=devices
  )


def _wait(processes, timeout=400):
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


@pytest.mark.slow  # ~100 s each: three launcher runs; tests/test_diloco.py covers two processes
@pytest.mark.parametrize(
  "method", [[], ["--config.diloco.num_workers=0"]], ids=["muloco_k4", "data_parallel_muon"]
)
def test_two_processes_match_one(tmp_path, method):
  data_dir = tmp_path / "data"
  _wait([_start(tmp_path / "single", data_dir, 4, *method)])  # builds the dataset too
  coordinator = f"localhost:{_free_port()}"
  _wait(
    [
      _start(
        tmp_path / "multi",
        data_dir,
        2,
        f"--coordinator_address={coordinator}",
        "--num_processes=2",
        f"--process_id={i}",
        *method,
      )
      for i in range(2)
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
