"""The embedding's backward pass and the chunked cross-entropy (issue 21, items 2 and 3).

The embedding's gradient is summed in float32 by sort and segmented scan, with no scatter-add of
low-precision rows; the loss forms the logits a chunk of positions at a time.  Both equal the
plain computations (the forward pass bit for bit, gradients to bf16 round-off), and the programs
handed to the compiler show it: no bf16 scatter, unique-index stores into the table, and less
temporary memory for the 150m step with the paper's vocabulary.
"""

import dataclasses
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muloco_jax.tools import aot
from muloco_jax import config as config_lib
from muloco_jax import model as model_lib
from muloco_jax import train

VOCAB, FEATURES = 512, 32


def _tokens(contended: bool, shape=(8, 64)) -> jax.Array:
  """Uniform ids, or text-like ids where one id (a space) is every third token."""
  tokens = jax.random.randint(jax.random.key(1), shape, 0, VOCAB)
  return tokens.at[:, ::3].set(7) if contended else tokens


@pytest.mark.parametrize("contended", [False, True])
def test_embedding_lookup_equals_cast_table_gather_and_sums_its_gradient_in_float32(contended):
  table = jax.random.normal(jax.random.key(0), (VOCAB, FEATURES))
  tokens = _tokens(contended)
  cotangent = jax.random.normal(jax.random.key(2), tokens.shape + (FEATURES,), jnp.bfloat16)

  @jax.jit
  def lookups_and_grads(table, tokens, cotangent):
    # Today's lookup (Flax nn.Embed with dtype=bf16): cast the table, then gather.
    plain, plain_vjp = jax.vjp(lambda t: jnp.take(t.astype(jnp.bfloat16), tokens, axis=0), table)
    ours, our_vjp = jax.vjp(lambda t: model_lib.embedding_lookup(t, tokens, jnp.bfloat16), table)
    rows = cotangent.reshape(-1, FEATURES).astype(jnp.float32)
    exact = jax.ops.segment_sum(rows, tokens.reshape(-1), VOCAB)
    return ours, plain, our_vjp(cotangent)[0], plain_vjp(cotangent)[0], exact

  ours, plain, grad, plain_grad, exact = lookups_and_grads(table, tokens, cotangent)
  assert ours.dtype == jnp.bfloat16
  np.testing.assert_array_equal(np.asarray(ours, np.float32), np.asarray(plain, np.float32))
  assert grad.dtype == jnp.float32
  scale = float(jnp.max(jnp.abs(exact)))
  our_error = float(jnp.max(jnp.abs(grad - exact))) / scale
  plain_error = float(jnp.max(jnp.abs(plain_grad - exact))) / scale
  assert our_error < 1e-6
  # Today's gradient is the float32 one to bf16 round-off (its scatter accumulates in bf16).
  assert plain_error < 0.05
  if contended:
    assert plain_error > 10 * our_error


def test_sorted_segment_sum_matches_segment_sum_drops_out_of_range_ids_and_vmaps():
  rows = jax.random.normal(jax.random.key(0), (4, 200, 3))
  ids = jax.random.randint(jax.random.key(1), (4, 200), -2, 12)  # some ids outside [0, 10)
  ours = jax.jit(jax.vmap(lambda r, i: model_lib.sorted_segment_sum(r, i, 10)))(rows, ids)
  for r, i, o in zip(rows, ids, ours):
    expected = jax.ops.segment_sum(jnp.where((i >= 0)[:, None], r, 0.0), jnp.maximum(i, 0), 10)
    np.testing.assert_allclose(o, expected, rtol=1e-5, atol=1e-5)


def _loss_and_grads(chunk_len, params, batch, config):
  model = model_lib.Transformer(dataclasses.replace(config, loss_chunk_len=chunk_len))
  return jax.jit(jax.value_and_grad(train.make_loss_fn(model)))(params, batch)


