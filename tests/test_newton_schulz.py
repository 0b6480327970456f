"""Newton-Schulz variants: the Polar Express schedule, Gram Newton-Schulz, bf16 matmul operands."""

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muloco_jax
from muloco_jax import config as config_lib
from muloco_jax import optim
from muloco_jax.tools.benchmarks.sharded_muon import dot_flops

SCHEDULES = ("classic", "muloco", "polar_express")
METHODS = ("newton_schulz", "gram")
# The documented band of each schedule for normalised singular values in [0.01, 1].
BANDS = {"classic": (0.68, 1.135), "muloco": (0.977, 1.033), "polar_express": (0.87, 1.125)}


def _spectral(rng, shape, s):
  """Matrices of `shape` (leading axes: a batch) with singular values `s` and random
  singular vectors; also their exact polar factors U V^T."""
  *batch, m, n = shape
  k = min(m, n)
  u = np.linalg.qr(rng.normal(size=(*batch, m, k)))[0]
  v = np.linalg.qr(rng.normal(size=(*batch, n, k)))[0]
  vt = np.swapaxes(v, -1, -2)
  return (u * s) @ vt, u @ vt


def _spread(k, low):
  """k singular values, geometric from 1 down, the smallest `low` times their 2-norm (what
  it is after the Frobenius normalisation): a fixed point, reached in a few iterations."""
  r = low
  for _ in range(50):
    r = low * np.linalg.norm(np.geomspace(1.0, r, k))
  return np.geomspace(1.0, r, k)


def _composed(s, coefficients):
  """What each schedule does to a singular value: its quintics composed, on s / ||s||."""
  s = np.asarray(s, np.float64) / np.linalg.norm(s)
  for a, b, c in coefficients:
    s = a * s + b * s**3 + c * s**5
  return s


def _singular_values(x):
  return np.linalg.svd(np.asarray(x, np.float64), compute_uv=False)


def _relative(a, b):
  a, b = np.asarray(a, np.float64), np.asarray(b, np.float64)
  return np.linalg.norm(a - b) / np.linalg.norm(b)


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(40, 112), (112, 40), (48, 48), (3, 32, 80), (2, 2, 24, 64)])
def test_singular_values_reach_the_band(method, schedule, shape):
  """Normalised singular values spread over [0.01, 1] come out as the composed quintics of
  the schedule, inside its band, whichever the method and orientation, batched or not."""
  s = _spread(min(shape[-2:]), 0.011)
  g, _ = _spectral(np.random.default_rng(0), shape, s)
  out = muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), schedule, method=method)
  s_out = _singular_values(out)
  expected = np.sort(_composed(s, optim.newton_schulz_coefficients(schedule)))[::-1]
  np.testing.assert_allclose(s_out, np.broadcast_to(expected, s_out.shape), atol=2e-3)
  low, high = BANDS[schedule]
  assert low <= s_out.min() and s_out.max() <= high, (s_out.min(), s_out.max())


def test_polar_express_reaches_its_band_from_1e_3():
  """Polar Express is built for singular values down to 1e-3 of the largest (l = 1e-3)."""
  g, _ = _spectral(np.random.default_rng(1), (64, 160), _spread(64, 1.1e-3))
  s_out = _singular_values(muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), "polar_express"))
  assert 0.84 <= s_out.min() and s_out.max() <= 1.125
  classic = _singular_values(muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), "classic"))
  assert classic.min() < 0.6


def test_polar_express_is_the_papers_algorithm():
  """Algorithm 1 of arXiv 2505.16932 in float64 NumPy: X / (1.01 ||X||_F + 1e-7), then the
  first `steps` polynomials with the safety factor (the last one repeated beyond 8)."""
  raw = optim.POLAR_EXPRESS_COEFFICIENTS
  listed = [(a / 1.01, b / 1.01**3, c / 1.01**5) for a, b, c in raw[:-1]] + [raw[-1]]
  g = np.random.default_rng(2).normal(size=(24, 56))
  for steps in (3, 5, 10):
    x = g / (np.linalg.norm(g) * 1.01 + 1e-7)
    for a, b, c in (listed + [listed[-1]] * steps)[:steps]:
      a_ = x @ x.T
      x = a * x + (b * a_ + c * a_ @ a_) @ x
    ours = muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), "polar_express", steps)
    np.testing.assert_allclose(ours, x, atol=2e-5)


