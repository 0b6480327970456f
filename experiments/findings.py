"""Verdicts on the paper's findings from the reproduction's cells (issue 14), and their tables.

Each finding is a per-seed effect, signed so that the paper's claim is positive, over the seeds
that finished for every cell it compares (cells of one seed share the initialisation and the data
order, so the difference is paired).  The verdict follows one rule (`verdict`): with n seeds, mean
m and sample standard deviation s of the effect, "reproduced" if m > 2 s / sqrt(n),
"contradicted" if m < -2 s / sqrt(n), otherwise (or with fewer than 2 seeds) "inconclusive".

Claims of equality ("lossless", "matches") are tested as non-inferiority within a stated margin:
the effect is margin - (loss increase), with margin = MARGIN x the reference loss; "near-lossless"
allows twice that, and "degrades" means the increase exceeds the margin.

`report` writes experiments/results/summary.json, results/reproduction/{summary,results}.md and
plots with error bars (mean +- std over seeds), and replaces the tables between the markers
`<!-- summary:begin -->` and `<!-- summary:end -->` in experiments/README.md (the one copy: the
top-level README links to it).
"""

from __future__ import annotations

import math
import os

import numpy as np

from experiments import common

MARGIN = 0.005  # 0.5% of the reference loss: "lossless" / "matches"
LABELS = {
  "dp_adamw": "DP AdamW",
  "dp_muon": "DP Muon",
  "diloco": "DiLoCo (AdamW inner)",
  "muloco": "MuLoCo (Muon inner)",
}
COMPRESSOR_LABELS = {
  "stat4": "statistical 4-bit, per row",
  "stat2": "statistical 2-bit, per row",
  "linear2": "linear 2-bit, per row",
  "linear2_tensor": "linear 2-bit, per tensor",
  "topk2": "top-k 2%",
}
BEGIN, END = "<!-- summary:begin -->", "<!-- summary:end -->"


def verdict(effects) -> tuple[float, float, int, str]:
  """(mean, sample std, n, verdict) of per-seed effects by the rule in the module docstring."""
  x = np.asarray(effects, np.float64)
  n = len(x)
  if n == 0:
    return math.nan, math.nan, 0, "inconclusive"
  mean = float(x.mean())
  std = float(x.std(ddof=1)) if n > 1 else math.nan
  if n < 2:
    return mean, std, n, "inconclusive"
  bar = 2 * std / math.sqrt(n)
  if mean > bar:
    return mean, std, n, "reproduced"
  if mean < -bar:
    return mean, std, n, "contradicted"
  return mean, std, n, "inconclusive"


def paired(effect, *runs: dict) -> list[float]:
  """effect(*values) for every seed present in all `runs` ({seed: value})."""
  seeds = sorted(set.intersection(*(set(r) for r in runs))) if runs else []
  return [effect(*(r[s] for r in runs)) for s in seeds]


def seed_losses(runs: dict) -> dict:
  return {int(s): r["final_eval_loss"] for s, r in runs.items() if r is not None}


def method_losses(chosen: dict, method: str, k: int) -> dict | None:
  """{seed: loss} of a method's chosen setting at K (the DP baselines at any K), None if it
  was not chosen (yet)."""
  c = chosen.get((method, 0 if method.startswith("dp_") else k))
  return None if c is None else seed_losses(c.get("seeds", {}))


def finding(text, paper, effects, definition) -> dict:
  mean, std, n, v = verdict(effects)
  return dict(
    finding=text,
    paper=paper,
    effect_mean=mean,
    effect_std=std,
    n_seeds=n,
    verdict=v,
    effect=definition,
    per_seed=list(effects),
  )


