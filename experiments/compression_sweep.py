"""Compressed pseudogradients at K=8: final loss and bytes sent, MuLoCo vs DiLoCo (issue 6.2).

  python experiments/compression_sweep.py            # full sweep
  python experiments/compression_sweep.py --smoke    # a few steps of every cell

Compressors: none (fp32), statistical 8/4/2 bits (per row), linear (min-max) 2 bits (per row),
top-k 5% -- each with and without error feedback (decay 0.9) -- for MuLoCo (Muon inner) and DiLoCo
(AdamW inner) at the default learning rates.  1-D parameters (norm gains) are sent uncompressed.
The uncompressed K=8 cells are the k_sweep's cells with the same config (reused when present).
Resumable: finished cells (results/compression/cells/*.json) are skipped.
"""

import os
import sys

from absl import app
from absl import flags

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top

SWEEP = "compression"
METHODS = {"muloco": "MuLoCo", "diloco": "DiLoCo"}
# (label, compression overrides without error_feedback)
COMPRESSORS = (
  ("statistical-8bit", {"compression.kind": "statistical", "compression.bits": 8}),
  ("statistical-4bit", {"compression.kind": "statistical", "compression.bits": 4}),
  ("statistical-2bit", {"compression.kind": "statistical", "compression.bits": 2}),
  ("linear-2bit", {"compression.kind": "linear", "compression.bits": 2}),
  ("topk-5pct", {"compression.kind": "topk", "compression.topk_fraction": 0.05}),
)
# Run order (most informative first, so that a cut-short sweep still answers the main questions).
PRIORITY = (
  "none",
  "statistical-2bit",
  "linear-2bit",
  "statistical-4bit",
  "topk-5pct",
  "statistical-8bit",
)

# Inner learning rates: the best of the k_sweep's grid for the DP baselines (its defaults).
LRS = {"muloco": 0.04, "diloco": 6e-3}

common.define_flags()
flags.DEFINE_integer("k", 8, "Number of workers K.")
flags.DEFINE_list(
  "compressors",
  [c for c, _ in COMPRESSORS],
  "Compressors to run (the uncompressed cells always run).",
)


def cells(k, only=None):
  """(method, compressor, error_feedback, overrides) in PRIORITY order; EF-on before EF-off."""
  comps = {c: v for c, v in COMPRESSORS if only is None or c in only}
  out = []
  for ef in (True, False):
    for label in PRIORITY:
      if label != "none" and label not in comps:
        continue
      for method in METHODS:
        base = common.method_overrides(method, k, LRS[method])
        if label == "none":
          if ef:
            out.append((method, "none", None, base))
        else:
          out.append(
            (method, label, ef, {**base, **comps[label], "compression.error_feedback": ef})
          )
  return out


def _name(method, k, comp, ef, overrides):
  if comp == "none":  # the k_sweep's cell name for the same config
    return common.cell_name(method, f"K{k}", f"lr{overrides['optimizer.learning_rate']:g}")
  return common.cell_name(method, f"K{k}", comp, "ef" if ef else "noef")


