"""Tests for muloco_jax.compression: bit packing, quantizers, payload bytes, error feedback."""

import functools
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import Mesh, PartitionSpec as P

from muloco_jax import compression as C
from muloco_jax import config as config_lib
from muloco_jax import layout

STAT32 = functools.partial(C.CompressionSpec, "statistical", table_dtype="float32")

# Whole-function jit: one compile per (shape, spec) is much cheaper than eager op-by-op dispatch.
_encode = jax.jit(C.encode, static_argnums=1)
_decode = jax.jit(C.decode, static_argnums=(1, 2, 3))
_rel_error = jax.jit(lambda tree, codec: codec.relative_error(tree), static_argnums=1)


@functools.partial(jax.jit, static_argnums=1)
def _encode_decode(x, spec):
  payload = C.encode(x, spec)
  return payload, C.decode(payload, spec, x.shape)


def _rng(seed=0):
  return np.random.default_rng(seed)


def _model_tree(rng, d=32, hidden=88, vocab=64):
  """A small model-shaped tree: embedding, head, 2-D matrices, a 3-D kernel and 1-D gains."""
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  return {
    "embedding": {"embedding": f(vocab, d)},
    "layer_0": {
      "attn": {
        "wq": {"kernel": f(d, 2, 16)},
        "wo": {"kernel": f(d, d)},
        "q_norm": {"scale": f(16)},
      },
      "mlp": {"w1": {"kernel": f(d, hidden)}, "w2": {"kernel": f(hidden, d)}},
      "attn_norm": {"scale": f(d)},
    },
    "head": {"kernel": f(d, vocab)},
  }


def _tree_150m(vocab=32000, d=512, layers=6, hidden=1408, head_dim=128):
  """Shapes of the paper's 150M model (d=512, 6 layers, SwiGLU hidden 2.75 d, QK-norm)."""
  s = lambda *shape: jax.ShapeDtypeStruct(shape, jnp.float32)
  layer = lambda: {
    "attn": {name: {"kernel": s(d, d)} for name in ("wq", "wk", "wv", "wo")}
    | {"q_norm": {"scale": s(head_dim)}, "k_norm": {"scale": s(head_dim)}},
    "mlp": {
      "w1": {"kernel": s(d, hidden)},
      "w3": {"kernel": s(d, hidden)},
      "w2": {"kernel": s(hidden, d)},
    },
    "attn_norm": {"scale": s(d)},
    "mlp_norm": {"scale": s(d)},
  }
  tree = {
    "embedding": {"embedding": s(vocab, d)},
    "final_norm": {"scale": s(d)},
    "head": {"kernel": s(d, vocab)},
  }
  return tree | {f"layer_{i}": layer() for i in range(layers)}


def _fp32_nbytes(tree):
  return sum(4 * math.prod(x.shape) for x in jax.tree_util.tree_leaves(tree))


# ----------------------------------------------------------------------------- spec


@pytest.mark.parametrize(
  "kwargs, field",
  [
    (dict(kind="stat"), "^kind='stat'"),
    (dict(kind="linear", bits=3), "^bits=3"),
    (dict(kind="linear", bits=16), "^bits=16"),
    (dict(kind="statistical", bits=True), "^bits=True"),
    (dict(kind="topk", topk_fraction=0.0), "^topk_fraction=0.0"),
    (dict(kind="topk", topk_fraction=1.5), "^topk_fraction=1.5"),
    (dict(kind="statistical", table_dtype="int8"), "^table_dtype='int8'"),
  ],
)
def test_spec_validation_names_field(kwargs, field):
  with pytest.raises(ValueError, match=field):
    C.CompressionSpec(**kwargs)


def test_pack_rejects_bad_bits():
  with pytest.raises(ValueError, match="^bits=3"):
    C.pack_bits(jnp.zeros(4, jnp.uint8), 3)


def test_config_names_the_bad_compression_key():
  config = config_lib.default_config()
  config.diloco.num_workers = 2
  config.compression.kind, config.compression.bits = "linear", 3
  with pytest.raises(ValueError, match=r"^compression\.bits=3 must be one of"):
    config_lib.validate(config)


# ----------------------------------------------------------------------------- bit packing


