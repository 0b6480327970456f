"""Tests of muloco_jax.diloco on the 8 virtual CPU devices (see conftest.py): the outer step,
workers left out and restarted, and the averagers (the mean, compressed all-gather and
reduce-scatter, workers' and owners' error feedback), their bytes and their settings."""

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import optax
import pytest

from muloco_jax import compression, config as config_lib, diloco, runtime, sharding
from muloco_jax.tools import aot
from scanned_mlp import ScannedMLP
from toy_models import (
  assert_trees_close,
  host,
  loss_fn,
  make_batch,
  make_params,
  make_stacked_params,
  run_stacked,
  stacked_loss_fn,
)


def test_outer_step_is_nesterov_sgd_on_mean_pseudogradient():
  """(c) theta <- theta_ref - lr (delta + mu u), u <- mu u + delta, delta = mean_k delta_k."""
  lr, mu, k = 0.7, 0.9, 4
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1, momentum=0.5),
    diloco.outer_optimizer(lr, mu),
    k,
    sharding.make_mesh(4, 1),
  )
  state = trainer.init(make_params())
  velocity = jax.tree.map(np.zeros_like, make_params())
  for r in range(3):
    for h in range(2):
      state, _ = trainer.inner_step(state, trainer.shard_batch(make_batch(r * 2 + h, 16)))
    theta_ref, workers = host(state.params), host(state.worker_params)
    deltas = jax.tree.map(lambda t, w: t[None] - w, theta_ref, workers)
    delta = jax.tree.map(lambda d: d.mean(0), deltas)
    velocity = jax.tree.map(lambda u, d: mu * u + d, velocity, delta)
    expected = jax.tree.map(lambda t, d, u: t - lr * (d + mu * u), theta_ref, delta, velocity)
    state, metrics = trainer.outer_sync(state)
    assert_trees_close(state.params, expected)
    assert_trees_close(
      state.worker_params, jax.tree.map(lambda x: np.broadcast_to(x, (k,) + x.shape), expected)
    )
    flat = np.concatenate([x.reshape(k, -1) for x in jax.tree.leaves(deltas)], axis=1)
    mean = flat.mean(0)
    np.testing.assert_allclose(metrics["pseudograd_norm"], np.linalg.norm(mean), rtol=1e-5)
    np.testing.assert_allclose(
      metrics["worker_pseudograd_norm"], np.linalg.norm(flat, axis=1), rtol=1e-5
    )
    np.testing.assert_allclose(
      metrics["worker_cosine"],
      flat @ mean / (np.linalg.norm(flat, axis=1) * np.linalg.norm(mean)),
      rtol=1e-4,
    )
    assert int(metrics["num_contributing"]) == k
    assert float(metrics["sync_bytes"]) == k * 4 * flat.shape[1]