def test_polar_express_is_closest_to_the_polar_factor_on_a_decaying_spectrum():
  """s_k = k^-1.5, as gradients' spectra decay (normalised: down to 1e-3): five steps of
  Polar Express land nearer U V^T (relative Frobenius distance) than five of "classic" or
  "muloco", which leave the tail below 0.01 behind."""
  g, polar = _spectral(np.random.default_rng(3), (96, 224), np.arange(1, 97) ** -1.5)
  errors = {
    schedule: _relative(muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), schedule), polar)
    for schedule in SCHEDULES
  }
  assert errors["polar_express"] < min(errors["classic"], errors["muloco"]), errors


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(32, 96), (96, 32), (4, 40, 72)])
def test_gram_equals_newton_schulz(schedule, shape):
  """Well-conditioned inputs: the same polynomial to float32 round-off, on fewer flops; the
  compiled program runs exactly the matmul flops `newton_schulz_flops` counts."""
  g = jax.random.normal(jax.random.key(4), shape)
  ns = muloco_jax.orthogonalize(g, schedule)
  gram = muloco_jax.orthogonalize(g, schedule, method="gram")
  np.testing.assert_allclose(gram, ns, atol=2e-5)
  flops = {}
  for method in METHODS:
    fn = jax.jit(lambda x, method=method: muloco_jax.orthogonalize(x, schedule, method=method))
    flops[method] = dot_flops(fn.lower(g).compile().as_text())
    assert flops[method] == optim.newton_schulz_flops(shape, 5, schedule=schedule, method=method), (
      method
    )
  assert flops["gram"] < flops["newton_schulz"]


def test_gram_is_newton_schulz_on_squares():
  """Where Gram would take more flops (n <= 1.5 m, e.g. squares) "gram" runs Newton-Schulz."""
  g = jax.random.normal(jax.random.key(5), (2, 40, 40))
  np.testing.assert_array_equal(
    muloco_jax.orthogonalize(g, "muloco", method="gram"), muloco_jax.orthogonalize(g, "muloco")
  )
  for shape in ((40, 40), (40, 60), (60, 40)):
    assert optim.newton_schulz_flops(shape, 5, method="gram") == optim.newton_schulz_flops(shape, 5)
  assert optim.newton_schulz_flops((40, 61), 5, method="gram") < optim.newton_schulz_flops(
    (40, 61), 5
  )


def test_gram_restarts_keep_long_schedules_stable():
  """Ten classic steps on a rank-deficient matrix: without restarts the Gram matrix's
  round-off grows by 3.4445^20 and the iteration diverges; with them it stays on
  Newton-Schulz."""
  s = np.r_[np.ones(32), np.zeros(32)]
  g, _ = _spectral(np.random.default_rng(6), (64, 176), s)
  g = jnp.asarray(g, jnp.float32)
  ns = muloco_jax.orthogonalize(g, "classic", steps=10)
  gram = muloco_jax.orthogonalize(g, "classic", steps=10, method="gram")
  assert _relative(gram, ns) < 1e-2