@pytest.mark.parametrize("bits", [1, 2, 4, 8])
def test_pack_unpack_round_trip(bits):
  rng = _rng(bits)
  for n in (1, 7, 13, 1001):
    codes = rng.integers(0, 2**bits, n).astype(np.uint8)
    packed = jax.jit(C.pack_bits, static_argnums=1)(codes, bits)
    assert packed.dtype == jnp.uint8 and packed.shape == (math.ceil(n * bits / 8),)
    np.testing.assert_array_equal(
      jax.jit(C.unpack_bits, static_argnums=(1, 2))(packed, bits, n), codes
    )
    # Padding is zeros.
    full = np.asarray(C.unpack_bits(packed, bits, packed.shape[0] * (8 // bits)))
    assert not full[n:].any()


def test_pack_bit_layout():
  # Value i of a byte sits at bit i * bits (little end first).
  np.testing.assert_array_equal(
    C.pack_bits(np.array([1, 0, 1, 1, 0, 0, 0, 1, 1]), 1), [0b10001101, 0b1]
  )
  np.testing.assert_array_equal(C.pack_bits(np.array([1, 2, 3, 0, 3]), 2), [1 | 2 << 2 | 3 << 4, 3])
  np.testing.assert_array_equal(C.pack_bits(np.array([0xA, 0x5, 0x7]), 4), [0x5A, 0x07])
  np.testing.assert_array_equal(C.pack_bits(np.array([200, 7]), 8), [200, 7])


# ----------------------------------------------------------------------------- quantizers


@pytest.mark.parametrize("per_row", [True, False])
def test_linear_error_within_half_step(per_row):
  x = _rng(1).standard_normal((12, 40)).astype(np.float32) * np.linspace(0.1, 3, 12)[:, None]
  for bits in C.BITS:
    payload, decoded = _encode_decode(x, C.CompressionSpec("linear", bits, per_row))
    err = np.abs(x - np.asarray(decoded)).reshape(payload["scale"].shape[0], -1)
    scale = np.asarray(payload["scale"])[:, None]
    assert np.all(err <= scale / 2 + 1e-5 * (1 + np.abs(x).max())), bits


def _statistical_reference(x2, bits):
  """Independent float64 statistics per row: mean, scale and codes."""
  n_bins = 2**bits
  mean = x2.mean(axis=1, keepdims=True)
  scale = 6 * x2.std(axis=1, ddof=1, keepdims=True) / n_bins
  codes = np.clip(np.round((x2 - mean) / scale + n_bins // 2), 0, n_bins - 1)
  return mean, scale, codes


@pytest.mark.parametrize("per_row", [True, False])
def test_statistical_bins_table_and_sum(per_row):
  """Codes follow the formula and each table entry is the mean of its bin's members. Hence:
  a value in an interior bin is within one bin width (scale) of its reconstruction; a value
  in an edge bin (which also holds the clipped values) lies within its bin-mates' range; and
  the per-bin errors cancel, so sum(D(C(x))) == sum(x) (per row when per_row), clipping included.

  (Values inside +-3 sigma can still land in an edge bin whose mean is pulled out by the
  clipped outliers: with Gaussian data the error there reaches ~1.1 bin widths at 2 bits.)
  """
  rng = _rng(2)
  x = (rng.standard_t(2.5, (6, 300)) * np.linspace(0.005, 0.02, 6)[:, None] + 0.003).astype(
    np.float32
  )
  x2 = x.reshape(6 if per_row else 1, -1).astype(np.float64)
  for bits in C.BITS:
    payload, decoded = _encode_decode(x, STAT32(bits=bits, per_row=per_row))
    decoded = np.asarray(decoded, np.float64).reshape(x2.shape)
    codes = np.asarray(C.unpack_bits(payload["codes"], bits, x.size)).reshape(x2.shape)
    mean, scale, ref_codes = _statistical_reference(x2, bits)
    assert np.mean(codes == ref_codes) > 0.999  # float32 vs float64 at exact bin edges
    assert (codes == 0).any() and (codes == 2**bits - 1).any()  # clipped outliers present
    err = np.abs(x2 - decoded)
    interior = (codes > 0) & (codes < 2**bits - 1)
    assert np.all(err[interior] <= (scale * np.ones_like(x2))[interior] * (1 + 1e-4))
    table = np.asarray(payload["table"], np.float64) * float(payload["table_scale"])
    tol = 1e-6 * np.abs(x2).max()  # float32 arithmetic
    for r in range(x2.shape[0]):
      for b in np.unique(codes[r]):
        members = x2[r][codes[r] == b]
        np.testing.assert_allclose(table[r, b], members.mean(), rtol=0, atol=tol)
        assert members.min() - tol <= table[r, b] <= members.max() + tol
    np.testing.assert_allclose(decoded.sum(1), x2.sum(1), atol=1e-6 * np.abs(x2).sum())


@pytest.mark.parametrize("bits", [2, 8])
def test_statistical_float16_table(bits):
  """The float16 table moves each entry by at most 2**-12 of the power-of-two table_scale."""
  x = (_rng(3).standard_t(2.5, (16, 200)) * 1e-3).astype(np.float32)
  payload, decoded = _encode_decode(x, C.CompressionSpec("statistical", bits))
  _, decoded32 = _encode_decode(x, STAT32(bits=bits))
  table_scale = float(payload["table_scale"])
  assert payload["table"].dtype == jnp.float16
  assert np.abs(np.asarray(payload["table"], np.float32)).max() <= 1.0
  assert table_scale == 2.0 ** np.round(np.log2(table_scale))
  np.testing.assert_allclose(decoded, decoded32, rtol=0, atol=2.0**-12 * table_scale)
  bound = x.size * 2.0**-12 * table_scale + 1e-6 * np.abs(x).sum()
  assert abs(np.asarray(decoded, np.float64).sum() - x.astype(np.float64).sum()) <= bound


def test_statistical_empty_bins_and_degenerate_scale():
  x = np.array([[0.0, 0.0, 0.0, 0.0, 10.0], [3.0, 3.0, 3.0, 3.0, 3.0]], np.float32)
  payload, decoded = _encode_decode(x, STAT32(bits=2))
  table = np.asarray(payload["table"]) * float(payload["table_scale"])
  mean, scale = 2.0, 6 * np.std(x[0], ddof=1) / 4
  # Row 0: the zeros get code round(-2 / scale + 2) = 2, the 10 gets code 3; bins 0 and 1
  # are empty and hold their bin centres mean + (b - 2) * scale.
  np.testing.assert_allclose(
    table[0], [mean - 2 * scale, mean - scale, 0.0, 10.0], rtol=1e-6, atol=1e-6
  )
  # Row 1 is constant: zero std -> scale 1, everything in the centre bin, decoded exactly.
  np.testing.assert_array_equal(decoded, x)
  # A single element and a scalar are one row of one value, decoded exactly.
  for v in (np.array([1.5], np.float32), np.float32(-2.0)):
    for spec in (STAT32(bits=1), C.CompressionSpec("linear", bits=1)):
      np.testing.assert_array_equal(_encode_decode(v, spec)[1], v)


@pytest.mark.parametrize("kind", ["statistical", "linear"])
def test_side_data_shapes(kind):
  side = {"statistical": "table", "linear": "offset"}[kind]
  extra = {"statistical": (4,), "linear": ()}[kind]
  for shape, rows in (((6, 10), 6), ((4, 3, 5), 4), ((10,), 1), ((), 1)):
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    per_row = jax.eval_shape(functools.partial(C.encode, spec=C.CompressionSpec(kind, 2, True)), x)
    per_tensor = jax.eval_shape(
      functools.partial(C.encode, spec=C.CompressionSpec(kind, 2, False)), x
    )
    assert per_row[side].shape == (rows, *extra) and per_tensor[side].shape == (1, *extra)
    assert per_row["codes"].shape == per_tensor["codes"].shape == (math.ceil(math.prod(shape) / 4),)


def test_topk_keeps_largest_k():
  x = _rng(4).standard_normal((20, 50)).astype(np.float32)
  payload, decoded = _encode_decode(x, C.CompressionSpec("topk", topk_fraction=0.05))
  assert payload["values"].shape == (50,) and payload["indices"].dtype == jnp.int32
  decoded = np.asarray(decoded)
  kept = decoded != 0
  assert kept.sum() == 50
  np.testing.assert_array_equal(decoded[kept], x[kept])
  assert np.abs(x[kept]).min() >= np.abs(x[~kept]).max()
  # k = max(1, int(n * fraction)); ties go to the lower flat index, deterministically.
  ties = np.array([1.0, -1.0, 0.5, 1.0, -1.0], np.float32)
  payload = _encode(ties, C.CompressionSpec("topk", topk_fraction=0.4))
  assert sorted(np.asarray(payload["indices"]).tolist()) == [0, 1]
  assert _encode(ties, C.CompressionSpec("topk", topk_fraction=0.01))["values"].shape == (1,)


# ----------------------------------------------------------------------------- pytrees and bytes


def test_codec_exclusion_rules():
  tree = _model_tree(_rng(5))
  spec = C.CompressionSpec("statistical", 2)
  shapes = jax.eval_shape(C.TreeCodec(spec).compress, tree)
  assert set(shapes["layer_0"]["attn_norm"]["scale"]) == {"values"}
  assert set(shapes["embedding"]["embedding"]) == {"codes", "table", "table_scale"}
  paper = C.TreeCodec(spec, C.exclude_vectors_embedding_head)
  payloads = jax.jit(paper.compress)(tree)
  assert set(payloads["embedding"]["embedding"]) == {"values"}
  assert set(payloads["head"]["kernel"]) == {"values"}
  assert set(payloads["layer_0"]["mlp"]["w1"]["kernel"]) == {"codes", "table", "table_scale"}
  decoded = jax.jit(lambda p: paper.decompress(p, tree))(payloads)
  for name in ("embedding", "head"):
    jax.tree_util.tree_map(np.testing.assert_array_equal, decoded[name], tree[name])
  norm = ("layer_0", "attn_norm", "scale")
  np.testing.assert_array_equal(decoded[norm[0]][norm[1]][norm[2]], tree[norm[0]][norm[1]][norm[2]])
  # A kernel's rows are its output units (its last axis).
  kernel = tree["layer_0"]["attn"]["wq"]["kernel"]
  np.testing.assert_allclose(
    decoded["layer_0"]["attn"]["wq"]["kernel"],
    np.moveaxis(_encode_decode(np.moveaxis(kernel, -1, 0), spec)[1], 0, -1),
  )


@pytest.mark.parametrize("kind", ["statistical", "linear"])
def test_dense_kernel_rows_are_output_units_and_the_rule_is_replaceable(kind):
  """W (in, out): each of its out columns is quantized as one row, as the authors' (out, in)
  weights are; the embedding (V, D) one row per token; a replaced rule takes the input axis."""
  rng = _rng(11)
  w = rng.standard_normal((48, 16)).astype(np.float32) * np.linspace(0.1, 3, 16, dtype=np.float32)
  table = rng.standard_normal((40, 16)).astype(np.float32)
  spec = C.CompressionSpec(kind, bits=2)
  tree = {"dense": {"kernel": w}, "embed": {"embedding": table}}
  got = C.TreeCodec(spec, C.exclude_vectors).roundtrip(tree)
  np.testing.assert_allclose(got["dense"]["kernel"], _encode_decode(w.T, spec)[1].T, rtol=1e-6)
  np.testing.assert_allclose(got["embed"]["embedding"], _encode_decode(table, spec)[1], rtol=1e-6)
  rows_in = C.TreeCodec(spec, C.exclude_vectors, row_axis=lambda path, leaf: 0).roundtrip(tree)
  np.testing.assert_allclose(rows_in["dense"]["kernel"], _encode_decode(w, spec)[1], rtol=1e-6)
  # Byte counts follow the rule: 16 rows of 48 (one table each) against 48 rows of 16.
  assert C.TreeCodec(spec).nbytes({"k": {"kernel": w}}) == C.compressed_nbytes((16, 48), spec)


def test_payload_bytes_match_closed_form():
  tree = _model_tree(_rng(6))
  specs = [
    C.CompressionSpec(kind, bits, per_row)
    for kind in ("statistical", "linear")
    for bits in C.BITS
    for per_row in (True, False)
  ]
  specs += [
    STAT32(bits=2),
    C.CompressionSpec("topk", topk_fraction=0.03),
    C.CompressionSpec("none"),
  ]
  for exclude in (C.exclude_vectors, C.exclude_vectors_embedding_head):
    for spec in specs:
      codec = C.TreeCodec(spec, exclude)
      expected = codec.nbytes(tree)
      shapes = jax.eval_shape(codec.compress, tree)
      assert C.payload_nbytes(shapes) == expected
  # Concrete arrays for two, and the per-leaf closed form by hand.
  for spec in (C.CompressionSpec("statistical", 2), specs[-2]):
    payloads = jax.jit(C.TreeCodec(spec).compress)(tree)
    assert C.payload_nbytes(payloads) == C.TreeCodec(spec).nbytes(tree)
  assert (
    C.compressed_nbytes((88, 32), C.CompressionSpec("statistical", 2))
    == 88 * 32 // 4 + 88 * 4 * 2 + 4
  )
  assert C.compressed_nbytes((88, 32), C.CompressionSpec("linear", 1)) == 88 * 32 // 8 + 88 * 8
  assert (
    C.compressed_nbytes((7,), C.CompressionSpec("statistical", 2, table_dtype="float32"))
    == 2 + 16 + 4
  )
  assert C.compressed_nbytes((88, 32), C.CompressionSpec("topk", topk_fraction=0.05)) == 140 * 8
  assert C.compressed_nbytes((88, 32), C.CompressionSpec("none")) == 88 * 32 * 4


def test_two_bit_ratio_on_150m_tree():
  """Default 2-bit row-wise statistical sends >= 15x fewer bytes than float32 (norms in fp32)."""
  tree = _tree_150m()
  fp32 = _fp32_nbytes(tree)
  ratio = lambda spec, exclude=C.exclude_vectors: (
    fp32 / C.payload_nbytes(jax.eval_shape(C.TreeCodec(spec, exclude).compress, tree))
  )
  assert ratio(C.CompressionSpec("statistical", 2)) >= 15.0
  assert ratio(C.CompressionSpec("statistical", 2, per_row=False)) >= 15.0
  assert ratio(C.CompressionSpec("linear", 2)) >= 15.0
  assert ratio(STAT32(bits=2)) < 15.0  # an fp32 table (even with the mean folded in) falls short
  assert 30.0 <= ratio(C.CompressionSpec("statistical", 1)) < 32.0
  # On the hidden matrices alone (the paper's runs send embedding and head in fp32).
  matrices = {k: v for k, v in tree.items() if k.startswith("layer_")}
  spec = C.CompressionSpec("statistical", 2)
  assert _fp32_nbytes(matrices) / C.TreeCodec(spec).nbytes(matrices) >= 15.0


def test_relative_compression_error():
  tree = _model_tree(_rng(7))
  codec = lambda *args: C.TreeCodec(C.CompressionSpec(*args), C.exclude_vectors)
  errs = [float(_rel_error(tree, codec("statistical", b))) for b in (2, 8)]
  assert 0.3 < errs[0] < 0.5 and errs[1] < 0.02
  zeros = jax.tree_util.tree_map(np.zeros_like, tree)
  assert float(_rel_error(zeros, codec("statistical", 2))) == 0.0
  assert float(_rel_error(tree, codec("none"))) == 0.0


# ----------------------------------------------------------------------------- error feedback


def test_error_feedback_telescopes_with_beta_one():
  """e_t = e_{t-1} + delta_t - D(c_t)  =>  sum_t D(c_t) + e_T == sum_t delta_t."""
  rng = _rng(8)
  tree = _model_tree(rng)
  spec = C.CompressionSpec("statistical", 2)
  codec = C.TreeCodec(spec)
  step = jax.jit(lambda e, d: codec.feedback(e, d, 1.0))
  decode = jax.jit(lambda p: codec.decompress(p, tree))
  error = C.init_error(tree)
  sent = C.init_error(tree)
  total = C.init_error(tree)
  for _ in range(5):
    delta = jax.tree_util.tree_map(lambda x: rng.standard_normal(x.shape).astype(np.float32), tree)
    payload, error = step(error, delta)
    sent = jax.tree_util.tree_map(np.add, sent, decode(payload))
    total = jax.tree_util.tree_map(np.add, total, delta)
  lhs = jax.tree_util.tree_map(np.add, sent, error)
  jax.tree_util.tree_map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-4), lhs, total)
  assert not np.asarray(error["layer_0"]["attn_norm"]["scale"]).any()  # excluded: sent exactly
  assert np.abs(np.asarray(error["layer_0"]["mlp"]["w1"]["kernel"])).max() > 0


def test_error_feedback_recurrence_and_off():
  rng = _rng(9)
  spec = C.CompressionSpec("linear", 2)
  beta = 0.9
  step = jax.jit(C.error_feedback_step, static_argnums=(2, 3, 4))
  error = np.zeros((8, 16), np.float32)
  for _ in range(3):
    delta = rng.standard_normal((8, 16)).astype(np.float32)
    payload, new_error = step(error, delta, spec, beta, True)
    sent = _decode(payload, spec, delta.shape, jnp.float32)
    np.testing.assert_allclose(new_error, beta * error + delta - sent, atol=1e-6)
    error = np.asarray(new_error)
  # Without error feedback: C(delta) is sent and the buffer is returned untouched.
  payload, same = C.error_feedback_step(error, delta, spec, beta, use_ef=False)
  assert same is error
  jax.tree_util.tree_map(np.testing.assert_array_equal, payload, _encode(delta, spec))


# ----------------------------------------------------------------------------- jit / vmap / shard_map


@pytest.mark.parametrize(
  "spec",
  [
    C.CompressionSpec("statistical", 2),
    C.CompressionSpec("linear", 4, False),
    C.CompressionSpec("topk"),
  ],
  ids=lambda s: s.kind,
)
def test_vmap_over_workers_matches_loop(spec):
  x = _rng(10).standard_normal((4, 16, 24)).astype(np.float32)
  payloads = jax.jit(jax.vmap(lambda v: C.encode(v, spec)))(x)
  decoded = jax.jit(jax.vmap(lambda p: C.decode(p, spec, (16, 24))))(payloads)
  for k in range(4):
    single, single_decoded = _encode_decode(x[k], spec)
    for key in single:
      assert payloads[key].shape == (4, *single[key].shape)
      np.testing.assert_allclose(payloads[key][k], single[key], rtol=1e-6, atol=1e-7)
    np.testing.assert_allclose(decoded[k], single_decoded, rtol=1e-6, atol=1e-7)


def test_shard_map_all_gather_and_decode():
  """Each device encodes its worker's delta, payloads are all-gathered, every worker decodes all."""
  mesh = Mesh(np.array(jax.devices()[:4]), ("workers",))
  spec = C.CompressionSpec("statistical", 2)
  x = _rng(11).standard_normal((4, 8, 32)).astype(np.float32)

  def worker(local):
    payload = C.encode(local[0], spec)
    gathered = jax.tree_util.tree_map(lambda a: jax.lax.all_gather(a, "workers"), payload)
    return jnp.mean(jax.vmap(lambda p: C.decode(p, spec, (8, 32)))(gathered), axis=0)[None]

  out = jax.jit(jax.shard_map(worker, mesh=mesh, in_specs=P("workers"), out_specs=P("workers")))(x)
  expected = np.mean([_encode_decode(x[k], spec)[1] for k in range(4)], axis=0)
  for k in range(4):
    np.testing.assert_allclose(out[k], expected, rtol=1e-5, atol=1e-6)


# ----------------------------------------------------------------------------- stacked layers


def _unscanned_tree(rng, layers=3, d=16, hidden=40):
  f = lambda *shape: rng.standard_normal(shape).astype(np.float32)
  block = lambda: {
    "attn": {"q": {"kernel": f(d, d)}, "q_norm": {"scale": f(8)}},
    "mlp": {"up": {"kernel": f(d, hidden)}, "down": {"kernel": f(hidden, d)}},
    "mlp_norm": {"scale": f(d)},
  }
  tree = {f"layers_{i}": block() for i in range(layers)}
  return tree | {"embedding": {"embedding": f(32, d)}, "final_norm": {"scale": f(d)}}


@pytest.mark.parametrize(
  "spec",
  [
    C.CompressionSpec("statistical", 2),
    C.CompressionSpec("statistical", 4, per_row=False),
    C.CompressionSpec("linear", 2),
    C.CompressionSpec("topk", topk_fraction=0.1),
  ],
  ids=lambda s: f"{s.kind}{s.bits}{'row' if s.per_row else 'tensor'}",
)
def test_stacked_leaves_are_compressed_per_layer(spec):
  """A scanned tree (layers/... with a leading L axis) is sent exactly as the unscanned one:
  per-layer rows, per-layer statistics and k, stacked norm gains uncompressed."""
  tree = _unscanned_tree(_rng(12))
  stacked = layout.stack_layers(tree)

  codec = C.TreeCodec(spec)

  @jax.jit
  def both_layouts(tree, stacked):
    ef = lambda t: codec.feedback(C.init_error(t), t, 0.9)[1]
    stacked_payloads = codec.compress(stacked)
    return {
      "payloads": codec.compress(tree),
      "stacked_payloads": stacked_payloads,
      "decoded": codec.decompress(stacked_payloads, stacked),
      "expected": layout.stack_layers(codec.roundtrip(tree)),
      "error": layout.stack_layers(ef(tree)),
      "stacked_error": ef(stacked),
      "rel_error": codec.relative_error(tree),
      "stacked_rel_error": codec.relative_error(stacked),
    }

  out = both_layouts(tree, stacked)
  payloads, stacked_payloads = out["payloads"], out["stacked_payloads"]
  assert set(stacked_payloads["layers"]["mlp_norm"]["scale"]) == {"values"}
  assert set(stacked_payloads["layers"]["attn"]["q_norm"]["scale"]) == {"values"}
  # Layer i of every stacked payload is the unscanned layer i's payload.
  for i in range(3):
    layer_i = jax.tree_util.tree_map(lambda x: x[i], stacked_payloads["layers"])
    jax.tree_util.tree_map(
      lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-7),
      layer_i,
      payloads[f"layers_{i}"],
    )
  # Same bytes on the wire, and the closed form still matches the payload.
  assert C.payload_nbytes(stacked_payloads) == C.payload_nbytes(payloads)
  assert codec.nbytes(stacked) == C.payload_nbytes(stacked_payloads)
  assert codec.nbytes(tree) == C.payload_nbytes(payloads)
  # Decoding, error feedback and the relative error agree per layer.
  close = lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-6, atol=1e-6)
  jax.tree_util.tree_map(close, out["decoded"], out["expected"])
  gain = stacked["layers"]["mlp_norm"]["scale"]
  np.testing.assert_array_equal(out["decoded"]["layers"]["mlp_norm"]["scale"], gain)
  jax.tree_util.tree_map(close, out["error"], out["stacked_error"])
  np.testing.assert_allclose(out["stacked_rel_error"], out["rel_error"], rtol=1e-5)


def test_exclusion_rules_use_the_per_layer_rank():
  tree = layout.stack_layers(_unscanned_tree(_rng(13)))
  specs = C.TreeCodec(C.CompressionSpec("statistical", 2)).leaf_specs(tree)
  assert specs["layers"]["mlp_norm"]["scale"] == C.NO_COMPRESSION
  assert specs["layers"]["mlp"]["up"]["kernel"].kind == "statistical"
  paper = C.TreeCodec(C.CompressionSpec("linear", 2), C.exclude_vectors_embedding_head)
  paper = paper.leaf_specs(tree)
  assert paper["embedding"]["embedding"] == C.NO_COMPRESSION
  assert paper["layers"]["attn"]["q"]["kernel"].kind == "linear"
  # A replaced stacked-axes rule reaches the built-in exclusion rules: with no stacked axes a
  # stacked gain (L, d) is a matrix again.
  no_stack = lambda path, leaf: 0
  specs = C.TreeCodec(C.CompressionSpec("statistical", 2), stacked_axes=no_stack).leaf_specs(tree)
  assert specs["layers"]["mlp_norm"]["scale"].kind == "statistical"


def test_relative_error_and_error_feedback_off():
  tree = _model_tree(_rng(14))
  codec = C.TreeCodec(C.CompressionSpec("statistical", 2))

  @jax.jit
  def run(tree):
    decoded = codec.roundtrip(tree)
    # Error feedback off (no buffer): C(delta) is sent and no buffer comes back.
    off = codec.feedback(None, tree, 0.9)
    return {
      "relative_error": C.relative_error(tree, decoded),
      "relative_compression_error": codec.relative_error(tree),
      "exact": C.relative_error(tree, tree),
      "off": off,
      "payloads": codec.compress(tree),
    }

  out = run(tree)
  np.testing.assert_allclose(out["relative_error"], out["relative_compression_error"], rtol=1e-6)
  assert float(out["exact"]) == 0.0
  payloads, same = out["off"]
  assert same is None
  jax.tree_util.tree_map(np.testing.assert_array_equal, payloads, out["payloads"])
