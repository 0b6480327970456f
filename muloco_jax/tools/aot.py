"""Will a run fit on a TPU slice?  Compiles its training programs for a TPU topology, from any host.

  python -m muloco_jax.tools.aot --config=configs/NAME.py --topology=v5p:4x4x4 [--config.a.b=v]

No TPU is needed: libtpu (`pip install -e ".[tpu]"`) compiles for a topology described by
`jax.experimental.topologies`, and every input is an abstract `jax.ShapeDtypeStruct` carrying the
sharding the run would give it, so nothing is allocated.  The programs are the ones
`train.train_and_evaluate` runs every step, built by the same code (`train.make_algorithm` on
`sharding.mesh_for_workers` over the topology's devices, `programs` of `muloco_jax.runtime`):

  diloco.num_workers = 0   `train_step` (data parallelism, FSDP over the `fsdp` axis);
  diloco.num_workers = K   `inner_step` (all K workers) and `outer_sync` of each fragment
                           (`outer_sync[f]` with several); with diloco.overlap_steps > 0
                           every `overlapped_step[exchange f, adopt g]` the sync schedule of
                           train.num_steps brings (the inner step with the exchanges and
                           adoptions due beside it) and the final step's `adoption[f]`;
  and for both             `init` (a fresh run's state from its parameters) and `eval_step`.

`restore` is a resume's peak: orbax reads the checkpoint straight into the state's layout, so
it holds the train state's bytes on the fullest device (`sharding.state_bytes_per_device`, from
the shardings alone), printed beside those of a layout with every leaf replicated.

For each it prints the compiler's per-device memory (`Compiled.memory_analysis()`): arguments,
outputs, aliased (donated) bytes, temporaries, generated code and the peak, against the HBM of one
device; and, for every program, the collectives of the compiled HLO (kind, count, operand
bytes, whether they cross workers), its async start/done pairs and how
many of those have matrix multiplies scheduled between start and done (the transfer overlaps
them).  jax 0.10.2's `CompiledMemoryStats`
has argument/output/alias/temp/generated_code_size_in_bytes (and host_ twins, all 0 here) and
`peak_memory_in_bytes`, the high-water mark of the TPU compiler's buffer assignment: that is the
peak used.  It is within a few percent of arguments + outputs - aliased + temporaries + code for
large programs (some MiB above it for tiny ones); that sum stands in if a libtpu reports 0.  The
HBM of a device is what the TPU compiler itself says is available (it names the figure, to
10 MiB, when a probe program asks for more), else a table per chip.  A program over the HBM
makes the TPU compiler fail with RESOURCE_EXHAUSTED: its peak is then the requirement the error
states, and its arguments are counted from their shapes and shardings.

The model's vocabulary comes from the config without loading data: `data.tokenizer="byte"` has
257 tokens, a SentencePiece .model path its own vocabulary; with "bpe" (trained on the data at
the first run, `data.vocab_size` pieces) the `model.size` preset's vocabulary is used: Llama-3's
128256 for the paper sizes, the vocabulary the paper trains them with.

The last line of stdout is JSON: {"fits", "peak_bytes_per_device" (the maximum over the
programs and the restore), "hbm_bytes", "topology", "programs": {name: {...}}}.  The exit
status is 1 when a program does not fit (stderr says what to change), and bad flags or
settings fail before anything is compiled, naming the setting.
"""

from __future__ import annotations

import collections
import functools
import json
import math
import os
import re
import sys
import time

from absl import app
from absl import flags
import jax
import jax.numpy as jnp
import numpy as np
from jax.experimental import topologies
from ml_collections import config_flags

from muloco_jax import config as config_lib
from muloco_jax import model as model_lib
from muloco_jax import sharding
from muloco_jax import tokenizer as tokenizer_lib
from muloco_jax import train

_CONFIG = config_flags.DEFINE_config_file("config", None, "A configs/*.py file.", lock_config=True)
_TOPOLOGY = flags.DEFINE_string(
  "topology", None, "TPU topology GENERATION:SHAPE, e.g. v5e:4x4, v5p:4x4x4, v6e:16x16."
)
_NUM_SLICES = flags.DEFINE_integer("num_slices", 1, "Slices of that topology (joined by DCN).")
flags.mark_flags_as_required(["config", "topology"])

