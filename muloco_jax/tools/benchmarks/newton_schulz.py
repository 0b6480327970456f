r"""Newton-Schulz benchmark: each method x schedule against optax.contrib, time and accuracy.

  python -m muloco_jax.tools.benchmarks.newton_schulz [--sizes=150m,914m] [--dtype=float32|bfloat16]

For each distinct hidden-matrix (Muon) shape of the presets, times `orthogonalize` with every
method ("newton_schulz", "gram") and schedule ("classic", "muloco", "polar_express"; five
iterations each) against `optax.contrib`'s Newton-Schulz with the same coefficients and steps,
all in one run: every round runs every call, the (shape, schedule) groups in a fresh random
order and optax and ours on the same matrix one right after the other, also in random order,
so that load from elsewhere on the machine falls on them alike.  Times are medians over the
rounds; optax / ours is the median of the per-round ratios.  A call shorter than the longest
one is repeated back to back up to its length.  The "step" row times one Muon step as each
optimizer runs it, in the same rounds: `optax.contrib.scale_by_muon` against our
`scale_by_muon` (each method) on the preset's hidden matrices, one jitted update each; ours
orthogonalizes each shape's matrices in one batched call, optax each matrix on its own.

Accuracy: the relative Frobenius distance ||O - U V^T||_F / ||U V^T||_F of the result O to the
exact polar factor of G = U S V^T, averaged over gradient-like matrices: random singular
vectors and decaying spectra s_k = k^-alpha, alpha in `ALPHAS` (their normalised smallest
singular values, 1.7e-2 / 1.5e-3 / 7.9e-5 of the 2-norm at 512 rows, are where the schedules
differ).  The step's accuracy weighs the shapes by their number of hidden matrices.  With
--dtype=bfloat16 the matrices are bf16 (ours: bf16 matmul operands and X between iterations,
float32 coefficients, accumulation and sums; optax: bf16 throughout, its coefficients rounded).

With --compile_for=v5p:2x2x1 (a TPU topology; libtpu compiles it here, no TPU needed) it also
prints XLA's cost analysis of optax's and our Newton-Schulz on each shape compiled for one of
its chips: bytes accessed and estimated seconds.  Both iterate in a loop, whose body the
analysis counts once, so the figures are one iteration plus the set-up: what the float32 work
around bf16 products costs on an accelerator, measured without one.

Then the verdict: the fastest of ours, on the step, whose step accuracy is at least optax's
with the paper's ("muloco") coefficients (within 1e-4, float32 round-off); and the cost of
Gram iterations forced on the square shapes, where "gram" runs Newton-Schulz instead.
"""

import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from optax.contrib import _muon as optax_muon

from muloco_jax import model as model_lib
from muloco_jax import optim

ALPHAS = (0.5, 1.0, 1.5)
BASELINE = "muloco"  # optax's Newton-Schulz with the paper's coefficients
BASELINE_COEFFICIENTS = optim.newton_schulz_coefficients(BASELINE)


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


def hidden_matrices(size):
  """The preset's hidden (Muon) matrices, unstacked, as a flat list of shapes."""
  config = model_lib.model_config(size, scan_layers=False)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  labels = jax.tree.leaves(optim.muon_labels(shapes))
  return [leaf.shape for leaf, label in zip(jax.tree.leaves(shapes), labels) if label == "muon"]


def hidden_shapes(size):
  """{shape: how many hidden (Muon) matrices of the preset have it}."""
  counts = {}
  for shape in hidden_matrices(size):
    counts[shape] = counts.get(shape, 0) + 1
  return dict(sorted(counts.items()))


def gradient_like(shape, alpha, dtype, seed):
  """G = U diag(k^-alpha) V^T with random orthonormal U, V, and its polar factor U V^T."""
  rng = np.random.default_rng(seed)
  m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(n, k)))[0]
  g = (u * np.arange(1, k + 1) ** -alpha) @ v.T
  return jnp.asarray(g, dtype), u @ v.T


def distance(fn, samples):
  """Mean relative Frobenius distance of fn(G) to U V^T over the samples."""
  return float(
    np.mean(
      [
        np.linalg.norm(np.asarray(fn(g), np.float64) - polar) / np.linalg.norm(polar)
        for g, polar in samples
      ]
    )
  )


def calls(coefficients, compute_dtype):
  """{name: jitted function of one matrix}: optax, ours with each method."""
  out = {
    "optax": jax.jit(
      lambda x: optax_muon.orthogonalize_via_newton_schulz(x, jnp.asarray(coefficients), eps=1e-7)
    )
  }
  for method in optim.METHODS:
    out[method] = jax.jit(
      lambda x, method=method: optim.orthogonalize(
        x, coefficients, compute_dtype=compute_dtype, method=method
      )
    )
  return out


