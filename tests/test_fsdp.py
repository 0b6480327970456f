"""FSDP inside each worker: sharded runs equal unsharded ones, bytes per device, collectives."""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from muloco_jax import compression, diloco, optim, runtime, sharding
from muloco_jax.tools import aot
from scanned_mlp import ScannedMLP

D, H, V, L = 32, 64, 64, 2  # every dimension divisible by 8


MODEL = ScannedMLP(vocab=V, width=D, hidden=H, layers=L)
make_params, loss_fn, batch_at = MODEL.params, MODEL.loss, MODEL.batch


MUON = optim.muon(0.02, shard_axis=sharding.FSDP_AXIS, param_specs=sharding.fsdp_specs)


# Float32 round-off differs between layouts (reduction orders); Adam's 1 / sqrt(v) magnifies it
# on rarely-seen embedding rows to ~1e-5.
def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def run_diloco(mesh, average=None, steps=3):
  trainer = runtime.DiLoCo(
    loss_fn,
    MUON,
    diloco.outer_optimizer(0.7, 0.9),
    2,
    mesh,
    average=average,
  )
  state = trainer.init(make_params())
  for step in range(steps):
    state, _ = trainer.inner_step(state, trainer.shard_batch(batch_at(step)))
  state, _ = trainer.outer_sync(state)
  state, _ = trainer.inner_step(state, trainer.shard_batch(batch_at(steps)))
  return trainer, state


@pytest.mark.parametrize("collective", [None, "all_gather", "reduce_scatter"])
def test_diloco_worker2_fsdp4_equals_fsdp1(collective):
  """MuLoCo K=2 on 2 x 4 devices (parameters, Muon and Adam states, error feedback sharded 4
  ways; Newton-Schulz distributed) equals K=2 on 2 x 1 devices, after inner steps, a sync and
  one more inner step: uncompressed, and 4-bit with error feedback over either collective."""
  kwargs = {}
  if collective:
    spec = compression.CompressionSpec(kind="statistical", bits=4)
    kwargs = dict(average=diloco.compressed_average(spec, collective=collective))
  _, sharded = run_diloco(sharding.make_mesh(2, 4), **kwargs)
  _, plain = run_diloco(sharding.make_mesh(2, 1), **kwargs)
  # The layouts really differ: a worker's kernel is split 4 ways; the shared one 8 ways when
  # each worker row owns half (the mean), 4 ways when every worker keeps it (compressed).
  kernel = sharded.worker_params["layers"]["up"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (1, L, D, H // 4)
  shared = sharded.params["layers"]["up"]["kernel"]
  ways = 4 if collective else 8
  assert np.prod(shared.sharding.shard_shape(shared.shape)) == shared.size // ways
  # Round-off that moves an averaged value across a bin edge of the owners' second
  # quantization shows as a few 1e-5 differences after the outer step.
  atol = 1e-4 if collective == "reduce_scatter" else 2e-5
  for a, b in zip(jax.tree.leaves(host(sharded)), jax.tree.leaves(host(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=atol)


def test_data_parallel_fsdp8_equals_fsdp1():
  def run(mesh):
    dp = runtime.DataParallel(loss_fn, MUON, mesh)
    state = dp.init(make_params())
    for step in range(3):
      state, _, _ = dp.train_step(state, dp.place_batch(batch_at(step), 16), step + 1, False)
    return state

  sharded = run(sharding.make_mesh(1, 8))
  plain = run(sharding.make_mesh(1, 1))
  kernel = sharded.params["head"]["kernel"]
  assert kernel.sharding.shard_shape(kernel.shape) == (D, V // 8)
  for a, b in zip(jax.tree.leaves(host(sharded)), jax.tree.leaves(host(plain))):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=2e-5)


def _leaf_bytes(tree):
  return [np.prod(x.shape, dtype=int) * x.dtype.itemsize for x in jax.tree.leaves(tree)]


@pytest.mark.parametrize("workers, fsdp", [(2, 4), (4, 2), (1, 8)])
def test_state_bytes_per_device_closed_form(workers, fsdp):
  """Per device: each worker's parameters and inner state / fsdp (K / W workers a row), the
  shared parameters and outer state / (W fsdp); only scalars (counts, step) are replicated."""
  k = 4
  trainer = runtime.DiLoCo(
    loss_fn, MUON, diloco.outer_optimizer(), k, sharding.make_mesh(workers, fsdp)
  )
  state = trainer.abstract_state(make_params())
  per_worker = sum(_leaf_bytes((state.worker_params, state.worker_opt_state))) // k
  shared = sum(_leaf_bytes((state.params, state.outer_opt_state)))
  expected = per_worker * (k // workers) / fsdp + shared / (workers * fsdp)
  got = sharding.state_bytes_per_device(state)
  # Scalars and per-worker [K] counts are replicated: at most a few hundred bytes.
  assert expected <= got <= expected + 512, (got, expected)
  replicated = sum(_leaf_bytes(state))
  assert got / replicated <= 1 / (workers * fsdp) + 1e-3
  # The data-parallel state on 8 devices: everything / 8.
  dp = runtime.DataParallel(loss_fn, MUON, sharding.make_mesh(1, 8))
  dp_state = dp.abstract_state(make_params())
  assert sharding.state_bytes_per_device(dp_state) <= sum(_leaf_bytes(dp_state)) / 8 + 512


def _collectives(fn, args, fsdp):
  hlo = fn.lower(*args).compile().as_text()
  return aot.collectives(hlo, fsdp, dcn_crosses_workers=False)["collectives"]


def test_inner_step_stays_inside_workers_and_sync_goes_to_owners():
  """Compiled on 2 workers x fsdp 4: the inner step's collectives (weight gathers, gradient
  reductions, Muon's all-to-alls) never cross workers; the outer sync moves each worker's
  parameters to the owners of the shared shards (all-to-all) and the new ones back (all-gather),
  and all-reduces nothing parameter-sized across workers."""
  trainer = runtime.DiLoCo(loss_fn, MUON, diloco.outer_optimizer(), 2, sharding.make_mesh(2, 4))
  tokens = jax.ShapeDtypeStruct((16, 8), jnp.int32)
  programs = trainer.programs(make_params(), {"inputs": tokens, "targets": tokens})
  inner = _collectives(*programs["inner_step"], fsdp=4)
  assert inner and all(c["cross_worker"] == 0 for c in inner.values()), inner
  assert inner["all-to-all"]["count"] >= 1  # Muon's matrices to their owners and back
  outer = _collectives(*programs["outer_sync"], fsdp=4)
  param_bytes = sum(_leaf_bytes(make_params()))
  assert outer["all-to-all"]["cross_worker"] >= 1 and outer["all-gather"]["cross_worker"] >= 1
  crossing_all_reduce = outer.get("all-reduce", {"operand_bytes": 0})["operand_bytes"]
  assert crossing_all_reduce < 0.05 * param_bytes, outer
