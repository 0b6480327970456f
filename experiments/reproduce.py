"""The reproduction that decides the paper's claims: tuned runs, 3 seeds, verdicts by a rule (issue 14).

  python experiments/reproduce.py               # every stage (resumable), then the report
  python experiments/reproduce.py & python experiments/reproduce.py   # two cell runners at once
  python experiments/reproduce.py --report_only # summary.json, tables and plots from finished cells

Stages, each a list of cells (one training run each) that depends only on finished earlier stages:
  1. tune:        seed 0, inner-lr grid (x2 spacing, 3 points, extended while the best is at an
                  edge) for DP AdamW, DP Muon, DiLoCo and MuLoCo at K in {1, 2, 4, 8}; outer
                  Nesterov SGD (0.7, 0.6) at K=1 (the paper's), (0.7, 0.9) at K >= 2;
  2. outer:       seed 0, K >= 2, at the best inner lr: outer (0.7, 0.6) and (1.0, 0.9) too;
  3. seeds:       every chosen setting (best of stages 1-2 on seed 0) on seeds 1 and 2;
  4. compression: MuLoCo K=8 at its chosen setting, the authors' way (row-wise statistics, error
                  feedback decay 0.9 accumulating outer_lr x delta, embedding/head/gains in
                  float32, the average re-quantized): statistical 2 and 4 bit, linear 2 bit per
                  row and per tensor, top-k 2%, each with error feedback on and off, 3 seeds;
  5. control:     uncompressed, outer lr x the norm ratio ||D(C(x))|| / ||x|| of each compressor
                  without error feedback (seed 0's mean): step shrink without compression error;
  6. streaming:   MuLoCo K=8 on a 4-layer model, F in {1, 2, 4} fragments, 3 seeds;
  7. overlap:     streaming MuLoCo on the 4-layer model at K in {4, 8}, F in {2, 4}, the exchange
                  overlapping tau in {0, 1, 2} inner steps (issue 24), for tau > 0 with adoption
                  replace or keep_progress and mixing alpha in {0, 0.5}: the whole grid on seed 0,
                  then seeds 1 and 2 at tau = 0 and at each adoption's default alpha (the lowest
                  mean seed-0 loss gap to tau = 0, findings.overlap_default_alpha);
  8. directional: cos(K-worker averaged pseudogradient, K=1 pseudogradient) for AdamW and Muon at
                  their chosen DP learning rates, K in {2, 4, 8}, 3 seeds.
Then `report`: experiments/results/summary.json (one entry per finding, verdict by the rule in
`verdict`), experiments/results/reproduction/*.md and *.png, and the tables between the
`<!-- summary:begin -->` / `<!-- summary:end -->` markers of experiments/README.md.

Every run has the same token budget (360 steps x 32 sequences x 64 bytes).  A seed sets the
initialisation and the data order, so cells of one seed are paired.  Several processes may run
the script at once: each claims a cell with a lock file before training it and waits at the end
of a stage for the others.  A killed cell resumes from its checkpoint on the next run.
"""

import dataclasses
import functools
import math
import os
import sys
import time

from absl import app
from absl import flags
import numpy as np

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
from experiments import common  # pylint: disable=g-import-not-at-top
from experiments import directional_correctness  # pylint: disable=g-import-not-at-top
from experiments import findings  # pylint: disable=g-import-not-at-top

SWEEP = "reproduction"
INNER = {"dp_adamw": "adamw", "diloco": "adamw", "dp_muon": "muon", "muloco": "muon"}
OUTER_K1 = (0.7, 0.6)  # the paper's MuLoCo K=1 outer optimizer
OUTER_DEFAULT = (0.7, 0.9)
# (label, compression overrides); the authors' recipe is added by `compression_overrides`.
COMPRESSORS = {
  "stat4": {"compression.kind": "statistical", "compression.bits": 4},
  "stat2": {"compression.kind": "statistical", "compression.bits": 2},
  "linear2": {"compression.kind": "linear", "compression.bits": 2},
  "linear2_tensor": {
    "compression.kind": "linear",
    "compression.bits": 2,
    "compression.per_row": False,
  },
  "topk2": {"compression.kind": "topk", "compression.topk_fraction": 0.02},
}
CONTROL_MIN_SHRINK = 0.02  # a control only where the compressor shrinks the step by >= 2%