GIB = 2**30
# HBM per device (GiB) by `device_kind`, used only when the compiler's figure cannot be read.
# v4 and older expose each TensorCore as a device (half a chip's HBM).
HBM_GIB = {
  "TPU v2": 8,
  "TPU v3": 16,
  "TPU v4": 16,
  "TPU v5 lite": 16,
  "TPU v5": 95,
  "TPU v6 lite": 32,
}
# Generations whose slices of up to 8 chips are one host; other slices have 2x2x1 chips a host.
_SINGLE_HOST_8 = ("v5e", "v5litepod", "v6e")
_COLLECTIVES = ("all-reduce", "all-gather", "reduce-scatter", "all-to-all", "collective-permute")
_ITEMSIZE = {"pred": 1, "s4": 0.5, "u4": 0.5, "s8": 1, "u8": 1, "f8e4m3fn": 1, "f8e5m2": 1}
_ITEMSIZE.update({t: 2 for t in ("s16", "u16", "f16", "bf16")})
_ITEMSIZE.update({t: 4 for t in ("s32", "u32", "f32")})
_ITEMSIZE.update({t: 8 for t in ("s64", "u64", "f64", "c64")})
_ITEMSIZE["c128"] = 16
_SIZE = re.compile(r"([0-9.]+)([KMGT]?)")
_OOM = re.compile(
  r"required for HLO temporaries \(([0-9.]+[KMGT]?)\).*available HBM \(([0-9.]+[KMGT]?)\)"
)


def topology_devices(name: str, num_slices: int) -> list:
  """The devices of `num_slices` slices of TPU topology `name` (ValueError naming it if bad)."""
  generation, _, shape = name.partition(":")
  try:
    dims = [int(n) for n in shape.split("x")]
  except ValueError:
    dims = []
  if not generation or not dims or min(dims) < 1:
    raise ValueError(f"--topology={name!r} is not GENERATION:SHAPE, e.g. v5p:4x4x4 or v6e:16x16.")
  if num_slices < 1:
    raise ValueError(f"--num_slices={num_slices} must be >= 1.")
  dims = (dims + [1, 1])[:3]
  # Describing and compiling take no TPU: libtpu may load beside another process holding it (a
  # training run, another check), and there are no TPU workers to look up (it would log errors).
  os.environ.setdefault("ALLOW_MULTIPLE_LIBTPU_LOAD", "1")
  os.environ.setdefault("TPU_WORKER_HOSTNAMES", "localhost")
  if generation.lower() in _SINGLE_HOST_8 and math.prod(dims) <= 8:
    host = tuple(dims)
  else:
    host = tuple(min(b, d) for b, d in zip((2, 2, 1), dims))
  try:
    desc = topologies.get_topology_desc(
      platform="tpu",
      topology_name=name,
      chip_config_name="default",
      chips_per_host_bounds=host,
      num_slices=num_slices,
    )
  except Exception as e:  # libtpu's INVALID_ARGUMENT says what is wrong with the name
    raise ValueError(f"--topology={name!r}: {str(e).splitlines()[0]}") from None
  return list(desc.devices)


def _bytes(text: str) -> int:
  number, unit = _SIZE.fullmatch(text).groups()
  return round(float(number) * 1024 ** " KMGT".index(unit or " "))


def hbm_bytes(device) -> int:
  """Bytes of HBM the TPU compiler allows one program on `device`: it names them when a probe
  program asks for 1 TiB; failing that, `HBM_GIB[device.device_kind]`."""
  mesh = jax.sharding.Mesh(np.array([device]), ("d",))
  probe = jax.ShapeDtypeStruct((2**40,), jnp.int8, sharding=jax.NamedSharding(mesh, jax.P()))
  try:
    jax.jit(lambda x: x + 1).lower(probe).compile()
  except Exception as e:
    match = _OOM.search(str(e))
    if match:
      return _bytes(match.group(2))
  if device.device_kind not in HBM_GIB:
    raise ValueError(f"no HBM size known for {device.device_kind!r}; add it to aot.HBM_GIB.")
  return HBM_GIB[device.device_kind] * GIB


