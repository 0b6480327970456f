"""Pseudogradient compression for MuLoCo: quantizers, bit packing, payloads, error feedback.

MuLoCo (arXiv 2505.23725) lets every worker compress its pseudogradient
``delta_k = theta_ref - theta_k`` before the workers exchange them. This module holds the
compressors the paper studies, written as pure, jittable ``jax.numpy`` functions on one
tensor (they work under ``jax.jit``, ``jax.vmap`` over a leading worker axis and inside
``shard_map``), and ``TreeCodec``, which applies them to a pytree.

Compressors (``CompressionSpec.kind``), with ``n_bins = 2**bits``, bits in {1, 2, 4, 8}:

* ``"statistical"`` -- the paper's default. With m = mean(x) and s the unbiased standard
  deviation of x - m::

      scale = 6 s / n_bins                     (range_in_sigmas = 6; zero/non-finite -> 1)
      code  = clip(round((x - m) / scale + n_bins // 2), 0, n_bins - 1)
      D(code) = m + T[code],  T[b] = mean of the centred values x - m whose code is b

  An empty bin's entry is its bin centre (b - n_bins // 2) * scale (never read back, since
  no code points at it). Because T holds per-bin means of everything that fell in the bin,
  clipped outliers included, the per-bin errors sum to zero and sum(D(C(x))) == sum(x)
  (per row when per_row; exact up to float32 round-off with a float32 table).
  Note the bin centres are asymmetric about m (codes 0 .. n_bins - 1 sit at
  -n_bins/2 .. n_bins/2 - 1 scale units), exactly as in the authors' code; the table of
  means repairs the reconstruction points.
* ``"linear"`` -- min-max: scale = (max - min) / (n_bins - 1) (zero -> 1),
  code = clip(round((x - min) / scale), 0, n_bins - 1), D(code) = code * scale + min.
* ``"topk"`` -- keep k = max(1, int(n * topk_fraction)) entries of largest magnitude of the
  whole tensor; the decoded tensor is zero elsewhere. Ties go to the lower flat index
  (``jax.lax.top_k``).
* ``"none"`` -- the tensor itself in float32.

Both quantizers work per tensor or per row (``per_row=True``): the tensor is viewed as
``(shape[0], -1)`` and every row gets its own statistics; a 0-D or 1-D tensor is one row.  A
``TreeCodec`` first moves each leaf's row axis to the front (``flax_row_axis``: a Flax kernel's
output units, the authors' rows; replaceable with ``row_axis=``).

Payload format (a dict of arrays whose shapes depend only on (shape, spec), so payloads of
K workers can be all-gathered along a leading axis and decoded with ``jax.vmap``)::

    statistical: codes uint8[ceil(n*bits/8)], table <table_dtype>[R, n_bins], table_scale f32[]
    linear:      codes uint8[ceil(n*bits/8)], offset f32[R], scale f32[R]
    topk:        values f32[k], indices int32[k]
    none:        values f32[shape]

with R the number of rows (1 per tensor). Codes are bit packed little-end first: value i
of a byte sits at bit i * bits, as in the authors' ``bitpack_tensor``.

Side-data format of the statistical quantizer (a deliberate departure, documented): the
authors' code (facebookresearch/MuLoCo, ``BatchedRowiseQuantizationCompressor``) sends a
float32 mean per row plus a float32 table of n_bins centred means per row: at 2 bits a row
of 512 values costs 128 code bytes + 20 side bytes, only 13.8x fewer bytes than float32.
Only the table is needed to decode, so here the row mean is folded into the table
(T'[b] = m + T[b]) and the table is stored in float16 after division by one power-of-two
``table_scale`` per tensor (float32, 4 bytes): 128 + 8 bytes per 512-row, 15.06x. The power of
two keeps every row's entries in [-1, 1), away from float16 overflow and, unless a row is
more than 2**14 times smaller than the largest row of the tensor, out of the subnormals.
Rounding moves an entry m + T[b] by at most 2**-11 of itself: for entries within ~4 sigma
that is under a tenth of a bin width at 8 bits and negligible at 2 bits (on a Gaussian
512x512 tensor the relative error ||x - D(C(x))|| / ||x|| agrees with the float32 table to
4 digits at every bit width). With error feedback the rounding is absorbed as well, since
the residual is taken against the decoded values.
``table_dtype="float32"`` keeps the authors' float32 precision (the power-of-two division is
exact; the mean stays folded in, which saves their 4 bytes per row).
At 8 bits a per-row table of 256 entries costs as much as a 256..512-long row of codes,
so per-tensor statistics (``per_row=False``) are the sensible choice there.

Error feedback (per worker, ``error_feedback_step``; ``TreeCodec.feedback`` on a tree)::

    e <- beta * e + delta;   c = C(e);   e <- e - D(c)

The authors' outer optimizer uses ``e <- beta * e + outer_lr * delta`` (callers who want
that pass ``outer_lr * delta``). Without error feedback c = C(delta) and e is unchanged.
Excluded leaves (norm gains by default; the paper's runs also exclude the embedding and
the output head) are sent uncompressed in float32.

Stacked layers: a ``TreeCodec`` sees every leaf per layer (``muloco_jax.layout``). A leaf
with s leading layer-stack axes (a scanned model's ``layers/...``, e.g. a kernel
``(L, in, out)``) is encoded as a batch of L per-layer tensors (``jax.vmap`` of ``encode`` /
``decode`` over the stacked axes): rows, per-tensor statistics and top-k's k are those of
one layer, exactly as for the unscanned ``layers_i/...``, and the payload arrays carry the
stacked axes in front. The exclusion rules use the per-layer rank, so stacked norm gains
``(L, d)`` are sent exactly like unstacked ones.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any, Callable, NamedTuple

import jax
import jax.numpy as jnp
import numpy as np

from muloco_jax import layout

KINDS = ("none", "statistical", "linear", "topk")
BITS = (1, 2, 4, 8)
TABLE_DTYPES = ("float16", "float32")
RANGE_IN_SIGMAS = 6.0
PAPER_EXCLUDED_NAMES = ("embedding", "head")

Payload = dict[str, jax.Array]
ExcludeFn = Callable[[tuple, Any], bool]


def _check_bits(bits) -> None:
  if isinstance(bits, bool) or not isinstance(bits, (int, np.integer)) or bits not in BITS:
    raise ValueError(f"bits={bits!r} must be one of {BITS}")


@dataclasses.dataclass(frozen=True)
class CompressionSpec:
  """What to send for one tensor. Hashable, so it can be a static argument of ``jax.jit``.

  Attributes:
    kind: "none", "statistical", "linear" or "topk".
    bits: bits per code for the quantizers, one of 1, 2, 4, 8.
    per_row: quantizer statistics per row of the (shape[0], -1) view instead of per tensor
      (of each layer's tensor for a stacked leaf, its row axis first in a ``TreeCodec``;
      see the module docstring).
    topk_fraction: fraction of entries top-k keeps, in (0, 1].
    table_dtype: storage of the statistical lookup table, "float16" (default, see the
      module docstring) or "float32" (the authors' precision).
  """

  kind: str
  bits: int = 2
  per_row: bool = True
  topk_fraction: float = 0.05
  table_dtype: str = "float16"

  def __post_init__(self):
    if self.kind not in KINDS:
      raise ValueError(f"kind={self.kind!r} must be one of {KINDS}")
    _check_bits(self.bits)
    if not isinstance(self.per_row, (bool, np.bool_)):
      raise ValueError(f"per_row={self.per_row!r} must be a bool")
    fraction = self.topk_fraction
    if (
      isinstance(fraction, bool)
      or not isinstance(fraction, (int, float))
      or not 0.0 < fraction <= 1.0
    ):
      raise ValueError(f"topk_fraction={fraction!r} must be in (0, 1]")
    if self.table_dtype not in TABLE_DTYPES:
      raise ValueError(f"table_dtype={self.table_dtype!r} must be one of {TABLE_DTYPES}")

  @property
  def n_bins(self) -> int:
    return 2**self.bits


NO_COMPRESSION = CompressionSpec("none")


# ----------------------------------------------------------------------------- bit packing


def pack_bits(codes: jax.Array, bits: int) -> jax.Array:
  """Packs codes (< 2**bits) into uint8, little-end first.

  Value i of each byte occupies bits [i * bits, (i + 1) * bits); the input is flattened and
  zero padded to a multiple of 8 // bits values. Returns uint8[ceil(n * bits / 8)].
  """
  _check_bits(bits)
  per_byte = 8 // bits
  flat = jnp.ravel(codes).astype(jnp.uint8) & jnp.uint8(2**bits - 1)
  grouped = jnp.pad(flat, (0, -flat.shape[0] % per_byte)).reshape(-1, per_byte)
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  # The shifted fields do not overlap, so their sum is their bitwise or (at most 255).
  return jnp.sum(grouped << shifts, axis=1, dtype=jnp.uint8)


def unpack_bits(packed: jax.Array, bits: int, n: int) -> jax.Array:
  """Inverse of ``pack_bits``: the first n codes of ``packed`` as uint8[n]."""
  _check_bits(bits)
  per_byte = 8 // bits
  shifts = (jnp.arange(per_byte, dtype=jnp.uint8) * bits).astype(jnp.uint8)
  fields = (packed[:, None] >> shifts) & jnp.uint8(2**bits - 1)
  return fields.reshape(-1)[:n]


# ----------------------------------------------------------------------------- quantizers


def _num_rows(shape: tuple[int, ...], spec: CompressionSpec) -> int:
  return shape[0] if spec.per_row and len(shape) >= 2 else 1


def _topk_k(n: int, fraction: float) -> int:
  return max(1, int(n * fraction))


def _encode_statistical(x2: jax.Array, spec: CompressionSpec) -> Payload:
  n_rows, row_len = x2.shape
  n_bins, half = spec.n_bins, spec.n_bins // 2
  mean = jnp.mean(x2, axis=1, keepdims=True)
  centred = x2 - mean
  std = jnp.sqrt(jnp.sum(centred * centred, axis=1, keepdims=True) / max(row_len - 1, 1))
  scale = RANGE_IN_SIGMAS * std / n_bins
  scale = jnp.where(jnp.isfinite(scale) & (scale != 0), scale, 1.0)
  codes = jnp.clip(jnp.round(centred / scale + half), 0, n_bins - 1).astype(jnp.int32)
  bins = jnp.arange(n_bins)

  def scattered(codes, centred):  # serialises on colliding updates on GPU/TPU
    zeros, rows = jnp.zeros((n_rows, n_bins), jnp.float32), jnp.arange(n_rows)[:, None]
    return zeros.at[rows, codes].add(centred), zeros.at[rows, codes].add(1.0)

  def masked(codes, centred):  # one masked sum per bin, fused into one pass over each row
    hit = codes[:, None, :] == bins[:, None]
    sums = jnp.sum(jnp.where(hit, centred[:, None, :], 0.0), axis=2)
    return sums, jnp.sum(hit, axis=2).astype(jnp.float32)

  def sorted_runs(codes, centred):
    # Each row sorted by code; a running sum that restarts at every new code (a segmented
    # scan: a bin's sum carries only its own round-off), read at each bin's last entry.
    codes, values = jax.lax.sort((codes, centred), dimension=1, num_keys=1)
    starts = jnp.pad(codes[:, 1:] != codes[:, :-1], ((0, 0), (1, 0)), constant_values=True)
    restart_sum = lambda a, b: (a[0] | b[0], jnp.where(b[0], b[1], a[1] + b[1]))
    _, running = jax.lax.associative_scan(restart_sum, (starts, values), axis=1)
    upto = jax.vmap(lambda c: jnp.searchsorted(c, bins, side="right"))(codes)  # codes <= b
    sums = jnp.take_along_axis(running, jnp.maximum(upto - 1, 0), axis=1)  # empty bins: unused
    return sums, jnp.diff(upto, axis=1, prepend=0).astype(jnp.float32)

  # Per-bin sums and counts of the centred values of each row.  A scatter-add into 2-256 bins
  # collides on GPU/TPU: there, masked sums up to 16 bins and a sort for 256.  XLA:CPU runs the
  # scatter as a plain loop, as fast as masked sums at 4 bins and faster beyond (at 2 bins
  # masked sums take the encode down to 0.65-0.85x of its time).
  sums, counts = jax.lax.platform_dependent(
    codes,
    centred,
    cpu=masked if n_bins == 2 else scattered,
    default=masked if n_bins <= 16 else sorted_runs,
  )
  centres = (jnp.arange(n_bins, dtype=jnp.float32) - half) * scale
  table = mean + jnp.where(counts > 0, sums / jnp.maximum(counts, 1.0), centres)
  # One power of two per tensor brings the table into [-1, 1) before the narrow cast.
  peak = jnp.max(jnp.abs(table))
  _, exponent = jnp.frexp(jnp.where(jnp.isfinite(peak) & (peak > 0), peak, 1.0))
  table_scale = jnp.ldexp(jnp.float32(1.0), exponent)
  return {
    "codes": pack_bits(codes, spec.bits),
    "table": (table / table_scale).astype(spec.table_dtype),
    "table_scale": table_scale,
  }


def _decode_statistical(payload: Payload, spec: CompressionSpec, n_rows: int, n: int) -> jax.Array:
  codes = unpack_bits(payload["codes"], spec.bits, n).reshape(n_rows, -1).astype(jnp.int32)
  table = payload["table"].astype(jnp.float32) * payload["table_scale"]
  return jnp.take_along_axis(table, codes, axis=1)


def _encode_linear(x2: jax.Array, spec: CompressionSpec) -> Payload:
  low = jnp.min(x2, axis=1)
  scale = (jnp.max(x2, axis=1) - low) / (spec.n_bins - 1)
  scale = jnp.where(scale == 0, 1.0, scale)
  codes = jnp.round((x2 - low[:, None]) / scale[:, None])
  codes = jnp.clip(codes, 0, spec.n_bins - 1).astype(jnp.uint8)
  return {"codes": pack_bits(codes, spec.bits), "offset": low, "scale": scale}


def _decode_linear(payload: Payload, spec: CompressionSpec, n_rows: int, n: int) -> jax.Array:
  codes = unpack_bits(payload["codes"], spec.bits, n).reshape(n_rows, -1).astype(jnp.float32)
  return codes * payload["scale"][:, None] + payload["offset"][:, None]


def _encode_topk(x: jax.Array, spec: CompressionSpec) -> Payload:
  flat = jnp.ravel(x)
  k = _topk_k(flat.shape[0], spec.topk_fraction)
  # On TPU, whose sort-based top-k is slow, `approx_max_k` (arXiv 2206.14286, expected recall
  # 0.95: an entry may give way to a slightly smaller one; error feedback carries it to the
  # next round); elsewhere the exact `top_k`.
  _, indices = jax.lax.platform_dependent(
    jnp.abs(flat),
    tpu=lambda a: jax.lax.approx_max_k(a, k),
    default=lambda a: jax.lax.top_k(a, k),
  )
  return {"values": flat[indices], "indices": indices.astype(jnp.int32)}


def _decode_topk(payload: Payload, n: int) -> jax.Array:
  # Top-k's indices are distinct: a scatter without collisions.
  zeros = jnp.zeros((n,), jnp.float32)
  return zeros.at[payload["indices"]].set(payload["values"], unique_indices=True)


def encode(x: jax.Array, spec: CompressionSpec) -> Payload:
  """Compresses one tensor into a payload (see the module docstring for its layout).

  Statistics are computed in float32. Payload shapes depend only on (x.shape, spec).
  """
  x = jnp.asarray(x).astype(jnp.float32)
  if spec.kind == "none":
    return {"values": x}
  if spec.kind == "topk":
    return _encode_topk(x, spec)
  x2 = x.reshape(_num_rows(x.shape, spec), -1)
  if spec.kind == "statistical":
    return _encode_statistical(x2, spec)
  return _encode_linear(x2, spec)


def decode(
  payload: Payload, spec: CompressionSpec, shape: tuple[int, ...], dtype=jnp.float32
) -> jax.Array:
  """Reconstructs the tensor of the given shape and dtype from ``encode``'s payload."""
  shape = tuple(shape)
  n = math.prod(shape)
  if spec.kind == "none":
    flat = payload["values"]
  elif spec.kind == "topk":
    flat = _decode_topk(payload, n)
  elif spec.kind == "statistical":
    flat = _decode_statistical(payload, spec, _num_rows(shape, spec), n)
  else:
    flat = _decode_linear(payload, spec, _num_rows(shape, spec), n)
  return flat.reshape(shape).astype(dtype)


# ----------------------------------------------------------------------------- byte counts


def payload_nbytes(payload: Any) -> int:
  """Bytes on the wire: the sum of the array sizes in any pytree of payloads.

  Works on concrete arrays and on ``jax.ShapeDtypeStruct`` (e.g. from ``jax.eval_shape``).
  """
  return sum(
    math.prod(leaf.shape) * np.dtype(leaf.dtype).itemsize
    for leaf in jax.tree_util.tree_leaves(payload)
  )


def compressed_nbytes(shape: tuple[int, ...], spec: CompressionSpec) -> int:
  """Closed form of the payload size of one tensor, independent of ``encode``.

  none: 4 n;  topk: 8 k (fp32 value + int32 index);
  statistical: ceil(n bits / 8) + R 2**bits itemsize(table_dtype) + 4;
  linear: ceil(n bits / 8) + 8 R  (fp32 min and scale per row).
  """
  n = math.prod(shape)
  if spec.kind == "none":
    return 4 * n
  if spec.kind == "topk":
    return 8 * _topk_k(n, spec.topk_fraction)
  code_bytes = -(-n * spec.bits // 8)
  n_rows = _num_rows(tuple(shape), spec)
  if spec.kind == "statistical":
    return code_bytes + n_rows * spec.n_bins * np.dtype(spec.table_dtype).itemsize + 4
  return code_bytes + 8 * n_rows


# ----------------------------------------------------------------------------- pytrees


def exclude_vectors(
  path: tuple, leaf: Any, *, stacked_axes: layout.StackedAxesFn = layout.stacked_axes
) -> bool:
  """Default labelling rule: leaves of per-layer rank <= 1 (norm gains, stacked or not;
  scalars) are sent in fp32."""
  return layout.layer_ndim(path, leaf, stacked_axes=stacked_axes) <= 1


def exclude_vectors_embedding_head(
  path: tuple, leaf: Any, *, stacked_axes: layout.StackedAxesFn = layout.stacked_axes
) -> bool:
  """The paper's rule: also send the embedding and the output head uncompressed.

  A leaf is the embedding or the head when a component of its path is exactly
  "embedding" or "head" (``PAPER_EXCLUDED_NAMES``).
  """
  return exclude_vectors(path, leaf, stacked_axes=stacked_axes) or any(
    name in PAPER_EXCLUDED_NAMES for name in layout.path_names(path)
  )


def _bind(exclude: ExcludeFn, stacked_axes: layout.StackedAxesFn) -> ExcludeFn:
  """The built-in exclusion rules follow the codec's ``stacked_axes`` rule."""
  if exclude in (exclude_vectors, exclude_vectors_embedding_head):
    return lambda path, leaf: exclude(path, leaf, stacked_axes=stacked_axes)
  return exclude


def _per_layer(fn: Callable, num_stacked: int) -> Callable:
  """``fn`` of one layer mapped over ``num_stacked`` leading layer-stack axes."""
  for _ in range(num_stacked):
    fn = jax.vmap(fn)
  return fn


RowAxisFn = Callable[[tuple, Any], int]


def flax_row_axis(
  path: tuple, leaf: Any, *, stacked_axes: layout.StackedAxesFn = layout.stacked_axes
) -> int:
  """Default rule: the per-layer axis whose entries are the quantizers' rows.

  A Flax kernel (a leaf named "kernel" of per-layer rank >= 2, ``(in, ..., out)``) has one row
  per output unit, its last axis, as the authors' PyTorch weights ``(out, in)`` have theirs
  first; every other leaf its first axis (the embedding ``(V, D)``: one row per token).
  """
  ndim = layout.layer_ndim(path, leaf, stacked_axes=stacked_axes)
  names = layout.path_names(path)
  return ndim - 1 if ndim >= 2 and names and names[-1] == "kernel" else 0


class _Leaf(NamedTuple):
  """How one leaf is compressed: its spec, stacked axes, per-layer shape and row axis."""

  array: Any
  spec: "CompressionSpec"
  num_stacked: int
  shape: tuple
  axis: int

  def rows(self, x):
    """One layer with the row axis first (the view ``encode`` takes)."""
    return jnp.moveaxis(x, self.axis, 0) if x.ndim else x

  def unrows(self, y):
    return jnp.moveaxis(y, 0, self.axis) if y.ndim else y

  @property
  def rows_shape(self) -> tuple:
    shape = list(self.shape)
    return tuple(shape[self.axis : self.axis + 1] + shape[: self.axis] + shape[self.axis + 1 :])

  def per_layer(self, fn: Callable) -> Callable:
    return _per_layer(fn, self.num_stacked)


def _split_layer(x: jax.Array, num_chunks: int) -> jax.Array:
  x = jnp.reshape(x, (1,)) if x.ndim == 0 else x
  rows = -(-x.shape[0] // num_chunks)
  x = jnp.pad(x, [(0, rows * num_chunks - x.shape[0])] + [(0, 0)] * (x.ndim - 1))
  return x.reshape((num_chunks, rows) + x.shape[1:])


@dataclasses.dataclass(frozen=True)
class TreeCodec:
  """How a pytree is sent: every leaf with ``spec``, but the excluded ones in float32.

  A leaf with stacked layer axes (``stacked_axes``) is encoded per layer, the payload arrays
  carrying the stacked axes in front, and each layer with its ``row_axis`` first
  (``flax_row_axis``: a kernel's rows are its output units).  The methods take one worker's
  tree: call them per worker (under ``jax.vmap`` / ``shard_map``).  Hashable, so it can be a
  static argument of ``jax.jit``.

  Attributes:
    spec: what to send for a compressed leaf.
    exclude: ``exclude(path, leaf)`` true: the leaf is sent uncompressed
      (``NO_COMPRESSION``).  The built-in rules (``exclude_vectors``,
      ``exclude_vectors_embedding_head``) follow ``stacked_axes``; a custom one applies its own.
    stacked_axes: the rule giving a leaf's leading layer-stack axes (``muloco_jax.layout``).
    row_axis: the rule giving the per-layer axis whose entries are the quantizers' rows.
  """

  spec: CompressionSpec
  exclude: ExcludeFn = exclude_vectors
  stacked_axes: layout.StackedAxesFn = layout.stacked_axes
  row_axis: RowAxisFn = flax_row_axis

  def _plan(self, tree: Any) -> tuple[list[_Leaf], Any]:
    """Flattened leaves, each a ``_Leaf``, and the treedef."""
    exclude, row_axis = _bind(self.exclude, self.stacked_axes), self.row_axis
    if row_axis is flax_row_axis:
      row_axis = functools.partial(flax_row_axis, stacked_axes=self.stacked_axes)
    path_leaves, treedef = jax.tree_util.tree_flatten_with_path(tree)
    plan = []
    for path, leaf in path_leaves:
      shape = layout.layer_shape(path, leaf, stacked_axes=self.stacked_axes)
      leaf_spec = NO_COMPRESSION if exclude(path, leaf) else self.spec
      axis = int(row_axis(path, leaf)) if shape else 0
      if shape and not 0 <= axis < len(shape):
        raise ValueError(
          f"row_axis gives axis {axis} for {jax.tree_util.keystr(tuple(path))} of per-layer "
          f"shape {shape}"
        )
      plan.append(_Leaf(leaf, leaf_spec, len(np.shape(leaf)) - len(shape), shape, axis))
    return plan, treedef

  def leaf_specs(self, tree: Any) -> Any:
    """The spec each leaf is sent with: ``NO_COMPRESSION`` where ``exclude(path, leaf)``."""
    plan, treedef = self._plan(tree)
    return jax.tree_util.tree_unflatten(treedef, [leaf.spec for leaf in plan])

  def compress(self, tree: Any) -> Any:
    """C(tree): ``tree``'s structure with a payload dict per leaf."""
    plan, treedef = self._plan(tree)
    payloads = [
      leaf.per_layer(lambda x, leaf=leaf: encode(leaf.rows(x), leaf.spec))(leaf.array)
      for leaf in plan
    ]
    return jax.tree_util.tree_unflatten(treedef, payloads)

  def decompress(self, payloads: Any, like: Any) -> Any:
    """D(payloads), the inverse of ``compress``; ``like`` (arrays or ShapeDtypeStructs) gives
    shapes and dtypes (and, through its paths, the stacked layer axes and row axes)."""
    plan, treedef = self._plan(like)

    def decoder(leaf):
      return lambda p: leaf.unrows(decode(p, leaf.spec, leaf.rows_shape, leaf.array.dtype))

    decoded = [
      leaf.per_layer(decoder(leaf))(payload)
      for leaf, payload in zip(plan, treedef.flatten_up_to(payloads))
    ]
    return jax.tree_util.tree_unflatten(treedef, decoded)

  def roundtrip(self, tree: Any) -> Any:
    """D(C(tree)): what the receivers reconstruct (also the authors' re-quantization after
    reduce)."""
    return self.decompress(self.compress(tree), tree)

  def feedback(self, error: Any, tree: Any, decay: float) -> tuple[Any, Any]:
    """One error-feedback step on every leaf (``error_feedback_step``, per layer, row axis
    first): ``e <- decay e + x;  c = C(e);  e <- e - D(c)``.  Returns (payloads c, new e).

    Excluded leaves are sent exactly, so their error stays zero.  ``error`` None: no error
    feedback, ``(compress(tree), None)``.
    """
    if error is None:
      return self.compress(tree), None
    plan, treedef = self._plan(tree)

    def step(leaf):
      def one_layer(e, x):
        payload, e = error_feedback_step(leaf.rows(e), leaf.rows(x), leaf.spec, decay)
        return payload, leaf.unrows(e)

      return leaf.per_layer(one_layer)

    out = [step(leaf)(e, leaf.array) for e, leaf in zip(treedef.flatten_up_to(error), plan)]
    payloads = jax.tree_util.tree_unflatten(treedef, [payload for payload, _ in out])
    return payloads, jax.tree_util.tree_unflatten(treedef, [e for _, e in out])

  def nbytes(self, tree: Any) -> int:
    """Closed-form bytes one worker sends for ``tree``: the sum over leaves and layers of
    ``compressed_nbytes`` of the per-layer shape, row axis first."""
    plan, _ = self._plan(tree)
    return sum(
      math.prod(np.shape(leaf.array)[: leaf.num_stacked])
      * compressed_nbytes(leaf.rows_shape, leaf.spec)
      for leaf in plan
    )

  def relative_error(self, tree: Any) -> jax.Array:
    """||tree - D(C(tree))|| / ||tree|| over all leaves (0 for a zero tree)."""
    return relative_error(tree, self.roundtrip(tree))

  def split_rows(self, tree: Any, num_chunks: int) -> Any:
    """Every leaf cut into ``num_chunks`` blocks of whole rows, stacked on a new leading axis.

    One layer's tensor with R rows along its ``row_axis`` (a scalar counts as one) is zero
    padded to ``num_chunks * ceil(R / num_chunks)`` rows; chunk j holds rows
    ``[j r, (j + 1) r)``, ``r = ceil(R / num_chunks)``, and keeps the layer's axis order.  A
    stacked leaf ``(L, ...)`` gives ``(num_chunks, L, ...)``: each chunk is again a tree of
    per-layer tensors with the same paths, so every method applies to it (``jax.vmap`` over the
    chunk axis), with the same rules.  Per-row statistics of a chunk are those of the whole
    tensor.  ``join_rows`` inverts.
    """
    plan, treedef = self._plan(tree)

    def split(leaf):
      def one_layer(x):
        chunks = _split_layer(leaf.rows(x), num_chunks)
        return jax.vmap(leaf.unrows)(chunks) if x.ndim else chunks

      return jnp.moveaxis(leaf.per_layer(one_layer)(leaf.array), leaf.num_stacked, 0)

    return jax.tree_util.tree_unflatten(treedef, [split(leaf) for leaf in plan])

  def join_rows(self, chunks: Any, like: Any) -> Any:
    """Inverse of ``split_rows``: the chunks put back together, padding dropped; ``like``
    (arrays or ShapeDtypeStructs) gives the leaves' shapes."""
    plan, treedef = self._plan(like)

    def join(leaf, chunk):
      rows = leaf.shape[leaf.axis] if leaf.shape else 1

      def one_layer(y):
        y = jax.vmap(leaf.rows)(y) if leaf.shape else y
        return leaf.unrows(y.reshape((-1,) + y.shape[2:])[:rows].reshape(leaf.rows_shape))

      return leaf.per_layer(one_layer)(jnp.moveaxis(chunk, 0, leaf.num_stacked))

    return jax.tree_util.tree_unflatten(
      treedef, [join(leaf, c) for leaf, c in zip(plan, treedef.flatten_up_to(chunks))]
    )


def relative_error(original: Any, decoded: Any) -> jax.Array:
  """||original - decoded|| / ||original|| over all leaves of two like-shaped trees, in
  float32 (0 when ``original`` is zero)."""
  as32 = lambda t: [x.astype(jnp.float32) for x in jax.tree_util.tree_leaves(t)]
  originals, decodeds = as32(original), as32(decoded)
  err = sum(jnp.sum(jnp.square(a - b)) for a, b in zip(originals, decodeds))
  norm = sum(jnp.sum(jnp.square(a)) for a in originals)
  return jnp.where(norm > 0, jnp.sqrt(err / jnp.where(norm > 0, norm, 1.0)), 0.0)


# ----------------------------------------------------------------------------- error feedback


def init_error(tree: Any) -> Any:
  """A zero float32 error-feedback buffer shaped like ``tree``."""
  return jax.tree_util.tree_map(lambda x: jnp.zeros(x.shape, jnp.float32), tree)


def error_feedback_step(
  error: jax.Array, delta: jax.Array, spec: CompressionSpec, beta: float, use_ef: bool = True
) -> tuple[Payload, jax.Array]:
  """One worker's compression of one tensor with error feedback.

  With ``use_ef``: e <- beta e + delta; c = C(e); e <- e - D(c); returns (c, e).
  Without: returns (C(delta), error) with the buffer untouched.
  """
  if not use_ef:
    return encode(delta, spec), error
  error = beta * error + delta.astype(jnp.float32)
  payload = encode(error, spec)
  return payload, error - decode(payload, spec, error.shape, jnp.float32)
