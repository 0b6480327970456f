r"""Newton-Schulz benchmark: ours against optax.contrib and the matmul floor.

  python -m muloco_jax.benchmarks.newton_schulz [--dtype=float32|bfloat16] [--schedule=muloco]

Times `orthogonalize` on each distinct hidden-matrix shape of the paper's 150M
model, and the whole set of its hidden matrices as one Muon step
(`scale_by_muon.update`), against `optax.contrib`'s Newton-Schulz with the same
coefficients, steps and dtype.

The floor is Newton-Schulz flops divided by the best matmul rate measured here
over: square matmuls (512 to 2048); each product that Newton-Schulz computes
(X X^T, A A, P X) on each shape; and those products for every hidden matrix at
once, both as independent dots in one program (which XLA may run concurrently)
and as one batched dot per shape; all in the benchmark's dtype and in float32
(XLA:CPU computes a bfloat16 dot as a float32 one between two conversions,
which a Newton-Schulz chain partly fuses away, so the float32 rate is the
stricter bound there).

Every timed function runs in each round, in a random order drawn afresh each
round, so that load from elsewhere on the machine falls on all of them alike;
ours and optax on the same matrices run one right after the other.  Times are
medians over the rounds, and optax / ours is the median of the per-round
ratios.  Within a round, a function runs back to back for at least a tenth of
the step's flops (one call is timed over tens of milliseconds rather than one,
and as inside a training step, XLA's per-call start-up is not counted against
a single matrix).
"""

import itertools
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import _muon as optax_muon

from muloco_jax import model as model_lib
from muloco_jax import optim

_DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matrix dtype.")
_SCHEDULE = flags.DEFINE_enum("schedule", "muloco", ["classic", "muloco"], "Coefficients.")
_SIZE = flags.DEFINE_string("size", "150m", "Model preset whose hidden matrices are used.")
_REPEATS = flags.DEFINE_integer("repeats", 7, "Rounds of timed runs (median).")


def round_times(groups, repeats):
  """Seconds of one run of each call, per round: groups[g][c] = (fn, args, runs).

  Each round times every call's `runs` back-to-back runs together.  The groups
  go in a fresh random order each round, and the calls of a group one right
  after another, also in random order: a group's calls meet the same load.
  Returns one (repeats,) array per call, nested as `groups`.
  """
  for group in groups:
    for fn, args, _ in group:
      jax.block_until_ready(fn(*args))  # compile + warm up
  times = [[[] for _ in group] for group in groups]
  rng = np.random.default_rng(0)
  for _ in range(repeats):
    for g in rng.permutation(len(groups)):
      for c in rng.permutation(len(groups[g])):
        fn, args, runs = groups[g][c]
        start = time.perf_counter()
        jax.block_until_ready([fn(*args) for _ in range(runs)])
        times[g][c].append((time.perf_counter() - start) / runs)
  return [[np.asarray(t) for t in group] for group in times]


def hidden_matrices(size, dtype):
  """The hidden (Muon) matrices of a preset, as random normal arrays."""
  config = model_lib.model_config(size, scan_layers=False)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  labels = optim.muon_labels(shapes)
  leaves = [s for s, lab in zip(jax.tree.leaves(shapes), jax.tree.leaves(labels)) if lab == "muon"]
  keys = jax.random.split(jax.random.key(0), len(leaves))
  return [jax.random.normal(k, s.shape, dtype) for k, s in zip(keys, leaves)]


def _products(x, a):
  """Newton-Schulz's three products on a wide x (m, n) and an (m, m) a."""
  return x @ jnp.swapaxes(x, -1, -2), a @ a, a @ x


def matmul_probes(matrices, dtype):
  """(name, fn, args, flops) of the `dtype` matmuls whose best rate sets the floor."""
  seeds = itertools.count(1)
  normal = lambda *shape: jax.random.normal(jax.random.key(next(seeds)), shape, dtype)
  wide = sorted({tuple(sorted(m.shape)) for m in matrices})
  square = jax.jit(lambda a: a @ a)  # also each shape's A A
  probes = {
    f"square {n}": (square, (normal(n, n),), 2 * n**3)
    for n in sorted({512, 1024, 2048} | {m for m, _ in wide})
  }
  for m, n in wide:  # the other products of a Newton-Schulz iteration
    x, a = normal(m, n), normal(m, m)
    probes[f"X X^T {m}x{n}"] = (jax.jit(lambda x: x @ x.T), (x,), 2 * m * m * n)
    probes[f"P X {m}x{m} @ {m}x{n}"] = (jax.jit(lambda a, x: a @ x), (a, x), 2 * m * m * n)
  # Every matrix's products at once, in its wide orientation, grouped by shape.
  groups = [
    [
      (normal(*sorted(m.shape)), normal(min(m.shape), min(m.shape)))
      for m in matrices
      if tuple(sorted(m.shape)) == s
    ]
    for s in wide
  ]
  flops = sum(optim.newton_schulz_flops(m.shape, 1) for m in matrices)
  all_of = f"X X^T, A A, P X of all {len(matrices)}"
  probes[f"{all_of}, separate dots"] = (
    jax.jit(lambda groups: [_products(x, a) for g in groups for x, a in g]),
    (groups,),
    flops,
  )
  stacks = [tuple(jnp.stack(arrays) for arrays in zip(*g)) for g in groups]
  probes[f"{all_of}, batched per shape"] = (
    jax.jit(lambda stacks: [_products(x, a) for x, a in stacks]),
    (stacks,),
    flops,
  )
  return [(f"{name} ({dtype.name})", *probe) for name, probe in probes.items()]