def vocab_size(config) -> tuple[int, str]:
  """(vocabulary size, where it comes from), from the config alone (see the module docstring)."""
  spec = config.data.tokenizer
  if spec == "byte":
    return tokenizer_lib.ByteTokenizer.vocab_size, "data.tokenizer='byte'"
  if spec == "bpe":
    return model_lib.model_config(config.model.size).vocab_size, f"model.size={config.model.size!r}"
  try:
    return tokenizer_lib.SentencePieceTokenizer(spec).vocab_size, f"data.tokenizer={spec!r}"
  except (OSError, RuntimeError) as e:
    raise ValueError(f"data.tokenizer={spec!r} is neither 'bpe', 'byte' nor a .model file") from e


def programs(config, devices, vocab: int) -> tuple[dict, jax.sharding.Mesh, dict]:
  """{name: (jitted function, abstract arguments)} of the run `config` on `devices`, the mesh and
  the abstract train state (with its shardings)."""
  mesh = train.make_mesh(config, devices)
  model = train.make_model(config, vocab)
  init_params = functools.partial(model_lib.init_params, model.config)
  param_shapes = jax.eval_shape(init_params, jax.random.key(config.seed))
  loss_fn = train.make_loss_fn(model)
  algorithm = train.make_algorithm(
    config, loss_fn, train.make_optimizer(config), param_shapes, mesh
  )
  tokens = jax.ShapeDtypeStruct((config.train.batch_size, config.data.seq_len), jnp.int32)
  jobs = algorithm.programs(
    param_shapes, {"inputs": tokens, "targets": tokens}, config.train.num_steps
  )
  state = algorithm.abstract_state(param_shapes)
  eval_tokens = jax.ShapeDtypeStruct(
    (config.train.eval_batch_size or config.train.batch_size, config.data.seq_len),
    jnp.int32,
    sharding=sharding.rows_over_devices(mesh),
  )
  jobs["eval_step"] = (
    train.make_eval_step(loss_fn, mesh),
    (algorithm.params(state), {"inputs": eval_tokens, "targets": eval_tokens}),
  )
  return jobs, mesh, state


def _shape_bytes(text: str) -> int:
  """Bytes of the arrays written in HLO text, e.g. "(f32[4,8]{1,0}, bf16[2]{0})"."""
  total = 0
  for dtype, dims in re.findall(r"\b([a-z]+[0-9]*[a-z0-9]*)\[([0-9,]*)\]", text):
    if dtype in _ITEMSIZE:
      total += math.ceil(_ITEMSIZE[dtype] * math.prod(int(n) for n in dims.split(",") if n))
  return total


def _iota(dims: str, perm: str | None) -> np.ndarray:
  """Device ids of an HLO iota list "[dims]T(perm)", before the final reshape."""
  dims = [int(n) for n in dims.split(",")]
  ids = np.arange(math.prod(dims)).reshape(dims)
  return ids.transpose([int(n) for n in perm.split(",")]) if perm else ids


def _groups(line: str) -> list[list[int]]:
  """The device groups of a collective's HLO line (replica_groups or source_target_pairs).

  Three spellings: an iota list "[groups,size]<=[dims]T(perm)", explicit "{{0,1},{2,3}}", and
  mesh axes "mesh['axis_0'=2,'axis_1'=4], device_ids=([dims]T(perm)) {'axis_1'}" (a group per index of
  the axes not named, its devices along the named ones).
  """
  mesh = re.search(
    r"replica_groups=mesh\[([^\]]*)\](?:, device_ids=\(\[([0-9,]+)\]"
    r"(?:T\(([0-9,]+)\))?\))? \{([^}]*)\}",
    line,
  )
  if mesh:
    axes = re.findall(r"'(\w+)'=([0-9]+)", mesh[1])
    names, sizes = [n for n, _ in axes], [int(k) for _, k in axes]
    ids = _iota(mesh[2], mesh[3]) if mesh[2] else np.arange(math.prod(sizes))
    ids = ids.reshape(sizes)
    grouped = [names.index(n) for n in re.findall(r"'(\w+)'", mesh[4])]
    rest = [i for i in range(len(names)) if i not in grouped]
    size = math.prod(sizes[i] for i in grouped)
    return ids.transpose(rest + grouped).reshape(-1, size).tolist()
  iota = re.search(r"replica_groups=\[([0-9,]+)\]<=\[([0-9,]+)\](?:T\(([0-9,]+)\))?", line)
  if iota:
    shape = [int(n) for n in iota[1].split(",")]
    return _iota(iota[2], iota[3]).reshape(shape).tolist()
  listed = re.search(r"(?:replica_groups|source_target_pairs)=\{(\{[0-9,{}]*\})\}", line)
  if not listed:
    return []
  return [[int(n) for n in g.split(",") if n] for g in re.findall(r"\{([0-9,]*)\}", listed[1])]


