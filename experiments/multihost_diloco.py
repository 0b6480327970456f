"""Two-process DiLoCo on CPU: a check that the sharded DiLoCo runs across JAX processes.

    python experiments/multihost_diloco.py --num_processes=2

The parent starts ``num_processes`` copies of this script (``--process_id=i``, coordinator on a free
localhost port, ``--devices_per_process`` CPU devices each, gloo CPU collectives) plus one
single-process reference run on as many local devices, waits for all of them (killing them all on a
failure or after ``--timeout`` seconds), and checks that every process ends with bit-identical
parameters that match the single-process run to float tolerance.

Every run trains a tiny MLP with DiLoCo (``runtime.DiLoCo``) on a ``("worker", "fsdp")`` mesh over all
global devices.  Worker k's batch at inner step t is drawn from ``default_rng([seed, k, t])``; a
process builds only the shards of the workers its devices hold (``jax.make_array_from_callback``).
"""

from __future__ import annotations

import argparse
import hashlib
import os
import socket
import subprocess
import sys
import tempfile
import time

import numpy as np

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def parse_args(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--num_processes", type=int, default=2)
  parser.add_argument(
    "--process_id", type=int, default=None, help="set by the parent; unset means: act as the parent"
  )
  parser.add_argument("--coordinator", default=None, help="host:port, set by the parent")
  parser.add_argument("--devices_per_process", type=int, default=2)
  parser.add_argument("--fsdp", type=int, default=1, help="devices per worker")
  parser.add_argument("--num_workers", type=int, default=8, help="DiLoCo K")
  parser.add_argument("--rounds", type=int, default=3)
  parser.add_argument("--inner_steps", type=int, default=4, help="H")
  parser.add_argument("--per_worker_batch", type=int, default=8)
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--out", default=None, help="where a run writes its final params (.npz)")
  parser.add_argument("--timeout", type=float, default=300.0, help="seconds, for the parent")
  return parser.parse_args(argv)


IN_DIM, HIDDEN, CLASSES = 8, 16, 4


def worker_batch(seed: int, worker: int, step: int, rows: int) -> dict:
  """The deterministic batch of one worker at one inner step."""
  teacher = np.random.default_rng(seed).normal(size=(IN_DIM, CLASSES))
  rng = np.random.default_rng([seed, worker, step])
  x = rng.normal(size=(rows, IN_DIM)).astype(np.float32)
  return {"x": x, "y": np.argmax(x @ teacher, axis=-1).astype(np.int32)}


def train(args) -> dict:
  """One DiLoCo run (this process's part of it); returns the final shared params on the host."""
  import jax

  if args.num_processes > 1:
    jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(args.coordinator, args.num_processes, args.process_id)
  import jax.numpy as jnp
  import optax
  from jax.experimental import multihost_utils

  from muloco_jax import diloco, runtime, sharding

  def loss_fn(params, batch):
    hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
    logits = hidden @ params["w2"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()

  rng = np.random.default_rng(args.seed + 1)
  params = {
    "w1": (rng.normal(size=(IN_DIM, HIDDEN)) / np.sqrt(IN_DIM)).astype(np.float32),
    "b1": np.zeros(HIDDEN, np.float32),
    "w2": (rng.normal(size=(HIDDEN, CLASSES)) / np.sqrt(HIDDEN)).astype(np.float32),
  }
  devices = jax.devices()
  mesh = sharding.make_mesh(len(devices) // args.fsdp, args.fsdp, devices)
  trainer = runtime.DiLoCo(
    loss_fn, optax.adamw(1e-2), diloco.outer_optimizer(0.7, 0.9), args.num_workers, mesh
  )
  state = trainer.init(params)
  k, rows = args.num_workers, args.per_worker_batch

  def make_batch(step):
    def shard(name):
      def callback(index):
        workers = range(k)[index[0]]
        return np.stack([worker_batch(args.seed, w, step, rows)[name][index[1]] for w in workers])

      return callback

    example = worker_batch(args.seed, 0, step, rows)
    return {
      name: jax.make_array_from_callback((k,) + value.shape, trainer.batch_sharding, shard(name))
      for name, value in example.items()
    }

  step = 0
  for round_ in range(args.rounds):
    for _ in range(args.inner_steps):
      state, inner_metrics = trainer.inner_step(state, make_batch(step))
      step += 1
    state, metrics = trainer.outer_sync(state)
    loss = np.asarray(inner_metrics["loss"].addressable_data(0))
    print(
      f"[process {args.process_id}] round {round_} local-worker loss {loss.mean():.4f} "
      f"pseudograd_norm {float(metrics['pseudograd_norm'].addressable_data(0)):.4f} "
      f"contributing {int(metrics['num_contributing'].addressable_data(0))}",
      flush=True,
    )
  # The shared params are sharded over every device: gather them whole on each process.
  final = {
    name: np.asarray(multihost_utils.process_allgather(leaf, tiled=True))
    for name, leaf in state.params.items()
  }
  if args.num_processes > 1:
    jax.distributed.shutdown()
  return final


def checksum(params: dict) -> str:
  digest = hashlib.sha256()
  for name in sorted(params):
    digest.update(name.encode())
    digest.update(np.ascontiguousarray(params[name], np.float32).tobytes())
  return digest.hexdigest()[:16]


def free_port() -> int:
  with socket.socket() as sock:
    sock.bind(("localhost", 0))
    return sock.getsockname()[1]


def child_command(
  args, out: str, num_processes: int, process_id: int, devices: int, coordinator: str | None = None
) -> list[str]:
  cmd = [
    sys.executable,
    os.path.abspath(__file__),
    f"--num_processes={num_processes}",
    f"--process_id={process_id}",
    f"--out={out}",
    f"--devices_per_process={devices}",
    f"--fsdp={args.fsdp}",
    f"--num_workers={args.num_workers}",
    f"--rounds={args.rounds}",
    f"--inner_steps={args.inner_steps}",
    f"--per_worker_batch={args.per_worker_batch}",
    f"--seed={args.seed}",
  ]
  return cmd + ([f"--coordinator={coordinator}"] if coordinator else [])


def launch(args) -> int:
  """Parent: run the multi-process job and the single-process reference, then compare."""
  with tempfile.TemporaryDirectory() as tmp:
    coordinator = f"localhost:{free_port()}"
    outs = {f"process {i}": os.path.join(tmp, f"p{i}.npz") for i in range(args.num_processes)}
    outs["single process"] = os.path.join(tmp, "single.npz")
    procs = {}
    for i, (name, out) in enumerate(outs.items()):
      if i < args.num_processes:
        devices = args.devices_per_process
        cmd = child_command(args, out, args.num_processes, i, devices, coordinator)
      else:
        devices = args.devices_per_process * args.num_processes
        cmd = child_command(args, out, 1, 0, devices)
      env = dict(
        os.environ,
        JAX_PLATFORMS="cpu",
        XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}",
        PYTHONPATH=os.pathsep.join(filter(None, [REPO, os.environ.get("PYTHONPATH")])),
      )
      procs[name] = subprocess.Popen(cmd, env=env)
    deadline = time.monotonic() + args.timeout
    try:
      while True:
        codes = {name: proc.poll() for name, proc in procs.items()}
        failed = next((f"{name} exited with {code}" for name, code in codes.items() if code), None)
        if failed or all(code == 0 for code in codes.values()):
          break
        if time.monotonic() > deadline:
          failed = f"timed out after {args.timeout:.0f} s"
          break
        time.sleep(0.2)
    finally:
      for proc in procs.values():
        if proc.poll() is None:
          proc.kill()
          proc.wait()
    if failed:
      print(f"FAILED: {failed}", flush=True)
      return 1
    results = {name: dict(np.load(out)) for name, out in outs.items()}

  sums = {name: checksum(params) for name, params in results.items()}
  for name, value in sums.items():
    print(f"checksum {name}: {value}")
  multi = [sums[f"process {i}"] for i in range(args.num_processes)]
  if len(set(multi)) != 1:
    print("FAILED: the processes disagree")
    return 1
  reference, result = results["single process"], results["process 0"]
  worst = max(float(np.max(np.abs(result[n] - reference[n]))) for n in reference)
  if not all(np.allclose(result[n], reference[n], rtol=1e-5, atol=1e-6) for n in reference):
    print(f"FAILED: multi-process result differs from the single-process run by {worst:.3g}")
    return 1
  print(f"OK: {args.num_processes} processes agree; max |diff| to single process {worst:.3g}")
  return 0


def main(argv=None) -> int:
  args = parse_args(argv)
  if args.process_id is None:
    return launch(args)
  np.savez(args.out, **train(args))
  return 0


if __name__ == "__main__":
  sys.exit(main())