@dataclasses.dataclass(frozen=True)
class Plan:
  """What the sweep runs; compression and streaming run at the largest K, overlap at overlap_ks
  (on the streaming stage's model)."""

  ks: tuple = (1, 2, 4, 8)
  seeds: tuple = (0, 1, 2)
  grids: tuple = (("adamw", (3e-3, 6e-3, 1.2e-2)), ("muon", (0.02, 0.04, 0.08)))
  max_grid_points: int = 6
  outer_grid: tuple = (OUTER_DEFAULT, (0.7, 0.6), (1.0, 0.9), (1.0, 0.6))
  compressors: tuple = tuple(COMPRESSORS)
  streaming_layers: int = 4
  fragments: tuple = (1, 2, 4)
  overlap_ks: tuple = (4, 8)
  overlap_fragments: tuple = (2, 4)
  overlap_taus: tuple = (0, 1, 2)
  adoptions: tuple = ("replace", "keep_progress")  # muloco_jax.diloco.ADOPTIONS
  alphas: tuple = (0.0, 0.5)  # diloco.mixing for tau > 0
  directional_ks: tuple = (2, 4, 8)
  directional_warmup: int = 60  # data-parallel steps before the measured round


# --smoke: every stage, on a few cells of a few steps.
SMOKE_PLAN = Plan(
  ks=(1, 2),
  seeds=(0, 1),
  grids=(("adamw", (3e-3,)), ("muon", (0.02,))),
  max_grid_points=1,
  outer_grid=(OUTER_DEFAULT, (0.7, 0.6)),
  compressors=("stat2", "topk2"),
  streaming_layers=2,
  fragments=(1, 2),
  overlap_ks=(2,),
  overlap_fragments=(2,),
  overlap_taus=(0, 1),
  directional_ks=(2,),
  directional_warmup=2,
)

common.define_flags()
flags.DEFINE_list(
  "stages",
  [],
  "Of compression, control, streaming, overlap and directional, train only these (default: "
  "all; the others' finished cells still go into the report); tune, outer and seeds always run, "
  "and control only with compression.",
)
flags.DEFINE_float("poll", 10.0, "Seconds between checks for cells another process is training.")


def outer_of(k):
  return OUTER_K1 if k == 1 else OUTER_DEFAULT


def setting_overrides(method, k, lr, outer, seed):
  """A (method, K, inner lr, outer (lr, momentum), seed) run."""
  o = common.method_overrides(method, k, lr)
  o["seed"] = seed
  if k:
    o["diloco.outer_lr"], o["diloco.outer_momentum"] = outer
  return o


def setting_name(method, k, lr, outer, seed, *extra):
  parts = [method] + ([f"K{k}"] if k else []) + [f"lr{lr:g}"]
  if k:
    parts.append(f"outer{outer[0]:g}-{outer[1]:g}")
  return common.cell_name(*parts, *extra, f"s{seed}")


class Cells:
  """Finished cells by name, and the runner that trains missing ones (several processes)."""

  def __init__(self, smoke):
    self.smoke = smoke
    self.plan = SMOKE_PLAN if smoke else Plan()
    self.dir = os.path.join(common.sweep_dir(SWEEP), "cells")
    self.training = True  # False: `make` only collects finished cells (a stage not selected)

  def path(self, name):
    return os.path.join(self.dir, name + ".json")

  def get(self, name):
    p = self.path(name)
    return common.load_json(p) if os.path.exists(p) else None

  def run(self, cells):
    """Trains the cells {name: (overrides, info)} not finished yet (see `make`)."""
    return self.make(
      {
        name: lambda name=name: common.run_cell(
          SWEEP, name, cells[name][0], smoke=self.smoke, info=cells[name][1]
        )
        for name in cells
      }
    )

  def make(self, jobs):
    """Runs `jobs[name]()`, which writes the cell's result file, for every cell not finished
    yet, each claimed by one process; returns {name: result} once every one is finished (by
    this process or another), or the finished ones under --report_only or without `training`."""
    fl = flags.FLAGS
    while self.training and not fl.report_only:
      pending = [n for n in jobs if not os.path.exists(self.path(n))]
      if not pending:
        break
      for name in pending:
        if not os.path.exists(self.path(name)) and common.claim(self.path(name)):
          try:
            jobs[name]()
          finally:
            common.release(self.path(name))
      if any(not os.path.exists(self.path(n)) for n in jobs):
        time.sleep(fl.poll)  # cells another process is training
    results = {n: self.get(n) for n in jobs}
    return {n: r for n, r in results.items() if r is not None}


