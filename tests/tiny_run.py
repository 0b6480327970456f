"""The tiny data-parallel run the training tests start from (byte KJV, 32-token sequences)."""

from muloco_jax import config as config_lib


def tiny_config(data_dir):
  """Tiny model, float32, batch 16, 24 steps; eval and checkpoints every 8."""
  c = config_lib.default_config()
  c.model.size = "tiny"
  c.model.dtype = "float32"
  c.data.dir = data_dir
  c.data.tokenizer = "byte"
  c.data.seq_len = 32
  c.train.num_steps = 24
  c.train.batch_size = 16
  c.train.log_every = 2
  c.train.eval_every = 8
  c.train.eval_steps = 2
  c.train.checkpoint_every = 8
  c.train.keep_checkpoints = 2
  c.train.progress_bar = False
  c.optimizer.warmup_steps = 4
  return c