def findings(chosen: dict, runs: dict) -> list[dict]:
  """Every finding the issue lists, from whatever cells are finished."""
  loss = {key: seed_losses(c.get("seeds", {})) for key, c in chosen.items()}
  ks = sorted(k for m, k in loss if m == "muloco")
  out = []
  dp_adamw, dp_muon = loss.get(("dp_adamw", 0), {}), loss.get(("dp_muon", 0), {})
  out.append(
    finding(
      "DP Muon reaches a lower loss than DP AdamW",
      "DP Muon < DP AdamW (every size)",
      paired(lambda a, m: a - m, dp_adamw, dp_muon),
      "L(DP AdamW) - L(DP Muon)",
    )
  )
  for method, dp, label, dp_label in (
    ("muloco", dp_muon, "MuLoCo", "DP Muon"),
    ("diloco", dp_adamw, "DiLoCo", "DP AdamW"),
  ):
    out.append(
      finding(
        f"{label} K=1 is at least as good as {dp_label}",
        f"{label} K=1 <= {dp_label}",
        paired(lambda d, x: d - x, dp, loss.get((method, 1), {})),
        f"L({dp_label}) - L({label} K=1)",
      )
    )
  for k in ks:
    out.append(
      finding(
        f"MuLoCo beats DiLoCo at K={k}",
        "MuLoCo < DiLoCo at every K",
        paired(lambda d, m: d - m, loss.get(("diloco", k), {}), loss.get(("muloco", k), {})),
        f"L(DiLoCo K={k}) - L(MuLoCo K={k})",
      )
    )
  for k in ks[1:]:
    out.append(
      finding(
        f"MuLoCo's gap to its DP baseline grows less than DiLoCo's from K=1 to K={k}",
        "MuLoCo's gap to DP grows more slowly with K",
        paired(
          lambda d1, dk, m1, mk: (dk - d1) - (mk - m1),
          *(loss.get((m, kk), {}) for m in ("diloco", "muloco") for kk in (1, k)),
        ),
        f"[L(DiLoCo K={k}) - L(DiLoCo K=1)] - [L(MuLoCo K={k}) - L(MuLoCo K=1)] "
        "(the DP baselines cancel)",
      )
    )
  out += compression_findings(chosen, runs)
  out += streaming_findings(runs.get("streaming", {}))
  out += overlap_findings(runs.get("overlap", {}))
  out += directional_findings(runs.get("directional", {}))
  return out


def compression_reference(chosen, runs):
  """(K, {seed: loss} of uncompressed MuLoCo at that K) of the compression stage (run at the
  largest K), or None before it ran."""
  k = max((k for m, k in chosen if m == "muloco"), default=None)
  if not runs.get("compression") or k is None:
    return None
  return k, seed_losses(chosen[("muloco", k)]["seeds"])