def loss(r):
  """A finished cell's final eval loss for choosing settings: a diverged run ranks last."""
  value = r.get("final_eval_loss")
  return value if value is not None and math.isfinite(value) else math.inf


# ----------------------------------------------------------------------------
# The stages.


def methods_and_ks(plan):
  return [("dp_adamw", 0), ("dp_muon", 0)] + [(m, k) for m in ("diloco", "muloco") for k in plan.ks]


def tune(cells):
  """Stage 1: the lr grid on seed 0, extended by x2 steps while the best is at an edge.
  Returns {(method, K): [(lr, result), ...]}."""
  plan = cells.plan
  grids = {(m, k): list(dict(plan.grids)[INNER[m]]) for m, k in methods_and_ks(plan)}
  while True:
    todo = {}
    for (m, k), grid in grids.items():
      for lr in grid:
        name = setting_name(m, k, lr, outer_of(k), 0)
        todo[name] = (setting_overrides(m, k, lr, outer_of(k), 0), dict(method=m, K=k, lr=lr))
    done = cells.run(todo)
    grown = False
    for (m, k), grid in grids.items():
      names = [setting_name(m, k, lr, outer_of(k), 0) for lr in grid]
      if any(n not in done for n in names) or len(grid) >= plan.max_grid_points:
        continue
      losses = [loss(done[n]) for n in names]
      best = int(np.argmin(losses))
      if best == len(grid) - 1:
        grid.append(grid[-1] * 2)
        grown = True
      elif best == 0:
        grid.insert(0, grid[0] / 2)
        grown = True
    if not grown:  # (under --report_only it grows only onto finished cells)
      break
  return {
    key: [
      (lr, done[setting_name(*key, lr, outer_of(key[1]), 0)])
      for lr in grid
      if setting_name(*key, lr, outer_of(key[1]), 0) in done
    ]
    for key, grid in grids.items()
  }


def choose(cells, tuned):
  """Stages 2-3: the outer grid at K >= 2 at the best inner lr; where the best outer setting
  changed, the inner lr's neighbours (x1/2, x2) under it until the best is bracketed; then every
  chosen setting on every seed.  Returns {(method, K): {"lr", "outer", "seeds": {seed: result}, "grid": [...]}}."""
  plan = cells.plan
  # Every seed-0 run of a (method, K): {(lr, outer): result}.
  runs = {key: {(lr, outer_of(key[1])): r for lr, r in rs} for key, rs in tuned.items() if rs}

  def train(settings):
    todo = {
      setting_name(m, k, lr, o, 0): (
        setting_overrides(m, k, lr, o, 0),
        dict(method=m, K=k, lr=lr, outer_lr=o[0], outer_momentum=o[1]),
      )
      for m, k, lr, o in settings
    }
    done = cells.run(todo)
    for m, k, lr, o in settings:
      if setting_name(m, k, lr, o, 0) in done:
        runs[(m, k)][(lr, o)] = done[setting_name(m, k, lr, o, 0)]

  best = lambda key: min(runs[key], key=lambda setting: loss(runs[key][setting]))
  train([(m, k, best((m, k))[0], o) for m, k in runs if k >= 2 for o in plan.outer_grid[1:]])
  for _ in range(plan.max_grid_points):  # until the best lr under the new outer is bracketed
    refine = []
    for m, k in runs:
      lr, outer = best((m, k))
      if outer != outer_of(k):
        refine += [(m, k, x, outer) for x in (lr / 2, lr * 2) if (x, outer) not in runs[(m, k)]]
    if not refine:
      break
    train(refine)
  chosen = {}
  for key, settings in runs.items():
    lr, outer = best(key)
    chosen[key] = dict(
      lr=lr,
      outer=outer,
      grid=[dict(lr=x, outer=list(o), loss=loss(r)) for (x, o), r in sorted(settings.items())],
    )
  todo = {}
  for (m, k), c in chosen.items():
    for seed in plan.seeds[1:]:
      todo[setting_name(m, k, c["lr"], c["outer"], seed)] = (
        setting_overrides(m, k, c["lr"], c["outer"], seed),
        dict(method=m, K=k, lr=c["lr"], seed=seed),
      )
  cells.run(todo)
  for (m, k), c in chosen.items():
    c["seeds"] = {s: cells.get(setting_name(m, k, c["lr"], c["outer"], s)) for s in plan.seeds}
  return chosen


