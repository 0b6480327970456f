"""Optimizers: Muon as an optax `GradientTransformation`.

Muon (Jordan et al. 2024) takes SGD momentum on a matrix-shaped parameter and
replaces the update by its nearest semi-orthogonal matrix, computed with a few
Newton-Schulz iterations.  MuLoCo (arXiv 2505.23725) uses it as DiLoCo's inner
optimizer: orthogonalized steps average and compress better across workers.

Pieces, smallest first:
  * `orthogonalize`: Newton-Schulz on the last two axes, batched over the rest.
  * `scale_by_muon`: momentum -> orthogonalize -> shape scale, on >=2-D leaves.
  * `muon`: the full optimizer: Muon on hidden matrices, AdamW on everything
    else (embedding, output head, norm gains), decoupled weight decay, lr
    (or schedule).
"""

from __future__ import annotations

import functools
import math
from typing import Any, Callable, NamedTuple, Sequence, Union

import jax
import jax.numpy as jnp
from jax import lax
import optax
from optax.contrib import MuonDimensionNumbers

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
SCALE_RULES = ("spectral", "moonlight", "none")

Schedule = Union[str, Sequence[Sequence[float]]]
Coefficients = tuple[tuple[float, float, float], ...]


def newton_schulz_coefficients(schedule: Schedule = "classic", steps: int = 5) -> Coefficients:
  """The (a, b, c) triple of each Newton-Schulz iteration.

  "classic" repeats `CLASSIC_COEFFICIENTS` `steps` times; "muloco" is the
  paper's five triples (`steps` must then be 5, or omitted as 5); an explicit
  sequence of triples is taken as given and `steps` is ignored.
  """
  if isinstance(schedule, str):
    if schedule == "classic":
      if not isinstance(steps, int) or steps < 1:
        raise ValueError(f"Newton-Schulz `steps` must be a positive int, got {steps!r}.")
      return (CLASSIC_COEFFICIENTS,) * steps
    if schedule == "muloco":
      if steps != len(MULOCO_COEFFICIENTS):
        raise ValueError(
          f'The "muloco" Newton-Schulz schedule has {len(MULOCO_COEFFICIENTS)} '
          f"steps; got steps={steps}."
        )
      return MULOCO_COEFFICIENTS
    raise ValueError(
      f'Unknown Newton-Schulz schedule {schedule!r}: use "classic", "muloco" '
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


def _iterate(x, coefficients: Coefficients, eps: float):
  """Newton-Schulz on the last two axes of a wide x (rows <= cols), in x's dtype."""
  # Frobenius normalisation in float32 puts every singular value in [0, 1].
  norm = jnp.sqrt(jnp.sum(jnp.square(x.astype(jnp.float32)), axis=(-2, -1), keepdims=True))
  x = x / (norm + eps).astype(x.dtype)

  def iteration(x, abc):
    a, b, c = abc
    gram = x @ jnp.swapaxes(x, -1, -2)
    return a * x + (b * gram + c * (gram @ gram)) @ x, None

  # A loop rather than unrolled: on XLA:CPU a whole Muon step then takes ~4%
  # less CPU time (one matrix takes the same).
  return lax.scan(iteration, x, jnp.asarray(coefficients, x.dtype))[0]


@functools.partial(jax.jit, static_argnames=("coefficients", "compute_dtype", "eps"))
def _newton_schulz(x, coefficients: Coefficients, compute_dtype, eps: float):
  """X <- a X + (b A + c A^2) X with A = X X^T, on the last two axes of x."""
  in_dtype = x.dtype
  tall = x.shape[-2] > x.shape[-1]
  if tall:  # iterate on the wide orientation: A is then the smaller Gram matrix
    x = jnp.swapaxes(x, -1, -2)
  x = x.astype(compute_dtype or in_dtype)
  iterate = functools.partial(_iterate, coefficients=coefficients, eps=eps)
  matrices = x.reshape(-1, *x.shape[-2:])
  if len(matrices) > 1:
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
) -> jax.Array:
  """Approximately orthogonalizes the matrices in the last two axes of `x`.

  Newton-Schulz: X_0 = G / (||G||_F + eps) and, for each (a, b, c) of the
  schedule, A = X X^T, X <- a X + (b A + c A^2) X.  For G = U S V^T this maps
  every singular value s through the odd quintic p(s) = a s + b s^3 + c s^5, so
  the result is U p^(n)(S) V^T with p^(n)(S) near 1 (about 0.5-1.5 for
  "classic", about 0.7-1.2 for "muloco").  Tall matrices are transposed so that
  A is the smaller Gram matrix.  Leading axes (stacked layers, heads) are a
  batch, done in one computation with no Python loop per matrix: batched
  matmuls, or on CPU a `lax.map` over the matrices.

  Args:
    x: array of rank >= 2, float dtype.
    schedule: "classic", "muloco" or a sequence of (a, b, c) triples.
    steps: iterations for "classic".
    compute_dtype: dtype of the iteration (e.g. jnp.bfloat16); None keeps x's.
    eps: added to the Frobenius norm.

  Returns:
    An array of x's shape and dtype.
  """
  x = jnp.asarray(x)
  if x.ndim < 2:
    raise ValueError(f"orthogonalize needs an array of rank >= 2, got shape {x.shape}.")
  if not jnp.issubdtype(x.dtype, jnp.floating):
    raise ValueError(f"orthogonalize needs a floating-point array, got dtype {x.dtype}.")
  coefficients = newton_schulz_coefficients(schedule, steps)
  compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)
  return _newton_schulz(x, coefficients, compute_dtype, float(eps))