@pytest.mark.parametrize("method", METHODS)
def test_bfloat16_operands_keep_the_float32_polynomial(method):
  """bf16 matmul operands with float32 coefficients and elementwise work: the singular values
  stay in "muloco"'s band [0.978, 1.032] up to bf16 noise (bf16-rounded coefficients give
  another polynomial, whose band reaches 1.05), and the result is within 1.5% of float32's."""
  g, _ = _spectral(np.random.default_rng(7), (96, 288), _spread(96, 0.012))
  g = jnp.asarray(g, jnp.float32)
  out = muloco_jax.orthogonalize(g, "muloco", compute_dtype=jnp.bfloat16, method=method)
  assert out.dtype == jnp.float32
  s_out = _singular_values(out)
  assert 0.965 <= s_out.min() and s_out.max() <= 1.042, (s_out.min(), s_out.max())
  assert _relative(out, muloco_jax.orthogonalize(g, "muloco")) < 0.015
  # A bf16 input: the same, rounded to bf16 at the end.
  g16 = g.astype(jnp.bfloat16)
  out16 = muloco_jax.orthogonalize(g16, "muloco", method=method)
  assert out16.dtype == jnp.bfloat16
  expected = muloco_jax.orthogonalize(
    g16.astype(jnp.float32), "muloco", compute_dtype=jnp.bfloat16, method=method
  )
  assert _relative(out16, expected) < 0.005


def _scan_carries(jaxpr):
  """The dtypes carried by every scan in a jaxpr and the jaxprs inside it."""
  out = []
  for eqn in jaxpr.eqns:
    if eqn.primitive.name == "scan":
      out += [v.aval.dtype for v in eqn.outvars[: eqn.params["num_carry"]]]
    for param in eqn.params.values():
      inner = getattr(param, "jaxpr", param)
      if hasattr(inner, "eqns"):
        out += _scan_carries(inner)
  return out


def test_bfloat16_iterations_keep_x_in_bfloat16_and_the_float32_polynomials_accuracy():
  """With bf16 operands X stays bf16 between iterations (the loop carries bf16, not float32:
  half the bytes per iteration), and the result is within 1.25x of float32's distance to the
  exact polar factor (0.0214 against 0.0179; a float32 X gave 0.0211), closer than optax's bf16
  iteration (0.0327: its coefficients rounded to bf16)."""
  g, polar = _spectral(np.random.default_rng(3), (128, 352), _spread(128, 0.01))
  g16 = jnp.asarray(g, jnp.bfloat16)
  jaxpr = jax.make_jaxpr(lambda x: optim.orthogonalize(x, "muloco"))(g16)
  assert _scan_carries(jaxpr.jaxpr) == [jnp.bfloat16]
  coefficients = jnp.asarray(optim.newton_schulz_coefficients("muloco"))
  error = {
    "float32": _relative(optim.orthogonalize(jnp.asarray(g, jnp.float32), "muloco"), polar),
    "bfloat16": _relative(optim.orthogonalize(g16, "muloco").astype(jnp.float32), polar),
    "optax": _relative(
      optax.contrib._muon.orthogonalize_via_newton_schulz(g16, coefficients, eps=1e-7).astype(
        jnp.float32
      ),
      polar,
    ),
  }
  assert error["bfloat16"] <= 1.25 * error["float32"], error
  assert error["bfloat16"] < error["optax"], error


def _low_rank_plus_noise(rng, m, n, rank=8, noise=0.05):
  """Gradient-like: a few strong directions over a noise floor."""
  a = rng.normal(size=(m, rank)) @ rng.normal(size=(rank, n)) / np.sqrt(rank)
  return jnp.asarray(a + noise * rng.normal(size=(m, n)), jnp.float32)


@pytest.mark.parametrize("schedule", SCHEDULES)
@pytest.mark.parametrize("shape", [(64, 448), (448, 64), (48, 384)])
def test_gram_in_bfloat16_is_as_accurate_as_newton_schulz(schedule, shape):
  """bf16 operands on gradient-like matrices: Gram Newton-Schulz within 1.5x of plain
  Newton-Schulz's distance to the float32 result (its products with X_0 split both factors,
  `optim._split_product`; one bf16 product was 2-14x further), and the compiled program runs
  the flops `newton_schulz_flops` counts for bf16 operands."""
  g = _low_rank_plus_noise(np.random.default_rng(sum(shape)), *shape)
  exact = muloco_jax.orthogonalize(g, schedule)
  bf16 = {
    method: jax.jit(
      lambda x, method=method: muloco_jax.orthogonalize(
        x, schedule, compute_dtype=jnp.bfloat16, method=method
      )
    )
    for method in METHODS
  }
  errors = {method: _relative(fn(g), exact) for method, fn in bf16.items()}
  assert errors["gram"] <= 1.5 * errors["newton_schulz"], errors
  for method, fn in bf16.items():
    assert dot_flops(fn.lower(g).compile().as_text()) == optim.newton_schulz_flops(
      shape, 5, schedule=schedule, method=method, compute_dtype=jnp.bfloat16
    )