def compression_findings(chosen, runs) -> list[dict]:
  reference = compression_reference(chosen, runs)
  if reference is None:
    return []
  k, none = reference
  comp = runs["compression"]
  lossy = {c: seed_losses(r) for c, r in comp.items()}
  out = []
  pct = f"{100 * MARGIN:g}%"
  claims = (
    ("stat4", "lossless", MARGIN, "4-bit compression with error feedback is lossless"),
    (
      "stat2",
      "near-lossless",
      2 * MARGIN,
      "2-bit statistical with error feedback is nearly lossless",
    ),
  )
  for label, word, margin, paper in claims:
    out.append(
      finding(
        f"MuLoCo K={k}, {COMPRESSOR_LABELS[label]} + EF is {word} "
        f"(loss increase < {100 * margin:g}%)",
        paper,
        paired(lambda n, c, m=margin: m * n - (c - n), none, lossy.get((label, True), {})),
        f"{100 * margin:g}% x L(none) - [L({label} EF) - L(none)]",
      )
    )
  for label in ("linear2", "linear2_tensor"):
    out.append(
      finding(
        f"MuLoCo K={k}, {COMPRESSOR_LABELS[label]} + EF degrades (loss increase > {pct})",
        "2-bit linear quantization degrades",
        paired(lambda n, c: (c - n) - MARGIN * n, none, lossy.get((label, True), {})),
        f"[L({label} EF) - L(none)] - {pct} x L(none)",
      )
    )
  out.append(
    finding(
      f"MuLoCo K={k} with 2-bit statistical + EF beats uncompressed DiLoCo K={k}",
      "v1: MuLoCo 2-bit EF beats AdamW-DiLoCo, sending 8x fewer bytes",
      paired(
        lambda d, c: d - c,
        method_losses(chosen, "diloco", k) or {},
        lossy.get(("stat2", True), {}),
      ),
      f"L(DiLoCo K={k}, float32) - L(MuLoCo K={k}, stat2 EF)",
    )
  )
  for label in COMPRESSOR_LABELS:
    out.append(
      finding(
        f"Error feedback helps MuLoCo K={k} with {COMPRESSOR_LABELS[label]}",
        "error feedback helps",
        paired(
          lambda off, on: off - on, lossy.get((label, False), {}), lossy.get((label, True), {})
        ),
        f"L({label} no EF) - L({label} EF)",
      )
    )
  for label, c in runs.get("control", {}).items():
    out.append(
      finding(
        f"{COMPRESSOR_LABELS[label]} without EF loses more than its step shrink alone "
        f"(outer lr x {c['ratio']:g}, uncompressed)",
        "not claimed (a control: step size vs compression error)",
        paired(lambda c_, ctl: c_ - ctl, lossy.get((label, False), {}), seed_losses(c["seeds"])),
        f"L({label} no EF) - L(uncompressed, outer lr x {c['ratio']:g})",
      )
    )
  return out


def streaming_findings(streaming) -> list[dict]:
  if 1 not in streaming:
    return []
  base = seed_losses(streaming[1])
  return [
    finding(
      f"Streaming MuLoCo with F={f} fragments matches plain MuLoCo (loss increase < "
      f"{100 * MARGIN:g}%)",
      "streaming matches DiLoCo",
      paired(lambda b, s: MARGIN * b - (s - b), base, seed_losses(streaming[f])),
      f"{100 * MARGIN:g}% x L(F=1) - [L(F={f}) - L(F=1)]",
    )
    for f in sorted(streaming)
    if f != 1
  ]


# The overlap stage (issue 24): runs["overlap"] = {(K, F, tau, adoption, alpha): {seed: result}},
# tau = 0 under the key (K, F, 0, None, None).
OVERLAP_CLAIM = "issue 24: overlap costs no quality (tau = 1, 2 within 0.5% of tau = 0)"


def overlap_reference(overlap, k, f) -> dict:
  """{seed: loss} of the tau = 0 cells of (K, F)."""
  return seed_losses(overlap.get((k, f, 0, None, None), {}))


def relative_gaps(base: dict, losses: dict) -> list[float]:
  """(L - L(tau=0)) / L(tau=0) per paired seed."""
  return paired(lambda b, s: (s - b) / b, base, losses)


def no_quality_cost(base: dict, losses: dict) -> list[float]:
  """The margin effect per paired seed: 0.5% x L(tau=0) - [L - L(tau=0)] (positive: within)."""
  return paired(lambda b, s: MARGIN * b - (s - b), base, losses)


def overlap_settings(overlap, adoption) -> tuple[list, list]:
  """(sorted alphas, sorted (K, F, tau > 0)) that the overlap stage ran for `adoption`."""
  keys = [key for key in overlap if key[2] and key[3] == adoption]
  return sorted({key[4] for key in keys}), sorted({key[:3] for key in keys})