def newton_schulz_flops(shape: Sequence[int], steps: int) -> int:
  """Floating-point operations of `orthogonalize` on one array of `shape`."""
  *batch, m, n = shape
  m, n = min(m, n), max(m, n)
  per_step = 2 * m * m * n + 2 * m * m * m + 2 * m * m * n  # A, A^2, (bA + cA^2) X
  return math.prod(batch) * steps * per_step


# --------------------------------------------------------------------------
# Fan-in / fan-out axes of a leaf.

DimensionNumbers = MuonDimensionNumbers
# Flax kernels are (..., in, out): reduce over -2, output -1, leading axes are
# a batch (e.g. the layer axis of scanned blocks).
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


# --------------------------------------------------------------------------
# scale_by_muon


class ScaleByMuonState(NamedTuple):
  """Momentum buffer of `scale_by_muon` (same tree as the params)."""

  momentum: optax.Updates


def _resolve_dimension_numbers(dimension_numbers, params):
  """A per-leaf tree of MuonDimensionNumbers (None: the Flax default)."""
  if dimension_numbers is None:
    dimension_numbers = FLAX_DIMENSION_NUMBERS
  if callable(dimension_numbers) and not isinstance(dimension_numbers, MuonDimensionNumbers):
    dimension_numbers = dimension_numbers(params)
  if isinstance(dimension_numbers, MuonDimensionNumbers):
    return jax.tree.map(lambda _: dimension_numbers, params)
  return dimension_numbers


def _check_matrix_leaf(path, leaf):
  name = jax.tree_util.keystr(path)
  if not jnp.issubdtype(leaf.dtype, jnp.floating):
    raise ValueError(f"Muon needs floating-point parameters; {name} has dtype {leaf.dtype}.")
  if leaf.ndim < 2:
    raise ValueError(
      f"Muon needs parameters of rank >= 2; {name} has shape {leaf.shape}. Send "
      "scalars and vectors to AdamW (see `muon_labels`)."
    )


def scale_by_muon(
  beta: float = 0.95,
  nesterov: bool = True,
  momentum_dtype: Any = None,
  schedule: Schedule = "classic",
  ns_steps: int = 5,
  compute_dtype: Any = None,
  scale: str = "spectral",
  dimension_numbers: Any = None,
  eps: float = 1e-7,
) -> optax.GradientTransformation:
  """Muon's direction: momentum, Newton-Schulz, shape scale.

    m <- beta m + (1 - beta) g
    u = beta m + (1 - beta) g   (Nesterov)   or   u = m
    update = shape_scale(fan_in, fan_out) * orthogonalize(u)

  Every leaf must have rank >= 2 (use `muon` to route the rest to AdamW).
  Leaves are viewed as (batch, fan_in, fan_out) matrices through
  `dimension_numbers` (an optax `MuonDimensionNumbers`, a tree of them, or a
  function of the params returning one; default: Flax (..., in, out) kernels
  with leading axes as a batch) and each leaf's matrices are orthogonalized in
  one `orthogonalize` computation.  Leaves are not concatenated into one batch
  per shape: that costs two copies of every matrix and gains nothing on CPU,
  where a batch is a loop anyway.

  Args:
    beta: momentum decay.
    nesterov: use the Nesterov look-ahead.
    momentum_dtype: dtype of the momentum buffer (None: the params').
    schedule, ns_steps, compute_dtype, eps: see `orthogonalize`.
    scale: "spectral" (paper), "moonlight" or "none"; see `shape_scale`.
    dimension_numbers: which axes are fan-in / fan-out, see above.
  """
  coefficients = newton_schulz_coefficients(schedule, ns_steps)
  shape_scale(1, 1, scale)  # validates the rule now rather than at the first step
  compute_dtype = None if compute_dtype is None else jnp.dtype(compute_dtype)

  def init_fn(params):
    jax.tree_util.tree_map_with_path(_check_matrix_leaf, params)
    _resolve_dimension_numbers(dimension_numbers, params)
    momentum = jax.tree.map(lambda p: jnp.zeros_like(p, dtype=momentum_dtype or p.dtype), params)
    return ScaleByMuonState(momentum=momentum)

  def update_fn(updates, state, params=None):
    momentum = optax.tree.update_moment(updates, state.momentum, beta, 1)
    direction = optax.tree.update_moment(updates, momentum, beta, 1) if nesterov else momentum
    momentum = optax.tree.cast(momentum, momentum_dtype) if momentum_dtype else momentum
    dims_tree = _resolve_dimension_numbers(
      dimension_numbers, params if params is not None else updates
    )
    leaves, treedef = jax.tree.flatten(direction)
    dims = treedef.flatten_up_to(dims_tree)

    def orthogonalized(leaf, dn):
      matrices, inverse = _as_matrices(leaf, dn)
      ortho = _newton_schulz(matrices, coefficients, compute_dtype, float(eps))
      return inverse(ortho * shape_scale(*matrices.shape[1:], scale)).astype(leaf.dtype)

    out = [orthogonalized(leaf, dn) for leaf, dn in zip(leaves, dims)]
    return jax.tree.unflatten(treedef, out), ScaleByMuonState(momentum=momentum)

  return optax.GradientTransformation(init_fn, update_fn)