def compression_overrides(label, error_feedback):
  o = dict(COMPRESSORS[label])
  o.update(
    {
      "compression.error_feedback": error_feedback,
      "compression.error_decay": 0.9,
      "compression.error_feedback_scale": "outer_lr" if error_feedback else "none",
      "compression.exclude": "vectors_embedding_head",
      "compression.collective": "all_gather",
      "compression.requantize_average": True,
      "compression.table_dtype": "float32",
    }
  )
  return o


def compress(cells, chosen):
  """Stage 4: {(label, error_feedback): {seed: result}} at MuLoCo's chosen setting, largest K."""
  plan, k = cells.plan, max(cells.plan.ks)
  c = chosen[("muloco", k)]
  todo = {}
  for label in plan.compressors:
    for ef in (True, False):
      for seed in plan.seeds:
        o = setting_overrides("muloco", k, c["lr"], c["outer"], seed)
        o.update(compression_overrides(label, ef))
        name = setting_name("muloco", k, c["lr"], c["outer"], seed, label, "ef" if ef else "noef")
        todo[name] = (o, dict(compressor=label, error_feedback=ef, seed=seed))
  done = cells.run(todo)
  out = {}
  for name, r in done.items():
    out.setdefault((r["compressor"], r["error_feedback"]), {})[r["seed"]] = r
  return out


def control(cells, chosen, compressed):
  """Stage 5: {label: {"ratio", "seeds": {seed: result}}} for compressors that shrink the step."""
  plan, k = cells.plan, max(cells.plan.ks)
  c = chosen[("muloco", k)]
  ratios = {}
  for label in plan.compressors:
    r = compressed.get((label, False), {}).get(0)
    if r is not None and abs(1 - r["mean_compression_norm_ratio"]) >= CONTROL_MIN_SHRINK:
      ratios[label] = round(r["mean_compression_norm_ratio"], 3)
  todo = {}
  for label, ratio in ratios.items():
    outer = (round(c["outer"][0] * ratio, 4), c["outer"][1])
    for seed in plan.seeds:
      name = setting_name("muloco", k, c["lr"], outer, seed, "control", label)
      todo[name] = (
        setting_overrides("muloco", k, c["lr"], outer, seed),
        dict(control_of=label, norm_ratio=ratio, seed=seed),
      )
  done = cells.run(todo)
  out = {label: dict(ratio=ratio, seeds={}) for label, ratio in ratios.items()}
  for r in done.values():
    out[r["control_of"]]["seeds"][r["seed"]] = r
  return out


def streaming(cells, chosen):
  """Stage 6: {F: {seed: result}}, MuLoCo at the largest K on a model of plan.streaming_layers
  blocks."""
  plan, k = cells.plan, max(cells.plan.ks)
  c = chosen[("muloco", k)]
  layers = plan.streaming_layers
  todo = {}
  for f in plan.fragments:
    for seed in plan.seeds:
      o = setting_overrides("muloco", k, c["lr"], c["outer"], seed)
      o.update({"model.num_layers": layers, "diloco.num_fragments": f})
      name = setting_name("muloco", k, c["lr"], c["outer"], seed, f"L{layers}", f"F{f}")
      todo[name] = (o, dict(fragments=f, seed=seed))
  out = {}
  for r in cells.run(todo).values():
    out.setdefault(r["fragments"], {})[r["seed"]] = r
  return out


def overlap_keys(plan, alphas=None):
  """The overlap stage's settings (K, F, tau, adoption, alpha): tau = 0 once per (K, F) (adoption
  and alpha None: no exchange is in flight at adoption, so both adoptions are the same; it runs at
  the library's replace, alpha 0), and for tau > 0 every adoption x alpha, or only alpha =
  alphas[adoption] when given."""
  keys = []
  for k in plan.overlap_ks:
    for f in plan.overlap_fragments:
      for tau in plan.overlap_taus:
        if not tau:
          keys.append((k, f, 0, None, None))
          continue
        for adoption in plan.adoptions:
          for alpha in plan.alphas if alphas is None else (alphas[adoption],):
            keys.append((k, f, tau, adoption, alpha))
  return keys