def overlap_default_alpha(overlap, adoption) -> float:
  """The default alpha for tau > 0 with `adoption`, by the data: the alpha with the lowest mean
  seed-0 relative loss gap to tau = 0 over the (K, F, tau) where every alpha has a seed-0 result
  (a diverged run counts as an infinite gap); ties and no data: the smallest alpha (0.0 when the
  stage has not run: the library's default)."""
  alphas, configs = overlap_settings(overlap, adoption)
  if not alphas:
    return 0.0
  gaps = {a: [] for a in alphas}
  for k, f, tau in configs:
    base = overlap_reference(overlap, k, f).get(0)
    losses = [seed_losses(overlap.get((k, f, tau, adoption, a), {})).get(0) for a in alphas]
    if base is None or any(x is None for x in losses):
      continue
    for a, x in zip(alphas, losses):
      gap = (x - base) / base
      gaps[a].append(gap if math.isfinite(gap) else math.inf)
  if not gaps[alphas[0]]:
    return alphas[0]
  return min(alphas, key=lambda a: float(np.mean(gaps[a])))  # min keeps the first on ties


def overlap_differences(overlap, configs, one, other) -> list[float]:
  """L(one) - L(other) per paired seed over the (K, F, tau) of `configs`; `one` and `other`
  are (adoption, alpha) settings."""
  effects = []
  for k, f, tau in configs:
    effects += paired(
      lambda x, y: x - y,
      seed_losses(overlap.get((k, f, tau, *one), {})),
      seed_losses(overlap.get((k, f, tau, *other), {})),
    )
  return effects


def overlap_findings(overlap) -> list[dict]:
  """Per (K, F, tau > 0, adoption) at the adoption's default alpha: no quality cost against
  tau = 0 (non-inferiority within MARGIN, per seed); per adoption and larger alpha: whether it
  beats the smallest alpha, paired over (K, F, tau, seed)."""
  if not overlap:
    return []
  out = []
  adoptions = sorted({key[3] for key in overlap if key[2]}, key=lambda a: (a != "replace", a))
  defaults = {a: overlap_default_alpha(overlap, a) for a in adoptions}
  for k, f in sorted({key[:2] for key in overlap}):
    base = overlap_reference(overlap, k, f)
    for tau in sorted({key[2] for key in overlap if key[:2] == (k, f) and key[2]}):
      for adoption in adoptions:
        alpha = defaults[adoption]
        losses = seed_losses(overlap.get((k, f, tau, adoption, alpha), {}))
        out.append(
          finding(
            f"Streaming MuLoCo K={k}, F={f}, overlap tau={tau} with {adoption} adoption "
            f"(alpha={alpha:g}) costs no quality (loss increase < {100 * MARGIN:g}% of tau=0)",
            OVERLAP_CLAIM,
            no_quality_cost(base, losses),
            f"{100 * MARGIN:g}% x L(tau=0) - [L(tau={tau}) - L(tau=0)]",
          )
        )
  for adoption in adoptions:
    alphas, configs = overlap_settings(overlap, adoption)
    for alpha in alphas[1:]:
      out.append(
        finding(
          f"Overlap with {adoption} adoption: alpha={alpha:g} beats alpha={alphas[0]:g} for "
          f"tau > 0 (default chosen: alpha={defaults[adoption]:g})",
          "issue 24: the default alpha for tau > 0, chosen by measurement",
          overlap_differences(overlap, configs, (adoption, alphas[0]), (adoption, alpha)),
          f"L(alpha={alphas[0]:g}) - L(alpha={alpha:g}), one value per (K, F, tau, seed) run "
          "at both alphas (the rule's n counts these pairs)",
        )
      )
  if len(adoptions) == 2:  # which adoption the default should be, by the same rule
    (first, a), (second, b) = ((x, defaults[x]) for x in adoptions)
    configs = sorted({key[:3] for key in overlap if key[2]})
    out.append(
      finding(
        f"Overlap: {second} adoption (alpha={b:g}) beats {first} (alpha={a:g}) for tau > 0",
        "issue 24: the default adoption, chosen by measurement",
        overlap_differences(overlap, configs, (first, a), (second, b)),
        f"L({first}) - L({second}), one value per (K, F, tau, seed) run with both at their "
        "default alphas",
      )
    )
  return out


OPTIMIZER_LABELS = {"adamw": "AdamW (DiLoCo)", "muon": "Muon (MuLoCo)"}


