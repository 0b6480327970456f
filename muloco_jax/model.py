"""Llama-3 style decoder-only transformer (Flax linen), as used by MuLoCo (arXiv 2505.23725).

Architecture (paper, "Model" section): untied token embedding and output head, pre-norm RMSNorm
blocks, QK-norm, RoPE (theta 5e5), causal attention, SwiGLU MLP with hidden width 2.75 d, no
biases. Parameters are stored in ``param_dtype`` (fp32 master weights); activations run in
``dtype`` (bf16 by default); attention softmax and the output logits are fp32.

Every hidden weight is a 2-D ``(in, out)`` Dense kernel, so Muon can treat it as a matrix. With
``scan_layers=True`` the blocks live under one module ``layers`` and each block parameter gets a
leading layer axis (kernels become ``(num_layers, in, out)``); otherwise blocks are
``layers_0 ... layers_{L-1}``. Parameter paths::

    embedding/embedding                       (vocab, d)
    layers_i/attn_norm/scale                  (d,)
    layers_i/attn/{q,k,v}/kernel              (d, heads * head_dim)
    layers_i/attn/{q_norm,k_norm}/scale       (head_dim,)
    layers_i/attn/o/kernel                    (heads * head_dim, d)
    layers_i/mlp_norm/scale                   (d,)
    layers_i/mlp/{gate,up}/kernel             (d, mlp_hidden)
    layers_i/mlp/down/kernel                  (mlp_hidden, d)
    final_norm/scale                          (d,)
    head/kernel                               (d, vocab)

Initialisation follows torchtitan's Llama (the authors' code base): embedding N(0, 1); q, k, v and
gate N(0, 0.02^2); o, up and down N(0, (0.02 / sqrt(2 L))^2), the same for every layer so scanned
and unscanned stacks draw from one distribution; head truncated normal, std d^-1/2, cut at 3 std;
norm gains 1.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

_INIT_STD = 0.02

# Paper sizes (arXiv 2505.23725, width x layers): head_dim 128, Llama-3 vocabulary. The
# names count untied embedding + head, e.g. 150M = 2 * 128256 * 512 + 6 * 12.25 * 512^2.
# ``tiny`` (~1.5M) and ``small`` (~10M) are CPU-sized models for tests and quick experiments.
PRESETS: dict[str, dict[str, int]] = {
  "tiny": dict(d_model=128, num_layers=2, head_dim=32, vocab_size=4096),
  "small": dict(d_model=256, num_layers=10, head_dim=64, vocab_size=4096),
  "150m": dict(d_model=512, num_layers=6, head_dim=128, vocab_size=128256),
  "416m": dict(d_model=1024, num_layers=12, head_dim=128, vocab_size=128256),
  "914m": dict(d_model=1536, num_layers=18, head_dim=128, vocab_size=128256),
  "1.76b": dict(d_model=2048, num_layers=24, head_dim=128, vocab_size=128256),
  "3.1b": dict(d_model=2560, num_layers=30, head_dim=128, vocab_size=128256),
  "15b": dict(d_model=4608, num_layers=54, head_dim=128, vocab_size=128256),
}


def _default_mlp_hidden(d_model: int) -> int:
  """ceil(2.75 * d_model) rounded up to a multiple of 128 (of 64 when d_model < 512).

  Exactly 2.75 * d_model for every paper size.
  """
  multiple = 128 if d_model >= 512 else 64
  return -(-math.ceil(2.75 * d_model) // multiple) * multiple


@dataclasses.dataclass(frozen=True)
class ModelConfig:
  """Transformer hyper-parameters.

  ``num_heads`` defaults to ``d_model // head_dim`` (``d_model`` must then be a multiple of
  ``head_dim``); ``mlp_hidden`` defaults to ``_default_mlp_hidden(d_model)``. Both are resolved
  at construction, so ``dataclasses.replace(config, d_model=...)`` keeps the old values.
  """

  vocab_size: int
  d_model: int
  num_layers: int
  num_heads: int | None = None
  head_dim: int = 128
  mlp_hidden: int | None = None
  max_seq_len: int = 2048
  rope_theta: float = 5e5
  norm_eps: float = 1e-6
  scan_layers: bool = False
  remat: bool = False
  # Sequence positions whose logits the training loss forms at once (`loss`); 0: all.
  loss_chunk_len: int = 128
  dtype: Any = jnp.bfloat16
  param_dtype: Any = jnp.float32

  def __post_init__(self):
    if self.head_dim % 2:
      raise ValueError(f"head_dim must be even for RoPE, got {self.head_dim}")
    if self.num_heads is None:
      if self.d_model % self.head_dim:
        raise ValueError(
          f"d_model={self.d_model} is not a multiple of head_dim={self.head_dim}; "
          "set num_heads explicitly"
        )
      object.__setattr__(self, "num_heads", self.d_model // self.head_dim)
    if self.mlp_hidden is None:
      object.__setattr__(self, "mlp_hidden", _default_mlp_hidden(self.d_model))


def model_config(
  size: str, vocab_size: int | None = None, max_seq_len: int = 2048, **overrides
) -> ModelConfig:
  """The ``ModelConfig`` of a preset in ``PRESETS``; ``overrides`` replace any config field."""
  if size.lower() not in PRESETS:
    raise ValueError(f"unknown model size {size!r}; valid sizes: {', '.join(PRESETS)}")
  fields = {f.name for f in dataclasses.fields(ModelConfig)}
  for name in overrides:
    if name not in fields:
      raise ValueError(
        f"unknown ModelConfig field {name!r}; valid fields: {', '.join(sorted(fields))}"
      )
  kwargs = dict(PRESETS[size.lower()], max_seq_len=max_seq_len)
  if vocab_size is not None:
    kwargs["vocab_size"] = vocab_size
  return ModelConfig(**{**kwargs, **overrides})


def apply_rope(x: jax.Array, positions: jax.Array, theta: float) -> jax.Array:
  """Rotary position embedding (half-split "rotate_half" layout), computed in fp32.

  x: [..., T, heads, head_dim]; positions: [T] or [B, T]. Channel pair (i, i + head_dim/2) is
  rotated by angle ``position * theta^(-2i / head_dim)``.
  """
  half = x.shape[-1] // 2
  freqs = theta ** (-jnp.arange(half, dtype=jnp.float32) / half)
  angles = (positions.astype(jnp.float32)[..., None] * freqs)[..., None, :]
  sin, cos = jnp.sin(angles), jnp.cos(angles)
  x1, x2 = jnp.split(x.astype(jnp.float32), 2, axis=-1)
  return jnp.concatenate([x1 * cos - x2 * sin, x2 * cos + x1 * sin], axis=-1).astype(x.dtype)


def _rms_norm(config: ModelConfig, name: str) -> nn.RMSNorm:
  return nn.RMSNorm(
    epsilon=config.norm_eps, dtype=config.dtype, param_dtype=config.param_dtype, name=name
  )


def _dense(config: ModelConfig, features: int, std: float, name: str) -> nn.Dense:
  return nn.Dense(
    features,
    use_bias=False,
    dtype=config.dtype,
    param_dtype=config.param_dtype,
    kernel_init=nn.initializers.normal(std),
    name=name,
  )


class Attention(nn.Module):
  """Causal multi-head attention with QK-norm (RMSNorm over head_dim) and RoPE."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    b, t, _ = x.shape
    out_std = _INIT_STD / math.sqrt(2 * cfg.num_layers)
    heads = (b, t, cfg.num_heads, cfg.head_dim)
    q = _dense(cfg, cfg.num_heads * cfg.head_dim, _INIT_STD, "q")(x).reshape(heads)
    k = _dense(cfg, cfg.num_heads * cfg.head_dim, _INIT_STD, "k")(x).reshape(heads)
    v = _dense(cfg, cfg.num_heads * cfg.head_dim, _INIT_STD, "v")(x).reshape(heads)
    positions = jnp.arange(t)
    q = apply_rope(_rms_norm(cfg, "q_norm")(q), positions, cfg.rope_theta)
    k = apply_rope(_rms_norm(cfg, "k_norm")(k), positions, cfg.rope_theta)
    # Logits and softmax are fp32 inside dot_product_attention for bf16 inputs.
    y = jax.nn.dot_product_attention(q, k, v, is_causal=True)
    return _dense(cfg, cfg.d_model, out_std, "o")(y.reshape(b, t, -1))


