r"""Muon under FSDP: per-device Newton-Schulz work and collectives, from compiled programs.

  python -m muloco_jax.tools.benchmarks.sharded_muon [--size=150m] [--fsdp=8] [--schedule=muloco]

Builds the abstract parameters of a preset (scanned layers), shards each over F = `--fsdp`
virtual CPU devices (`sharding.fsdp_specs`: its largest per-layer dimension divisible by F),
and compiles, without running it, one optimizer update (`tx.update` with the state and
update sharded as the params) three ways: `optim.muon` with `shard_axis="fsdp"` (each device
orthogonalizes 1/F of the hidden matrices), `optim.muon` without it (each shape's matrices in
one Newton-Schulz on the sharded stack, partitioned as XLA sees fit), and `optax.contrib.muon`
with the same Newton-Schulz coefficients on the same hidden matrices (the rest to Adam in all
three).

Per device it prints the matmul flops of the compiled program, counted from its HLO text
(`dot_flops`: every dot, times the trip counts of the loops around it), XLA's own cost
analysis (which counts a loop body once, whatever its trip count: Newton-Schulz iterates in
a loop, so that figure undercounts it), and the collectives (`collectives`: how many run and
the bytes of their results, each loop iteration counted too).
"""

import os

os.environ.setdefault("JAX_PLATFORMS", "cpu")
if "xla_force_host_platform_device_count" not in os.environ.get("XLA_FLAGS", ""):
  os.environ["XLA_FLAGS"] = (
    os.environ.get("XLA_FLAGS", "") + " --xla_force_host_platform_device_count=8"
  ).strip()

import collections
import functools
import math
import re
import time

from absl import app
from absl import flags
import jax
import optax

from muloco_jax import model as model_lib
from muloco_jax import optim
from muloco_jax import sharding

_SIZE = flags.DEFINE_string("size", "150m", "Model preset.")
_FSDP = flags.DEFINE_integer("fsdp", 8, "Devices the parameters are sharded over (<= 8).")
_SCHEDULE = flags.DEFINE_enum("schedule", "muloco", ["classic", "muloco"], "Coefficients.")

COLLECTIVES = ("all-to-all", "all-gather", "all-reduce", "reduce-scatter", "collective-permute")
_ITEMSIZE = {"pred": 1, "s8": 1, "u8": 1, "bf16": 2, "f16": 2, "s32": 4, "u32": 4, "f32": 4}
_ITEMSIZE.update(f64=8, s64=8, u64=8)
_ARRAY = re.compile(r"\b([a-z]+\d*)\[([\d,]*)\]")
_COMPUTATION = re.compile(r"^(?:ENTRY )?%([\w.\-]+) \((.*)\) -> .*\{$")
# `%name = SHAPE opcode(operands), attributes` (SHAPE may be a tuple).
_INSTRUCTION = re.compile(r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*?)\)")
_CALLEE = re.compile(r"\b(?:calls|to_apply|body)=%([\w.\-]+)")
_CALLEE_LIST = re.compile(r"\b(?:branch_computations|called_computations)=\{([^}]*)\}")


def _dims(text: str) -> list[int]:
  """The dimensions of the first array shape in `text`, e.g. "f32[4,8]{1,0}" -> [4, 8]."""
  return [int(n) for n in _ARRAY.search(text)[2].split(",") if n]


def _nbytes(text: str) -> int:
  """Bytes of the arrays written in `text`, e.g. "(f32[4,8]{1,0}, bf16[2]{0})"."""
  return sum(
    _ITEMSIZE.get(dtype, 4) * math.prod(int(n) for n in dims.split(",") if n)
    for dtype, dims in _ARRAY.findall(text)
  )


def _computations(hlo: str) -> tuple[dict, str]:
  """{computation name: its instruction lines, parameters first as "%p = SHAPE parameter()"},
  and the name of the entry computation."""
  computations, entry, lines = {}, None, None
  for line in hlo.splitlines():
    header = _COMPUTATION.match(line)
    if header:
      name, params = header.groups()
      entry = name if line.startswith("ENTRY") else entry
      lines = computations[name] = [
        f"%{p} = {shape} parameter()"
        for p, shape in re.findall(r"([\w.\-]+): ([a-z]+\d*\[[\d,]*\])", params)
      ]
    elif lines is not None and line.strip() and line.strip() != "}":
      lines.append(line)
  return computations, entry


def _executed(hlo: str, measure) -> collections.Counter:
  """The sum of `measure(line, match, shapes)` (a Counter) over the instructions that compiled
  HLO text executes: the entry computation's and, recursively, those of the computations they
  call, a loop's body as many times as its known trip count (once if unknown).  `match` is the
  line's `_INSTRUCTION` match; `shapes` maps every instruction name to its shape."""
  computations, entry = _computations(hlo)
  matches = {
    name: [(line, _INSTRUCTION.match(line)) for line in lines]
    for name, lines in computations.items()
  }
  shapes = {m[1]: m[2] for lines in matches.values() for _, m in lines if m}

  @functools.cache
  def total(name):
    counts = collections.Counter()
    for line, match in matches.get(name, ()):
      if not match:
        continue
      counts.update(measure(line, match, shapes))
      trips = re.search(r'"known_trip_count":\{"n":"(\d+)"', line)
      times = int(trips[1]) if trips and match[3] == "while" else 1
      listed = [
        c for group in _CALLEE_LIST.findall(line) for c in re.findall(r"%([\w.\-]+)", group)
      ]
      for callee in _CALLEE.findall(line) + listed:
        counts.update({k: times * v for k, v in total(callee).items()})
    return counts

  return total(entry)