def directional_cosines(directional) -> dict:
  """{(optimizer, K): {seed: mean-over-matrices cosine}} of the directional stage's cells."""
  cos = {}
  for (optimizer, seed), r in directional.items():
    for k, p in r["per_k"].items():
      cos.setdefault((optimizer, int(k)), {})[seed] = p["mean_matrix_cosine"]
  return cos


def directional_findings(directional) -> list[dict]:
  cos = directional_cosines(directional)
  ks = sorted({k for _, k in cos})
  return [
    finding(
      f"Muon's K={k} averaged pseudogradient points closer to the K=1 one than AdamW's",
      "Muon's higher directional correctness",
      paired(lambda m, a: m - a, cos.get(("muon", k), {}), cos.get(("adamw", k), {})),
      f"cos_Muon(K={k}) - cos_AdamW(K={k}), mean over matrices",
    )
    for k in ks
  ]


# ----------------------------------------------------------------------------
# Tables and plots.


def mean_std(values) -> str:
  x = np.asarray(list(values), np.float64)
  if len(x) == 0:
    return "not run"
  if len(x) == 1:
    return f"{x[0]:.4f} (1 seed)"
  return f"{x.mean():.4f} +- {x.std(ddof=1):.4f}"


def summary_table(items) -> list[str]:
  lines = [
    "| finding | paper | effect (mean +- std) | seeds | verdict |",
    "|---|---|---|---|---|",
  ]
  for f in items:
    effect = (
      ""
      if f["n_seeds"] == 0
      else f"{f['effect_mean']:+.4f} +- {f['effect_std']:.4f}"
      if f["n_seeds"] > 1
      else f"{f['effect_mean']:+.4f}"
    )
    lines.append(
      f"| {f['finding']} | {f['paper']} | {effect} | {f['n_seeds']} | **{f['verdict']}** |"
    )
  return lines


def loss_table(chosen) -> list[str]:
  ks = sorted({k for m, k in chosen if k})
  lines = [
    "| method | " + " | ".join(f"K={k}" for k in ks) + " |",
    "|---|" + "---|" * len(ks),
  ]
  for method in LABELS:
    cells = []
    for k in ks[:1] if method.startswith("dp_") else ks:
      losses = method_losses(chosen, method, k)
      cells.append("not run" if losses is None else mean_std(losses.values()))
    if method.startswith("dp_"):
      cells += ["(same)"] * (len(ks) - 1)
    lines.append(f"| {LABELS[method]} | " + " | ".join(cells) + " |")
  return lines


def settings_table(chosen) -> list[str]:
  lines = [
    "| method | K | inner lr | outer (lr, momentum) | seed-0 grid (lr, outer: loss) |",
    "|---|---|---|---|---|",
  ]
  for (method, k), c in sorted(
    chosen.items(), key=lambda t: (list(LABELS).index(t[0][0]), t[0][1])
  ):
    grid = ", ".join(
      f"{g['lr']:g}"
      + (f" ({g['outer'][0]:g}, {g['outer'][1]:g})" if k else "")
      + f": {g['loss']:.4f}"
      for g in c["grid"]
    )
    outer = f"({c['outer'][0]:g}, {c['outer'][1]:g})" if k else "-"
    lines.append(f"| {LABELS[method]} | {k or '-'} | {c['lr']:g} | {outer} | {grid} |")
  return lines


