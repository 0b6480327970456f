"""The paper's MuLoCo settings (arXiv 2505.23725 and the authors' code), at the 150m preset.

  python -m muloco_jax.main --config=configs/paper/muloco.py --workdir=/tmp/paper_muloco
  python -m muloco_jax.main --config=configs/paper/muloco.py:statistical2 ...   (compressed)

Muon lr 0.0224 with momentum 0.9 and no Nesterov, spectral scaling, bf16 Newton-Schulz; its
AdamW part (0.9, 0.99, eps 1e-8) for the embedding, head and gains; weight decay 1e-4 rescaled
by the per-worker batch against 512 sequences; warmup 300 steps, cosine to 10%; K=8 workers,
H=30, outer Nesterov SGD (0.7, 0.9).  The argument, e.g. "statistical2" or "linear4", turns on
compression exactly the authors' way: row-wise quantizer (rows = output units), error
feedback with decay 0.9 accumulating outer_lr x delta, the embedding, head and gains sent in
float32, the average re-quantized after the all-gather (their `simulate_quantization_after_reduce`)
and outer (0.8, 0.8), their compression runs' setting.
"""

import re

from muloco_jax.config import default_config


def get_config(arg: str = ""):
  config = default_config()
  config.model.size = "150m"
  config.model.scan_layers = True
  config.model.dtype = "bfloat16"
  config.data.seq_len = 2048
  config.train.num_steps = 2880  # 96 outer rounds of H=30
  config.train.batch_size = 256
  config.optimizer.name = "muon"
  config.optimizer.learning_rate = 0.0224
  config.optimizer.adam_learning_rate = 0.0  # the same peak for the AdamW part
  config.optimizer.momentum = 0.9
  config.optimizer.nesterov = False
  config.optimizer.muon_scale = "spectral"
  config.optimizer.ns_dtype = "bfloat16"
  config.optimizer.weight_decay = 1e-4
  config.optimizer.warmup_steps = 300
  config.optimizer.min_lr_ratio = 0.1
  config.diloco.num_workers = 8
  config.diloco.sync_every = 30
  config.diloco.outer_lr, config.diloco.outer_momentum = 0.7, 0.9
  config.diloco.outer_nesterov = True
  config.diloco.weight_decay_reference_batch = 512
  if arg:
    match = re.fullmatch(r"(statistical|linear)(\d)", arg)
    if not match:
      raise ValueError(f"configs/paper/muloco.py argument {arg!r}: expected e.g. statistical2")
    c = config.compression
    c.kind, c.bits, c.per_row = match[1], int(match[2]), True
    c.error_feedback, c.error_decay, c.error_feedback_scale = True, 0.9, "outer_lr"
    c.exclude = "vectors_embedding_head"
    c.collective, c.requantize_average = "all_gather", True
    c.table_dtype = "float32"  # the authors' table precision
    config.diloco.outer_lr, config.diloco.outer_momentum = 0.8, 0.8
  return config
