"""The README's main job: MuLoCo (K=4 workers, Muon inner) on the embedded KJV corpus.

Runs on a 2-core laptop CPU in a few minutes and shows the eval loss falling:
  python -m muloco_jax.main --config=configs/quickstart.py --workdir=/tmp/quickstart
"""

from muloco_jax.config import default_config


def get_config():
  config = default_config()
  config.model.size = "tiny"
  config.model.dtype = "float32"  # bf16 matmuls are slow on CPUs; use bf16 on GPU/TPU
  config.data.seq_len = 128
  config.train.num_steps = 240
  config.train.batch_size = 32
  config.train.log_every = 10
  config.train.eval_every = 60
  config.train.checkpoint_every = 60
  config.optimizer.name = "muon"
  config.optimizer.learning_rate = 0.02
  config.optimizer.adam_learning_rate = 3e-3
  config.optimizer.warmup_steps = 30
  config.optimizer.ns_dtype = "float32"
  config.diloco.num_workers = 4
  config.diloco.sync_every = 30
  return config