# --------------------------------------------------------------------------
# The full optimizer.

# Path components that mark a >=2-D parameter as an embedding or output head.
ADAM_NAMES = ("embed", "embedding", "wte", "tok_embeddings", "head", "lm_head", "output")


def muon_labels(params, adam_names: Sequence[str] = ADAM_NAMES):
  """Labels "muon" for hidden matrices (rank >= 2), "adam" for the rest.

  A leaf goes to AdamW when its rank is < 2 (norm gains, biases, scalars) or
  any key of its path is in `adam_names` (embedding, untied output head).
  """
  names = set(adam_names)

  def label(path, leaf):
    keys = {str(getattr(k, "key", getattr(k, "name", k))) for k in path}
    return "adam" if jnp.ndim(leaf) < 2 or keys & names else "muon"

  return jax.tree_util.tree_map_with_path(label, params)


def _check_float_params(params):
  for path, leaf in jax.tree_util.tree_leaves_with_path(params):
    if not jnp.issubdtype(jnp.asarray(leaf).dtype, jnp.floating):
      raise ValueError(
        f"muon needs floating-point parameters; {jax.tree_util.keystr(path)} "
        f"has dtype {jnp.asarray(leaf).dtype}."
      )


def muon(
  learning_rate: optax.ScalarOrSchedule,
  beta: float = 0.95,
  nesterov: bool = True,
  weight_decay: float = 0.0,
  weight_decay_mask: Any = lambda params: jax.tree.map(lambda p: jnp.ndim(p) >= 2, params),
  adam_b1: float = 0.9,
  adam_b2: float = 0.99,
  adam_eps: float = 1e-8,
  adam_learning_rate: optax.ScalarOrSchedule | None = None,
  labels: Callable[[Any], Any] = muon_labels,
  momentum_dtype: Any = None,
  schedule: Schedule = "classic",
  ns_steps: int = 5,
  compute_dtype: Any = None,
  scale: str = "spectral",
  dimension_numbers: Any = None,
  eps: float = 1e-7,
) -> optax.GradientTransformation:
  """Muon on hidden matrices, AdamW on everything else (arXiv 2505.23725).

  For a leaf labelled "muon":  p <- p (1 - lr wd) - lr * scale_by_muon(g);
  for a leaf labelled "adam":  p <- p (1 - lr_adam wd) - lr_adam * adam(g)
  with Adam betas (0.9, 0.99) and eps 1e-8 as in the paper.  Weight decay is
  decoupled and applies where `weight_decay_mask` is True (default: rank >= 2).
  `learning_rate` (and `adam_learning_rate`, default the same) may be an optax
  schedule.  `labels` maps the params to a tree of "muon"/"adam" (default
  `muon_labels`).  The remaining arguments go to `scale_by_muon`.
  """
  adam_learning_rate = learning_rate if adam_learning_rate is None else adam_learning_rate
  muon_part = optax.chain(
    scale_by_muon(
      beta=beta,
      nesterov=nesterov,
      momentum_dtype=momentum_dtype,
      schedule=schedule,
      ns_steps=ns_steps,
      compute_dtype=compute_dtype,
      scale=scale,
      dimension_numbers=dimension_numbers,
      eps=eps,
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
