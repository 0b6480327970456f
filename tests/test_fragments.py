"""Tests of muloco_jax.fragments: `split_into_fragments`, and streaming DiLoCo syncing one
fragment at a time."""

import jax
import numpy as np
import optax
import pytest

from muloco_jax import diloco, runtime, sharding
from muloco_jax import fragments as fragments_lib
from toy_models import (
  assert_trees_close,
  host,
  make_batch,
  make_stacked_params,
  run_stacked,
  stacked_loss_fn,
)


def test_streaming_fragments():
  params = make_stacked_params()
  fragments = fragments_lib.split_into_fragments(params, 2)
  assert fragments == (
    ("layers_0", "layers_1", "embedding"),
    ("layers_2", "layers_3", "final_norm", "head"),
  )
  with pytest.raises(ValueError, match="^num_fragments=5"):
    fragments_lib.split_into_fragments(params, 5)
  inner, outer = optax.adamw(1e-2), diloco.outer_optimizer()
  mesh = sharding.make_mesh(2, 1)
  # F=1 streaming is plain DiLoCo.
  plain, _ = run_stacked(runtime.DiLoCo(stacked_loss_fn, inner, outer, 4, mesh), params)
  one, _ = run_stacked(
    runtime.DiLoCo(
      stacked_loss_fn,
      inner,
      outer,
      4,
      mesh,
      fragments=fragments_lib.split_into_fragments(params, 1),
    ),
    params,
  )
  assert_trees_close(one.params, plain.params, rtol=0, atol=0)
  # Syncing fragment 0 moves only its parameters and its own outer state.
  trainer = runtime.DiLoCo(stacked_loss_fn, inner, outer, 4, mesh, fragments=fragments)
  state = trainer.init(params)
  for h in range(3):
    state, _ = trainer.inner_step(state, trainer.shard_batch(make_batch(h, 16)))
  before = host(state)
  state, _ = trainer.outer_sync(state, fragment_index=0)
  after = host(state)
  for key in fragments[0]:
    assert not np.allclose(
      jax.tree.leaves(after.params[key])[0], jax.tree.leaves(before.params[key])[0]
    )
    assert_trees_close(
      after.worker_params[key],
      jax.tree.map(lambda x: np.broadcast_to(x, (4,) + x.shape), after.params[key]),
      rtol=0,
      atol=0,
    )
  for key in fragments[1]:
    assert_trees_close(after.params[key], before.params[key], rtol=0, atol=0)
    assert_trees_close(after.worker_params[key], before.worker_params[key], rtol=0, atol=0)
  assert_trees_close(after.outer_opt_state[1], before.outer_opt_state[1], rtol=0, atol=0)
