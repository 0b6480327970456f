r"""Quantizer throughput: encode (quantize + pack) of a preset's whole pseudogradient, in GB/s.

  python -m muloco_jax.tools.benchmarks.quantize [--size=150m] [--repeats=5]

Times `compression.TreeCodec.compress` (per leaf: statistics, codes, per-bin table, bit packing;
norm gains sent as they are) of a random float32 pseudogradient shaped as the preset's
parameters, for each compressor, against two memory-bandwidth probes in the same run: a sum
over the tree (reads it once) and x -> 2 x (reads and writes it).  GB/s = bytes of the float32
pseudogradient / median time; every round runs every call in a fresh random order
(`newton_schulz.round_times`).

The statistical quantizer's per-bin sums run as a scatter-add, masked sums or a sort
depending on the platform and bit width (`compression._encode_statistical`).  This run checks
that every formulation gives the scatter-add's tables up to float32 round-off: on the hidden
matrices of the first layer and 4096 rows of the embedding, each `lax.platform_dependent`
branch is forced in turn (the GPU/TPU branch runs on this CPU), and the tables are compared
with a scatter-add computed here from the payload's codes, in units of each row's standard
deviation; the codes must be equal.
"""

import functools
from unittest import mock

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np

from muloco_jax import compression
from muloco_jax import model as model_lib
from muloco_jax.tools.benchmarks.newton_schulz import round_times

_SIZE = flags.DEFINE_string(
  "size", "150m", "Model preset whose parameters shape the pseudogradient."
)
_REPEATS = flags.DEFINE_integer("repeats", 5, "Rounds of timed runs (median).")

SPECS = (
  compression.CompressionSpec("statistical", bits=1),
  compression.CompressionSpec("statistical", bits=2),
  compression.CompressionSpec("statistical", bits=4),
  compression.CompressionSpec("statistical", bits=8),
  compression.CompressionSpec("statistical", bits=8, per_row=False),
  compression.CompressionSpec("linear", bits=2),
  compression.CompressionSpec("topk", topk_fraction=0.05),
)


def pseudogradient(size):
  """Random normal float32 leaves shaped as the preset's (unscanned) parameters."""
  config = model_lib.model_config(size, scan_layers=False)
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  leaves, treedef = jax.tree.flatten(shapes)
  keys = jax.random.split(jax.random.key(1), len(leaves))
  return treedef.unflatten([1e-3 * jax.random.normal(k, s.shape) for k, s in zip(keys, leaves)])


def _branch(name, *args, **branches):
  """`lax.platform_dependent` that takes the branch for platform `name` (else `default`)."""
  return branches.get(name, branches["default"])(*args)


def encoder(spec, platform=None):
  """Jitted `TreeCodec(spec).compress`; with `platform`, traced with every
  `lax.platform_dependent` taking that platform's branch, whatever runs it."""
  encode = compression.TreeCodec(spec).compress
  if platform is None:
    return jax.jit(encode)

  def forced(tree):
    with mock.patch.object(jax.lax, "platform_dependent", functools.partial(_branch, platform)):
      return encode(tree)

  return jax.jit(forced)


def scatter_deviation(tree, spec, payloads):
  """Largest |T - T_scatter| / std over the rows of every compressed leaf, T_scatter being
  mean + (per-bin sums / counts) of the row, by a scatter-add over the payload's codes."""
  worst = 0.0
  for x, payload in zip(jax.tree.leaves(tree), jax.tree.leaves(payloads, is_leaf=_is_payload)):
    if "table" not in payload:
      continue
    n_rows = compression._num_rows(x.shape, spec)
    x2 = np.asarray(x, np.float32).reshape(n_rows, -1)
    codes = np.asarray(compression.unpack_bits(payload["codes"], spec.bits, x.size))
    codes = codes.reshape(n_rows, -1).astype(np.int64)
    mean = x2.mean(axis=1, keepdims=True)
    rows = np.broadcast_to(np.arange(n_rows)[:, None], codes.shape)
    sums, counts = np.zeros((n_rows, spec.n_bins)), np.zeros((n_rows, spec.n_bins))
    np.add.at(sums, (rows, codes), x2 - mean)
    np.add.at(counts, (rows, codes), 1.0)
    table = np.asarray(payload["table"], np.float64) * float(payload["table_scale"])
    deviation = np.abs(table - mean - sums / np.maximum(counts, 1.0)) / x2.std(axis=1)[:, None]
    worst = max(worst, float(np.max(np.where(counts > 0, deviation, 0.0))))
  return worst