def compression_table(chosen, runs) -> list[str]:
  reference = compression_reference(chosen, runs)
  if reference is None:
    return []
  k, none = reference
  comp = runs["compression"]
  lines = [
    "| compressor | EF | loss | loss - uncompressed (paired) | bits/param | rel. error "
    "| norm ratio |",
    "|---|---|---|---|---|---|---|",
    f"| none (float32) | - | {mean_std(none.values())} | | 32 | | |",
  ]
  for label, name in COMPRESSOR_LABELS.items():
    for ef in (True, False):
      rs = comp.get((label, ef), {})
      if not rs:
        continue
      diffs = paired(lambda n, c: c - n, none, seed_losses(rs))
      any_r = next(iter(rs.values()))
      ref = next((r for r in chosen[("muloco", k)]["seeds"].values() if r), None)
      bits = 32 * any_r["comm_bytes_total"] / ref["comm_bytes_total"] if ref else math.nan
      err = np.mean([r.get("mean_compression_error", math.nan) for r in rs.values()])
      ratio = np.mean([r.get("mean_compression_norm_ratio", math.nan) for r in rs.values()])
      lines.append(
        f"| {name} | {'on' if ef else 'off'} | {mean_std(seed_losses(rs).values())} | "
        f"{mean_std(diffs).replace('(1 seed)', '')} | {bits:.2f} | {err:.3f} | {ratio:.3f} |"
      )
  for label, c in runs.get("control", {}).items():
    lines.append(
      f"| control for {COMPRESSOR_LABELS[label]}: none, outer lr x {c['ratio']:g} | - | "
      f"{mean_std(seed_losses(c['seeds']).values())} | "
      f"{mean_std(paired(lambda n, x: x - n, none, seed_losses(c['seeds'])))} | 32 | | |"
    )
  return lines


def streaming_table(streaming) -> list[str]:
  if not streaming:
    return []
  lines = ["| fragments F | loss | loss - F=1 (paired) |", "|---|---|---|"]
  base = seed_losses(streaming.get(1, {}))
  for f in sorted(streaming):
    losses = seed_losses(streaming[f])
    diff = "" if f == 1 else mean_std(paired(lambda b, s: s - b, base, losses))
    lines.append(f"| {f} | {mean_std(losses.values())} | {diff} |")
  return lines


def overlap_table(overlap) -> list[str]:
  """Every overlap setting per (K, F): loss, the paired relative gap to tau = 0 and the rule's
  verdict on "within 0.5% of tau = 0" (the contrary results too), then the default alphas."""
  if not overlap:
    return []
  adoptions = sorted({key[3] for key in overlap if key[2]}, key=lambda a: (a != "replace", a))
  defaults = {a: overlap_default_alpha(overlap, a) for a in adoptions}
  pct = f"{100 * MARGIN:g}%"
  lines = [
    f"| K | F | tau | adoption | alpha | loss | gap to tau=0 (paired, %) | within {pct} of tau=0 |",
    "|---|---|---|---|---|---|---|---|",
  ]
  order = lambda key: (key[0], key[1], key[2], adoptions.index(key[3]) if key[2] else -1, key[4])
  for key in sorted(overlap, key=order):
    k, f, tau, adoption, alpha = key
    base, losses = overlap_reference(overlap, k, f), seed_losses(overlap[key])
    if not tau:
      lines.append(f"| {k} | {f} | 0 | - | - | {mean_std(losses.values())} | (reference) | |")
      continue
    gaps = [100 * g for g in relative_gaps(base, losses)]
    gap = mean_std(gaps) if gaps else ""
    v = verdict(no_quality_cost(base, losses))[3]
    default = " (default)" if alpha == defaults[adoption] else ""
    lines.append(
      f"| {k} | {f} | {tau} | {adoption} | {alpha:g}{default} | {mean_std(losses.values())} | "
      f"{gap} | {v} |"
    )
  lines.append("")
  for adoption in adoptions:
    alpha = defaults[adoption]
    gaps = []
    for k, f, tau in overlap_settings(overlap, adoption)[1]:
      gaps += relative_gaps(
        overlap_reference(overlap, k, f),
        seed_losses(overlap.get((k, f, tau, adoption, alpha), {})),
      )
    mean = f"{100 * np.mean(gaps):+.3f}%" if gaps else "no runs yet"
    lines.append(
      f"Default alpha for tau > 0 with {adoption} adoption, by the data: **{alpha:g}** (the "
      f"lowest mean seed-0 gap to tau=0 over K, F and tau; the other seeds run at it); mean gap at "
      f"it over every K, F, tau and seed: {mean}."
    )
    lines.append("")
  return lines[:-1]