def step_calls(coefficients, compute_dtype):
  """{name: (jitted Muon update of a tree of hidden matrices, its state's init)}: optax's
  `scale_by_muon` and ours with each method, the same coefficients, eps and momentum."""
  matrix = lambda updates: jax.tree.map(lambda _: optax_muon.MuonDimensionNumbers(), updates)
  optimizers = {
    "optax": optax_muon.scale_by_muon(
      tuple(coefficients), eps=1e-7, weight_dimension_numbers=matrix
    )
  }
  for method in optim.METHODS:
    optimizers[method] = optim.scale_by_muon(
      ns_coeffs=coefficients, eps=1e-7, ns_method=method, compute_dtype=compute_dtype
    )
  return {name: (jax.jit(tx.update), tx.init) for name, tx in optimizers.items()}


def compiled_costs(size, dtype, topology):
  """{shape: {name: (bytes accessed, estimated seconds)}}: XLA's cost analysis of optax's and
  our Newton-Schulz ("muloco") on each hidden shape, compiled for one chip of TPU `topology`."""
  # Imported here: aot brings the training stack (tfds, grain, orbax), which timing needs not.
  from muloco_jax.tools import aot  # pylint: disable=import-outside-toplevel

  device = aot.topology_devices(topology, 1)[0]
  sharding = jax.sharding.SingleDeviceSharding(device)
  fns = calls(BASELINE_COEFFICIENTS, dtype if dtype != jnp.float32 else None)
  out = {}
  for shape in hidden_shapes(size):
    x = jax.ShapeDtypeStruct(shape, dtype, sharding=sharding)
    out[shape] = {}
    for name in ("optax", "newton_schulz"):
      cost = fns[name].lower(x).compile().cost_analysis()
      cost = cost[0] if isinstance(cost, list) else cost
      out[shape][name] = (cost["bytes accessed"], cost["optimal_seconds"])
  return out


def forced_gram(coefficients):
  """Gram iterations on a matrix of any shape (what "gram" does not run on squares)."""
  return jax.jit(lambda x: optim._iterate_gram(x, coefficients, 1e-7, x.dtype).astype(x.dtype))


