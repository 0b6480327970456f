"""The run configuration: schema, defaults and validation.

Every file under configs/ starts from `default_config()` and overrides fields;
absl's `--config.a.b=value` flags override further.  `validate` checks a config
before anything is compiled and names the offending setting.
"""

import sys

from absl import app
import ml_collections

from muloco_jax import compression
from muloco_jax import data as data_lib
from muloco_jax import diloco

OPTIMIZERS = ("adamw", "muon", "sgd")
COMPRESSORS = compression.KINDS
EF_SCALES = ("none", "outer_lr")
EXCLUDE_RULES = {
  "vectors": compression.exclude_vectors,
  "vectors_embedding_head": compression.exclude_vectors_embedding_head,
}


def default_config() -> ml_collections.ConfigDict:
  """All fields a run reads, with their defaults (a tiny data-parallel AdamW run)."""
  c = ml_collections.ConfigDict()
  c.seed = 0

  c.model = ml_collections.ConfigDict()
  c.model.size = "tiny"  # tiny, small, 150m, 416m, 914m, 1.76b, 3.1b, 15b
  c.model.num_layers = 0  # 0: the size preset's; else that many blocks of the preset's width
  c.model.max_seq_len = 2048
  c.model.scan_layers = False
  c.model.remat = False
  # The loss forms the float32 logits of this many positions of each sequence at a time
  # (rematerialised in the backward pass); 0: all at once.  Must divide data.seq_len.
  c.model.loss_chunk_len = 128
  c.model.dtype = "bfloat16"  # compute dtype; parameters are float32

  c.data = data_lib.default_config()
  c.data.seq_len = 128

  c.train = ml_collections.ConfigDict()
  c.train.num_steps = 300
  c.train.batch_size = 32  # global, in sequences
  c.train.log_every = 10
  c.train.eval_every = 100
  c.train.eval_steps = 8
  c.train.eval_batch_size = 0  # 0: train.batch_size
  c.train.checkpoint_every = 100
  c.train.keep_checkpoints = 2
  c.train.progress_bar = True  # only drawn on a terminal
  # "START:END": a jax.profiler trace of steps START..END-1 (e.g. "20:25": steps 20-24) in
  # WORKDIR/profile, for TensorBoard's profile plugin or Perfetto (docs/usage.md); "" = off.
  # A run resumed after START traces nothing.
  c.train.profile_steps = ""

  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "adamw"  # adamw | muon | sgd
  c.optimizer.learning_rate = 3e-3
  c.optimizer.warmup_steps = 30
  c.optimizer.min_lr_ratio = 0.1  # cosine decay ends at this fraction of the peak
  c.optimizer.weight_decay = 0.01
  c.optimizer.grad_clip = 1.0  # 0 disables clipping
  c.optimizer.b1 = 0.9  # AdamW (and the AdamW part of Muon)
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.momentum = 0.9  # Muon momentum (the paper's); SGD momentum
  c.optimizer.nesterov = False  # the paper's Muon runs use none
  c.optimizer.ns_schedule = "muloco"  # classic | muloco | polar_express
  c.optimizer.ns_steps = 5
  c.optimizer.ns_method = "newton_schulz"  # newton_schulz | gram (Gram Newton-Schulz)
  c.optimizer.ns_dtype = "bfloat16"  # Newton-Schulz matmul operands and X; sums are float32
  c.optimizer.muon_scale = "spectral"  # spectral | moonlight | none
  c.optimizer.adam_learning_rate = 0.0  # Muon's AdamW part; 0: optimizer.learning_rate

  c.diloco = ml_collections.ConfigDict()
  c.diloco.num_workers = 0  # K; 0 = plain data parallel
  c.diloco.sync_every = 30  # H
  c.diloco.outer_lr = 0.7
  c.diloco.outer_momentum = 0.9
  c.diloco.outer_nesterov = True
  # Devices that shard one worker's parameters, optimizer state and batch (the mesh `fsdp`
  # axis); 0: automatic, every device is used (see `sharding.mesh_for_workers`).
  c.diloco.fsdp = 0
  # The paper's weight-decay rescaling: wd *= (B / K) / reference; 0 = off (paper: 512).
  c.diloco.weight_decay_reference_batch = 0
  c.diloco.num_fragments = 1  # streaming DiLoCo: F fragments synced at staggered steps
  # tau: a sync's exchange runs beside the next inner step and is adopted tau steps after the
  # sync step (the authors' fragment_sync_delay); 0: no overlap.  Must be < sync_every.
  c.diloco.overlap_steps = 0
  # alpha: on adoption theta_k <- (1 - alpha) theta + alpha theta_k (fragment_update_alpha).
  # 0 and "replace" below are the measured defaults (experiments/README.md, "Overlap").
  c.diloco.mixing = 0.0
  # On adoption: "replace" (the worker takes the shared fragment) or "keep_progress" (it also
  # keeps the overlap_steps steps it took since the exchange; one more copy of its parameters).
  c.diloco.adoption = "replace"
  # Failure injection: "WORKER:START-END,..." loses worker WORKER for steps [START, END) (END
  # empty: for good): it takes no steps, misses the syncs in that window, and rejoins from the
  # shared parameters with a fresh inner state and error-feedback buffers.
  c.diloco.drop_workers = ""
  # Resume a checkpoint saved with another diloco.num_workers (an elastic restart): the shared
  # parameters, outer state and step are carried, every worker restarts from the shared
  # parameters (fresh inner state, schedule kept; error feedback at zero; see
  # `diloco.with_workers`).  Not with overlap_steps > 0.
  c.diloco.elastic_resume = False

  c.compression = ml_collections.ConfigDict()
  c.compression.kind = "none"  # none | statistical | linear | topk
  c.compression.bits = 2  # 1, 2, 4 or 8
  c.compression.per_row = True  # quantizer statistics per row (else per tensor)
  c.compression.topk_fraction = 0.05
  c.compression.error_feedback = True
  c.compression.error_decay = 0.9
  # none: e <- decay e + delta; outer_lr: e <- decay e + outer_lr delta (the authors' code).
  c.compression.error_feedback_scale = "none"
  c.compression.exclude = "vectors"  # vectors | vectors_embedding_head (the paper's runs)
  # How payloads cross workers: all_gather (each worker decodes all K) or reduce_scatter
  # (all-to-all of row chunks, owners average and re-quantize, all-gather).
  c.compression.collective = "all_gather"
  c.compression.requantize_average = False  # all_gather: the authors' re-quantized average
  c.compression.requantize_error_feedback = True  # reduce_scatter: owners' error feedback
  c.compression.table_dtype = "float16"  # statistical quantizer's decode table
  return c


