"""DiLoCo: K=8 workers with AdamW inner steps, an outer Nesterov SGD step every H=30 (CPU-sized).

The global batch is split over the K workers (B/K sequences each); workers are spread
over the devices' `worker` mesh axis (several per device when K exceeds the devices).
  python -m muloco_jax.main --config=configs/diloco.py --workdir=/tmp/diloco
"""

from muloco_jax.config import default_config


def get_config():
  config = default_config()
  config.model.size = "small"
  config.model.dtype = "float32"  # fast on CPU; the paper computes in bf16 on accelerators
  config.data.seq_len = 128
  config.train.num_steps = 300  # 10 rounds of H=30
  config.train.batch_size = 32  # global: 4 sequences per worker
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.diloco.num_workers = 8  # K
  config.diloco.sync_every = 30  # H
  config.diloco.outer_lr = 0.7
  config.diloco.outer_momentum = 0.9
  config.diloco.outer_nesterov = True
  return config
