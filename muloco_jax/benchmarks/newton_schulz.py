r"""Newton-Schulz benchmark: ours against optax.contrib and the matmul floor.

  python -m muloco_jax.benchmarks.newton_schulz [--dtype=float32] [--schedule=muloco]

Times `orthogonalize` on each distinct hidden-matrix shape of the paper's 150M
model, and the whole set of its hidden matrices as one Muon step
(`scale_by_muon.update`), against `optax.contrib`'s Newton-Schulz with the same
coefficients, steps and dtype.  The floor is Newton-Schulz flops divided by this
device's matmul rate, measured here on large square matmuls of the same dtype.
Every figure is a median of repeated runs measured in this one process.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import _muon as optax_muon

from muloco_jax import model as model_lib
from muloco_jax import optim

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matrix dtype.")
_SCHEDULE = flags.DEFINE_enum("schedule", "muloco", ["classic", "muloco"], "Coefficients.")
_SIZE = flags.DEFINE_string("size", "150m", "Model preset whose hidden matrices are used.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Timed runs per measurement (median).")


def _median_seconds(fn, *args, repeats):
  jax.block_until_ready(fn(*args))  # compile + warm up
  times = []
  for _ in range(repeats):
    start = time.perf_counter()
    jax.block_until_ready(fn(*args))
    times.append(time.perf_counter() - start)
  return float(np.median(times))


def matmul_rate(dtype, repeats):
  """Best measured flop/s of a square matmul (sizes 512..2048) on this device."""
  best = 0.0
  for n in (512, 1024, 2048):
    a = jnp.ones((n, n), dtype)
    seconds = _median_seconds(jax.jit(lambda x: x @ x), a, repeats=repeats)
    best = max(best, 2 * n**3 / seconds)
  return best


def hidden_matrices(size, dtype):
  """The hidden (Muon) matrices of a preset, as zeros-free random arrays."""
  config = model_lib.model_config(size, scan_layers=False)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  labels = optim.muon_labels(shapes)
  leaves = [s for s, l in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels)) if l == "muon"]
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return [jax.random.normal(k, s.shape, dtype) for k, s in zip(keys, leaves)]


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  coefficients = optim.newton_schulz_coefficients(_SCHEDULE.value)
  steps = len(coefficients)
  repeats = _REPEATS.value
  rate = matmul_rate(dtype, repeats)
  print(f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; dtype {dtype.name}; "
        f"schedule {_SCHEDULE.value}; measured matmul rate {rate / 1e9:.1f} GFLOP/s")

  ours = jax.jit(lambda x: optim.orthogonalize(x, coefficients))
  theirs = jax.jit(lambda x: optax_muon.orthogonalize_via_newton_schulz(
      x, jnp.asarray(coefficients), eps=1e-7))

  matrices = hidden_matrices(_SIZE.value, dtype)
  rows = []
  for shape in sorted({m.shape for m in matrices}):
    x = next(m for m in matrices if m.shape == shape)
    floor = optim.newton_schulz_flops(shape, steps) / rate
    t_ours = _median_seconds(ours, x, repeats=repeats)
    t_theirs = _median_seconds(theirs, x, repeats=repeats)
    rows.append((f"{shape[0]}x{shape[1]}", t_ours, t_theirs, floor))

  # The whole set as one Muon step: momentum + Newton-Schulz on every matrix.
  grads = {str(i): m for i, m in enumerate(matrices)}
  ours_tx = optim.scale_by_muon(schedule=coefficients, scale="none")
  theirs_tx = optax_muon.scale_by_muon(
      ns_coeffs=coefficients, eps=1e-7,
      weight_dimension_numbers=lambda g: jax.tree.map(lambda _: optim.MuonDimensionNumbers(), g))
  step = lambda tx: jax.jit(lambda g, s: tx.update(g, s, g)[0])
  floor = sum(optim.newton_schulz_flops(m.shape, steps) for m in matrices) / rate
  t_ours = _median_seconds(step(ours_tx), grads, ours_tx.init(grads), repeats=repeats)
  t_theirs = _median_seconds(step(theirs_tx), grads, theirs_tx.init(grads), repeats=repeats)
  rows.append((f"{_SIZE.value} step ({len(matrices)} matrices)", t_ours, t_theirs, floor))

  print(f"| matrices | ours (ms) | optax (ms) | optax / ours | floor (ms) | ours / floor |")
  print(f"|---|---|---|---|---|---|")
  for name, t_o, t_t, fl in rows:
    print(f"| {name} | {1e3 * t_o:.2f} | {1e3 * t_t:.2f} | {t_t / t_o:.2f}x | {1e3 * fl:.2f} | "
          f"{t_o / fl:.2f}x |")


if __name__ == "__main__":
  app.run(main)