def test_non_finite_and_inactive_workers_are_left_out():
  """(f) NaN workers and inactive workers drop out of the average; none left -> no step."""
  k, lr, mu = 4, 0.7, 0.9
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1, momentum=0.5),
    diloco.outer_optimizer(lr, mu),
    k,
    sharding.make_mesh(2, 1),
  )
  state = trainer.init(make_params())
  for h in range(2):
    state, _ = trainer.inner_step(state, trainer.shard_batch(make_batch(h, 16)))
  saved = host(state)

  def sync(poison_params=(), poison_opt=(), active=None):
    workers = jax.tree.map(np.copy, saved.worker_params)
    workers["w1"][list(poison_params), 0, 0] = np.nan
    opt_state = jax.tree.map(np.copy, saved.worker_opt_state)
    for leaf in jax.tree.leaves(opt_state):
      leaf[list(poison_opt)] = np.inf
    poisoned = saved._replace(worker_params=workers, worker_opt_state=opt_state)
    return trainer.outer_sync(jax.device_put(poisoned, trainer.state_sharding), active)

  def expected(used):
    delta = jax.tree.map(
      lambda t, w: (t[None] - w[used]).mean(0), saved.params, saved.worker_params
    )
    return jax.tree.map(lambda t, d: t - lr * (d + mu * d), saved.params, delta)

  for kwargs, used in [
    ({"poison_params": [1]}, [0, 2, 3]),
    ({"active": np.array([True, False, True, False])}, [0, 2]),
    ({"poison_params": [1], "active": np.array([1, 1, 0, 1], bool)}, [0, 3]),
  ]:
    new, metrics = sync(**kwargs)
    assert int(metrics["num_contributing"]) == len(used)
    np.testing.assert_array_equal(metrics["worker_contributed"], np.isin(range(k), used))
    assert_trees_close(new.params, expected(used))
    assert_trees_close(
      new.worker_params,
      jax.tree.map(lambda x: np.broadcast_to(x, (k,) + x.shape), host(new.params)),
    )

  for kwargs in [{"poison_params": range(k)}, {"active": np.zeros(k, bool)}]:
    new, metrics = sync(**kwargs)
    assert int(metrics["num_contributing"]) == 0
    assert_trees_close(new.params, saved.params, rtol=0, atol=0)
    assert_trees_close(new.outer_opt_state, saved.outer_opt_state, rtol=0, atol=0)
    assert np.all(np.isfinite(np.asarray(new.worker_params["w1"])))

  new, metrics = sync(poison_opt=[2])
  np.testing.assert_array_equal(metrics["worker_opt_state_reset"], [False, False, True, False])
  # A lost (inactive) worker comes back from theta with a fresh inner optimizer state.
  _, metrics = sync(active=np.array([True, False, True, True]))
  np.testing.assert_array_equal(metrics["worker_opt_state_reset"], [False, True, False, False])
  for before, after in zip(
    jax.tree.leaves(saved.worker_opt_state), jax.tree.leaves(host(new.worker_opt_state))
  ):
    np.testing.assert_array_equal(after[2], np.zeros_like(after[2]))
    np.testing.assert_array_equal(after[[0, 1, 3]], before[[0, 1, 3]])


@pytest.mark.parametrize(
  "make_inner",
  [
    lambda schedule: optax.sgd(schedule),
    lambda schedule: optax.adamw(schedule, weight_decay=0.1),
    lambda schedule: optax.inject_hyperparams(optax.sgd)(learning_rate=schedule, momentum=0.5),
  ],
  ids=["sgd", "adamw", "inject_hyperparams"],
)
def test_reset_worker_keeps_its_place_in_the_lr_schedule(make_inner, request):
  """A worker that rejoins (or went non-finite) restarts its moments, not its lr schedule."""
  k = 2
  inner = make_inner(optax.linear_schedule(0.0, 0.5, transition_steps=10))
  trainer = runtime.DiLoCo(
    loss_fn, inner, diloco.outer_optimizer(0.7, 0.9), k, sharding.make_mesh(2, 1)
  )
  state = trainer.init(make_params())

  def same_batch_for_every_worker(step):
    return trainer.shard_batch(jax.tree.map(lambda x: np.concatenate([x] * k), make_batch(step, 8)))

  for h in range(4):
    state, _ = trainer.inner_step(state, same_batch_for_every_worker(h))
  state, metrics = trainer.outer_sync(state, active=np.array([True, False]))  # worker 1 was lost
  np.testing.assert_array_equal(metrics["worker_opt_state_reset"], [False, True])
  state, _ = trainer.inner_step(state, same_batch_for_every_worker(4))
  state = host(state)
  # Every schedule position is the others' (Adam's bias-correction count restarts with its
  # moments: a fresh Adam).
  is_adam = lambda x: isinstance(x, optax.ScaleByAdamState)
  no_adam = jax.tree.map(
    lambda x: None if is_adam(x) else x, state.worker_opt_state, is_leaf=is_adam
  )
  counts = [leaf for leaf in jax.tree.leaves(no_adam) if leaf.dtype.kind == "i"]
  assert counts
  for count in counts:
    np.testing.assert_array_equal(count, [5, 5])
  if request.node.callspec.id == "sgd":
    # Both workers start the round from theta and take -lr g on the same batch: equal
    # parameters mean equal learning rates.
    for leaf in jax.tree.leaves(state.worker_params):
      np.testing.assert_allclose(leaf[0], leaf[1], rtol=1e-6, atol=1e-7)