def model_overrides(config: ml_collections.ConfigDict) -> dict:
  """The ``ModelConfig`` fields a run's config replaces in its size preset."""
  return {"num_layers": config.model.num_layers} if config.model.num_layers else {}


def validate(config: ml_collections.ConfigDict) -> None:
  """Raises ValueError naming the first bad setting; called before compilation."""
  from muloco_jax import model as model_lib  # the model module imports flax; keep this module light

  _check(config.model.num_layers >= 0, "model.num_layers", config.model.num_layers, "must be >= 0")
  try:
    model_config = model_lib.model_config(
      config.model.size, max_seq_len=config.model.max_seq_len, **model_overrides(config)
    )
  except ValueError as e:
    raise ValueError(f"model.size={config.model.size!r}: {e}") from None
  _check(config.data.seq_len >= 1, "data.seq_len", config.data.seq_len, "must be >= 1")
  chunk_len, seq_len = config.model.loss_chunk_len, config.data.seq_len
  _check(
    chunk_len >= 0 and (chunk_len == 0 or chunk_len >= seq_len or seq_len % chunk_len == 0),
    "model.loss_chunk_len",
    chunk_len,
    f"must be 0, a divisor of data.seq_len={seq_len} or at least it",
  )
  _check(
    config.data.seq_len <= config.model.max_seq_len,
    "data.seq_len",
    config.data.seq_len,
    f"exceeds the model's limit model.max_seq_len={config.model.max_seq_len}",
  )
  for key in (
    "num_steps",
    "batch_size",
    "log_every",
    "eval_every",
    "eval_steps",
    "checkpoint_every",
    "keep_checkpoints",
  ):
    _check(config.train[key] >= 1, f"train.{key}", config.train[key], "must be >= 1")
  profile_steps(config)  # validates train.profile_steps
  _check(
    config.optimizer.name in OPTIMIZERS,
    "optimizer.name",
    config.optimizer.name,
    f"is not one of {OPTIMIZERS}",
  )
  _check(
    config.optimizer.learning_rate > 0,
    "optimizer.learning_rate",
    config.optimizer.learning_rate,
    "must be > 0",
  )
  _check(
    0 <= config.optimizer.warmup_steps < config.train.num_steps,
    "optimizer.warmup_steps",
    config.optimizer.warmup_steps,
    f"must be in [0, train.num_steps={config.train.num_steps})",
  )
  if config.optimizer.name == "muon":
    from muloco_jax import optim  # imports optax; only Muon runs need it

    opt = config.optimizer
    _check(
      opt.ns_method in optim.METHODS,
      "optimizer.ns_method",
      opt.ns_method,
      f"is not one of {optim.METHODS}",
    )
    try:
      optim.newton_schulz_coefficients(opt.ns_schedule, opt.ns_steps)
    except ValueError as e:
      raise ValueError(f"optimizer.ns_schedule={opt.ns_schedule!r}: {e}") from None
  d = config.diloco
  _check(d.num_workers >= 0, "diloco.num_workers", d.num_workers, "must be >= 0")
  _check(d.sync_every >= 1, "diloco.sync_every", d.sync_every, "(H) must be >= 1")
  _check(d.fsdp >= 0, "diloco.fsdp", d.fsdp, "must be >= 0")
  _check(d.num_fragments >= 1, "diloco.num_fragments", d.num_fragments, "must be >= 1")
  _check(
    d.num_fragments <= model_config.num_layers,
    "diloco.num_fragments",
    d.num_fragments,
    f"exceeds the model's {model_config.num_layers} layers",
  )
  _check(
    d.num_fragments == 1 or not config.model.scan_layers,
    "diloco.num_fragments",
    d.num_fragments,
    "> 1 needs model.scan_layers=False (fragments are layer ranges)",
  )
  _check(
    d.num_fragments <= d.sync_every,
    "diloco.num_fragments",
    d.num_fragments,
    f"exceeds diloco.sync_every={d.sync_every} (fragments would share sync steps)",
  )
  _check(
    0 <= d.overlap_steps < d.sync_every,
    "diloco.overlap_steps",
    d.overlap_steps,
    f"must be in [0, diloco.sync_every={d.sync_every}) (adopted before the fragment's next sync)",
  )
  _check(0.0 <= d.mixing <= 1.0, "diloco.mixing", d.mixing, "must be in [0, 1]")
  _check(
    d.adoption in diloco.ADOPTIONS,
    "diloco.adoption",
    d.adoption,
    f"is not one of {diloco.ADOPTIONS}",
  )
  _check(
    not (d.elastic_resume and d.overlap_steps),
    "diloco.elastic_resume",
    d.elastic_resume,
    "cannot resume with diloco.overlap_steps > 0 (an exchange may be in flight in the checkpoint)",
  )
  drop_schedule(config)  # validates diloco.drop_workers
  c = config.compression
  _check(c.kind in COMPRESSORS, "compression.kind", c.kind, f"is not one of {COMPRESSORS}")
  _check(
    c.kind == "none" or d.num_workers >= 1,
    "compression.kind",
    c.kind,
    "needs DiLoCo (diloco.num_workers >= 1)",
  )
  _check(
    c.exclude in EXCLUDE_RULES, "compression.exclude", c.exclude, f"is not one of {EXCLUDE_RULES}"
  )
  _check(
    c.error_feedback_scale in EF_SCALES,
    "compression.error_feedback_scale",
    c.error_feedback_scale,
    f"is not one of {EF_SCALES}",
  )
  _check(
    c.error_feedback or c.error_feedback_scale == "none",
    "compression.error_feedback_scale",
    c.error_feedback_scale,
    "needs compression.error_feedback=True (it scales what enters the buffer)",
  )
  _check(
    c.collective in diloco.COLLECTIVES,
    "compression.collective",
    c.collective,
    f"is not one of {diloco.COLLECTIVES}",
  )
  _check(
    not (c.requantize_average and c.collective == "reduce_scatter"),
    "compression.requantize_average",
    c.requantize_average,
    "simulates a compressed reduce-scatter with compression.collective='all_gather'; "
    "'reduce_scatter' re-quantizes the average itself",
  )
  compression_spec(config)  # validates bits, topk_fraction, table_dtype
  # The split over the devices of the mesh is checked once the mesh is known.
  _check(
    config.train.batch_size % max(d.num_workers, 1) == 0,
    "train.batch_size",
    config.train.batch_size,
    f"must be divisible by diloco.num_workers={d.num_workers}",
  )