def benchmark(size, dtype, repeats):
  counts = hidden_shapes(size)
  compute_dtype = dtype if dtype != jnp.float32 else None
  schedules = {s: optim.newton_schulz_coefficients(s) for s in optim.SCHEDULES}
  rows = []  # (shape, schedule, {name: fn}, samples)
  for shape in counts:
    samples = [gradient_like(shape, a, dtype, seed) for seed, a in enumerate(ALPHAS)]
    for schedule, coefficients in schedules.items():
      rows.append((shape, schedule, calls(coefficients, compute_dtype), samples))
  squares = [shape for shape in counts if shape[0] == shape[1]]
  longest = max(optim.newton_schulz_flops(shape, 5) for shape in counts)
  runs = lambda shape: -(-longest // optim.newton_schulz_flops(shape, 5))
  x_of = {shape: samples[0][0] for shape, _, _, samples in rows}
  groups = [[(fn, (x_of[shape],), runs(shape)) for fn in fns.values()] for shape, _, fns, _ in rows]
  plain = calls(schedules[BASELINE], compute_dtype)["newton_schulz"]
  groups += [
    [(fn, (x_of[shape],), runs(shape)) for fn in (plain, forced_gram(schedules[BASELINE]))]
    for shape in squares
  ]
  grads = [x_of[shape] for shape in hidden_matrices(size)]
  steps = {s: step_calls(c, compute_dtype) for s, c in schedules.items()}
  groups += [
    [(update, (grads, init(grads)), 1) for update, init in fns.values()] for fns in steps.values()
  ]
  times = round_times(groups, repeats)

  table = {}  # (shape or "step", schedule) -> {name: (per-round seconds, error)}
  for (shape, schedule, fns, samples), group in zip(rows, times):
    table[shape, schedule] = {
      name: (t, distance(fn, samples)) for (name, fn), t in zip(fns.items(), group)
    }
  total = sum(counts.values())
  for (schedule, fns), group in zip(steps.items(), times[len(rows) + len(squares) :]):
    table["step", schedule] = {
      name: (t, sum(counts[s] * table[s, schedule][name][1] for s in counts) / total)
      for name, t in zip(fns, group)
    }

  print(
    f"\n{size}: {total} hidden matrices {dict((f'{m}x{n}', c) for (m, n), c in counts.items())}; "
    f"{jnp.dtype(dtype).name}; {repeats} rounds; {jax.devices()[0].device_kind}"
  )
  print()
  print(
    "| matrices | schedule | optax (ms) | newton_schulz (ms) | gram (ms) | optax / NS | "
    "optax / gram | error optax | error NS | error gram |"
  )
  print("|---|---|---|---|---|---|---|---|---|---|")
  for (shape, schedule), entry in table.items():
    name = f"{shape[0]}x{shape[1]} (x{counts[shape]})" if shape != "step" else f"{size} step"
    t = {k: v[0] for k, v in entry.items()}
    err = {k: v[1] for k, v in entry.items()}
    print(
      f"| {name} | {schedule} | {1e3 * np.median(t['optax']):.1f} | "
      f"{1e3 * np.median(t['newton_schulz']):.1f} | {1e3 * np.median(t['gram']):.1f} | "
      f"{np.median(t['optax'] / t['newton_schulz']):.2f}x | "
      f"{np.median(t['optax'] / t['gram']):.2f}x | {err['optax']:.4f} | "
      f"{err['newton_schulz']:.4f} | {err['gram']:.4f} |"
    )

  baseline_t, baseline_err = table["step", BASELINE]["optax"]
  candidates = [
    (np.median(baseline_t / entry[method][0]), method, schedule)
    for (shape, schedule), entry in table.items()
    if shape == "step"
    for method in optim.METHODS
    if entry[method][1] <= baseline_err + 1e-4
  ]
  speedup, method, schedule = max(candidates)
  ratio = lambda key: np.median(table[key, BASELINE]["optax"][0] / table[key, schedule][method][0])
  per_shape = ", ".join(f"{m}x{n} {ratio((m, n)):.2f}x" for m, n in counts)
  print(
    f"\nFastest at least as accurate as optax's 5-step Newton-Schulz ({BASELINE}, step error "
    f"{baseline_err:.4f}): {method} / {schedule}, {speedup:.2f}x on the step ({per_shape})."
  )
  for shape, (t_ns, t_forced) in zip(squares, times[len(rows) :]):
    split = optim._splits(dtype, jnp.float32)  # bf16: Gram's products with X_0 split
    flops = [optim._wide_flops(*shape, schedules[BASELINE], gram, split) for gram in (True, False)]
    print(
      f"Gram forced on {shape[0]}x{shape[1]} ({BASELINE}): {1e3 * np.median(t_forced):.1f} ms "
      f"against Newton-Schulz's {1e3 * np.median(t_ns):.1f} ms: "
      f"{np.median(t_forced / t_ns):.2f}x the time, {flops[0] / flops[1]:.2f}x the flops."
    )


def print_compiled_costs(size, dtype, topology):
  print(
    f"\n{size} ({BASELINE}, {jnp.dtype(dtype).name}) compiled for one {topology} chip, XLA's "
    "cost analysis of one loop iteration and the set-up:"
  )
  for (m, n), cost in compiled_costs(size, dtype, topology).items():
    (optax_bytes, optax_seconds), (ours_bytes, ours_seconds) = cost.values()
    print(
      f"  {m}x{n}: optax {optax_bytes / 1e6:.1f} MB, {1e6 * optax_seconds:.1f} us; ours "
      f"{ours_bytes / 1e6:.1f} MB ({ours_bytes / optax_bytes:.2f}x), {1e6 * ours_seconds:.1f} us "
      f"(optax / ours {optax_seconds / ours_seconds:.2f}x)"
    )


def main(argv):
  del argv
  for size in _SIZES.value:
    if _COMPILE_FOR.value:
      print_compiled_costs(size, jnp.dtype(_DTYPE.value), _COMPILE_FOR.value)
    if _REPEATS.value:
      benchmark(size, jnp.dtype(_DTYPE.value), _REPEATS.value)


if __name__ == "__main__":  # flags defined here: `round_times` is imported by other benchmarks
  _SIZES = flags.DEFINE_list("sizes", ["150m", "914m"], "Presets whose hidden shapes are used.")
  _DTYPE = flags.DEFINE_enum("dtype", "float32", ["float32", "bfloat16"], "Matrix dtype.")
  _REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds of timed runs (median); 0: none.")
  _COMPILE_FOR = flags.DEFINE_string(
    "compile_for", "", "A TPU topology (e.g. v5p:2x2x1): also print each shape's compiled costs."
  )
  app.run(main)
