"""muloco_jax: MuLoCo (DiLoCo with Muon as the inner optimizer) in JAX/Flax.

The optimizer, DiLoCo, compression and model pieces import only jax, flax and
optax; the training harness (`train_and_evaluate`, `default_config`,
`get_dataset`) also pulls in tensorflow-datasets and grain, so it is imported on
first use.
"""

import importlib

from muloco_jax.compression import (
  CompressionSpec,
  TreeCodec,
  compressed_nbytes,
  decode,
  encode,
  pack_bits,
  unpack_bits,
)
from muloco_jax.diloco import (
  AllGatherAverageState,
  Averager,
  DiLoCoState,
  ErrorFeedback,
  ReduceScatterAverageState,
  all_gather_average,
  compressed_average,
  mean_average,
  outer_optimizer,
  pseudogradient,
  reduce_scatter_average,
)
from muloco_jax.fragments import split_into_fragments
from muloco_jax.runtime import DataParallel, DiLoCo
from muloco_jax.sharding import make_mesh, mesh_for_workers
from muloco_jax import layout
from muloco_jax.layout import matrix_mask, stack_layers, unstack_layers
from muloco_jax.model import ModelConfig, Transformer, model_config, param_count
from muloco_jax.optim import (
  CLASSIC_COEFFICIENTS,
  FLAX_DIMENSION_NUMBERS,
  MULOCO_COEFFICIENTS,
  MuonDimensionNumbers,
  ScaleByMuonState,
  dimension_numbers_tree,
  fan_in_fan_out,
  muon,
  muon_labels,
  newton_schulz_coefficients,
  orthogonalize,
  scale_by_muon,
)

_LAZY = {
  "train_and_evaluate": "muloco_jax.train",
  "default_config": "muloco_jax.config",
  "get_dataset": "muloco_jax.data",
}


def __getattr__(name):
  if name in _LAZY:
    return getattr(importlib.import_module(_LAZY[name]), name)
  raise AttributeError(f"module 'muloco_jax' has no attribute {name!r}")