# `%name = SHAPE opcode(operands), attributes` (SHAPE may be a tuple).
_INSTRUCTION = re.compile(
  r"^\s*(?:ROOT\s+)?%([\w.\-]+)\s*=\s*(.*?)\s([a-z][\w\-]*)\((.*?)\)(?:,|$)"
)


def _matmuls(opcode: str, name: str, line: str, per_computation: dict) -> int:
  """Matrix multiplies an instruction runs: 1 for a dot/convolution, a fusion around one (the
  TPU compiler names those ``convolution...``/``dot...`` fusions of kind kOutput) or a GEMM
  custom-call (GPU); for a while loop, call or conditional, those of the computations it runs
  (a loop body counted once), which the HLO text prints before their caller."""
  if opcode in ("dot", "convolution") or (
    opcode == "fusion" and (name.startswith(("convolution", "dot")) or "kind=kOutput" in line)
  ):
    return 1
  if opcode == "custom-call" and re.search(r'custom_call_target="[^"]*(gemm|matmul)', line, re.I):
    return 1
  if opcode in ("while", "call", "conditional"):
    called = re.findall(r"(?:body|to_apply|branch_computations)=\{?([^,}]*)", line)
    names = [n.strip().lstrip("%") for group in called for n in group.split(",")]
    return sum(per_computation.get(n, 0) for n in names)
  return 0