def _dot(line, match, shapes) -> dict:
  if match[3] != "dot":
    return {}
  lhs = shapes[re.search(r"%([\w.\-]+)", match[4])[1]]
  contracted = re.search(r"lhs_contracting_dims=\{([\d,]*)\}", line)[1]
  k = math.prod(_dims(lhs)[int(i)] for i in contracted.split(",") if i)
  return {"flops": 2 * math.prod(_dims(match[2])) * k}


def _collective(line, match, shapes) -> dict:
  kind = match[3].removesuffix("-start")
  return {kind: 1, f"{kind} bytes": _nbytes(match[2])} if kind in COLLECTIVES else {}


def dot_flops(hlo: str) -> int:
  """Flops of the dots that compiled HLO text executes (per device: 2 x output elements x
  contracted size per dot, each loop iteration counted)."""
  return _executed(hlo, _dot)["flops"]


def collectives(hlo: str) -> dict:
  """{collective kind: (times executed, bytes of their results)} of compiled HLO text (per
  device, each loop iteration counted)."""
  found = _executed(hlo, _collective)
  return {kind: (found[kind], found[f"{kind} bytes"]) for kind in COLLECTIVES if kind in found}


def cost_flops(compiled) -> float:
  """XLA's cost-analysis flops of a compiled program (a dict, or a list of one per module)."""
  cost = compiled.cost_analysis()
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  return float((cost or {}).get("flops", 0.0))


def compile_update(tx, params, specs, mesh):
  """`tx.update(grads, state, params)` compiled with everything sharded as the params."""
  shardings = sharding.named(mesh, specs)
  with jax.set_mesh(mesh):
    state = jax.eval_shape(tx.init, params)
    state_shardings = sharding.named(mesh, sharding.state_specs(state, params, specs))
    step = jax.jit(
      tx.update,
      in_shardings=(shardings, state_shardings, shardings),
      out_shardings=(shardings, state_shardings),
    )
    return step.lower(params, state, params).compile()


def main(argv):
  del argv
  fsdp = _FSDP.value
  coefficients = optim.newton_schulz_coefficients(_SCHEDULE.value)
  config = model_lib.model_config(_SIZE.value, scan_layers=True)
  params = jax.eval_shape(functools.partial(model_lib.init_params, config), jax.random.key(0))
  mesh = sharding.make_mesh(1, fsdp)
  specs = sharding.fsdp_specs(params, fsdp)
  labels = optim.muon_labels(params)
  hidden = [p for p, lab in zip(jax.tree.leaves(params), jax.tree.leaves(labels)) if lab == "muon"]
  matrices = [(math.prod(p.shape[:-2]), p.shape[-2:]) for p in hidden]
  ns_flops = sum(n * optim.newton_schulz_flops(shape, len(coefficients)) for n, shape in matrices)
  optax_dims = jax.tree.map(
    lambda lab: optim.FLAX_DIMENSION_NUMBERS if lab == "muon" else None, labels
  )
  variants = {
    'ours, shard_axis="fsdp"': optim.muon(
      1e-3, ns_coeffs=coefficients, shard_axis=sharding.FSDP_AXIS, param_specs=specs
    ),
    "ours, shard_axis=None": optim.muon(1e-3, ns_coeffs=coefficients),
    "optax.contrib.muon": optax.contrib.muon(
      1e-3,
      ns_coeffs=coefficients,
      ns_steps=len(coefficients),
      muon_weight_dimension_numbers=optax_dims,
    ),
  }
  rows = {}
  for name, tx in variants.items():
    start = time.perf_counter()
    compiled = compile_update(tx, params, specs, mesh)
    hlo = compiled.as_text()
    rows[name] = (dot_flops(hlo), cost_flops(compiled), collectives(hlo))
    rows[name] += (time.perf_counter() - start,)

  print(
    f"{_SIZE.value} (scanned), {sum(n for n, _ in matrices)} hidden matrices in {len(hidden)} "
    f"leaves; fsdp={fsdp} CPU devices; {_SCHEDULE.value} schedule ({len(coefficients)} steps); "
    f"Newton-Schulz {ns_flops / 1e9:.1f} GFLOP in all, {ns_flops / fsdp / 1e9:.2f} per device "
    "if split evenly"
  )
  print()
  print(
    "| update | dot GFLOP/device | / shard_axis=None | cost-analysis GFLOP | "
    "all-to-all (n, MiB) | all-gather (n, MiB) | all-reduce (n, MiB) | compile (s) |"
  )
  print("|---|---|---|---|---|---|---|---|")
  baseline = rows["ours, shard_axis=None"][0]
  for name, (flops, cost, found, seconds) in rows.items():
    cells = [
      f"{found[kind][0]}, {found[kind][1] / 2**20:.1f}" if kind in found else "0"
      for kind in ("all-to-all", "all-gather", "all-reduce")
    ]
    print(
      f"| {name} | {flops / 1e9:.2f} | {flops / baseline:.3f} | {cost / 1e9:.2f} | "
      f"{' | '.join(cells)} | {seconds:.1f} |"
    )
  for name, (_, _, found, _) in rows.items():
    others = [
      f"{k} {n} ({b / 2**20:.1f} MiB)" for k, (n, b) in found.items() if k in COLLECTIVES[3:]
    ]
    if others:
      print(f"{name}: also " + ", ".join(others))


if __name__ == "__main__":
  app.run(main)