def _mlp():
  k = jax.random.split(jax.random.key(8), 4)
  params = {
    "up": {"kernel": jax.random.normal(k[0], (16, 48)) / 4},
    "layers": {"kernel": jax.random.normal(k[1], (2, 48, 48)) / 7},  # stacked squares
    "down": {"kernel": jax.random.normal(k[2], (48, 8)) / 7},
  }
  x = jax.random.normal(k[3], (64, 16))
  y = jnp.sin(x[:, :8])

  def loss(p):
    h = jnp.tanh(x @ p["up"]["kernel"])
    for w in p["layers"]["kernel"]:
      h = jnp.tanh(h @ w)
    return jnp.mean(jnp.square(h @ p["down"]["kernel"] - y))

  return params, loss


def test_muon_with_gram_trains_as_newton_schulz():
  params, loss = _mlp()

  def train(method, steps=8):
    tx = muloco_jax.muon(0.05, ns_coeffs="polar_express", ns_method=method, weight_decay=0.01)

    def step(carry, _):
      p, s = carry
      u, s = tx.update(jax.grad(loss)(p), s, p)
      return (optax.apply_updates(p, u), s), loss(p)

    (p, _), losses = jax.lax.scan(step, (params, tx.init(params)), None, length=steps)
    return p, losses

  p_ns, losses_ns = jax.jit(train, static_argnums=0)("newton_schulz")
  p_gram, losses_gram = jax.jit(train, static_argnums=0)("gram")
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), p_gram, p_ns)
  np.testing.assert_allclose(losses_gram, losses_ns, rtol=1e-5)
  assert losses_ns[-1] < 0.5 * losses_ns[0]


def test_bad_method_is_refused_naming_the_setting():
  x = jnp.ones((4, 6))
  with pytest.raises(ValueError, match="method='svd'"):
    muloco_jax.orthogonalize(x, method="svd")
  with pytest.raises(TypeError):
    muloco_jax.orthogonalize(x, "classic", 5, None, 1e-7, "gram")  # keyword-only
  with pytest.raises(ValueError, match="ns_method='svd'"):
    muloco_jax.scale_by_muon(ns_method="svd")
  with pytest.raises(ValueError, match="ns_method='svd'"):
    muloco_jax.muon(0.1, ns_method="svd")
  with pytest.raises(ValueError, match="steps"):
    optim.newton_schulz_coefficients("polar_express", 0)


@pytest.mark.parametrize(
  "key, value, match",
  [
    ("ns_method", "svd", "optimizer.ns_method='svd'"),
    ("ns_schedule", "cubic", "optimizer.ns_schedule='cubic'"),
    ("ns_steps", 4, "optimizer.ns_schedule='muloco'"),
  ],
)
def test_config_validation_names_the_setting(key, value, match):
  config = config_lib.default_config()
  config.optimizer.name = "muon"
  config.optimizer[key] = value
  with pytest.raises(ValueError, match=match):
    config_lib.validate(config)
  config.optimizer.name = "adamw"  # the Newton-Schulz settings are Muon's alone
  config_lib.validate(config)


def test_config_ns_method_reaches_muon():
  from muloco_jax import train

  config = config_lib.default_config()
  config.optimizer.name = "muon"
  config.optimizer.ns_method = "gram"
  train.make_optimizer(config)
  config.optimizer.ns_method = "svd"  # unvalidated: muon itself refuses it
  with pytest.raises(ValueError, match="ns_method='svd'"):
    train.make_optimizer(config)