def collectives(hlo: str, fsdp: int, dcn_crosses_workers: bool) -> dict:
  """Per collective kind in compiled HLO text: count, operand bytes (per device) and how many
  cross workers; the number of async start/done pairs per opcode (collectives, copies...); and,
  per async kind other than copies, how many pairs have matrix multiplies scheduled between
  start and done (``overlap``: the transfer runs while they compute) and how many in all.

  Device i of the program is in worker row i // fsdp (the mesh's order).  Across
  slices a collective is a send/recv pair to the DCN ("megascale") runtime: counted once, as
  "dcn-KIND", crossing workers when `dcn_crosses_workers` (each worker row inside one slice).
  """
  shapes, calls, pairs = {}, [], collections.Counter()
  overlap = collections.defaultdict(lambda: {"pairs": 0, "with_matmuls": 0, "matmuls_between": 0})
  started, matmuls = {}, 0  # async starts of the current computation: name -> matmuls before
  per_computation, computation = {}, None
  for line in hlo.splitlines():
    if line.endswith("{") and not line.startswith(" "):  # a new computation
      started, matmuls = {}, 0
      computation = re.findall(r"%?([\w.\-]+) ", line.removeprefix("ENTRY "))[:1]
      computation = computation[0] if computation else None
    match = _INSTRUCTION.match(line)
    if not match:
      continue
    name, shape, opcode, operands = match.groups()
    shapes[name] = shape
    if (opcode.endswith("-start") and opcode != "copy-start") or opcode in ("send", "recv"):
      started[name] = matmuls
    elif opcode.endswith("-done") and opcode != "copy-done":
      start = re.findall(r"%([\w.\-]+)", operands)[:1]
      if start and start[0] in started:
        entry = overlap[opcode.removesuffix("-done")]
        between = matmuls - started.pop(start[0])
        entry["pairs"] += 1
        entry["with_matmuls"] += between > 0
        entry["matmuls_between"] += between
    matmuls += _matmuls(opcode, name, line, per_computation)
    per_computation[computation] = matmuls
    if opcode.endswith("-start"):
      pairs[opcode.removesuffix("-start")] += 1
    dcn = re.search(r'_xla_megascale_transfer_type="(\w+)"', line)
    if opcode == "send" and dcn:
      names = re.findall(r"%([\w.\-]+)", operands)[:1]  # the data; then a token
      calls.append(("dcn-" + dcn[1].lower().replace("_", "-"), names, dcn_crosses_workers))
    elif opcode.removesuffix("-start") in _COLLECTIVES:
      groups = _groups(line)
      crosses = any(len({i // fsdp for i in g}) > 1 for g in groups)
      calls.append((opcode.removesuffix("-start"), re.findall(r"%([\w.\-]+)", operands), crosses))
  found = collections.defaultdict(lambda: {"count": 0, "operand_bytes": 0, "cross_worker": 0})
  for kind, names, crosses in calls:
    entry = found[kind]
    entry["count"] += 1
    entry["operand_bytes"] += sum(_shape_bytes(shapes.get(n, "")) for n in names)
    entry["cross_worker"] += crosses
  return {"collectives": dict(found), "async_pairs": dict(pairs), "overlap": dict(overlap)}


def compile_program(fn, args, hbm: int) -> dict:
  """Lowers and compiles `fn(*args)`: its per-device memory (bytes), cost, HLO text and the
  seconds lowering and compiling took."""
  start = time.perf_counter()
  lowered = fn.lower(*args)
  try:
    compiled = lowered.compile()
  except Exception as e:
    match = _OOM.search(str(e))
    if not match:
      raise
    return {
      "fits": False,
      "peak_bytes": _bytes(match.group(1)),
      "argument_bytes": sum(
        math.prod(x.sharding.shard_shape(x.shape)) * x.dtype.itemsize for x in jax.tree.leaves(args)
      ),
      "error": str(e).splitlines()[0],
      "compile_seconds": round(time.perf_counter() - start, 1),
    }
  seconds = time.perf_counter() - start
  m = compiled.memory_analysis()
  result = {
    "argument_bytes": m.argument_size_in_bytes,
    "output_bytes": m.output_size_in_bytes,
    "alias_bytes": m.alias_size_in_bytes,
    "temp_bytes": m.temp_size_in_bytes,
    "code_bytes": m.generated_code_size_in_bytes,
    "peak_bytes": m.peak_memory_in_bytes
    or (
      m.argument_size_in_bytes
      + m.output_size_in_bytes
      - m.alias_size_in_bytes
      + m.temp_size_in_bytes
      + m.generated_code_size_in_bytes
    ),
  }
  cost = compiled.cost_analysis() or {}
  cost = cost[0] if isinstance(cost, (list, tuple)) else cost
  result.update(
    fits=result["peak_bytes"] <= hbm,
    flops=float(cost.get("flops", 0.0)),
    bytes_accessed=float(cost.get("bytes accessed", 0.0)),
    compile_seconds=round(seconds, 1),
    hlo=compiled.as_text(),
  )
  return result


def advice(config) -> str:
  """What to change when a program does not fit."""
  d, tc = config.diloco, config.train
  tips = [
    "more devices per worker to shard the model over (a larger --topology or --num_slices"
    + (f", fewer workers than diloco.num_workers={d.num_workers}" if d.num_workers else "")
    + f", or diloco.fsdp={d.fsdp} -> 0: all of a worker's devices)"
  ]
  if not config.model.remat:
    tips.append("model.remat=True")
  if not config.model.scan_layers:
    tips.append("model.scan_layers=True")
  tips.append(f"a smaller train.batch_size (now {tc.batch_size}) or data.seq_len")
  return "; ".join(tips)


def main(argv):
  if len(argv) > 1:
    raise app.UsageError(f"Unexpected arguments: {argv[1:]}")
  jax.config.update("jax_platforms", "cpu")  # this host only traces; libtpu compiles
  config, topology = _CONFIG.value, _TOPOLOGY.value
  try:
    config_lib.validate(config)
    devices = topology_devices(topology, _NUM_SLICES.value)
    vocab, source = vocab_size(config)
    jobs, mesh, state = programs(config, devices, vocab)
    hbm = hbm_bytes(devices[0])
  except ValueError as e:
    sys.exit(f"FATAL {e}")
  slices = f" x {_NUM_SLICES.value} slices" if _NUM_SLICES.value > 1 else ""
  print(
    f"{topology}{slices}: {len(devices)} x {devices[0].device_kind}, "
    f"{hbm / GIB:.2f} GiB HBM each; mesh worker={mesh.shape[sharding.WORKER_AXIS]} x "
    f"fsdp={mesh.shape[sharding.FSDP_AXIS]}; model {config.model.size} "
    f"({model_lib.param_count(train.make_model(config, vocab).config) / 1e9:.3f}B parameters, "
    f"vocab {vocab} from {source})",
    flush=True,
  )
  state_bytes = sharding.state_bytes_per_device(state)
  total = sum(math.prod(x.shape) * x.dtype.itemsize for x in jax.tree.leaves(state))
  print(
    f"train state: {state_bytes / GIB:.2f} GiB on the fullest device "
    f"({total / GIB:.2f} GiB if every device held all of it: {state_bytes / total:.4f}x)",
    flush=True,
  )
  # A resume restores the state straight into its layout (`train.train_and_evaluate`): it holds
  # the state and nothing else.
  report = {"restore": {"fits": state_bytes <= hbm, "peak_bytes": state_bytes}}
  print(f"restore: peak {state_bytes / GIB:.2f} GiB of {hbm / GIB:.2f} GiB per device", flush=True)
  for name, (fn, args) in jobs.items():
    result = compile_program(fn, args, hbm)
    hlo = result.pop("hlo", None)
    if hlo is not None:
      rows = [{sharding.slow_link_group(d) for d in row} for row in mesh.devices]
      dcn_crosses_workers = all(len(r) == 1 for r in rows) and len(set().union(*rows)) > 1
      result.update(collectives(hlo, mesh.shape[sharding.FSDP_AXIS], dcn_crosses_workers))
    report[name] = result
    gib = lambda key: f"{result[key] / GIB:.2f}"
    if "error" not in result:
      line = (
        f"{name}: peak {gib('peak_bytes')} GiB of {hbm / GIB:.2f} GiB per device "
        f"(arguments {gib('argument_bytes')}, outputs {gib('output_bytes')}, aliased "
        f"{gib('alias_bytes')}, temporaries {gib('temp_bytes')}, code {gib('code_bytes')}); "
        f"{result['flops'] / 1e12:.3g} TFLOP; compiled in {result['compile_seconds']} s"
      )
    else:
      line = (
        f"{name}: DOES NOT FIT: peak {gib('peak_bytes')} GiB of {hbm / GIB:.2f} GiB per device "
        f"(arguments {gib('argument_bytes')}); the compiler says: {result['error']} "
        f"(after {result['compile_seconds']} s)"
      )
    print(line, flush=True)
    for kind, c in result.get("collectives", {}).items():
      print(
        f"  {kind}: {c['count']} ({c['cross_worker']} across workers), "
        f"{c['operand_bytes'] / 2**20:.1f} MiB operands",
        flush=True,
      )
    if result.get("async_pairs"):
      print(f"  async start/done pairs: {result['async_pairs']}", flush=True)
    for kind, o in result.get("overlap", {}).items():
      print(
        f"  {kind} start..done: {o['with_matmuls']} of {o['pairs']} with matrix multiplies "
        f"between ({o['matmuls_between']} in all)",
        flush=True,
      )
  fits = all(r["fits"] for r in report.values())
  summary = {
    "fits": fits,
    "peak_bytes_per_device": max(r["peak_bytes"] for r in report.values()),
    "hbm_bytes": hbm,
    "state_bytes_per_device": state_bytes,
    "state_bytes_total": total,
    "topology": topology,
    "programs": report,
  }
  if not fits:
    too_big = [n for n, r in report.items() if not r["fits"]]
    print(
      f"{', '.join(too_big)} does not fit in {hbm / GIB:.2f} GiB per device. Try: {advice(config)}.",
      file=sys.stderr,
      flush=True,
    )
  print(json.dumps(summary), flush=True)
  return 0 if fits else 1


if __name__ == "__main__":
  app.run(main, flags_parser=config_lib.parse_flags)