def overlap_cell(plan, chosen, key, seed):
  """(name, (overrides, info)) of one overlap cell: MuLoCo at K's chosen setting on the streaming
  stage's model."""
  k, f, tau, adoption, alpha = key
  c = chosen[("muloco", k)]
  layers = plan.streaming_layers
  o = setting_overrides("muloco", k, c["lr"], c["outer"], seed)
  o.update({"model.num_layers": layers, "diloco.num_fragments": f, "diloco.overlap_steps": tau})
  parts = [f"L{layers}", f"F{f}", f"tau{tau}"]
  if tau:
    o.update({"diloco.adoption": adoption, "diloco.mixing": alpha})
    parts += [adoption, f"a{alpha:g}"]
  name = setting_name("muloco", k, c["lr"], c["outer"], seed, *parts)
  return name, (o, dict(K=k, fragments=f, tau=tau, adoption=adoption, alpha=alpha, seed=seed))


def overlap(cells, chosen):
  """Stage 7: {(K, F, tau, adoption, alpha): {seed: result}}.  Seed 0 on every setting of
  `overlap_keys`; then the other seeds at tau = 0 and, for tau > 0, at each adoption's default
  alpha chosen from seed 0 (findings.overlap_default_alpha), as stage 3 does for learning rates."""
  plan, out = cells.plan, {}

  def train(keys, seeds):
    todo, key_of = {}, {}
    for key in keys:
      for seed in seeds:
        name, cell = overlap_cell(plan, chosen, key, seed)
        todo[name], key_of[name] = cell, (key, seed)
    for name, r in cells.run(todo).items():
      key, seed = key_of[name]
      out.setdefault(key, {})[seed] = r

  train(overlap_keys(plan), plan.seeds[:1])
  alphas = {a: findings.overlap_default_alpha(out, a) for a in plan.adoptions}
  train(overlap_keys(plan, alphas), plan.seeds[1:])
  return out


def directional(cells, chosen):
  """Stage 8: {(optimizer, seed): measurement} at the chosen DP learning rates."""
  plan, jobs, keys = cells.plan, {}, {}

  def measure(name, optimizer, seed, lr):
    start, cpu_start = time.perf_counter(), time.process_time()
    r = directional_correctness.measure(
      optimizer, plan.directional_warmup, plan.directional_ks, cells.smoke, seed=seed, lr=lr
    )
    r.update(wall_seconds=time.perf_counter() - start, cpu_seconds=time.process_time() - cpu_start)
    common.save_json(cells.path(name), r)

  for optimizer, method in (("adamw", "dp_adamw"), ("muon", "dp_muon")):
    lr = chosen[(method, 0)]["lr"]
    for seed in plan.seeds:
      name = common.cell_name("directional", optimizer, f"lr{lr:g}", f"s{seed}")
      jobs[name] = functools.partial(measure, name, optimizer, seed, lr)
      keys[name] = (optimizer, seed)
  return {keys[name]: r for name, r in cells.make(jobs).items()}


# The stages --stages may pick; tune, outer and seeds always run (the others start from their
# choices), and control runs with compression (it reads compression's norm ratios).  A stage not
# picked trains nothing but still collects its finished cells, so that the report stays whole.
STAGES = ("compression", "control", "streaming", "overlap", "directional")


def main(argv):
  del argv
  fl = flags.FLAGS
  unknown = set(fl.stages) - set(STAGES)
  if unknown:
    raise app.UsageError(f"--stages: unknown {sorted(unknown)}; choose from {STAGES}")
  common.setup_jax()
  cells = Cells(fl.smoke)
  wanted = lambda stage: not fl.stages or stage in fl.stages
  tuned = tune(cells)
  chosen = choose(cells, tuned) if all(tuned.values()) else {}
  runs = {}
  if chosen:
    for stage, run in (
      ("compression", lambda: compress(cells, chosen)),
      ("control", lambda: control(cells, chosen, runs["compression"])),
      ("streaming", lambda: streaming(cells, chosen)),
      ("overlap", lambda: overlap(cells, chosen)),
      ("directional", lambda: directional(cells, chosen)),
    ):
      cells.training = wanted(stage) and (stage != "control" or wanted("compression"))
      runs[stage] = run()
    cells.training = True
  findings.report(chosen, runs, smoke=fl.smoke)


if __name__ == "__main__":
  app.run(main)
