"""Compressed reduce-scatter + all-gather: equivalences, owners' error feedback, bytes on links."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from muloco_jax import compression, config as config_lib, diloco, runtime, sharding
from muloco_jax.tools import aot
from muloco_jax.tools.benchmarks import sync_bytes
from scanned_mlp import ScannedMLP

V, D, F, L = 37, 24, 40, 2  # 37 rows split over 4 or 8 owners: the last chunks are padding


MODEL = ScannedMLP(vocab=V, width=D, hidden=F, layers=L)
make_params, loss_fn = MODEL.params, MODEL.loss


def batch_at(step):
  return MODEL.batch(step, rows=16, seq=6)


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def train(average, num_workers, mesh, rounds=2, inner_steps=2, outer=None):
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.adamw(3e-2),
    outer or diloco.outer_optimizer(0.7, 0.9),
    num_workers,
    mesh,
    average=average,
  )
  state = trainer.init(make_params())
  metrics = []
  for r in range(rounds):
    for h in range(inner_steps):
      state, _ = trainer.inner_step(state, trainer.shard_batch(batch_at(r * inner_steps + h)))
    state, m = trainer.outer_sync(state)
    metrics.append(host(m))
  return trainer, host(state), metrics


def assert_trees_close(a, b, atol):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(a), jax.tree.leaves(b)):
    np.testing.assert_allclose(x, y, rtol=0, atol=atol)


@pytest.mark.parametrize(
  "spec",
  [
    # float32 tables: one table scale per chunk is then as exact as one per tensor.
    compression.CompressionSpec("statistical", bits=2, table_dtype="float32"),
    compression.CompressionSpec("linear", bits=4),
  ],
  ids=["statistical2", "linear4"],
)
def test_reduce_scatter_equals_all_gather_with_requantized_average(spec):
  """Per-row statistics and row-aligned chunks: the owners' second quantization without error
  feedback is the authors' re-quantized average, with only 2 (K-1)/K payloads per link."""
  mesh = sharding.make_mesh(4, 1)
  _, gathered, gathered_metrics = train(
    diloco.compressed_average(spec, requantize_average=True), 4, mesh
  )
  _, scattered, scattered_metrics = train(
    diloco.compressed_average(spec, collective="reduce_scatter", requantize_error_feedback=False),
    4,
    mesh,
  )
  assert scattered.average_state.owner_error is None
  # Float32 round-off: per-row sums over a chunk's rows and over the whole tensor's reduce in
  # different orders.
  assert_trees_close(scattered.params, gathered.params, atol=1e-5)
  assert_trees_close(scattered.worker_params, gathered.worker_params, atol=1e-5)
  assert_trees_close(
    scattered.average_state.worker_error, gathered.average_state.worker_error, atol=1e-5
  )
  for g, s in zip(gathered_metrics, scattered_metrics):
    np.testing.assert_allclose(s["compression_error"], g["compression_error"], rtol=1e-5)
    # 2 (3/4) vs 3 payloads; padding 37 rows to 40 and per-chunk side data add a few percent.
    assert s["sync_bytes_per_worker"] < 0.55 * g["sync_bytes_per_worker"]


def test_owner_error_feedback_keeps_what_the_second_quantization_dropped():
  """After the first sync (outer SGD with lr 1, no momentum: theta moves by the applied delta):
  applied delta + owners' buffers = the exact average of the decoded worker payloads, and the
  buffers are not zero (the second quantization did drop something)."""
  spec = compression.CompressionSpec("statistical", bits=2)
  average = diloco.compressed_average(spec, collective="reduce_scatter", error_decay=0.5)
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1),
    diloco.outer_optimizer(1.0, 0.0, False),
    4,
    sharding.make_mesh(4, 1),
    average=average,
  )
  state = trainer.init(make_params())
  for h in range(2):
    state, _ = trainer.inner_step(state, trainer.shard_batch(batch_at(h)))
  before = host(state)
  state, metrics = trainer.outer_sync(state)
  after = host(state)
  deltas = jax.tree.map(lambda t, w: t[None] - w, before.params, before.worker_params)
  # First round, empty buffers: worker k sent D(c_k) = delta_k - e_k.
  decoded = jax.tree.map(lambda d, e: d - e, deltas, after.average_state.worker_error)
  exact_average = jax.tree.map(lambda x: x.mean(axis=0), decoded)
  applied = jax.tree.map(lambda t, n: t - n, before.params, after.params)
  owner_error = compression.TreeCodec(spec).join_rows(
    after.average_state.owner_error, make_params()
  )
  assert_trees_close(jax.tree.map(np.add, applied, host(owner_error)), exact_average, atol=1e-6)
  kernel_error = owner_error["layers"]["up"]["kernel"]
  assert float(jnp.linalg.norm(kernel_error)) > 1e-3 * float(
    np.linalg.norm(exact_average["layers"]["up"]["kernel"])
  )
  assert 0 < float(metrics["average_compression_error"]) < 1


