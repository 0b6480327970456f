"""Tests for Muon (muloco_jax.optim): Newton-Schulz, scale_by_muon and the full optimizer."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
from optax.contrib import _muon as optax_muon
import pytest

import muloco_jax
from muloco_jax import optim as muon_lib


def _matrix_with_singular_values(rng, m, n, s):
  u, _ = np.linalg.qr(rng.normal(size=(m, m)))
  v, _ = np.linalg.qr(rng.normal(size=(n, n)))
  k = min(m, n)
  return (u[:, :k] * s) @ v[:, :k].T


def _scalar_iteration(s, coefficients, eps=1e-7):
  """What Newton-Schulz does to each singular value: the odd quintic, composed."""
  s = np.asarray(s, np.float64) / (np.linalg.norm(s) + eps)
  for a, b, c in coefficients:
    s = a * s + b * s**3 + c * s**5
  return s


@pytest.mark.parametrize("schedule,band", [("classic", (0.5, 1.5)), ("muloco", (0.85, 1.15))])
@pytest.mark.parametrize("shape", [(64, 64), (48, 160), (160, 48)])
def test_singular_values_in_band_random(schedule, band, shape):
  x = jax.random.normal(jax.random.key(0), shape)
  s = np.linalg.svd(np.asarray(muloco_jax.orthogonalize(x, schedule)), compute_uv=False)
  assert band[0] <= s.min() and s.max() <= band[1], (s.min(), s.max())


@pytest.mark.parametrize("schedule", ["classic", "muloco", "polar_express"])
def test_singular_values_follow_the_polynomial_ill_conditioned(schedule):
  rng = np.random.default_rng(1)
  s_in = np.logspace(0, -4, 40)  # condition number 1e4
  g = _matrix_with_singular_values(rng, 40, 90, s_in)
  out = np.asarray(muloco_jax.orthogonalize(jnp.asarray(g, jnp.float32), schedule))
  s_out = np.linalg.svd(out, compute_uv=False)
  expected = _scalar_iteration(s_in, muon_lib.newton_schulz_coefficients(schedule))
  np.testing.assert_allclose(s_out, np.sort(expected)[::-1], atol=2e-3)
  # Singular vectors are kept: out = U p(S) V^T, so u_k^T out v_k = p(s_k).
  u, _, vt = np.linalg.svd(g)
  np.testing.assert_allclose(np.sum(u[:, :40] * (out @ vt[:40].T), 0), expected, atol=2e-3)
  # Directions whose normalised singular value is not tiny land in the band.
  band = (0.5, 1.5) if schedule == "classic" else (0.7, 1.2)
  big = s_out[s_in / np.linalg.norm(s_in) > 0.05]
  assert band[0] <= big.min() and big.max() <= band[1]


def test_tall_is_transpose_of_wide_and_stacked_equals_loop():
  x = jax.random.normal(jax.random.key(2), (3, 2, 24, 56))
  batched = muloco_jax.orthogonalize(x, "muloco")
  for i in range(3):
    for j in range(2):
      np.testing.assert_allclose(
        batched[i, j], muloco_jax.orthogonalize(x[i, j], "muloco"), atol=1e-5
      )
  tall = muloco_jax.orthogonalize(jnp.swapaxes(x, -1, -2), "muloco")
  np.testing.assert_allclose(jnp.swapaxes(tall, -1, -2), batched, atol=1e-6)


def test_matches_optax_newton_schulz():
  x = jax.random.normal(jax.random.key(3), (40, 72))
  coeffs = jnp.asarray(muon_lib.MULOCO_COEFFICIENTS)
  theirs = optax_muon.orthogonalize_via_newton_schulz(x, coeffs, eps=1e-7)
  np.testing.assert_allclose(muloco_jax.orthogonalize(x, "muloco"), theirs, atol=1e-5)


def test_bfloat16_compute_and_input():
  x = jax.random.normal(jax.random.key(4), (64, 128))
  ref = muloco_jax.orthogonalize(x, "muloco")
  out = muloco_jax.orthogonalize(x, "muloco", compute_dtype=jnp.bfloat16)
  assert out.dtype == jnp.float32
  assert float(jnp.linalg.norm(out - ref) / jnp.linalg.norm(ref)) < 0.05
  out_bf16 = muloco_jax.orthogonalize(x.astype(jnp.bfloat16), "classic")
  assert out_bf16.dtype == jnp.bfloat16
  s = np.linalg.svd(np.asarray(out_bf16, np.float32), compute_uv=False)
  assert 0.5 <= s.min() and s.max() <= 1.5


def test_explicit_schedule_and_errors():
  x = jax.random.normal(jax.random.key(5), (8, 12))
  explicit = muloco_jax.orthogonalize(x, [muon_lib.CLASSIC_COEFFICIENTS] * 3)
  np.testing.assert_allclose(explicit, muloco_jax.orthogonalize(x, "classic", steps=3), atol=1e-6)
  with pytest.raises(ValueError, match="schedule"):
    muloco_jax.orthogonalize(x, "quartic")
  with pytest.raises(ValueError, match="triples"):
    muloco_jax.orthogonalize(x, [(1.0, 2.0)])
  with pytest.raises(ValueError, match="muloco"):
    muloco_jax.orthogonalize(x, "muloco", steps=3)
  with pytest.raises(ValueError, match="rank"):
    muloco_jax.orthogonalize(jnp.ones(5))
  with pytest.raises(ValueError, match="scale rule"):
    muloco_jax.scale_by_muon(scale="rms")


def _params():
  k = jax.random.split(jax.random.key(6), 5)
  return {
    "embedding": jax.random.normal(k[0], (12, 6)),
    "layers": {"mlp": {"kernel": jax.random.normal(k[1], (2, 6, 10))}, "norm": jnp.ones(6)},
    "proj": {"kernel": jax.random.normal(k[2], (10, 6))},
    "head": {"kernel": jax.random.normal(k[3], (6, 12))},
  }


def test_default_labels():
  labels = muloco_jax.muon_labels(_params())
  assert labels == {
    "embedding": "adam",
    "layers": {"mlp": {"kernel": "muon"}, "norm": "adam"},
    "proj": {"kernel": "muon"},
    "head": {"kernel": "adam"},
  }


def test_custom_labels_route_leaves():
  params = _params()
  all_adam = lambda p: jax.tree.map(lambda _: "adam", p)
  grads = jax.tree.map(lambda p: jnp.full_like(p, 0.3), params)
  ours = muloco_jax.muon(0.1, labels=all_adam)
  adam = optax.chain(optax.scale_by_adam(b2=0.99), optax.scale_by_learning_rate(0.1))
  u1, _ = ours.update(grads, ours.init(params), params)
  u2, _ = adam.update(grads, adam.init(params), params)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6), u1, u2)


def _numpy_muon_reference(params, grads_seq, lr, wd, beta, b1, b2, eps):
  """Float64 NumPy re-derivation of two `muon` steps (nesterov, classic NS)."""
  labels = muloco_jax.muon_labels(params)
  flat_p, treedef = jax.tree.flatten(params)
  flat_l = treedef.flatten_up_to(labels)
  p = [np.asarray(x, np.float64) for x in flat_p]
  mom = [np.zeros_like(x) for x in p]
  v = [np.zeros_like(x) for x in p]
  coeffs = muon_lib.newton_schulz_coefficients("classic")
  for t, grads in enumerate(grads_seq, start=1):
    g_flat = [np.asarray(x, np.float64) for x in jax.tree.leaves(grads)]
    for i, (g, label) in enumerate(zip(g_flat, flat_l)):
      if label == "muon":
        mom[i] = beta * mom[i] + (1 - beta) * g
        d = beta * mom[i] + (1 - beta) * g
        out = np.empty_like(d)
        for idx in np.ndindex(d.shape[:-2]):
          x = d[idx]
          tall = x.shape[0] > x.shape[1]
          x = x.T if tall else x
          x = x / (np.linalg.norm(x) + 1e-7)
          for a, b, c in coeffs:
            gram = x @ x.T
            x = a * x + (b * gram + c * gram @ gram) @ x
          out[idx] = x.T if tall else x
        fan_in, fan_out = d.shape[-2], d.shape[-1]
        update = np.sqrt(fan_out / fan_in) * out
      else:
        mom[i] = b1 * mom[i] + (1 - b1) * g
        v[i] = b2 * v[i] + (1 - b2) * g * g
        update = (mom[i] / (1 - b1**t)) / (np.sqrt(v[i] / (1 - b2**t)) + eps)
      if p[i].ndim >= 2:
        update = update + wd * p[i]
      p[i] = p[i] - lr * update
  return jax.tree.unflatten(treedef, p)


def test_two_steps_equal_numpy_float64_reference():
  params = _params()
  grads_seq = [
    jax.tree.map(lambda x, s=s: jax.random.normal(jax.random.key(s), x.shape), params)
    for s in (10, 11)
  ]
  lr, wd = 0.05, 0.1
  tx = muloco_jax.muon(lr, beta=0.9, weight_decay=wd)
  state = tx.init(params)
  p = params
  for grads in grads_seq:
    updates, state = jax.jit(tx.update)(grads, state, p)
    p = optax.apply_updates(p, updates)
  expected = _numpy_muon_reference(params, grads_seq, lr, wd, 0.9, 0.9, 0.99, 1e-8)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5), p, expected)


def test_chain_after_clipping_and_schedule():
  params = _params()
  grads = jax.tree.map(lambda p: 10.0 * jnp.ones_like(p), params)
  schedule = optax.linear_schedule(0.1, 0.0, 10)
  chained = optax.chain(optax.clip_by_global_norm(1.0), muloco_jax.muon(schedule))
  plain = muloco_jax.muon(schedule)
  clipped, _ = optax.clip_by_global_norm(1.0).update(grads, optax.EmptyState())
  state_c, state_p = chained.init(params), plain.init(params)
  for _ in range(3):
    u_c, state_c = jax.jit(chained.update)(grads, state_c, params)
    u_p, state_p = jax.jit(plain.update)(clipped, state_p, params)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-7), u_c, u_p)
  # The schedule advanced: the third step used lr = 0.08.
  assert float(optax.tree.norm(u_c)) > 0


def test_vmap_over_independent_problems():
  params = _params()
  stacked = jax.tree.map(lambda p: jnp.stack([p, 2 * p, -p]), params)
  grads = jax.tree.map(
    lambda p: jnp.sin(jnp.arange(p.size, dtype=p.dtype).reshape(p.shape)), stacked
  )
  tx = muloco_jax.muon(0.1, weight_decay=0.01)
  states = jax.vmap(tx.init)(stacked)
  updates, _ = jax.jit(jax.vmap(tx.update))(grads, states, stacked)
  for i in range(3):
    p_i = jax.tree.map(lambda x: x[i], stacked)
    g_i = jax.tree.map(lambda x: x[i], grads)
    u_i, _ = tx.update(g_i, tx.init(p_i), p_i)
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a[i], b, atol=1e-5), updates, u_i)


def test_dimension_numbers_and_scale_rules():
  x = {"w": jax.random.normal(jax.random.key(7), (4, 6, 5))}  # (out_a, in, out_b)
  dn = muloco_jax.MuonDimensionNumbers(reduction_axis=1, output_axis=(0, 2))
  tx = muloco_jax.scale_by_muon(
    beta=0.0, nesterov=False, weight_dimension_numbers=dn, scale="moonlight"
  )
  u, _ = tx.update(x, tx.init(x), x)
  matrix = jnp.transpose(x["w"], (1, 0, 2)).reshape(6, 20)
  expected = 0.2 * np.sqrt(20) * muloco_jax.orthogonalize(matrix)
  np.testing.assert_allclose(jnp.transpose(u["w"], (1, 0, 2)).reshape(6, 20), expected, atol=1e-5)
  assert muloco_jax.fan_in_fan_out(x["w"], dn) == (6, 20)
  # Momentum in bfloat16 is kept in bfloat16.
  tx16 = muloco_jax.scale_by_muon(mu_dtype=jnp.bfloat16, weight_dimension_numbers=dn)
  _, state = tx16.update(x, tx16.init(x), x)
  assert state.momentum["w"].dtype == jnp.bfloat16


def test_bad_inputs_raise():
  with pytest.raises(ValueError, match="floating-point"):
    muloco_jax.muon(0.1).init({"w": jnp.ones((3, 3), jnp.int32)})
  with pytest.raises(ValueError, match="rank >= 2"):
    force_muon = lambda p: jax.tree.map(lambda _: "muon", p)
    muloco_jax.muon(0.1, labels=force_muon).init({"w": jnp.ones((3, 3)), "scale": jnp.ones(())})
  with pytest.raises(ValueError, match="schedule"):
    muloco_jax.muon(0.1, ns_coeffs=[(1.0, 2.0, "x")])
  with pytest.raises(ValueError, match="scale rule"):
    muloco_jax.muon(0.1, scale="adam")


def _mlp_problem():
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(1024, 32)), jnp.float32)
  teacher = [rng.normal(size=(32, 64)) / np.sqrt(32), rng.normal(size=(64, 16)) / 8]
  labels = jnp.argmax(jnp.tanh(x @ teacher[0]) @ teacher[1], -1)
  r = np.random.default_rng(1)
  init = {
    "w1": jnp.asarray(r.normal(size=(32, 128)) / np.sqrt(32), jnp.float32),
    "w2": jnp.asarray(r.normal(size=(128, 128)) / np.sqrt(128), jnp.float32),
    "w3": jnp.asarray(r.normal(size=(128, 16)) / np.sqrt(128), jnp.float32),
  }

  def loss(p):
    logits = jnp.tanh(jnp.tanh(x @ p["w1"]) @ p["w2"]) @ p["w3"]
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, labels))

  return init, loss


def test_muon_beats_tuned_sgd_and_adamw_on_an_mlp():
  init, loss = _mlp_problem()

  def final_losses(make_tx, lrs, steps=60):
    """Final loss for each learning rate: one compiled run vmapped over lrs."""

    def run(lr):
      tx = make_tx(lr)

      def body(carry, _):
        p, s = carry
        u, s = tx.update(jax.grad(loss)(p), s, p)
        return (optax.apply_updates(p, u), s), None

      (p, _), _ = jax.lax.scan(body, (init, tx.init(init)), None, length=steps)
      return loss(p)

    values = np.asarray(jax.jit(jax.vmap(run))(jnp.asarray(lrs, jnp.float32)))
    return np.where(np.isfinite(values), values, np.inf)

  lrs = np.logspace(-2, 1, 7)
  best = {
    "sgd": final_losses(lambda lr: optax.sgd(lr, momentum=0.9), lrs).min(),
    "adamw": final_losses(lambda lr: optax.adamw(lr, b2=0.99), lrs).min(),
    "muon": final_losses(muloco_jax.muon, lrs).min(),
  }
  assert best["muon"] < 0.5 * min(best["sgd"], best["adamw"]), best


def test_muon_options_are_keyword_only():
  with pytest.raises(TypeError):
    muloco_jax.muon(0.1, 0.9)
  with pytest.raises(TypeError):
    muloco_jax.scale_by_muon(0.9)
  # optax's names; one (a, b, c) triple is repeated ns_steps times, as in optax.
  x = {"w": jax.random.normal(jax.random.key(8), (6, 10))}
  triple = muloco_jax.scale_by_muon(ns_coeffs=muon_lib.CLASSIC_COEFFICIENTS, ns_steps=3)
  named = muloco_jax.scale_by_muon(ns_coeffs="classic", ns_steps=3)
  np.testing.assert_allclose(
    triple.update(x, triple.init(x), x)[0]["w"], named.update(x, named.init(x), x)[0]["w"]
  )


def test_rank3_leaf_needs_dimension_numbers():
  """A leaf of per-layer rank > 2 has no default matrix view: ValueError naming it."""
  params = {
    "attn": {"qkv": {"kernel": jax.random.normal(jax.random.key(9), (8, 2, 4))}},
    "norm": jnp.ones(8),
  }
  with pytest.raises(ValueError, match=re.escape("['attn']['qkv']['kernel']")):
    muloco_jax.muon(0.1).init(params)
  with pytest.raises(ValueError, match=re.escape("['w']")):
    muloco_jax.scale_by_muon().init({"w": jnp.ones((3, 4, 5))})
  # Explicit dimension numbers: one for every leaf, or a tree over the full params (None:
  # not given) as optax's `muon_weight_dimension_numbers`.
  dn = muloco_jax.MuonDimensionNumbers(reduction_axis=0, output_axis=(1, 2))
  kernel = params["attn"]["qkv"]["kernel"]
  expected = np.sqrt(8 / 8) * muloco_jax.orthogonalize(kernel.reshape(8, 8))
  for dims in (dn, {"attn": {"qkv": {"kernel": dn}}, "norm": None}):
    tx = muloco_jax.muon(1.0, beta=0.0, nesterov=False, muon_weight_dimension_numbers=dims)
    updates, _ = tx.update(params, tx.init(params), params)
    np.testing.assert_allclose(
      updates["attn"]["qkv"]["kernel"], -expected.reshape(8, 2, 4), atol=1e-5
    )
  # A stacked (scanned) kernel is a batch of per-layer matrices by default.
  stacked = {"layers": {"kernel": jax.random.normal(jax.random.key(10), (3, 6, 10))}}
  tx = muloco_jax.scale_by_muon(beta=0.0, nesterov=False)
  u, _ = tx.update(stacked, tx.init(stacked), stacked)
  for i in range(3):
    per_layer = np.sqrt(10 / 6) * muloco_jax.orthogonalize(stacked["layers"]["kernel"][i])
    np.testing.assert_allclose(u["layers"]["kernel"][i], per_layer, atol=1e-5)
  # A stacked norm gain (L, d) is a vector per layer: not a matrix for Muon.
  with pytest.raises(ValueError, match="rank >= 2 per layer"):
    tx.init({"layers": {"scale": jnp.ones((3, 6))}})


def _newton_schulz_calls(fn, *args):
  """The `_newton_schulz` calls in fn's jaxpr, as the shapes they orthogonalize."""
  jaxpr = jax.make_jaxpr(fn)(*args).jaxpr
  return sorted(
    eqn.invars[0].aval.shape
    for eqn in jaxpr.eqns
    if eqn.primitive.name in ("pjit", "jit") and eqn.params["name"] == "_newton_schulz"
  )