def directional_table(directional) -> list[str]:
  if not directional:
    return []
  cos = directional_cosines(directional)
  ks = sorted({k for _, k in cos})
  lines = [
    "| inner optimizer | " + " | ".join(f"K={k}" for k in ks) + " |",
    "|---|" + "---|" * len(ks),
  ]
  for optimizer, name in OPTIMIZER_LABELS.items():
    cells = [mean_std(cos.get((optimizer, k), {}).values()) for k in ks]
    lines.append(f"| {name} | " + " | ".join(cells) + " |")
  return lines


def plot_errorbars(path, series, *, title, xlabel, ylabel, xticks):
  """series = {label: (xs, [per-x list of per-seed values])}: mean with +-std bars."""
  points = {}
  for label, (xs, values) in series.items():
    pts = [
      (x, np.mean(v), np.std(v, ddof=1) if len(v) > 1 else 0.0) for x, v in zip(xs, values) if v
    ]
    if pts:
      points[label] = tuple(list(c) for c in zip(*pts))
  common.plot_lines(
    path, points, title=title, xlabel=xlabel, ylabel=ylabel, logx=True, xticks=xticks
  )


def plot_compression(path, chosen, runs):
  import matplotlib

  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  k, none = compression_reference(chosen, runs)
  comp = runs["compression"]
  fig, ax = plt.subplots(figsize=(7, 4))
  labels = list(COMPRESSOR_LABELS)
  for j, ef in enumerate((True, False)):
    means, stds = [], []
    for label in labels:
      d = paired(lambda n, c: c - n, none, seed_losses(comp.get((label, ef), {})))
      means.append(np.mean(d) if d else np.nan)
      stds.append(np.std(d, ddof=1) if len(d) > 1 else 0.0)
    x = np.arange(len(labels)) + (j - 0.5) * 0.35
    ax.bar(x, means, 0.35, yerr=stds, capsize=3, label="EF on" if ef else "EF off")
  ax.axhline(0, color="k", lw=0.8)
  ref = np.mean(list(none.values())) if none else 0.0
  ax.axhline(MARGIN * ref, color="gray", ls=":", lw=0.8, label=f"{100 * MARGIN:g}% margin")
  ax.set_xticks(np.arange(len(labels)))
  ax.set_xticklabels([COMPRESSOR_LABELS[lb].replace(", ", "\n") for lb in labels], fontsize=7)
  ax.set_ylabel("loss - uncompressed (paired, mean +- std)")
  ax.set_title(f"MuLoCo K={k}: compressed pseudogradients, the authors' recipe", fontsize=10)
  ax.set_yscale("symlog", linthresh=0.01)
  ax.grid(alpha=0.3, axis="y")
  ax.legend(fontsize=7)
  fig.tight_layout()
  fig.savefig(path, dpi=90)
  plt.close(fig)


def replace_block(path: str, text: str) -> None:
  """Replaces what lies between the summary markers of `path` (if it has them)."""
  if not os.path.exists(path):
    return
  with open(path) as f:
    doc = f.read()
  if BEGIN not in doc or END not in doc:
    return
  head, rest = doc.split(BEGIN, 1)
  _, tail = rest.split(END, 1)
  with open(path, "w") as f:
    f.write(head + BEGIN + "\n" + text.rstrip() + "\n" + END + tail)


