"""Data-parallel Muon baseline on every device (the paper's DP Muon; CPU-sized).

Muon (lr 0.02) updates the hidden matrices; its AdamW part (lr 3e-3) the embedding,
head and norm gains.
  python -m muloco_jax.main --config=configs/dp_muon.py --workdir=/tmp/dp_muon
"""

from muloco_jax.config import default_config


def get_config():
  config = default_config()
  config.model.size = "small"
  config.model.dtype = "float32"  # fast on CPU; the paper computes in bf16 on accelerators
  config.data.seq_len = 128
  config.train.num_steps = 300
  config.train.batch_size = 32  # global, as in the DiLoCo configs
  config.optimizer.name = "muon"
  config.optimizer.learning_rate = 0.02
  config.optimizer.adam_learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.ns_dtype = "float32"  # likewise: bf16 Newton-Schulz on accelerators
  config.diloco.num_workers = 0  # plain data parallelism
  return config
