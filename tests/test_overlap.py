"""Overlapped streaming sync: the runtime's fused programs against the algorithm step by step."""

import jax
import numpy as np
import optax
import pytest

from muloco_jax import compression, diloco, runtime, sharding
from test_reduce_scatter import batch_at, host, loss_fn, make_params

K, H, STEPS = 2, 4, 11
FRAGMENTS = (("embed", "layers"), ("norm", "head"))
OFFSETS = (2, 4)  # floor(H (f + 1) / F): the authors' staggering
INNER, OUTER = optax.sgd(0.05, momentum=0.9), diloco.outer_optimizer(0.7, 0.9)


def sync_steps(fragment, last):
  return [s for s in range(1, last + 1) if (s - OFFSETS[fragment]) % H == 0]


def reference(tau, alpha, average=None):
  """The documented semantics, written out on one device with the pure functions: the sync at
  step s exchanges the parameters as they are after step s (beside inner step s + 1, which does
  not see it), the workers adopt it after step s + tau; the final step adopts what is in flight,
  then syncs every fragment it did not adopt at once."""
  state = diloco.init(make_params(), INNER, OUTER, K, FRAGMENTS, average)
  inner = jax.jit(lambda s, b: diloco.inner_step(s, b, loss_fn, INNER)[0])
  pending = []  # (adopt after step, fragment)
  for step in range(1, STEPS + 1):
    shared = state
    for f in range(len(FRAGMENTS)):
      if tau and step - 1 in sync_steps(f, step - 1):
        shared, _ = diloco.exchange(shared, OUTER, None, average, FRAGMENTS, f)
        pending.append((step - 1 + tau, f))
    state = inner(state, shard(batch_at(step)))
    state = state._replace(
      params=shared.params,
      outer_opt_state=shared.outer_opt_state,
      average_state=shared.average_state,
    )
    final, adopted = step == STEPS, set()
    for when, f in list(pending):
      if when == step or final:
        state, _ = diloco.adopt(state, INNER, None, FRAGMENTS, f, alpha)
        pending.remove((when, f))
        adopted.add(f)
    for f in range(len(FRAGMENTS)):
      if (final and f not in adopted) or (not tau and step in sync_steps(f, step)):
        state, _ = diloco.outer_sync(state, INNER, OUTER, None, average, FRAGMENTS, f, mixing=alpha)
  return host(state)


def shard(batch):
  return jax.tree.map(lambda x: x.reshape((K, -1) + x.shape[1:]), batch)


def run(tau, alpha, mesh, average=None):
  trainer = runtime.DiLoCo(
    loss_fn,
    INNER,
    OUTER,
    K,
    mesh,
    average=average,
    fragments=FRAGMENTS,
    sync_every=H,
    overlap_steps=tau,
    mixing=alpha,
  )
  state = trainer.init(make_params())
  for step in range(1, STEPS + 1):
    state, _, _ = trainer.train_step(
      state, trainer.shard_batch(batch_at(step)), step, step == STEPS
    )
  return host(state)


def assert_close(a, b, atol=2e-5):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=1e-5, atol=atol)


@pytest.mark.parametrize("tau, alpha", [(0, 0.0), (1, 0.0), (3, 0.5)])
def test_runtime_equals_the_algorithm_written_out(tau, alpha):
  """Streaming with 2 fragments on 2 workers x fsdp 4; tau = 0, alpha = 0 is plain streaming;
  tau = 3 keeps both fragments in flight at once and one of them at the final step."""
  assert_close(run(tau, alpha, sharding.make_mesh(2, 4)), reference(tau, alpha))


def test_overlap_with_compressed_reduce_scatter():
  average = diloco.compressed_average(
    compression.CompressionSpec("statistical", bits=4), collective="reduce_scatter"
  )
  assert_close(run(2, 0.0, sharding.make_mesh(2, 1), average), reference(2, 0.0, average), 1e-4)


def test_overlap_changes_the_result():
  """The fused program really delays adoption: tau = 1 differs from tau = 0."""
  mesh = sharding.make_mesh(2, 1)
  delayed, plain = run(1, 0.0, mesh), run(0, 0.0, mesh)
  differences = [np.abs(a - b).max() for a, b in zip(*map(jax.tree.leaves, (delayed, plain)))]
  assert max(differences) > 1e-3


@pytest.mark.parametrize(
  "kwargs, name",
  [({"overlap_steps": H}, "diloco.overlap_steps"), ({"mixing": 1.5}, "diloco.mixing")],
)
def test_bad_overlap_settings_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    runtime.DiLoCo(loss_fn, INNER, OUTER, K, sharding.make_mesh(2, 1), sync_every=H, **kwargs)
