"""Tests for muloco_jax.model: sizes, causality, scan equivalence, dtypes, errors, RoPE."""

import dataclasses
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muloco_jax.model import (
  PRESETS,
  ModelConfig,
  Transformer,
  apply_rope,
  init_params,
  model_config,
  model_flops_per_token,
  param_count,
)

PAPER_SIZES = {
  "150m": 150e6,
  "416m": 416e6,
  "914m": 914e6,
  "1.76b": 1.76e9,
  "3.1b": 3.1e9,
  "15b": 15e9,
}

# Small enough to compile quickly on a 2-core CPU. Parameters do not depend on ``dtype``, so one
# set of params serves the bf16 and fp32 variants.
TEST_CONFIG = ModelConfig(vocab_size=64, d_model=64, num_layers=2, head_dim=16, max_seq_len=16)
F32_CONFIG = dataclasses.replace(TEST_CONFIG, dtype=jnp.float32)


@functools.lru_cache(maxsize=None)
def _forward(config):
  """One jitted apply per config, shared by all tests (saves compilations)."""
  return jax.jit(lambda params, tokens: Transformer(config).apply({"params": params}, tokens))


@pytest.fixture(scope="module")
def params():
  return jax.jit(functools.partial(init_params, TEST_CONFIG))(jax.random.key(0))


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 16), 0, TEST_CONFIG.vocab_size, jnp.int32)


def _stack_layers(params, num_layers):
  """Unscanned params -> scanned layout: layers_0..layers_{L-1} stacked along a new axis 0."""
  params = dict(params)
  blocks = [params.pop(f"layers_{i}") for i in range(num_layers)]
  return {**params, "layers": jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)}


@pytest.mark.parametrize("size", list(PAPER_SIZES))
def test_paper_preset_param_counts(size):
  config = model_config(size)
  n = param_count(config)
  assert abs(n / PAPER_SIZES[size] - 1) < 0.05, (size, n)
  d, hidden = config.d_model, config.num_heads * config.head_dim
  assert config.vocab_size == 128256 and config.head_dim == 128
  assert config.mlp_hidden == 2.75 * d and hidden == d
  per_layer = 4 * d * hidden + 3 * d * config.mlp_hidden + 2 * d + 2 * config.head_dim
  assert n == 2 * config.vocab_size * d + config.num_layers * per_layer + d


@pytest.mark.parametrize("size,target", [("tiny", 1e6), ("small", 10e6)])
def test_cpu_preset_param_counts(size, target):
  config = model_config(size)
  assert config.vocab_size == 4096
  assert 0.5 * target < param_count(config) < 2 * target


def test_model_config_overrides_and_flops():
  config = model_config("150M", vocab_size=1000, max_seq_len=128, scan_layers=True, remat=True)
  assert (config.vocab_size, config.max_seq_len, config.d_model, config.num_layers) == (
    1000,
    128,
    512,
    6,
  )
  assert config.scan_layers and config.remat
  n = param_count(config)
  assert n == param_count(dataclasses.replace(config, scan_layers=False))
  expected = 6 * (n - 1000 * 512) + 12 * 6 * 512 * 128
  assert model_flops_per_token(config, 128) == expected


def test_errors():
  with pytest.raises(ValueError, match="150m"):
    model_config("7b")
  with pytest.raises(ValueError, match="n_layers"):
    model_config("tiny", n_layers=3)
  with pytest.raises(ValueError, match="max_seq_len=16"):
    jax.eval_shape(functools.partial(init_params, TEST_CONFIG, seq_len=17), jax.random.key(0))


def test_params_dtypes_and_layout(params):
  flat = {
    "/".join(k.key for k in path): x for path, x in jax.tree_util.tree_leaves_with_path(params)
  }
  assert all(x.dtype == jnp.float32 for x in flat.values())
  assert {name.rsplit("/", 1)[1] for name in flat} == {"kernel", "scale", "embedding"}
  assert flat["embedding/embedding"].shape == (64, 64)
  assert flat["head/kernel"].shape == (64, 64)
  assert not np.allclose(flat["embedding/embedding"], flat["head/kernel"].T)
  for name in ["attn/q", "attn/k", "attn/v", "attn/o", "mlp/gate", "mlp/up"]:
    assert flat[f"layers_0/{name}/kernel"].ndim == 2
  assert flat["layers_1/mlp/down/kernel"].shape == (TEST_CONFIG.mlp_hidden, 64)
  assert flat["layers_1/attn/q_norm/scale"].shape == (16,)
  assert flat["final_norm/scale"].shape == (64,)
  assert sum(x.size for x in flat.values()) == param_count(TEST_CONFIG)


