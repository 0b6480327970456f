"""Next-token cross-entropy that never holds the whole batch's float32 logits.

With the paper's 128256-token vocabulary the logits of 16 x 1024 tokens are 8.4 GB in float32,
more than the rest of a 150m model's step.  `chunked_cross_entropy` forms them for
`chunk_len` positions of every sequence at a time inside a `lax.scan` whose body is
rematerialised (`jax.checkpoint`): the forward pass keeps one chunk's logits, and the backward
pass recomputes each chunk's logits from the hidden states it already holds.  The head's
gradient accumulates over chunks in float32.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp

from muloco_jax import model as model_lib


def token_losses_sum(logits: jax.Array, targets: jax.Array) -> jax.Array:
  """Sum over tokens of ``logsumexp(logits) - logits[target]`` (float32 logits [..., vocab]).

  The target's logit is a masked sum over the vocabulary, not a gather: elementwise along the
  vocabulary, it partitions like the logits (the TPU partitioner turns the gather of
  `optax.softmax_cross_entropy_with_integer_labels` on worker-split batches into an
  all-to-all across workers).
  """
  vocab = jnp.arange(logits.shape[-1])
  target = jnp.sum(jnp.where(vocab == targets[..., None], logits, 0.0), axis=-1)
  return jnp.sum(jax.nn.logsumexp(logits, axis=-1) - target)


def chunked_cross_entropy(
  config: model_lib.ModelConfig,
  hidden: jax.Array,
  head_kernel: jax.Array,
  targets: jax.Array,
  *,
  chunk_len: int,
) -> jax.Array:
  """Mean over [B, T] of ``-log softmax(hidden @ head_kernel)[target]``, `chunk_len` positions
  of each sequence at a time (``chunk_len`` 0 or >= T: all at once).

  The logits are `model.head_logits` (``config.dtype`` operands, float32 results), so each
  chunk's are those of `model.Transformer` bit for bit; only the order of the final sum and of
  the head gradient's accumulation differs.  Chunks split the sequence axis, not the batch
  axis, so a batch sharded over devices stays sharded inside every chunk.
  """
  batch, seq_len, features = hidden.shape
  if chunk_len <= 0 or chunk_len >= seq_len:
    return token_losses_sum(model_lib.head_logits(config, hidden, head_kernel), targets) / (
      batch * seq_len
    )
  if seq_len % chunk_len:
    raise ValueError(f"loss chunk_len={chunk_len} does not divide the sequence length {seq_len}")
  num_chunks = seq_len // chunk_len
  # [num_chunks, B, chunk_len, ...]: scan over the chunks.
  hidden = hidden.reshape(batch, num_chunks, chunk_len, features).swapaxes(0, 1)
  targets = targets.reshape(batch, num_chunks, chunk_len).swapaxes(0, 1)

  @jax.checkpoint
  def chunk_loss(kernel, hidden_chunk, targets_chunk):
    return token_losses_sum(model_lib.head_logits(config, hidden_chunk, kernel), targets_chunk)

  def accumulate(total, chunk):
    return total + chunk_loss(head_kernel, *chunk), None

  total, _ = jax.lax.scan(accumulate, jnp.zeros((), jnp.float32), (hidden, targets))
  return total / (batch * seq_len)
