"""Data-parallel AdamW baseline on every device (the paper's DP AdamW; CPU-sized).

python -m muloco_jax.main --config=configs/dp_adamw.py --workdir=/tmp/dp_adamw
"""

from muloco_jax.config import default_config


def get_config():
  config = default_config()
  config.model.size = "small"
  config.model.dtype = "float32"  # fast on CPU; the paper computes in bf16 on accelerators
  config.data.seq_len = 128
  config.train.num_steps = 300
  config.train.batch_size = 32  # global, as in the DiLoCo configs
  config.optimizer.name = "adamw"
  config.optimizer.learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.diloco.num_workers = 0  # plain data parallelism
  return config
