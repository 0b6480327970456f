"""Every shipped config is valid as it stands; the paper configs take their argument or say why."""

import glob
import importlib.util
import os

import pytest

from muloco_jax import config as config_lib
from muloco_jax import model as model_lib
from muloco_jax import train

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CONFIGS = sorted(glob.glob(os.path.join(REPO, "configs", "**", "*.py"), recursive=True))


def _load(path):
  spec = importlib.util.spec_from_file_location(os.path.basename(path)[:-3], path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


@pytest.mark.parametrize("path", CONFIGS, ids=lambda p: os.path.relpath(p, REPO))
def test_config_validates(path):
  config_lib.validate(_load(path).get_config())


@pytest.mark.parametrize("arg", ["statistical2", "statistical4", "linear2"])
def test_paper_compression_is_the_authors_way(arg):
  config = _load(os.path.join(REPO, "configs", "paper", "muloco.py")).get_config(arg)
  config_lib.validate(config)
  c = config.compression
  assert (c.error_feedback_scale, c.exclude, c.requantize_average) == (
    "outer_lr",
    "vectors_embedding_head",
    True,
  )
  assert config.optimizer.momentum == 0.9 and not config.optimizer.nesterov
  assert config.diloco.weight_decay_reference_batch == 512


def test_paper_config_names_a_bad_argument():
  with pytest.raises(ValueError, match="expected e.g. statistical2"):
    _load(os.path.join(REPO, "configs", "paper", "muloco.py")).get_config("topk")


def test_model_num_layers_replaces_the_presets_depth():
  config = config_lib.default_config()
  config.diloco.num_workers, config.diloco.sync_every = 2, 8
  config.diloco.num_fragments = 4
  with pytest.raises(ValueError, match=r"diloco\.num_fragments"):
    config_lib.validate(config)  # the tiny preset has 2 layers
  config.model.num_layers = 4
  config_lib.validate(config)
  model = train.make_model(config, vocab_size=257)
  assert model.config.num_layers == 4
  assert model.config.d_model == model_lib.PRESETS["tiny"]["d_model"]
