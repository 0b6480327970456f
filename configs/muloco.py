"""MuLoCo: DiLoCo with Muon inner steps; K=8 workers, outer Nesterov SGD every H=30 (CPU-sized).

Muon (lr 0.02) updates the hidden matrices, its AdamW part (lr 3e-3) the rest.
  python -m muloco_jax.main --config=configs/muloco.py --workdir=/tmp/muloco
"""

from muloco_jax.config import default_config


def get_config():
  config = default_config()
  config.model.size = "small"
  config.model.dtype = "float32"  # fast on CPU; the paper computes in bf16 on accelerators
  config.data.seq_len = 128
  config.train.num_steps = 300  # 10 rounds of H=30
  config.train.batch_size = 32  # global: 4 sequences per worker
  config.optimizer.name = "muon"
  config.optimizer.learning_rate = 0.02
  config.optimizer.adam_learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.ns_dtype = "float32"  # likewise: bf16 Newton-Schulz on accelerators
  config.diloco.num_workers = 8  # K
  config.diloco.sync_every = 30  # H
  config.diloco.outer_lr = 0.7
  config.diloco.outer_momentum = 0.9
  config.diloco.outer_nesterov = True
  return config