def compression_spec(config: ml_collections.ConfigDict) -> compression.CompressionSpec:
  """The `CompressionSpec` of `config.compression` (raises ValueError naming a bad key)."""
  c = config.compression
  try:
    return compression.CompressionSpec(
      kind=c.kind,
      bits=c.bits,
      per_row=c.per_row,
      topk_fraction=c.topk_fraction,
      table_dtype=c.table_dtype,
    )
  except ValueError as error:  # "bits=3 must be ..." names the field: give its config key
    raise ValueError(f"compression.{error}") from None


def drop_schedule(config: ml_collections.ConfigDict) -> list[tuple[int, int, float]]:
  """`diloco.drop_workers` as (worker, first lost step, first step back (inf: never))."""
  spec, num_workers = config.diloco.drop_workers.strip(), config.diloco.num_workers
  schedule = []
  for entry in filter(None, (e.strip() for e in spec.split(","))):
    try:
      worker, window = entry.split(":")
      start, end = window.split("-")
      item = (int(worker), int(start), float(end) if end.strip() else float("inf"))
    except ValueError as e:
      raise ValueError(
        f"diloco.drop_workers={spec!r}: entry {entry!r} is not WORKER:START-END (END may be empty)."
      ) from e
    _check(
      0 <= item[0] < num_workers,
      "diloco.drop_workers",
      spec,
      f"names worker {item[0]}, outside [0, diloco.num_workers={num_workers})",
    )
    _check(item[1] < item[2], "diloco.drop_workers", spec, f"has an empty window in {entry!r}")
    schedule.append(item)
  return schedule