# ----------------------------------------------------------------------------
# Compression.


def test_8bit_compressed_diloco_tracks_uncompressed_and_counts_bytes():
  inner, outer = optax.adamw(1e-2), diloco.outer_optimizer()
  params = make_stacked_params()
  spec = compression.CompressionSpec("statistical", bits=8, per_row=False)
  mesh = sharding.make_mesh(2, 1)
  plain, _ = run_stacked(runtime.DiLoCo(stacked_loss_fn, inner, outer, 4, mesh), params)
  average = diloco.compressed_average(spec, error_feedback=True, error_decay=0.9)
  compressed, metrics = run_stacked(
    runtime.DiLoCo(stacked_loss_fn, inner, outer, 4, mesh, average=average),
    params,
  )
  for a, b in zip(jax.tree.leaves(host(plain.params)), jax.tree.leaves(host(compressed.params))):
    assert np.linalg.norm(a - b) <= 1e-2 * np.linalg.norm(a)
  closed_form = 4 * compression.TreeCodec(spec).nbytes(params)
  assert float(metrics[-1]["sync_bytes"]) == closed_form
  assert 0 < float(metrics[-1]["compression_error"]) < 0.05
  assert float(metrics[-1]["error_buffer_norm"]) > 0


@pytest.mark.parametrize("scale", [1.0, 0.5])
def test_error_feedback_buffers_hold_what_was_not_sent(scale):
  """After the first sync e_k = s delta_k - D(C(s delta_k)) and the average is of
  D(C(s delta_k)); s = error_feedback_scale (the authors' code: the outer learning rate)."""
  inner, outer = optax.sgd(0.1), diloco.outer_optimizer(1.0, 0.0, False)
  params = make_stacked_params()
  spec = compression.CompressionSpec("linear", bits=2)
  trainer = runtime.DiLoCo(
    stacked_loss_fn,
    inner,
    outer,
    4,
    sharding.make_mesh(4, 1),
    average=diloco.compressed_average(spec, error_decay=0.5, error_feedback_scale=scale),
  )
  state = trainer.init(params)
  for h in range(2):
    state, _ = trainer.inner_step(state, trainer.shard_batch(make_batch(h, 16)))
  before = host(state)
  state, metrics = trainer.outer_sync(state)
  deltas = jax.tree.map(lambda t, w: scale * (t[None] - w), before.params, before.worker_params)
  roundtrip = compression.TreeCodec(spec).roundtrip
  sent = [roundtrip(jax.tree.map(lambda d: d[k], deltas)) for k in range(4)]
  norm = lambda tree: np.sqrt(sum(np.sum(np.square(x)) for x in jax.tree.leaves(tree)))
  ratios = [norm(sent[k]) / norm(jax.tree.map(lambda d: d[k], deltas)) for k in range(4)]
  np.testing.assert_allclose(metrics["compression_norm_ratio"], np.mean(ratios), rtol=1e-5)
  for k in range(4):
    residual = jax.tree.map(lambda d, s: d[k] - s, deltas, sent[k])
    assert_trees_close(
      jax.tree.map(lambda e: e[k], host(state.average_state.worker_error)), residual, atol=1e-6
    )
  mean_sent = jax.tree.map(lambda *s: np.mean(s, axis=0), *sent)
  assert_trees_close(
    state.params, jax.tree.map(lambda t, d: t - d, before.params, mean_sent), atol=1e-6
  )