def main(argv):
  del argv
  dtype = jnp.dtype(_DTYPE.value)
  coefficients = optim.newton_schulz_coefficients(_SCHEDULE.value)
  steps = len(coefficients)
  matrices = hidden_matrices(_SIZE.value, dtype)

  ours = jax.jit(lambda x: optim.orthogonalize(x, coefficients))
  theirs = jax.jit(
    lambda x: optax_muon.orthogonalize_via_newton_schulz(x, jnp.asarray(coefficients), eps=1e-7)
  )
  rows = []  # (name, flops, ours (fn, args), optax (fn, args))
  for shape in sorted({m.shape for m in matrices}):
    x = next(m for m in matrices if m.shape == shape)
    rows.append(
      (
        f"{shape[0]}x{shape[1]}",
        optim.newton_schulz_flops(shape, steps),
        (ours, (x,)),
        (theirs, (x,)),
      )
    )

  # The whole set as one Muon step: momentum + Newton-Schulz on every matrix.
  grads = {str(i): m for i, m in enumerate(matrices)}
  ours_tx = optim.scale_by_muon(ns_coeffs=coefficients, scale="none")
  theirs_tx = optax_muon.scale_by_muon(
    ns_coeffs=coefficients,
    eps=1e-7,
    weight_dimension_numbers=lambda g: jax.tree.map(lambda _: optim.MuonDimensionNumbers(), g),
  )
  step = lambda tx: (jax.jit(lambda g, s: tx.update(g, s, g)[0]), (grads, tx.init(grads)))
  rows.append(
    (
      f"{_SIZE.value} step ({len(matrices)} matrices)",
      sum(optim.newton_schulz_flops(m.shape, steps) for m in matrices),
      step(ours_tx),
      step(theirs_tx),
    )
  )

  # Short calls run back to back, for a tenth of the step's flops or more.
  probes = [
    probe
    for probe_dtype in dict.fromkeys([dtype, jnp.dtype(jnp.float32)])
    for probe in matmul_probes(matrices, probe_dtype)
  ]
  span = rows[-1][1] // 10
  runs = lambda flops: -(-span // flops)
  groups = [[(fn, args, runs(flops))] for _, fn, args, flops in probes]
  groups += [
    [(*ours_call, runs(flops)), (*theirs_call, runs(flops))]
    for _, flops, ours_call, theirs_call in rows
  ]
  times = round_times(groups, _REPEATS.value)
  probe_rates = [flops / np.median(t) for (_, _, _, flops), [t] in zip(probes, times)]
  rate, best = max(zip(probe_rates, (name for name, _, _, _ in probes)))

  print(
    f"device: {jax.devices()[0].device_kind} x{jax.device_count()}; dtype {dtype.name}; "
    f"schedule {_SCHEDULE.value}; {_REPEATS.value} rounds; best matmul rate "
    f"{rate / 1e9:.1f} GFLOP/s, {best}"
  )
  print()
  print("| matrices | ours (ms) | optax (ms) | optax / ours | floor (ms) | ours / floor |")
  print("|---|---|---|---|---|---|")
  for (name, flops, _, _), (t_ours, t_theirs) in zip(rows, times[len(probes) :]):
    floor = flops / rate
    print(
      f"| {name} | {1e3 * np.median(t_ours):.2f} | {1e3 * np.median(t_theirs):.2f} | "
      f"{np.median(t_theirs / t_ours):.2f}x | {1e3 * floor:.2f} | "
      f"{np.median(t_ours) / floor:.2f}x |"
    )
  print()
  print("| matmul probe | GFLOP/s |")
  print("|---|---|")
  for (name, _, _, _), probe_rate in zip(probes, probe_rates):
    print(f"| {name} | {probe_rate / 1e9:.1f} |")


if __name__ == "__main__":
  app.run(main)
