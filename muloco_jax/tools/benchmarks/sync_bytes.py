r"""Bytes one worker sends over its link per sync, by collective, bits and K, from shapes alone.

  python -m muloco_jax.tools.benchmarks.sync_bytes [--size=150m] [--workers=2,8,16] [--bits=2,4] \
    [--exclude=vectors]

For the model preset's parameters (nothing is allocated) it prints, per K, the uncompressed
mean (an all-to-all to the owners of the shared shards and an all-gather back:
2 (K-1)/K float32 copies) and, for the row-wise statistical quantizer at each bit width, both
compressed collectives of `diloco.compressed_average` (closed forms of
`diloco.compressed_sync_bytes`; tests/test_diloco.py checks them against compiled
programs and logged metrics):

  all_gather       every worker gathers all K payloads: K - 1 payloads;
  reduce_scatter   all-to-all of row chunks to their owners, owners re-quantize the average,
                   all-gather of the chunks: 2 (K-1)/K payloads (rows padded to a multiple of K).

MiB per worker per sync, and each collective's ratio to float32 and reduce_scatter's to
all_gather.
"""

from absl import app
from absl import flags
import jax

from muloco_jax import compression, config as config_lib, diloco
from muloco_jax import model as model_lib

MIB = 2**20


def table(size: str, workers, bits, exclude: str) -> list[dict]:
  shapes = jax.eval_shape(
    lambda: model_lib.init_params(model_lib.model_config(size), jax.random.key(0))
  )
  float32 = 4 * sum(x.size for x in jax.tree.leaves(shapes))
  rows = []
  for k in workers:
    mean = 2 * (k - 1) / k * float32
    row = {"K": k, "float32 mean": mean}
    for b in bits:
      spec = compression.CompressionSpec("statistical", bits=b)
      for collective in diloco.COLLECTIVES:
        sent = diloco.compressed_sync_bytes(
          shapes, spec, k, collective=collective, exclude=config_lib.EXCLUDE_RULES[exclude]
        )
        row[f"{b}-bit {collective}"] = sent["per_worker"]
    rows.append(row)
  return rows


def main(argv):
  del argv
  f = flags.FLAGS
  workers, bits = [int(k) for k in f.workers], [int(b) for b in f.bits]
  rows = table(f.size, workers, bits, f.exclude)
  print(f"{f.size}: MiB one worker sends per sync (exclude={f.exclude})")
  header = (
    ["K", "float32 mean"]
    + [f"{b}-bit {c}" for b in bits for c in diloco.COLLECTIVES]
    + [f"{b}-bit rs/ag" for b in bits]
  )
  print(" | ".join(header))
  for row in rows:
    cells = [str(row["K"]), f"{row['float32 mean'] / MIB:.1f}"]
    for b in bits:
      for c in diloco.COLLECTIVES:
        sent = row[f"{b}-bit {c}"]
        cells.append(f"{sent / MIB:.2f} ({sent / row['float32 mean']:.3f}x)")
    for b in bits:
      ratio = row[f"{b}-bit reduce_scatter"] / row[f"{b}-bit all_gather"]
      cells.append(f"{ratio:.3f}")
    print(" | ".join(cells))


if __name__ == "__main__":  # flags only here: tests import `table` beside other benchmarks
  flags.DEFINE_string("size", "150m", "Model preset.")
  flags.DEFINE_list("workers", ["2", "8", "16"], "Numbers of workers K.")
  flags.DEFINE_list("bits", ["2", "4"], "Bits of the statistical quantizer.")
  flags.DEFINE_enum("exclude", "vectors", list(config_lib.EXCLUDE_RULES), "Leaves sent in float32.")
  app.run(main)