def _is_payload(x):
  return isinstance(x, dict) and ("codes" in x or "values" in x)


def check_formulations(tree, spec):
  """(codes equal for the CPU and the GPU/TPU branches, largest table deviation of either from
  the scatter-add) on the first layer's hidden matrices and 4096 rows of the embedding, as a
  flat dict of matrices (rows: their first axis)."""
  sample = {
    jax.tree_util.keystr(path): leaf
    for path, leaf in jax.tree_util.tree_leaves_with_path(tree["layers_0"])
    if leaf.ndim == 2
  }
  sample["embedding"] = tree["embedding"]["embedding"][:4096]
  spec = compression.CompressionSpec(spec.kind, spec.bits, spec.per_row, table_dtype="float32")
  payloads = [encoder(spec, platform)(sample) for platform in ("cpu", "cuda")]
  codes = [jax.tree.leaves({k: p["codes"] for k, p in ps.items()}) for ps in payloads]
  same_codes = all(np.array_equal(a, b) for other in codes[1:] for a, b in zip(codes[0], other))
  return same_codes, max(scatter_deviation(sample, spec, p) for p in payloads)


def main(argv):
  del argv
  tree = pseudogradient(_SIZE.value)
  nbytes = sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(tree))
  leaves = lambda t: jax.tree.leaves(t)
  probes = {
    "read: sum of every leaf": (jax.jit(lambda t: sum(jnp.sum(x) for x in leaves(t))), 1),
    "read + write: x -> 2 x": (jax.jit(lambda t: jax.tree.map(lambda x: 2 * x, t)), 2),
  }
  groups = [[(fn, (tree,), 1)] for fn, _ in probes.values()]
  groups += [[(encoder(spec), (tree,), 1)] for spec in SPECS]
  times = [np.median(t) for [t] in round_times(groups, _REPEATS.value)]

  print(
    f"{_SIZE.value} pseudogradient: {nbytes / 1e9:.3f} GB float32 in {len(leaves(tree))} "
    f"leaves; {_REPEATS.value} rounds; {jax.devices()[0].device_kind} x{jax.device_count()}"
  )
  print()
  print("| memory-bandwidth probe | ms | GB/s |")
  print("|---|---|---|")
  for (name, (_, passes)), t in zip(probes.items(), times):
    print(f"| {name} | {1e3 * t:.0f} | {passes * nbytes / t / 1e9:.2f} |")
  read_rate = nbytes / times[0]
  print()
  print("| compressor | sent (MB) | encode (ms) | GB/s | / read probe |")
  print("|---|---|---|---|---|")
  for spec, t in zip(SPECS, times[len(probes) :]):
    name = spec.kind if spec.kind == "topk" else f"{spec.kind} {spec.bits}-bit"
    name += "" if spec.kind == "topk" or spec.per_row else " per tensor"
    sent = compression.TreeCodec(spec).nbytes(tree) / 1e6
    print(
      f"| {name} | {sent:.1f} | {1e3 * t:.0f} | {nbytes / t / 1e9:.2f} | "
      f"{nbytes / t / read_rate:.2f} |"
    )
  print()
  for spec in SPECS:
    if spec.kind == "statistical":
      same_codes, deviation = check_formulations(tree, spec)
      print(
        f"statistical {spec.bits}-bit{'' if spec.per_row else ' per tensor'}: the CPU and "
        f"GPU/TPU branches give {'equal' if same_codes else 'DIFFERENT'} codes; tables within "
        f"{deviation:.1e} std of the scatter-add's."
      )


if __name__ == "__main__":
  app.run(main)