def test_bf16_activations_fp32_logits(params, tokens):
  logits, state = jax.eval_shape(
    functools.partial(Transformer(TEST_CONFIG).apply, capture_intermediates=True),
    {"params": params},
    tokens,
  )
  acts = state["intermediates"]
  assert acts["embedding"]["__call__"][0].dtype == jnp.bfloat16
  assert acts["layers_0"]["attn"]["q"]["__call__"][0].dtype == jnp.bfloat16
  assert acts["layers_1"]["mlp"]["down"]["__call__"][0].dtype == jnp.bfloat16
  assert acts["final_norm"]["__call__"][0].dtype == jnp.bfloat16
  assert logits.dtype == jnp.float32 and logits.shape == (2, 16, 64)
  assert jnp.all(jnp.isfinite(_forward(TEST_CONFIG)(params, tokens)))


def test_causal(params, tokens):
  tokens = tokens[:, :12]  # also: shorter than max_seq_len
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % TEST_CONFIG.vocab_size)
  before = _forward(TEST_CONFIG)(params, tokens)
  after = _forward(TEST_CONFIG)(params, changed)
  np.testing.assert_allclose(before[:, :7], after[:, :7], atol=1e-6, rtol=0)
  assert np.all(np.abs(before[:, 7:] - after[:, 7:]).max(axis=-1) > 1e-3)


@pytest.mark.parametrize("config,atol", [(F32_CONFIG, 1e-5), (TEST_CONFIG, 5e-2)])
def test_scan_forward_matches_unscanned(params, tokens, config, atol):
  scanned = dataclasses.replace(config, scan_layers=True)
  stacked = _stack_layers(params, config.num_layers)
  fresh = jax.eval_shape(functools.partial(init_params, scanned), jax.random.key(0))
  assert jax.tree.structure(fresh) == jax.tree.structure(stacked)
  assert jax.tree.map(jnp.shape, fresh) == jax.tree.map(jnp.shape, stacked)
  assert fresh["layers"]["attn"]["q"]["kernel"].shape == (2, 64, 64)
  assert fresh["layers"]["mlp"]["down"]["kernel"].shape == (2, config.mlp_hidden, 64)
  assert fresh["layers"]["attn"]["k_norm"]["scale"].shape == (2, 16)
  np.testing.assert_allclose(
    _forward(scanned)(stacked, tokens), _forward(config)(params, tokens), atol=atol, rtol=0
  )


def test_scan_remat_gradients_match_unscanned(params, tokens):
  scanned = dataclasses.replace(F32_CONFIG, scan_layers=True, remat=True)

  @functools.partial(jax.jit, static_argnums=0)
  def grads(config, p):
    loss = lambda p: jnp.mean(Transformer(config).apply({"params": p}, tokens) ** 2)
    return jax.grad(loss)(p)

  g_scan = grads(scanned, _stack_layers(params, 2))
  g_ref = _stack_layers(grads(F32_CONFIG, params), 2)
  assert jax.tree.structure(g_scan) == jax.tree.structure(g_ref)
  for a, b in zip(jax.tree.leaves(g_scan), jax.tree.leaves(g_ref)):
    np.testing.assert_allclose(a, b, atol=1e-4 * float(jnp.abs(b).max()), rtol=0)


def test_rope_relative_positions():
  q, k = jax.random.normal(jax.random.key(0), (2, 1, 4, 32))
  theta = 5e5

  @jax.jit
  def score(pq, pk):
    qr = apply_rope(q[None], pq[None], theta)
    kr = apply_rope(k[None], pk[None], theta)
    return jnp.sum(qr * kr, axis=-1)

  np.testing.assert_allclose(score(3, 1), score(1003, 1001), rtol=1e-4, atol=1e-4)
  np.testing.assert_allclose(score(7, 7), jnp.sum(q * k, axis=-1)[None], rtol=1e-4, atol=1e-4)
  assert not np.allclose(score(3, 1), score(1, 3), atol=1e-3)
  rotated = apply_rope(q[None], jnp.array([[5]]), theta)  # [B, T] positions
  np.testing.assert_allclose(
    jnp.linalg.norm(rotated, axis=-1), jnp.linalg.norm(q[None], axis=-1), rtol=1e-5
  )
  np.testing.assert_allclose(apply_rope(q[None], jnp.array([0]), theta), q[None])


def test_presets_table():
  assert set(PRESETS) == {"tiny", "small", *PAPER_SIZES}
  assert model_config("914m").max_seq_len == 2048