def test_muon_step_orthogonalizes_each_shape_in_one_call():
  # q, k, v (16 x 16), a stacked (16 x 48) up and an unstacked (48 x 16) down: two shapes once
  # the tall down joins up as its transpose, so two calls on stacks of 3 and 2 + 1 matrices.
  keys = jax.random.split(jax.random.key(11), 5)
  grads = {
    "attn": {n: jax.random.normal(k, (16, 16)) for n, k in zip("qkv", keys)},
    "mlp": {
      "up": jax.random.normal(keys[3], (2, 16, 48)),
      "down": jax.random.normal(keys[4], (48, 16)),
    },
  }
  stacked = lambda path, leaf: 1 if leaf.ndim == 3 else 0
  tx = muon_lib.scale_by_muon(ns_coeffs="muloco", stacked_axes=stacked)
  step = lambda g: tx.update(g, tx.init(g))[0]
  assert _newton_schulz_calls(step, grads) == [(3, 16, 16), (3, 16, 48)]
  out = jax.jit(step)(grads)
  for path, leaf in jax.tree_util.tree_leaves_with_path(grads):
    fan_in, fan_out = leaf.shape[-2:]
    expected = muon_lib.shape_scale(fan_in, fan_out, "spectral") * muloco_jax.orthogonalize(
      leaf, "muloco"
    )
    got = out
    for key in path:
      got = got[key.key]
    np.testing.assert_allclose(got, expected, atol=1e-6, err_msg=jax.tree_util.keystr(path))