def test_k8_on_8_devices_equals_k8_vmapped_on_2():
  """Eight workers with a row each, or four to a row on two rows (chunks owned four to a row):
  the same parameters and error-feedback buffers."""
  average = diloco.compressed_average(
    compression.CompressionSpec("statistical", bits=4), collective="reduce_scatter"
  )
  _, wide, _ = train(average, 8, sharding.make_mesh(8, 1))
  _, narrow, _ = train(average, 8, sharding.make_mesh(2, 1))
  assert wide.average_state.worker_error is not None
  assert wide.average_state.owner_error is not None
  # Round-off moving a value across a bin edge shows as a rare 1e-5 difference.
  assert_trees_close(wide, narrow, atol=1e-4)


def _cross_worker(fn, args):
  hlo = fn.lower(*args).compile().as_text()
  found = aot.collectives(hlo, 1, dcn_crosses_workers=False)["collectives"]
  return {k: v["operand_bytes"] for k, v in found.items() if v["cross_worker"]}


@pytest.mark.parametrize("collective", diloco.COLLECTIVES)
def test_compiled_traffic_is_the_closed_form(collective):
  """Compiled for 8 workers on 8 devices, the operands of the cross-worker collectives are the
  packed payloads and nothing float32 and parameter-sized: reduce_scatter's all-to-all carries
  one worker's payload and its all-gather a chunk (a payload / 8); all_gather's all-gather a
  payload; the rest is scalars and the [K] contribution mask."""
  k, spec = 8, compression.CompressionSpec("statistical", bits=2)
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1),
    diloco.outer_optimizer(),
    k,
    sharding.make_mesh(k, 1),
    average=diloco.compressed_average(spec, collective=collective),
  )
  tokens = jax.ShapeDtypeStruct((16, 6), jnp.int32)
  fn, args = trainer.programs(make_params(), {"inputs": tokens, "targets": tokens})["outer_sync"]
  traffic = _cross_worker(fn, args)
  closed = diloco.compressed_sync_bytes(make_params(), spec, k, collective=collective)
  small = 64  # scalars (counts, norms) and the contribution mask
  if collective == "reduce_scatter":
    assert traffic["all-to-all"] == closed["payload"]
    assert closed["payload"] / k <= traffic["all-gather"] <= closed["payload"] / k + small
  else:
    assert "all-to-all" not in traffic
    assert closed["payload"] <= traffic["all-gather"] <= closed["payload"] + small
  assert traffic.get("all-reduce", 0) <= small
  # The metric the run logs is the same closed form.
  _, _, metrics = train(
    diloco.compressed_average(spec, collective=collective), k, trainer.mesh, 1, 1
  )
  assert metrics[0]["sync_bytes_per_worker"] == pytest.approx(closed["per_worker"])
  assert metrics[0]["sync_bytes"] == k * closed["payload"]


def test_reduce_scatter_sends_under_0_3x_of_all_gather_on_150m_at_k8():
  """The README's table (python -m muloco_jax.tools.benchmarks.sync_bytes): at K=8, 2 and 4 bits."""
  (row,) = sync_bytes.table("150m", [8], [2, 4], "vectors")
  for bits in (2, 4):
    assert row[f"{bits}-bit reduce_scatter"] <= 0.3 * row[f"{bits}-bit all_gather"]
    assert row[f"{bits}-bit reduce_scatter"] < 0.15 * row["float32 mean"]


def test_bad_settings_are_named_before_compilation():
  spec = compression.CompressionSpec("statistical", bits=2)
  # The Python API names its arguments, the config validation its keys.
  with pytest.raises(ValueError, match="^collective='ring'"):
    diloco.compressed_average(spec, collective="ring")
  with pytest.raises(ValueError, match="^requantize_average=True"):
    diloco.compressed_average(spec, collective="reduce_scatter", requantize_average=True)
  with pytest.raises(ValueError, match="^error_feedback_scale=0.8"):
    diloco.compressed_average(spec, error_feedback=False, error_feedback_scale=0.8)
  config = config_lib.default_config()
  config.diloco.num_workers = 2
  config.compression.kind = "statistical"
  for key, value, name in [
    ("collective", "ring", "compression.collective"),
    ("requantize_average", True, "compression.requantize_average"),
  ]:
    bad = ml_collections.ConfigDict(config.to_dict())
    bad.compression.collective = "reduce_scatter"
    bad.compression[key] = value
    with pytest.raises(ValueError, match=name):
      config_lib.validate(bad)
  bad = ml_collections.ConfigDict(config.to_dict())
  bad.compression.error_feedback, bad.compression.error_feedback_scale = False, "outer_lr"
  with pytest.raises(ValueError, match="^compression.error_feedback_scale="):
    config_lib.validate(bad)