def test_sync_bytes_match_closed_form_and_two_bits_save_15x():
  params = make_stacked_params(width=64, outputs=64)
  inner, outer = optax.sgd(0.01), diloco.outer_optimizer()
  spec = compression.CompressionSpec("statistical", bits=2)
  # Per worker over its link: the mean's all-to-all + all-gather, 2 (K-1)/K of its float32
  # pseudogradient; the compressed all-gather, K-1 payloads.
  for k in (2, 4):
    for average, expected, per_worker in [
      (diloco.mean_average(), 4 * sum(x.size for x in jax.tree.leaves(params)), 2 * (k - 1) / k),
      (diloco.compressed_average(spec), compression.TreeCodec(spec).nbytes(params), k - 1),
    ]:
      trainer = runtime.DiLoCo(
        stacked_loss_fn, inner, outer, k, sharding.make_mesh(2, 1), average=average
      )
      state = trainer.init(params)
      state, _ = trainer.inner_step(state, trainer.shard_batch(make_batch(0, 2 * k)))
      _, metrics = trainer.outer_sync(state)
      assert float(metrics["sync_bytes"]) == k * expected
      assert float(metrics["sync_bytes_per_worker"]) == per_worker * expected
  # On the paper's 150M model, 2-bit row-wise statistical sends >= 15x fewer bytes than fp32.
  from muloco_jax import model as model_lib

  config = model_lib.model_config("150m")
  shapes = jax.eval_shape(lambda: model_lib.init_params(config, jax.random.key(0)))
  float32_bytes = 4 * sum(x.size for x in jax.tree.leaves(shapes))
  assert float32_bytes / compression.TreeCodec(spec).nbytes(shapes) >= 15


# ----------------------------------------------------------------------------
# Compressed reduce-scatter.

V, D, F, L = 37, 24, 40, 2  # 37 rows split over 4 or 8 owners: the last chunks are padding


SCANNED = ScannedMLP(vocab=V, width=D, hidden=F, layers=L)


def batch_at(step):
  return SCANNED.batch(step, rows=16, seq=6)


def train(average, num_workers, mesh, rounds=2, inner_steps=2, outer=None):
  trainer = runtime.DiLoCo(
    SCANNED.loss,
    optax.adamw(3e-2),
    outer or diloco.outer_optimizer(0.7, 0.9),
    num_workers,
    mesh,
    average=average,
  )
  state = trainer.init(SCANNED.params())
  metrics = []
  for r in range(rounds):
    for h in range(inner_steps):
      state, _ = trainer.inner_step(state, trainer.shard_batch(batch_at(r * inner_steps + h)))
    state, m = trainer.outer_sync(state)
    metrics.append(host(m))
  return trainer, host(state), metrics


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
  assert_trees_close(scattered.params, gathered.params, rtol=0, atol=1e-5)
  assert_trees_close(scattered.worker_params, gathered.worker_params, rtol=0, atol=1e-5)
  assert_trees_close(
    scattered.average_state.worker_error, gathered.average_state.worker_error, rtol=0, atol=1e-5
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
    SCANNED.loss,
    optax.sgd(0.1),
    diloco.outer_optimizer(1.0, 0.0, False),
    4,
    sharding.make_mesh(4, 1),
    average=average,
  )
  state = trainer.init(SCANNED.params())
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
    after.average_state.owner_error, SCANNED.params()
  )
  assert_trees_close(
    jax.tree.map(np.add, applied, host(owner_error)), exact_average, rtol=0, atol=1e-6
  )
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
  assert_trees_close(wide, narrow, rtol=0, atol=1e-4)


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
    SCANNED.loss,
    optax.sgd(0.1),
    diloco.outer_optimizer(),
    k,
    sharding.make_mesh(k, 1),
    average=diloco.compressed_average(spec, collective=collective),
  )
  tokens = jax.ShapeDtypeStruct((16, 6), jnp.int32)
  fn, args = trainer.programs(SCANNED.params(), {"inputs": tokens, "targets": tokens})["outer_sync"]
  traffic = _cross_worker(fn, args)
  closed = diloco.compressed_sync_bytes(SCANNED.params(), spec, k, collective=collective)
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
