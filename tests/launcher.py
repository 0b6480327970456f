"""`python -m muloco_jax.main --config=configs/quickstart.py` in a subprocess, on fake CPU devices."""

import os
import subprocess
import sys

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def _command(workdir, devices, flags, env):
  env = dict(
    os.environ,
    JAX_PLATFORMS="cpu",
    XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
    **(env or {}),
  )
  argv = [
    sys.executable,
    "-m",
    "muloco_jax.main",
    "--config=configs/quickstart.py",
    f"--workdir={workdir}",
    *flags,
  ]
  return argv, env


def run(workdir, *flags, devices=2, env=None, timeout=600) -> subprocess.CompletedProcess:
  """Runs the launcher to the end; stdout and stderr captured apart."""
  argv, env = _command(workdir, devices, flags, env)
  return subprocess.run(argv, cwd=REPO, env=env, capture_output=True, text=True, timeout=timeout)


def start(workdir, *flags, devices=2, env=None) -> subprocess.Popen:
  """Starts the launcher; stdout and stderr merged into one pipe."""
  argv, env = _command(workdir, devices, flags, env)
  return subprocess.Popen(
    argv, cwd=REPO, env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True
  )