def main(argv):
  del argv
  fl = flags.FLAGS
  common.setup_jax()
  k = fl.k
  results = []
  unknown = set(fl.compressors) - {c for c, _ in COMPRESSORS}
  if unknown:
    raise app.UsageError(f"--compressors: unknown {sorted(unknown)}")
  for method, comp, ef, overrides in cells(k, fl.compressors):
    name = _name(method, k, comp, ef, overrides)
    r = common.run_cell(
      SWEEP,
      name,
      overrides,
      smoke=fl.smoke,
      info=dict(method=method, K=k, compressor=comp, error_feedback=ef),
      shared_with=("k_sweep",) if comp == "none" else (),
    )
    if r is None:
      continue
    r.update(method=method, compressor=comp, error_feedback=ef)
    results.append(r)

  none = {r["method"]: r for r in results if r["compressor"] == "none"}
  for r in results:
    ref = none[r["method"]]
    # bits per parameter actually sent, relative to fp32 (32 bits) of the uncompressed cell
    r["bits_per_param"] = 32.0 * r["comm_bytes_total"] / ref["comm_bytes_total"]
    r["loss_vs_uncompressed"] = r["final_eval_loss"] - ref["final_eval_loss"]
  header = (
    ["compressor", "EF"]
    + [f"{v} loss" for v in METHODS.values()]
    + [f"{v} - uncompressed" for v in METHODS.values()]
    + ["bits/param", "bytes sent (MuLoCo)"]
  )
  table = []
  keyed = {(r["method"], r["compressor"], r["error_feedback"]): r for r in results}
  for comp, ef in [("none", None)] + [(c, e) for c, _ in COMPRESSORS for e in (True, False)]:
    if not all((m, comp, ef) in keyed for m in METHODS):
      continue  # not run (yet)
    rs = [keyed[(m, comp, ef)] for m in METHODS]
    table.append(
      [comp, "-" if ef is None else ("on" if ef else "off")]
      + [f"{r['final_eval_loss']:.4f}" for r in rs]
      + [f"{r['loss_vs_uncompressed']:+.4f}" for r in rs]
      + [f"{rs[0]['bits_per_param']:.2f}", f"{rs[0]['comm_bytes_total']:.3g}"]
    )
  s = common.scale(fl.smoke)
  notes = [
    f"K={k}, H={s['sync_every']}, {s['num_steps']} steps x {s['batch_size']} seqs x "
    f"{s['seq_len']} tokens; MuLoCo lr {LRS['muloco']} (AdamW part "
    f"{common.MUON_ADAM_LR}), DiLoCo lr {LRS['diloco']}; outer lr {common.OUTER_LR}, "
    f"momentum {common.OUTER_MOMENTUM}. bits/param = 32 x bytes sent / bytes of the "
    "uncompressed run (all K workers' payloads, all syncs; norm gains stay fp32)."
  ]
  path = common.write_results(
    SWEEP,
    results,
    [
      "method",
      "compressor",
      "error_feedback",
      "final_eval_loss",
      "loss_vs_uncompressed",
      "comm_bytes_total",
      "bits_per_param",
      "mean_compression_error",
      "wall_seconds",
    ],
    table,
    header,
    f"Compressed pseudogradients, K={k}",
    notes=notes,
  )

  series, styles = {}, {}
  stat = ["none", "statistical-8bit", "statistical-4bit", "statistical-2bit"]
  markers = {"linear-2bit": "s", "topk-5pct": "^"}
  for method, mlabel in METHODS.items():
    for ef in (True, False):
      tag = f"{mlabel} {'EF' if ef else 'no EF'}"
      color = {
        ("muloco", True): "C0",
        ("muloco", False): "C9",
        ("diloco", True): "C3",
        ("diloco", False): "C1",
      }[(method, ef)]
      rs = [
        keyed[(method, c, None if c == "none" else ef)]
        for c in stat
        if (method, c, None if c == "none" else ef) in keyed
      ]
      series[f"{tag}: statistical"] = (
        [r["bits_per_param"] for r in rs],
        [r["final_eval_loss"] for r in rs],
      )
      styles[f"{tag}: statistical"] = dict(color=color, linestyle="-" if ef else ":")
      for comp, marker in markers.items():
        if (method, comp, ef) not in keyed:
          continue
        r = keyed[(method, comp, ef)]
        series[f"{tag}: {comp}"] = ([r["bits_per_param"]], [r["final_eval_loss"]])
        styles[f"{tag}: {comp}"] = dict(color=color, marker=marker, markersize=7, linestyle="")
  common.plot_lines(
    os.path.join(path, "loss_vs_bits.png"),
    series,
    styles=styles,
    logx=True,
    title=f"Final eval loss vs bits sent per parameter (K={k})",
    xlabel="bits per parameter per sync (32 = fp32)",
    ylabel="eval loss (nats/byte)",
    xticks=[1, 2, 4, 8, 32],
  )
  print(open(os.path.join(path, "table.md")).read())


if __name__ == "__main__":
  app.run(main)