def report(chosen: dict, runs: dict, *, smoke: bool = False, out: str | None = None) -> list[dict]:
  """summary.json, the markdown tables, the plots and experiments/README.md's block (not smoke)."""
  import glob

  out = out or common.flags.FLAGS.out
  path = common.sweep_dir("reproduction", out)
  items = findings(chosen, runs)
  common.save_json(os.path.join(out, "summary.json"), items)
  cell_results = [common.load_json(p) for p in glob.glob(os.path.join(path, "cells", "*.json"))]
  wall = sum(r.get("wall_seconds", 0.0) for r in cell_results)
  cpu = sum(r.get("cpu_seconds", 0.0) for r in cell_results)
  s = common.scale(smoke)
  setup = (
    f"Tiny Llama-style model (d=128, 2 layers; 4 for streaming and overlap), byte-level KJV, float32; "
    f"{s['num_steps']} steps x {s['batch_size']} sequences x {s['seq_len']} bytes for every run, "
    f"H={s['sync_every']} ({s['num_steps'] // s['sync_every']} outer rounds), warm-up "
    f"{s['warmup_steps']} then cosine to 10%; Muon momentum 0.9 without Nesterov (its AdamW part "
    f"lr {common.MUON_ADAM_LR:g}); weight decay 0.01 rescaled by the per-worker batch. Loss: "
    f"final eval loss in nats/byte, mean +- std over seeds. {len(cell_results)} cells, "
    f"{wall / 3600:.2f} h of summed cell wall time, {cpu / 3600:.2f} h of CPU time."
  )
  summary = ["## Verdicts", "", setup, "", *summary_table(items), ""]
  summary += [
    f"Rule: effect per seed signed so that the paper's claim is positive; reproduced if mean > "
    f"2 std / sqrt(n), contradicted if mean < -2 std / sqrt(n), else inconclusive. Equality "
    f"claims are non-inferiority within {100 * MARGIN:g}% of the reference loss (near-lossless: "
    f"{200 * MARGIN:g}%). Generated from experiments/results/summary.json by "
    f"experiments/findings.py.",
  ]
  results = ["## Final loss by method and K (chosen settings)", "", *loss_table(chosen), ""]
  results += ["## Chosen settings (best on seed 0)", "", *settings_table(chosen), ""]
  for title, table in (
    ("Compression (MuLoCo, authors' recipe)", compression_table(chosen, runs)),
    ("Streaming (MuLoCo K=8, 4 layers)", streaming_table(runs.get("streaming", {}))),
    (
      "Overlap (streaming MuLoCo, 4 layers: the exchange overlaps tau inner steps)",
      overlap_table(runs.get("overlap", {})),
    ),
    (
      "Directional correctness (cosine to the K=1 pseudogradient)",
      directional_table(runs.get("directional", {})),
    ),
  ):
    if table:
      results += [f"## {title}", "", *table, ""]
  with open(os.path.join(path, "summary.md"), "w") as f:
    f.write("\n".join(summary) + "\n")
  with open(os.path.join(path, "results.md"), "w") as f:
    f.write("\n".join(results) + "\n")

  ks = sorted({k for _, k in chosen if k})
  if ks:
    series = {}
    for method, label in LABELS.items():
      series[label] = (ks, [list((method_losses(chosen, method, k) or {}).values()) for k in ks])
    plot_errorbars(
      os.path.join(path, "loss_vs_k.png"),
      series,
      title="Final eval loss vs K (DP baselines drawn flat), mean +- std over seeds",
      xlabel="workers K",
      ylabel="eval loss (nats/byte)",
      xticks=ks,
    )
  if runs.get("compression"):
    plot_compression(os.path.join(path, "compression.png"), chosen, runs)
  directional = runs.get("directional", {})
  if directional:
    cos = directional_cosines(directional)
    dks = sorted({k for _, k in cos})
    series = {
      name: (dks, [list(cos.get((optimizer, k), {}).values()) for k in dks])
      for optimizer, name in OPTIMIZER_LABELS.items()
    }
    plot_errorbars(
      os.path.join(path, "directional.png"),
      series,
      title="cos(K-worker averaged pseudogradient, K=1), mean over matrices, +- std over seeds",
      xlabel="workers K",
      ylabel="cosine",
      xticks=dks,
    )
  if not smoke and out == common.DEFAULT_RESULTS:
    block = "\n".join(summary + ["", *results])
    replace_block(os.path.join(common.HERE, "README.md"), block)
  print("\n".join(summary))
  return items