class Mlp(nn.Module):
  """SwiGLU feed-forward: down(silu(gate(x)) * up(x))."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array) -> jax.Array:
    cfg = self.config
    out_std = _INIT_STD / math.sqrt(2 * cfg.num_layers)
    gate = _dense(cfg, cfg.mlp_hidden, _INIT_STD, "gate")(x)
    up = _dense(cfg, cfg.mlp_hidden, out_std, "up")(x)
    return _dense(cfg, cfg.d_model, out_std, "down")(nn.silu(gate) * up)


class Block(nn.Module):
  """Pre-norm residual block; ``(x, None) -> (x, None)`` so that it can be ``nn.scan``-ned."""

  config: ModelConfig

  @nn.compact
  def __call__(self, x: jax.Array, _: None) -> tuple[jax.Array, None]:
    x = x + Attention(self.config, name="attn")(_rms_norm(self.config, "attn_norm")(x))
    x = x + Mlp(self.config, name="mlp")(_rms_norm(self.config, "mlp_norm")(x))
    return x, None


def embedding_lookup(table: jax.Array, tokens: jax.Array, dtype) -> jax.Array:
  """``table[tokens]`` cast to ``dtype``, with a backward pass free of contended scatter-adds.

  The forward pass gathers from the (float32) table and casts after, which equals casting the
  table first.  The table's gradient is ``G[v] = sum_{i: tokens_i = v} dy_i``, summed in float32.
  The plain VJP is a scatter-add of every row of ``dy`` (in ``dtype``) into the table: on GPUs
  a frequent token (a space, a newline) makes thousands of atomic adds to one row, and XLA lowers
  low-precision atomic adds to compare-and-swap retry loops (openxla/xla#26371).  Here the rows
  are summed by `sorted_segment_sum`, one store per distinct token, whatever the distribution.
  """
  return _lookup(table.shape, table.dtype, jnp.dtype(dtype), table, tokens)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _lookup(table_shape, table_dtype, dtype, table, tokens):
  del table_shape, table_dtype
  return jnp.take(table, tokens, axis=0).astype(dtype)


def _lookup_fwd(table_shape, table_dtype, dtype, table, tokens):
  return _lookup(table_shape, table_dtype, dtype, table, tokens), tokens


def _lookup_bwd(table_shape, table_dtype, dtype, tokens, cotangent):
  del dtype
  vocab, features = table_shape
  rows = cotangent.reshape(-1, features).astype(jnp.float32)
  return sorted_segment_sum(rows, tokens.reshape(-1), vocab).astype(table_dtype), None


_lookup.defvjp(_lookup_fwd, _lookup_bwd)


def sorted_segment_sum(rows: jax.Array, ids: jax.Array, num_segments: int) -> jax.Array:
  """``out[v] = sum of rows[i] with ids[i] = v`` ([num_segments, d]), without atomic adds.

  Sort by id, take each run of equal ids' sum with a segmented inclusive scan (the operator
  ``(s1, x1) . (s2, x2) = (s1 | s2, x2 if s2 else x1 + x2)``, s marking a run's first row), and
  store each run's last partial sum at its id.  Ids outside ``[0, num_segments)`` are dropped.
  """
  order = jnp.argsort(ids)
  ids, rows = ids[order], rows[order]
  changes = ids[1:] != ids[:-1]
  starts = jnp.concatenate([jnp.ones((1,), bool), changes])
  ends = jnp.concatenate([changes, jnp.ones((1,), bool)])

  def combine(left, right):
    (left_start, left_sum), (right_start, right_sum) = left, right
    return left_start | right_start, jnp.where(
      right_start[:, None], right_sum, left_sum + right_sum
    )

  _, run_sums = jax.lax.associative_scan(combine, (starts, rows))
  # Rows that end no run get distinct out-of-range targets, so the indices really are unique.
  targets = jnp.where(ends, ids, num_segments + jnp.arange(ids.shape[0]))
  out = jnp.zeros((num_segments, rows.shape[-1]), rows.dtype)
  return out.at[targets].set(run_sums, mode="drop", unique_indices=True)


def head_logits(config: ModelConfig, hidden: jax.Array, kernel: jax.Array) -> jax.Array:
  """The output head: ``hidden @ kernel`` with ``config.dtype`` operands, float32 logits."""
  return jax.lax.dot_general(
    hidden.astype(config.dtype),
    kernel.astype(config.dtype),
    (((hidden.ndim - 1,), (0,)), ((), ())),
    preferred_element_type=jnp.float32,
  )


class Embed(nn.Module):
  """Token embedding ``(vocab, d)``, N(0, 1) init, looked up by `embedding_lookup`."""

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array) -> jax.Array:
    cfg = self.config
    table = self.param(
      "embedding", nn.initializers.normal(1.0), (cfg.vocab_size, cfg.d_model), cfg.param_dtype
    )
    return embedding_lookup(table, tokens, cfg.dtype)


class Head(nn.Module):
  """Untied output head ``(d, vocab)``: truncated normal init, std d^-1/2, cut at 3 std."""

  config: ModelConfig

  def setup(self):
    cfg = self.config
    self.kernel = self.param(
      "kernel",
      nn.initializers.truncated_normal(cfg.d_model**-0.5, lower=-3.0, upper=3.0),
      (cfg.d_model, cfg.vocab_size),
      cfg.param_dtype,
    )

  def __call__(self, hidden: jax.Array) -> jax.Array:
    return head_logits(self.config, hidden, self.kernel)


class Transformer(nn.Module):
  """Decoder-only LM: int32 tokens [B, T] -> fp32 logits [B, T, vocab]; T <= max_seq_len.

  With ``return_hidden=True`` it returns ``(hidden, head_kernel)`` instead: the final normed
  activations [B, T, d] and the head's kernel, for a loss that forms the logits itself (in
  chunks, `loss.chunked_cross_entropy`) rather than holding all of them.
  """

  config: ModelConfig

  @nn.compact
  def __call__(self, tokens: jax.Array, return_hidden: bool = False):
    cfg = self.config
    if tokens.ndim != 2:
      raise ValueError(f"tokens must be [batch, seq_len], got shape {tokens.shape}")
    if tokens.shape[1] > cfg.max_seq_len:
      raise ValueError(f"sequence length {tokens.shape[1]} exceeds max_seq_len={cfg.max_seq_len}")
    x = Embed(cfg, name="embedding")(tokens)
    block = nn.remat(Block, prevent_cse=not cfg.scan_layers) if cfg.remat else Block
    if cfg.scan_layers:
      layers = nn.scan(
        block, variable_axes={"params": 0}, split_rngs={"params": True}, length=cfg.num_layers
      )
      x, _ = layers(cfg, name="layers")(x, None)
    else:
      for i in range(cfg.num_layers):
        x, _ = block(cfg, name=f"layers_{i}")(x, None)
    x = _rms_norm(cfg, "final_norm")(x)
    head = Head(cfg, name="head")
    if return_hidden:
      return x, head.kernel
    return head(x)


def init_params(config: ModelConfig, rng: jax.Array, seq_len: int = 1) -> dict:
  """Fresh parameters (in ``config.param_dtype``); ``seq_len`` is the dummy input length only."""
  return Transformer(config).init(rng, jnp.zeros((1, seq_len), jnp.int32))["params"]


def param_count(config: ModelConfig) -> int:
  """Number of parameters, from shapes only (``jax.eval_shape``; nothing is allocated)."""
  # The scanned stack traces one block instead of L and holds the same number of parameters.
  config = dataclasses.replace(config, scan_layers=True, remat=False)
  shapes = jax.eval_shape(functools.partial(init_params, config), jax.random.key(0))
  return sum(math.prod(p.shape) for p in jax.tree.leaves(shapes))


def model_flops_per_token(config: ModelConfig, seq_len: int) -> float:
  """Training FLOPs per token (forward + backward), the PaLM / Chinchilla accounting for MFU.

  ``6 * (N - vocab * d_model) + 12 * num_layers * num_heads * head_dim * seq_len``: 6 FLOPs per
  parameter per token for every matmul weight (all parameters except the embedding lookup table,
  head included; the norm gains are negligible), plus QK^T and attention-times-V (2 * 2 * T * h
  forward per layer, times 3 for the backward), counted without the causal halving.
  """
  non_embedding = param_count(config) - config.vocab_size * config.d_model
  attention = 12 * config.num_layers * config.num_heads * config.head_dim * seq_len
  return float(6 * non_embedding + attention)