def test_chunked_loss_equals_the_full_logits_loss_and_gradients():
  config = model_lib.ModelConfig(vocab_size=VOCAB, d_model=64, num_layers=1, head_dim=16)
  params = model_lib.init_params(config, jax.random.key(0))
  tokens = _tokens(contended=True, shape=(4, 129))
  batch = {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
  full_loss, full_grads = _loss_and_grads(0, params, batch, config)

  # The loss of the full logits, written out as `make_loss_fn` computed it before chunking.
  @jax.jit
  def expected_loss(params, batch):
    logits = model_lib.Transformer(config).apply({"params": params}, batch["inputs"])
    assert logits.dtype == jnp.float32
    log_probs = jax.nn.log_softmax(logits)
    return -jnp.mean(jnp.take_along_axis(log_probs, batch["targets"][..., None], -1))

  expected = expected_loss(params, batch)
  np.testing.assert_allclose(full_loss, expected, rtol=1e-5)
  loss, grads = _loss_and_grads(32, params, batch, config)  # 4 chunks of the 128 positions
  np.testing.assert_allclose(loss, full_loss, rtol=1e-6)

  def relative_error(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))

  errors = jax.tree.map(relative_error, grads, full_grads)
  # Only the head's gradient is rounded per chunk (bf16 operands, float32 sum over chunks).
  assert errors["head"]["kernel"] < 2**-7
  assert max(jax.tree.leaves({k: v for k, v in errors.items() if k != "head"})) < 1e-6


def test_loss_chunk_len_must_divide_the_sequence_length():
  config = config_lib.default_config()
  config.data.seq_len, config.model.loss_chunk_len = 128, 48
  with pytest.raises(ValueError, match="model.loss_chunk_len=48"):
    config_lib.validate(config)
  for ok in (0, 32, 128, 512):
    config.model.loss_chunk_len = ok
    config_lib.validate(config)


def _train_step(vocab: int, chunk_len: int, seq_len: int = 128, batch_size: int = 2):
  """The 150m data-parallel step's jitted function and abstract arguments on one CPU device."""
  config = config_lib.default_config()
  config.model.size = "150m"
  config.data.seq_len, config.train.batch_size = seq_len, batch_size
  config.model.loss_chunk_len = chunk_len
  jobs, _, _ = aot.programs(config, jax.devices()[:1], vocab)
  return jobs["train_step"]


@pytest.mark.parametrize("vocab", [4096, 128256])
def test_150m_step_has_no_low_precision_scatter_into_the_embedding(vocab):
  # The lowered module is what every backend's compiler receives; the CPU compiler itself
  # widens bf16 scatters to float32, so its output would hide one.
  fn, args = _train_step(vocab, chunk_len=128)
  text = fn.lower(*args).as_text()
  scatters = re.findall(
    r'"stablehlo\.scatter".*?unique_indices = (\w+).*?\) -> (tensor<[^>]*>)', text, re.S
  )
  table = f"tensor<{vocab}x512x"
  into_table = [(unique, out) for unique, out in scatters if out.startswith(table)]
  assert into_table, "the embedding gradient's store into the table was not found"
  for unique, out in scatters:
    assert not re.search(r"x(bf16|f16)>", out), f"low-precision scatter: {out}"
  assert all(unique == "true" for unique, _ in into_table), into_table


def test_chunked_loss_cuts_the_150m_steps_temporary_memory():
  seq_len, batch_size, vocab = 512, 4, 128256
  temp = {}
  for chunk_len in (0, 128):
    fn, args = _train_step(vocab, chunk_len, seq_len, batch_size)
    temp[chunk_len] = fn.lower(*args).compile().memory_analysis().temp_size_in_bytes
  full_logits = batch_size * seq_len * vocab * 4
  # At least the full float32 logits go (their gradient too, in practice: 1.6x of them).
  assert temp[0] - temp[128] > full_logits, (temp, full_logits)
