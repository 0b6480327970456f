"""Optimizers: Muon as an optax `GradientTransformation`.

Muon (Jordan et al. 2024) takes SGD momentum on a matrix-shaped parameter and
replaces the update by its nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations.  MuLoCo (arXiv 2505.23725) uses it as DiLoCo's inner
optimizer: orthogonalized steps average and compress better across workers.

Pieces, smallest first:
  * `orthogonalize`: Newton-Schulz on the last two axes, batched over the rest
    (on the matrix itself, or on its Gram matrix: `method="gram"`).
  * `scale_by_muon`: momentum -> orthogonalize -> shape scale, on matrix leaves.
  * `muon`: the full optimizer: Muon on hidden matrices, AdamW on everything
    else (embedding, output head, norm gains), decoupled weight decay, lr
    (or schedule).

Every per-leaf decision (Muon or AdamW, weight decay, which axes form the
matrix) is taken on the leaf's per-layer shape (`muloco_jax.layout`): the
leading layer axis of a scanned block's parameters is a batch axis, so a
scanned model trains exactly as the unscanned one.  Keyword names follow
`optax.contrib.muon` where optax has the same option.
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import PartitionSpec as P
import numpy as np
import optax
from optax.contrib import MuonDimensionNumbers

from muloco_jax import layout

# The quintic (a, b, c) of Jordan et al., repeated each iteration.
CLASSIC_COEFFICIENTS = (3.4445, -4.7750, 2.0315)
# The paper's per-iteration triples (MuLoCo v2/v3 code, five iterations).
MULOCO_COEFFICIENTS = (
  (4.0848, -6.8946, 2.9270),
  (3.9505, -6.3029, 2.6377),
  (3.7418, -5.5913, 2.3037),
  (2.8769, -3.1427, 1.2046),
  (2.8366, -3.0525, 1.2012),
)
# The Polar Express degree-5 polynomials for singular values in [1e-3, 1] (Amsel, Persson,
# Musco and Gower, arXiv 2505.16932, Algorithm 1, from github.com/NoahAmsel/PolarExpress),
# before their stabilisation; the last one repeats for any further iteration.
POLAR_EXPRESS_COEFFICIENTS = (
  (8.28721201814563, -23.595886519098837, 17.300387312530933),
  (4.107059111542203, -2.9478499167379106, 0.5448431082926601),
  (3.9486908534822946, -2.908902115962949, 0.5518191394370137),
  (3.3184196573706015, -2.488488024314874, 0.51004894012372),
  (2.300652019954817, -1.6689039845747493, 0.4188073119525673),
  (1.891301407787398, -1.2679958271945868, 0.37680408948524835),
  (1.8750014808534479, -1.2500016453999487, 0.3750001645474248),
  (1.875, -1.25, 0.375),
)
# Their safety factor (Section 4.4): p(x / 1.01) for every polynomial but the last, and
# X_0 = G / (1.01 ||G||_F).
POLAR_EXPRESS_SAFETY = 1.01
SCHEDULES = ("classic", "muloco", "polar_express")
METHODS = ("newton_schulz", "gram")
SCALE_RULES = ("spectral", "moonlight", "none")
# Gram Newton-Schulz forms R = X X^T afresh once the iterations since it was last formed could
# have multiplied its round-off by more than this (see `_gram_restarts`).
GRAM_RESTART_GROWTH = 1e4

# A name, one (a, b, c) triple, or a sequence of triples.
Schedule = Union[str, Sequence[float], Sequence[Sequence[float]]]
Coefficients = tuple[tuple[float, float, float], ...]


def _is_one_triple(schedule) -> bool:
  """Whether `schedule` is one (a, b, c) triple of numbers (a list, tuple or array)."""
  if isinstance(schedule, str):
    return False
  try:
    return np.shape(schedule) == (3,) and np.asarray(schedule).dtype.kind in "iuf"
  except ValueError:  # ragged
    return False


def _check_steps(steps) -> None:
  if isinstance(steps, bool) or not isinstance(steps, int) or steps < 1:
    raise ValueError(f"Newton-Schulz `steps` must be a positive int, got {steps!r}.")


def _rescaled(triple, s: float):
  """The (a, b, c) of p(x / s) for the quintic p(x) = a x + b x^3 + c x^5 of `triple`."""
  a, b, c = triple
  return (a / s, b / s**3, c / s**5)


def newton_schulz_coefficients(schedule: Schedule = "classic", steps: int = 5) -> Coefficients:
  """The (a, b, c) triple of each Newton-Schulz iteration.

  "classic" repeats `CLASSIC_COEFFICIENTS` `steps` times; "muloco" is the
  paper's five triples (`steps` must then be 5, or omitted as 5);
  "polar_express" is the first `steps` of `POLAR_EXPRESS_COEFFICIENTS` (the last
  repeated beyond eight) with the authors' safety factor s = 1.01: every
  polynomial p but the last becomes p(x / s), and their normalisation
  X_0 = G / (s ||G||_F) is folded into the first as a further p(x / s), so that
  all schedules start from X_0 = G / ||G||_F.  One (a, b, c) triple of numbers
  is repeated `steps` times (as optax's `ns_coeffs`); an explicit sequence of
  triples is taken as given and `steps` is ignored.
  """
  if _is_one_triple(schedule):
    _check_steps(steps)
    schedule = (tuple(schedule),) * steps
  if isinstance(schedule, str):
    if schedule == "classic":
      _check_steps(steps)
      return (CLASSIC_COEFFICIENTS,) * steps
    if schedule == "muloco":
      if steps != len(MULOCO_COEFFICIENTS):
        raise ValueError(
          f'The "muloco" Newton-Schulz schedule has {len(MULOCO_COEFFICIENTS)} '
          f"steps; got steps={steps}."
        )
      return MULOCO_COEFFICIENTS
    if schedule == "polar_express":
      _check_steps(steps)
      *safe, last = POLAR_EXPRESS_COEFFICIENTS
      safe = [_rescaled(t, POLAR_EXPRESS_SAFETY) for t in safe]
      first, *rest = (safe + [last] * steps)[:steps]
      return (_rescaled(first, POLAR_EXPRESS_SAFETY), *rest)
    raise ValueError(
      f"Unknown Newton-Schulz schedule {schedule!r}: use one of {SCHEDULES} "
      "or a sequence of (a, b, c) triples."
    )
  try:
    triples = tuple(tuple(float(c) for c in t) for t in schedule)
  except (TypeError, ValueError) as e:
    raise ValueError(
      f"Malformed Newton-Schulz schedule {schedule!r}: expected a sequence of "
      "(a, b, c) triples of numbers."
    ) from e
  if not triples or any(len(t) != 3 for t in triples):
    raise ValueError(
      f"Malformed Newton-Schulz schedule {schedule!r}: expected a non-empty "
      "sequence of (a, b, c) triples."
    )
  if not all(math.isfinite(c) for t in triples for c in t):
    raise ValueError(f"Newton-Schulz schedule {schedule!r} has non-finite coefficients.")
  return triples


def _normalized(x, eps: float):
  """x / (||x||_F + eps) over the last two axes, in float32 (or x's dtype if wider): every
  singular value then lies in [0, 1]."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  return x / (jnp.sqrt(jnp.sum(jnp.square(x), axis=(-2, -1), keepdims=True)) + eps)


def _product(a, b, operand_dtype, out=None):
  """a @ b with both operands rounded to `operand_dtype`, accumulated in `out` (None: a's
  dtype)."""
  out = a.dtype if out is None else out
  a, b = a.astype(operand_dtype), b.astype(operand_dtype)
  if operand_dtype == out:
    return a @ b
  # XLA:CPU has no bf16 x bf16 -> f32 dot: there, the same product of the rounded operands
  # as an f32 dot (what it runs a bf16 dot as anyway).
  return lax.platform_dependent(
    a,
    b,
    cpu=lambda a, b: a.astype(out) @ b.astype(out),
    default=lambda a, b: jnp.matmul(a, b, preferred_element_type=out),
  )


def _iterate(x, coefficients: Coefficients, eps: float, operand_dtype):
  """Newton-Schulz on the last two axes of a wide x (rows <= cols).

  Matmul operands are `operand_dtype`; coefficients, accumulation and each iteration's
  elementwise work are float32, as in torch code with Python-float coefficients (the
  authors' bf16 runs).  X itself is kept in the narrower of `operand_dtype` and that
  accumulation dtype (float32, or x's if wider) between iterations, as that code keeps it
  in bf16: the products take it as it is, and an iteration moves half the bytes of a
  float32 X.  Compiled for a TPU chip, XLA's cost
  analysis of a bf16 iteration went from 1.39-1.77x optax's bytes (0.60-0.87x its estimated
  speed) to 1.07-1.14x (0.93-1.00x) on the 150m and 914m shapes
  (`muloco_jax.tools.benchmarks.newton_schulz --dtype=bfloat16 --compile_for=v5p:2x2x1`).
  """
  accumulate = jnp.promote_types(x.dtype, jnp.float32)
  dot = functools.partial(_product, operand_dtype=operand_dtype, out=accumulate)
  x = _normalized(x, eps).astype(
    operand_dtype if _splits(operand_dtype, accumulate) else accumulate
  )

  def iteration(x, abc):
    a, b, c = abc
    gram = dot(x, jnp.swapaxes(x, -1, -2))
    return (a * x + dot(b * gram + c * dot(gram, gram), x)).astype(x.dtype), None

  # A loop rather than unrolled: on XLA:CPU a whole Muon step then takes ~4%
  # less CPU time (one matrix takes the same).
  return lax.scan(iteration, x, jnp.asarray(coefficients, accumulate))[0]


def _gram_restarts(coefficients: Coefficients) -> tuple[int, ...]:
  """The iterations before which Gram Newton-Schulz forms R = X X^T afresh from X = Q X_0.

  R carries round-off of about eps ||R|| on its small eigenvalues s^2, and an iteration
  p(s) = s (a + b s^2 + c s^4) scales those by up to a^2 (p(s)^2 / s^2 -> a^2 as s -> 0).
  A restart comes before the product of a^2 over the iterations since R was formed would
  pass `GRAM_RESTART_GROWTH` (1e4): one restart for the five-step schedules, before
  iteration 2 for "polar_express" (the default of Dao-AILab/gram-newton-schulz) and
  iteration 3 for "muloco" and "classic".  In float32 on 256 x 704 matrices with condition
  number 1e6, half rank or s_k = k^-2, the result then stays within 2.3e-4 (relative
  Frobenius) of float64 Newton-Schulz for the five-step schedules, 8e-4 for eight
  "polar_express" steps and 2e-3 for ten "classic" ones (float32 Newton-Schulz: 3e-5, 1e-4,
  2e-3); without restarts, 3e-3, 0.14, and ten classic steps diverge.
  """
  restarts, growth = [], 1.0
  for t, (a, _, _) in enumerate(coefficients):
    if t and growth * a * a > GRAM_RESTART_GROWTH:
      restarts.append(t)
      growth = 1.0
    growth *= a * a
  return tuple(restarts)


def _iterate_gram(x, coefficients: Coefficients, eps: float, operand_dtype):
  """Gram Newton-Schulz on the last two axes of a wide x (m rows <= n cols).

  Each Newton-Schulz iteration is X <- p_t(X X^T) X with p_t(R) = a I + b R + c R^2, so
  from R = X_0 X_0^T every iterate is a polynomial in R times X_0: the m x m matrices

    Z = b R + c R^2,  Q <- Q (a I + Z)  (Q_0 = I),  R <- (a I + Z) R (a I + Z)

  carry the iteration, and X = Q X_0 is formed once at the end (Zhang, Amsel, Chen and
  Dao 2026, "Gram Newton-Schulz", github.com/Dao-AILab/gram-newton-schulz).  At the
  iterations of `_gram_restarts` X = Q X_0 is formed and R = X X^T recomputed from it.
  Products with X (n columns) have `operand_dtype` operands; the m x m products and all
  the rest are float32 (or x's dtype if wider).
  """
  x = _normalized(x, eps)
  dot = functools.partial(_product, operand_dtype=operand_dtype)
  eye = jnp.eye(x.shape[-2], dtype=x.dtype)
  restarts = _gram_restarts(coefficients)
  r, q = dot(x, jnp.swapaxes(x, -1, -2)), None
  for t, (a, b, c) in enumerate(coefficients):
    if t in restarts:
      x = _split_product(q, x, operand_dtype)
      r, q = dot(x, jnp.swapaxes(x, -1, -2)), None
    z = b * r + c * (r @ r)
    q = z + a * eye if q is None else q @ z + a * q
    if t + 1 < len(coefficients) and t + 1 not in restarts:  # R is needed again
      rz = r @ z + a * r
      r = z @ rz + a * rz
  return _split_product(q, x, operand_dtype)


def _split_product(q, x, operand_dtype):
  """``q @ x`` with ``operand_dtype`` operands and x kept to float32 accuracy: x = hi + lo,
  both parts rounded to ``operand_dtype``, two products.  Q's entries grow with the
  iteration (a^k), so one product with x rounded once would scale x's rounding by them: in
  bf16 Gram Newton-Schulz was then 2-14x further from float32's result than plain
  Newton-Schulz (tests/test_newton_schulz.py)."""
  dot = functools.partial(_product, operand_dtype=operand_dtype)
  if not _splits(operand_dtype, x.dtype):
    return dot(q, x)
  hi = x.astype(operand_dtype).astype(x.dtype)
  q_hi = q.astype(operand_dtype).astype(q.dtype)
  return dot(q_hi, hi) + dot(q_hi, x - hi) + dot(q - q_hi, hi)


def _wide_flops(m: int, n: int, coefficients: Coefficients, gram: bool, split: bool = False) -> int:
  """Matmul flops of Newton-Schulz (or Gram Newton-Schulz) on one wide m x n matrix; `split`:
  Gram's products with X in three narrow products (`_split_product`)."""
  if not gram:  # X X^T, A^2, (b A + c A^2) X per iteration
    return len(coefficients) * (4 * m * m * n + 2 * m**3)
  # Per run of L iterations between restarts: R = X X^T and the closing Q X_0 (2 m^2 n each,
  # the latter 3 times split), and 4 L - 3 m x m products (R^2 each, Q Z but the first, R Z and
  # Z (R Z) but the last).
  bounds = (0, *_gram_restarts(coefficients), len(coefficients))
  runs = [end - start for start, end in zip(bounds, bounds[1:])]
  closing = 6 if split else 2
  return sum((2 + closing) * m * m * n + (4 * length - 3) * 2 * m**3 for length in runs)


def _splits(operand_dtype, dtype) -> bool:
  """Whether `operand_dtype` is narrower than `dtype`: then Gram's products with X split X
  and Q (`_split_product`) and Newton-Schulz keeps X in `operand_dtype` (`_iterate`)."""
  return jnp.finfo(operand_dtype).bits < jnp.finfo(dtype).bits


def _uses_gram(
  shape: Sequence[int], coefficients: Coefficients, method: str, split: bool = False
) -> bool:
  """Whether `method` runs Gram Newton-Schulz on matrices of `shape`: "gram" does where it
  takes fewer flops: n > 1.5 m for any restarts (S runs, T iterations: Gram 4 S m^2 n +
  (8 T - 6 S) m^3 against T (4 m^2 n + 2 m^3)), n > 4.5 m for five steps with `split`
  (narrow operands: 8 S m^2 n); never on squares."""
  m, n = sorted(shape[-2:])
  gram_flops = _wide_flops(m, n, coefficients, True, split)
  return method == "gram" and gram_flops < _wide_flops(m, n, coefficients, False)


def _check_method(method, name: str = "method") -> None:
  if method not in METHODS:
    raise ValueError(f"Unknown Newton-Schulz {name}={method!r}: use one of {METHODS}.")


@functools.partial(
  jax.jit, static_argnames=("coefficients", "compute_dtype", "eps", "method", "batched")
)
def _newton_schulz(
  x, coefficients: Coefficients, compute_dtype, eps: float, method="newton_schulz", batched=False
):
  """`orthogonalize` on the last two axes of x, for validated arguments.

  `batched`: iterate on all of x's matrices as one batched computation on every platform,
  as for a batch axis sharded over devices (a loop over it would make GSPMD gather it).
  """
  in_dtype = x.dtype
  tall = x.shape[-2] > x.shape[-1]
  if tall:  # iterate on the wide orientation: X X^T is then the smaller Gram matrix
    x = jnp.swapaxes(x, -1, -2)
  operand_dtype = compute_dtype or in_dtype
  split = _splits(operand_dtype, jnp.promote_types(in_dtype, jnp.float32))
  iterate = _iterate_gram if _uses_gram(x.shape, coefficients, method, split) else _iterate
  iterate = functools.partial(
    iterate, coefficients=coefficients, eps=eps, operand_dtype=operand_dtype
  )
  matrices = x.reshape(-1, *x.shape[-2:])
  if batched:
    x = iterate(x)
  elif len(matrices) > 1:
    # XLA:CPU spends 10-20% more CPU time on a batched dot than on the same
    # products one matrix at a time, so on CPU the batch is a loop (lax.map);
    # elsewhere it is one batched computation.
    x = lax.platform_dependent(
      matrices, cpu=lambda m: lax.map(iterate, m), default=iterate
    ).reshape(x.shape)
  else:  # as a 2-D matrix: with a unit batch axis XLA:CPU is 15-25% slower
    x = iterate(matrices[0]).reshape(x.shape)
  if tall:
    x = jnp.swapaxes(x, -1, -2)
  return x.astype(in_dtype)


def orthogonalize(
  x: jax.Array,
  schedule: Schedule = "classic",
  steps: int = 5,
  compute_dtype: Any = None,
  eps: float = 1e-7,
  *,
  method: str = "newton_schulz",
) -> jax.Array:
  """Approximately orthogonalizes the matrices in the last two axes of `x`.

  Newton-Schulz: X_0 = G / (||G||_F + eps) and, for each (a, b, c) of the
  schedule, A = X X^T, X <- a X + (b A + c A^2) X.  For G = U S V^T this maps
  every singular value s through the odd quintic p(s) = a s + b s^3 + c s^5, so
  the result is U p^(n)(S) V^T with p^(n)(S) near 1: for normalised singular
  values s / ||s|| in [0.01, 1], in 0.68-1.13 for "classic", 0.978-1.032 for
  "muloco" and 0.87-1.12 for "polar_express"; in [1e-3, 1], 0.84-1.12 for
  "polar_express" (its design interval) and down to 0.47 for the other two.
  Tall matrices are transposed so that A is the smaller Gram matrix.  Leading
  axes (stacked layers, heads) are a batch, done in one computation with no
  Python loop per matrix: batched matmuls, or on CPU a `lax.map` over them.

  `method="gram"` computes the same polynomial on the m x m Gram matrix of a
  wide m x n matrix (see `_iterate_gram`, Gram Newton-Schulz, Zhang et al.
  2026): per iteration four m x m products instead of two products with X, so
  where n > 1.5 m it takes fewer flops (1.3x fewer for five iterations at
  n = 2.75 m with one restart: 8 m^2 n + 28 m^3 against 20 m^2 n + 10 m^3) and
  elsewhere (squares) it runs Newton-Schulz itself.  `newton_schulz_flops`
  counts either.

  Matmul operands, and X between iterations, are in `compute_dtype`;
  coefficients, accumulation and each iteration's sums stay in float32, as the
  authors' bf16 torch code does with Python-float coefficients (rounded to bf16,
  the "muloco" coefficients are another polynomial: band 0.994-1.051 rather than
  0.978-1.032 on [0.01, 1]).

  Args:
    x: array of rank >= 2, float dtype.
    schedule: "classic", "muloco", "polar_express" or a sequence of (a, b, c)
      triples; see `newton_schulz_coefficients`.
    steps: iterations for "classic" and "polar_express".
    compute_dtype: dtype of the matmul operands (e.g. jnp.bfloat16); None keeps x's.
    eps: added to the Frobenius norm.
    method: "newton_schulz" or "gram" (keyword-only).

  Returns:
    An array of x's shape and dtype.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"orthogonalize needs an array of rank >= 2, got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"orthogonalize needs a floating-point array, got dtype {x.dtype}.")
  _check_method(method)
  coefficients = newton_schulz_coefficients(schedule, steps)
  compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
  return _newton_schulz(x, coefficients, compute_dtype, float(eps), method)


def newton_schulz_flops(
  shape: Sequence[int],
  steps: int,
  *,
  schedule: Schedule = "classic",
  method: str = "newton_schulz",
  compute_dtype: Any = None,
) -> int:
  """Matmul flops of `orthogonalize(x, schedule, steps, compute_dtype, method=method)` on one
  float32 array of `shape`: per wide m x n matrix (m <= n) steps (4 m^2 n + 2 m^3) for
  Newton-Schulz, and for "gram" where it runs, 4 m^2 n per run between restarts (8 m^2 n with a
  narrower `compute_dtype`: the products with X split) plus 2 m^3 per m x m product."""
  _check_method(method)
  *batch, m, n = shape
  m, n = min(m, n), max(m, n)
  coefficients = newton_schulz_coefficients(schedule, steps)
  split = compute_dtype is not None and _splits(jnp.dtype(compute_dtype), jnp.float32)
  gram = _uses_gram((m, n), coefficients, method, split)
  return math.prod(batch) * _wide_flops(m, n, coefficients, gram, split)


# --------------------------------------------------------------------------
# Fan-in / fan-out axes of a leaf.

DimensionNumbers = MuonDimensionNumbers
# The default for a leaf whose per-layer rank is 2: a Flax (in, out) kernel,
# reduced over -2, output -1; the leading axes of such a leaf are exactly its
# stacked layer axes, the batch.
FLAX_DIMENSION_NUMBERS = MuonDimensionNumbers(reduction_axis=-2, output_axis=-1)


def _axes(x, dim_numbers: MuonDimensionNumbers):
  as_tuple = lambda a: (a,) if isinstance(a, int) else tuple(a)
  reduction = tuple(a % x.ndim for a in as_tuple(dim_numbers.reduction_axis))
  output = tuple(a % x.ndim for a in as_tuple(dim_numbers.output_axis))
  if set(reduction) & set(output) or not reduction or not output:
    raise ValueError(
      f"Muon dimension numbers {dim_numbers} are invalid for shape {x.shape}: "
      "reduction and output axes must be non-empty and disjoint."
    )
  batch = tuple(a for a in range(x.ndim) if a not in reduction + output)
  return batch, reduction, output


def fan_in_fan_out(x, dim_numbers: MuonDimensionNumbers = FLAX_DIMENSION_NUMBERS):
  """(fan_in, fan_out) of a leaf: the products of its reduction/output axes."""
  _, reduction, output = _axes(x, dim_numbers)
  return (math.prod(x.shape[a] for a in reduction), math.prod(x.shape[a] for a in output))


def _as_matrices(x, dim_numbers):
  """Reshapes x to (batch, fan_in, fan_out) and returns the inverse map."""
  batch, reduction, output = _axes(x, dim_numbers)
  perm = batch + reduction + output
  permuted_shape = tuple(x.shape[a] for a in perm)
  fan_in, fan_out = fan_in_fan_out(x, dim_numbers)
  matrices = jnp.transpose(x, perm).reshape(-1, fan_in, fan_out)
  inverse_perm = tuple(sorted(range(x.ndim), key=perm.__getitem__))
  return matrices, lambda m: jnp.transpose(m.reshape(permuted_shape), inverse_perm)


def shape_scale(fan_in: int, fan_out: int, rule: str) -> float:
  """Per-matrix multiplier of the orthogonalized update.

  "spectral": sqrt(fan_out / fan_in) (the paper's default: unit spectral norm
  per unit of input RMS); "moonlight": 0.2 * sqrt(max(fan_in, fan_out))
  (matches AdamW's update RMS, Liu et al. 2025); "none": 1.
  """
  if rule == "spectral":
    return math.sqrt(fan_out / fan_in)
  if rule == "moonlight":
    return 0.2 * math.sqrt(max(fan_in, fan_out))
  if rule == "none":
    return 1.0
  raise ValueError(f"Unknown Muon scale rule {rule!r}: use one of {SCALE_RULES}.")


def _leaf_dimension_numbers(path, leaf, given, stacked_axes):
  """The dimension numbers of one leaf meant for Muon: `given`, or the per-layer default."""
  name = jax.tree_util.keystr(tuple(path))
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"Muon needs floating-point parameters; {name} has dtype {leaf.dtype}.")
  if given is not None:
    _axes(leaf, given)  # validates them against the leaf
    return given
  shape = layout.layer_shape(path, leaf, stacked_axes=stacked_axes)
  if len(shape) < 2:
    raise ValueError(
      f"Muon needs parameters of rank >= 2 per layer; {name} has shape {leaf.shape} "
      f"({leaf.ndim - len(shape)} stacked layer axes). Send scalars and vectors to AdamW "
      "(see `muon_labels`)."
    )
  if len(shape) > 2:
    raise ValueError(
      f"Muon has no default dimension numbers for {name}: its per-layer shape {shape} has "
      "rank > 2, so which axes form the matrix is ambiguous (e.g. a DenseGeneral "
      "(d, heads, head_dim) kernel). Pass `MuonDimensionNumbers` for it "
      "(`weight_dimension_numbers` / `muon_weight_dimension_numbers`)."
    )
  return FLAX_DIMENSION_NUMBERS


def dimension_numbers_tree(
  params: Any,
  weight_dimension_numbers: Any = None,
  *,
  stacked_axes: layout.StackedAxesFn = layout.stacked_axes,
) -> Any:
  """Per-leaf `MuonDimensionNumbers` of a tree of Muon parameters.

  `weight_dimension_numbers` is None, one `MuonDimensionNumbers` for every
  leaf, a tree of them (None entries: the default) or a function of the params
  returning either.  The default for a leaf is `FLAX_DIMENSION_NUMBERS`
  (reduction -2, output -1, the leading stacked layer axes a batch) when its
  per-layer rank is 2; a leaf of per-layer rank > 2 has no default and raises
  a ValueError naming it, as does one of per-layer rank < 2.
  """
  given = weight_dimension_numbers
  if callable(given) and not isinstance(given, MuonDimensionNumbers):
    given = given(params)
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(params)
  if given is None or isinstance(given, MuonDimensionNumbers):
    given_leaves = [given] * len(path_leaves)
  else:
    given_leaves = treedef.flatten_up_to(given)
  dims = [
    _leaf_dimension_numbers(path, leaf, dn, stacked_axes)
    for (path, leaf), dn in zip(path_leaves, given_leaves)
  ]
  return jax.tree.unflatten(treedef, dims)


# --------------------------------------------------------------------------
# Newton-Schulz distributed over a mesh axis (FSDP).


def _mesh_axis_size(axis: str | None) -> int:
  """Size of mesh axis `axis` in the abstract mesh in context (1: no such axis, or no mesh)."""
  mesh = jax.sharding.get_abstract_mesh()
  if axis is None or axis not in mesh.shape:
    return 1
  if dict(zip(mesh.axis_names, mesh.axis_types))[axis] == jax.sharding.AxisType.Explicit:
    raise ValueError(
      f"Muon's shard_axis={axis!r} needs that mesh axis of type Auto (sharding constraints "
      "move the matrices), not Explicit (`jax.make_mesh`'s default: pass axis_types)."
    )
  return mesh.shape[axis]


def _sharded_fan_axis(leaf, dim_numbers, spec, axis: str) -> int | None:
  """The axis of the leaf's (batch, fan_in, fan_out) view, -2 or -1, that its PartitionSpec
  `spec` shards over mesh axis `axis`; None when neither (or no spec)."""
  _, reduction, output = _axes(leaf, dim_numbers)
  names = lambda entry: entry if isinstance(entry, tuple) else (entry,)
  sharded = {a for a, entry in enumerate(spec or ()) if axis in names(entry)}
  return -2 if sharded & set(reduction) else -1 if sharded & set(output) else None


def _wide(x):
  """x, or its transpose over the last two axes when it has more rows than columns."""
  return x if x.shape[-2] <= x.shape[-1] else jnp.swapaxes(x, -1, -2)


_TRANSPOSED_AXIS = {-2: -1, -1: -2, None: None}  # a tall matrix's fan axes in the wide stack


def _orthogonalize_groups(matrices, newton_schulz, fan_axes=None, axis=None, shards=1):
  """`newton_schulz` of each (batch, fan_in, fan_out) array of `matrices`, one call per group.

  A group is every matrix of one wide shape (m <= n) and dtype, a tall matrix joining as its
  transpose (Newton-Schulz maps X^T to the transpose of X's result): its matrices, from all
  arrays and all their stacked layers, are concatenated into one stack [N, m, n],
  orthogonalized in one batched computation and split again.

  With `shards` > 1 devices along mesh axis `axis` (FSDP), each device does 1/shards of every
  group: the stack is zero-padded to a multiple of `shards` (Newton-Schulz maps a zero matrix
  to zero), split over `axis` along N (an all-to-all), orthogonalized there, and resharded
  over the fan axis that `fan_axes` (-2, -1 or None per array) names most often, else the
  longer one (another all-to-all), so that each array is then a local slice of the stack.
  """
  groups = {}
  for i, m in enumerate(matrices):
    groups.setdefault((_wide(m).shape[1:], m.dtype), []).append(i)
  tall = [m.shape[-2] > m.shape[-1] for m in matrices]
  out = [None] * len(matrices)
  for (shape, _), members in groups.items():
    stack = jnp.concatenate([_wide(matrices[i]) for i in members])
    count = len(stack)
    if shards == 1:
      stack = newton_schulz(stack)
    else:
      stack = jnp.pad(stack, ((0, -count % shards), (0, 0), (0, 0)))
      by_matrix = functools.partial(lax.with_sharding_constraint, shardings=P(axis, None, None))
      # Pinned at both ends, the loop inside keeps whole matrices on each device (pinned at
      # its input alone, XLA may split each matrix inside the loop, with all-reduces every step).
      stack = by_matrix(newton_schulz(by_matrix(stack)))
      votes = [_TRANSPOSED_AXIS[fan_axes[i]] if tall[i] else fan_axes[i] for i in members]
      fan_axis = max((-2, -1), key=lambda a: (votes.count(a), shape[a]))
      stack = lax.with_sharding_constraint(
        stack[:count], P(None, *[axis if a == fan_axis else None for a in (-2, -1)])
      )
    offsets = np.cumsum([len(matrices[i]) for i in members])[:-1]
    for i, part in zip(members, jnp.split(stack, offsets)):
      out[i] = jnp.swapaxes(part, -1, -2) if tall[i] else part
  return out


# --------------------------------------------------------------------------
# scale_by_muon


class ScaleByMuonState(NamedTuple):
  """Momentum buffer of `scale_by_muon` (same tree as the params)."""

  momentum: optax.Updates


def scale_by_muon(
  *,
  ns_coeffs: Schedule = "classic",
  ns_steps: int = 5,
  ns_method: str = "newton_schulz",
  beta: float = 0.95,
  eps: float = 1e-7,
  mu_dtype: Any = None,
  nesterov: bool = True,
  weight_dimension_numbers: Any = None,
  compute_dtype: Any = None,
  scale: str = "spectral",
  stacked_axes: layout.StackedAxesFn = layout.stacked_axes,
  shard_axis: str | None = None,
  param_specs: Any = None,
) -> optax.GradientTransformation:
  """Muon's direction: momentum, Newton-Schulz, shape scale (arXiv 2505.23725).

  For each leaf, with gradient g and momentum m:

    m <- beta m + (1 - beta) g
    u = beta m + (1 - beta) g   (Nesterov)   or   u = m
    update = shape_scale(fan_in, fan_out) * orthogonalize(U)

  where U is u viewed as a batch of (fan_in, fan_out) matrices.  The view is
  given by `weight_dimension_numbers` (see `dimension_numbers_tree`): by
  default a leaf's stacked layer axes (`muloco_jax.layout.stacked_axes`) are
  the batch and its per-layer shape must be a Flax (in, out) kernel; a leaf of
  per-layer rank > 2 needs explicit `MuonDimensionNumbers` (all axes not named
  in them are a batch).  Every leaf must be a matrix per layer (use `muon` to
  route the rest to AdamW).  The matrices of one shape (a tall one as its
  transpose, so a (d, 4d) and a (4d, d) kernel share it) and dtype, from all
  leaves and all their stacked layers, are orthogonalized in one batched
  `orthogonalize` computation: one call per shape rather than per leaf.

  FSDP (`shard_axis`): with parameters sharded over a mesh axis of size F > 1,
  Newton-Schulz on each leaf has XLA either gather every matrix onto every
  device of the axis or split each product of every iteration with
  collectives (150M on 8 CPU devices: 360 all-gathers and 132 all-reduces a
  step, see `muloco_jax.tools.benchmarks.sharded_muon`).  Instead, when `shard_axis`
  names an axis of size F > 1 of the mesh in context (`jax.set_mesh`; an Auto
  axis), the stack [N, m, n] of each shape above is zero-padded
  to N' = F ceil(N / F) (Newton-Schulz maps 0 to 0: X_0 = 0 / (0 + eps)).
  The stack is constrained to `P(shard_axis)`, so that each device holds
  N' / F whole matrices (XLA moves them with an all-to-all) and orthogonalizes
  those alone, in one batched computation; the result is resharded over its
  fan-in or fan-out axis (another all-to-all), split into the leaves,
  shape-scaled, and each leaf is constrained to its spec in `param_specs`.
  Each matrix goes through exactly the arithmetic above, so the update is the
  same to round-off; per group, each device does the Newton-Schulz flops of
  ceil(N / F) matrices, and the only collectives are two all-to-alls (and one
  per leaf whose spec shards the other fan axis than most of its group's).
  Inside `jax.vmap(..., spmd_axis_name=...)` (DiLoCo workers) the constraints
  keep the vmapped axis where it is sharded, so the all-to-alls stay within
  each worker's group.  Without a mesh in context, or with the axis absent or
  of size 1, each stack is orthogonalized where it lies.

  All arguments are keyword-only; names follow `optax.contrib.scale_by_muon`.

  Args:
    ns_coeffs: Newton-Schulz coefficients: "classic", "muloco",
      "polar_express", one (a, b, c) triple (repeated `ns_steps` times) or a
      sequence of triples; see `newton_schulz_coefficients`.
    ns_steps: Newton-Schulz iterations for "classic", "polar_express" or a
      single triple.
    ns_method: "newton_schulz", or "gram" for Gram Newton-Schulz on the
      matrices where it takes fewer flops (see `orthogonalize`).
    beta: momentum decay.
    eps: added to the Frobenius norm before Newton-Schulz.
    mu_dtype: dtype of the momentum buffer (None: the params').
    nesterov: use the Nesterov look-ahead.
    weight_dimension_numbers: which axes are fan-in / fan-out, see above.
    compute_dtype: dtype of the Newton-Schulz matmul operands (None: the
      update's), also X's between iterations; coefficients, accumulation and
      sums are float32.
    scale: "spectral" (paper), "moonlight" or "none"; see `shape_scale`.
    stacked_axes: the rule giving a leaf's number of leading layer axes.
    shard_axis: name of the mesh axis over which to distribute Newton-Schulz
      (see FSDP above); None: each shape's stack where it lies.
    param_specs: the `PartitionSpec` of each parameter leaf (per worker, no
      worker axis), as a tree like the params (None entries: no constraint) or
      a function of the params returning it; used with `shard_axis` to put
      each leaf of the update back where its parameter lives.  None: leave the
      update's sharding to XLA's propagation.
  """
  coefficients = newton_schulz_coefficients(ns_coeffs, ns_steps)
  _check_method(ns_method, "ns_method")
  shape_scale(1, 1, scale)  # validates the rule now rather than at the first step
  compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
  dims_of = functools.partial(
    dimension_numbers_tree,
    weight_dimension_numbers=weight_dimension_numbers,
    stacked_axes=stacked_axes,
  )

  def init_fn(params):
    dims_of(params)  # raises now for a leaf Muon cannot take
    momentum = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=mu_dtype or p.dtype), params)
    return ScaleByMuonState(momentum=momentum)

  def update_fn(updates, state, params=None):
    momentum = optax.tree.update_moment(updates, state.momentum, beta, 1)
    direction = optax.tree.update_moment(updates, momentum, beta, 1) if nesterov else momentum
    momentum = optax.tree.cast(momentum, mu_dtype) if mu_dtype else momentum
    params = params if params is not None else updates
    leaves, treedef = jax.tree.flatten(direction)
    dims = treedef.flatten_up_to(dims_of(params))
    matrices, inverses = zip(*map(_as_matrices, leaves, dims)) if leaves else ((), ())
    newton_schulz = functools.partial(
      _newton_schulz,
      coefficients=coefficients,
      compute_dtype=compute_dtype,
      eps=float(eps),
      method=ns_method,
    )
    shards = _mesh_axis_size(shard_axis)
    specs, fan_axes = [None] * len(leaves), None
    if shards > 1:
      if param_specs is not None:
        specs = treedef.flatten_up_to(param_specs(params) if callable(param_specs) else param_specs)
      fan_axes = [_sharded_fan_axis(*args, shard_axis) for args in zip(leaves, dims, specs)]
      newton_schulz = functools.partial(newton_schulz, batched=True)
    ortho = _orthogonalize_groups(matrices, newton_schulz, fan_axes, shard_axis, shards)
    out = []
    for leaf, m, inverse, o, spec in zip(leaves, matrices, inverses, ortho, specs):
      o = inverse(o * shape_scale(*m.shape[1:], scale)).astype(leaf.dtype)
      out.append(o if spec is None else lax.with_sharding_constraint(o, spec))
    return jax.tree.unflatten(treedef, out), ScaleByMuonState(momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# The full optimizer.

# Path components that mark a >=2-D parameter as an embedding or output head.
ADAM_NAMES = ("embed", "embedding", "wte", "tok_embeddings", "head", "lm_head", "output")


def muon_labels(
  params: Any,
  adam_names: Sequence[str] = ADAM_NAMES,
  *,
  stacked_axes: layout.StackedAxesFn = layout.stacked_axes,
) -> Any:
  """Labels "muon" for hidden matrices, "adam" for the rest.

  A leaf goes to AdamW when its per-layer rank (`muloco_jax.layout.layer_ndim`)
  is < 2 (norm gains, stacked or not; biases; scalars) or a component of its
  path is in `adam_names` (embedding, untied output head).
  """
  names = set(adam_names)

  def label(path, leaf):
    vector = layout.layer_ndim(path, leaf, stacked_axes=stacked_axes) < 2
    return "adam" if vector or names & set(layout.path_names(path)) else "muon"

  return jax.tree_util.tree_map_with_path(label, params)


def _check_float_params(params):
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise ValueError(
        f"muon needs floating-point parameters; {jax.tree_util.keystr(path)} "
        f"has dtype {jnp.asarray(leaf).dtype}."
      )


def _restrict_to_muon_leaves(tree):
  """A full-params tree (of dimension numbers, of specs) as a function of the masked Muon
  subtree; None, a function or one `MuonDimensionNumbers` (already fit for any subtree) as is."""
  if tree is None or callable(tree) or isinstance(tree, MuonDimensionNumbers):
    return tree

  def restricted(masked_params):
    return jax.tree.map(
      lambda m, d: m if isinstance(m, optax.MaskedNode) else d,
      masked_params,
      tree,
      is_leaf=lambda x: isinstance(x, optax.MaskedNode),
    )

  return restricted


def muon(
  learning_rate: optax.ScalarOrSchedule,
  *,
  ns_coeffs: Schedule = "classic",
  ns_steps: int = 5,
  ns_method: str = "newton_schulz",
  beta: float = 0.95,
  eps: float = 1e-7,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = layout.matrix_mask,
  mu_dtype: Any = None,
  nesterov: bool = True,
  adam_b1: float = 0.9,
  adam_b2: float = 0.99,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  muon_weight_dimension_numbers: Any = None,
  adam_eps: float = 1e-8,
  compute_dtype: Any = None,
  scale: str = "spectral",
  labels: Callable[[Any], Any] = muon_labels,
  stacked_axes: layout.StackedAxesFn = layout.stacked_axes,
  shard_axis: str | None = None,
  param_specs: Any = None,
) -> optax.GradientTransformation:
  """Muon on hidden matrices, AdamW on everything else: MuLoCo's inner optimizer.

  MuLoCo (arXiv 2505.23725) uses, for a leaf labelled "muon",

    p <- p (1 - lr wd) - lr * scale_by_muon(g)

  (momentum beta, Nesterov, Newton-Schulz orthogonalization of every
  per-layer (fan_in, fan_out) matrix, spectral shape scale sqrt(fan_out /
  fan_in)), and for a leaf labelled "adam"

    p <- p (1 - lr_adam wd) - lr_adam * m_hat / (sqrt(v_hat) + adam_eps)

  with Adam betas (0.9, 0.99) and eps 1e-8 as in the paper.  Weight decay is
  decoupled and applies where `weight_decay_mask` is True (default
  `muloco_jax.layout.matrix_mask`: per-layer rank >= 2; optax's default None
  would decay every leaf).  `learning_rate` (and `adam_learning_rate`, default
  the same) may be an optax schedule.  `labels` maps the params to a tree of
  "muon"/"adam" (default `muon_labels`: per-layer rank < 2 and the embedding /
  head go to AdamW).  Every per-leaf decision sees the per-layer shape, so a
  scanned model (leading layer axis) gets the same update as the unscanned one.

  Everything after `learning_rate` is keyword-only.  Names follow
  `optax.contrib.muon`: `ns_coeffs` ("classic", "muloco", "polar_express", one
  (a, b, c) triple or a sequence of triples), `ns_steps`, `beta`, `eps` (Newton-Schulz),
  `weight_decay`, `weight_decay_mask`, `mu_dtype` (momentum dtype),
  `nesterov`, `adam_b1`, `adam_b2`, `adam_learning_rate` and
  `muon_weight_dimension_numbers` (one `MuonDimensionNumbers`, a tree of them
  over the full params with None for the default, or a function of the Muon
  params; see `dimension_numbers_tree`).  Our own: `ns_method` ("newton_schulz"
  or "gram", see `orthogonalize`), `adam_eps`, `labels`,
  `compute_dtype` (Newton-Schulz matmul operand dtype), `scale` (see `shape_scale`),
  `stacked_axes` (the rule for a leaf's leading layer axes, also used by the
  default `labels` and `weight_decay_mask`), and for FSDP-sharded params
  `shard_axis` and `param_specs` (a tree of `PartitionSpec`s over the full
  params, or a function of the Muon params): with a mesh axis `shard_axis` of
  size F > 1 in context, each device orthogonalizes 1/F of the hidden
  matrices of each shape rather than all of them (see `scale_by_muon`).
  """
  adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
  if labels is muon_labels:
    labels = functools.partial(muon_labels, stacked_axes=stacked_axes)
  if weight_decay_mask is layout.matrix_mask:
    weight_decay_mask = functools.partial(layout.matrix_mask, stacked_axes=stacked_axes)
  muon_part = optax.chain(
    scale_by_muon(
      ns_coeffs=ns_coeffs,
      ns_steps=ns_steps,
      ns_method=ns_method,
      beta=beta,
      eps=eps,
      mu_dtype=mu_dtype,
      nesterov=nesterov,
      weight_dimension_numbers=_restrict_to_muon_leaves(muon_weight_dimension_numbers),
      compute_dtype=compute_dtype,
      scale=scale,
      stacked_axes=stacked_axes,
      shard_axis=shard_axis,
      param_specs=_restrict_to_muon_leaves(param_specs),
    ),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(learning_rate),
  )
  adam_part = optax.chain(
    optax.scale_by_adam(b1=adam_b1, b2=adam_b2, eps=adam_eps),
    optax.add_decayed_weights(weight_decay, weight_decay_mask),
    optax.scale_by_learning_rate(adam_learning_rate),
  )
  inner = optax.multi_transform({"muon": muon_part, "adam": adam_part}, labels)

  def init_fn(params):
    _check_float_params(params)
    return inner.init(params)

  return optax.GradientTransformation(init_fn, inner.update)