def profile_steps(config: ml_collections.ConfigDict) -> range:
  """The steps `train.profile_steps` ("START:END") traces, range(START, END); empty when ""."""
  spec, num_steps = config.train.profile_steps.strip(), config.train.num_steps
  if not spec:
    return range(0)
  try:
    start, end = (int(s) for s in spec.split(":"))
  except ValueError:
    raise ValueError(
      f"train.profile_steps={spec!r} is not START:END (steps START..END-1, e.g. '20:25')."
    ) from None
  _check(
    1 <= start < end <= num_steps + 1,
    "train.profile_steps",
    spec,
    f"must have 1 <= START < END <= train.num_steps + 1 = {num_steps + 1} (END is excluded)",
  )
  return range(start, end)


def _check(ok: bool, name: str, value, why: str) -> None:
  if not ok:
    raise ValueError(f"{name}={value!r} {why}.")


def parse_flags(argv):
  """absl's parser for the launchers (`app.run(..., flags_parser=parse_flags)`), plus a one-line
  error for a `--config.x` override of a field the config lacks."""
  try:
    return app.parse_flags_with_usage(argv)
  except (AttributeError, KeyError) as e:  # what ml_collections raises for `--config.no.such`
    message = e
    while isinstance(message, BaseException) and message.args:
      message = message.args[0]
    key, _, hint = str(message).partition("\n")
    key = key.strip("\"'")
    overrides = [a.split("=", 1)[0] for a in argv[1:] if a.startswith("--config.")]
    named = [a for a in overrides if key in a[len("--config.") :].split(".")] or overrides
    sys.exit(
      f"FATAL Flags parsing error: the config has no field {key!r} "
      f"({', '.join(named)}). {hint}".rstrip()
    )
