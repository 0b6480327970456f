"""Tests of muloco_jax.diloco on the 8 virtual CPU devices (see conftest.py)."""

import os
import re
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muloco_jax import diloco, runtime, sharding
from muloco_jax import fragments as fragments_lib

IN_DIM, HIDDEN, CLASSES = 6, 8, 3
REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def loss_fn(params, batch):
  hidden = jnp.tanh(batch["x"] @ params["w1"] + params["b1"])
  logits = hidden @ params["w2"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_params(seed=0):
  rng = np.random.default_rng(seed)
  return {
    "w1": rng.normal(size=(IN_DIM, HIDDEN)).astype(np.float32) / np.sqrt(IN_DIM),
    "b1": np.zeros(HIDDEN, np.float32),
    "w2": rng.normal(size=(HIDDEN, CLASSES)).astype(np.float32) / np.sqrt(HIDDEN),
  }


def make_batch(step, rows, seed=0):
  rng = np.random.default_rng([seed, step])
  x = rng.normal(size=(rows, IN_DIM)).astype(np.float32)
  return {"x": x, "y": (np.abs(x[:, :CLASSES]).argmax(-1)).astype(np.int32)}


def host(tree):
  return jax.tree.map(np.asarray, tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)


def run(trainer, rounds, inner_steps, rows, seed=0):
  """``rounds`` DiLoCo rounds of ``inner_steps`` steps on a global batch of ``rows`` rows."""
  state = trainer.init(make_params())
  for r in range(rounds):
    for h in range(inner_steps):
      state, _ = trainer.inner_step(
        state, trainer.shard_batch(make_batch(r * inner_steps + h, rows, seed))
      )
    state, _ = trainer.outer_sync(state)
  return state


@pytest.mark.parametrize("data", [1, 2])
def test_k1_h1_is_data_parallel_sgd(data):
  """(a) K=1, H=1, inner SGD, outer SGD(lr 1, momentum 0) == data-parallel SGD."""
  sgd = optax.sgd(0.3)
  trainer = runtime.DiLoCo(
    loss_fn, sgd, diloco.outer_optimizer(1.0, 0.0), 1, sharding.make_mesh(1, data)
  )
  state = trainer.init(make_params())

  @jax.jit
  def dp_step(params, opt_state, batch):
    _, grads = jax.value_and_grad(loss_fn)(params, batch)
    updates, opt_state = sgd.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), opt_state

  params = make_params()
  opt_state = sgd.init(params)
  for step in range(5):
    batch = make_batch(step, 16)
    params, opt_state = dp_step(params, opt_state, batch)
    state, _ = trainer.inner_step(state, trainer.shard_batch(batch))
    state, metrics = trainer.outer_sync(state)
    assert int(metrics["num_contributing"]) == 1
    assert_trees_close(state.params, params)
    assert_trees_close(jax.tree.map(lambda x: x[0], state.worker_params), params)
  assert int(state.step) == 5


def test_identical_data_equals_single_worker():
  """(b) K=4 workers fed the same data == K=1 (also: K=8 vmapped on a single device)."""
  inner, outer = optax.adamw(1e-2), diloco.outer_optimizer(0.7, 0.9)
  batches = [[make_batch(r * 3 + h, 4) for h in range(3)] for r in range(2)]
  reference = []
  single = runtime.DiLoCo(loss_fn, inner, outer, 1, sharding.make_mesh(1, 1))
  state = single.init(make_params())
  for round_batches in batches:
    for batch in round_batches:
      state, _ = single.inner_step(state, single.shard_batch(batch))
    state, _ = single.outer_sync(state)
    reference.append(host(state.params))

  for k, mesh in [(4, sharding.make_mesh(4, 1)), (8, sharding.make_mesh(1, 1))]:
    multi = runtime.DiLoCo(loss_fn, inner, outer, k, mesh)
    state = multi.init(make_params())
    for round_batches, theta in zip(batches, reference):
      for batch in round_batches:
        tiled = jax.tree.map(lambda x: np.concatenate([x] * k), batch)
        state, _ = multi.inner_step(state, multi.shard_batch(tiled))
      state, _ = multi.outer_sync(state)
      assert_trees_close(state.params, theta)
      assert_trees_close(
        state.worker_params, jax.tree.map(lambda x: np.broadcast_to(x, (k,) + x.shape), theta)
      )
      for leaf in jax.tree.leaves(host(state.worker_opt_state)):
        np.testing.assert_array_equal(leaf, np.broadcast_to(leaf[0], leaf.shape))


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


def test_layout_independence():
  """(d) K=4 on 1, 2, 4 worker devices, on worker=2 x data=2, and unsharded (pure functions)."""
  inner, outer = optax.adamw(1e-2), diloco.outer_optimizer()
  results = [
    run(runtime.DiLoCo(loss_fn, inner, outer, 4, sharding.make_mesh(w, d)), 2, 3, 16)
    for w, d in [(1, 1), (2, 1), (4, 1), (2, 2)]
  ]

  inner_step = jax.jit(lambda s, b: diloco.inner_step(s, b, loss_fn, inner))
  outer_sync = jax.jit(lambda s: diloco.outer_sync(s, inner, outer))
  state = diloco.init(make_params(), inner, outer, 4)
  for r in range(2):
    for h in range(3):
      batch = jax.tree.map(lambda x: x.reshape((4, -1) + x.shape[1:]), make_batch(r * 3 + h, 16))
      state, _ = inner_step(state, batch)
    state, _ = outer_sync(state)
  results.append(state)
  for other in results[1:]:
    assert_trees_close(other, results[0])


def test_batch_and_worker_validation():
  with pytest.raises(ValueError, match="diloco.num_workers"):
    runtime.DiLoCo(loss_fn, optax.sgd(0.1), diloco.outer_optimizer(), 6, sharding.make_mesh(4, 1))
  trainer = runtime.DiLoCo(
    loss_fn, optax.sgd(0.1), diloco.outer_optimizer(), 4, sharding.make_mesh(2, 2)
  )
  with pytest.raises(ValueError, match="train.batch_size"):
    trainer.shard_batch(make_batch(0, 10))
  with pytest.raises(ValueError, match="train.batch_size"):
    trainer.shard_batch(make_batch(0, 12))  # 3 rows per worker, data axis 2
  state = trainer.init(make_params())
  with pytest.raises(ValueError, match="diloco.num_workers"):
    trainer.inner_step(state, make_batch(0, 16))


COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute")


def test_inner_step_has_no_collectives():
  """(e) The compiled inner step communicates nothing; the compiled outer sync all-reduces."""
  trainer = runtime.DiLoCo(
    loss_fn, optax.adamw(1e-2), diloco.outer_optimizer(), 4, sharding.make_mesh(4, 1)
  )
  state = trainer.init(make_params())
  batch = trainer.shard_batch(make_batch(0, 16))
  inner_hlo = trainer._inner_step.lower(state, batch).compile().as_text()
  active = sharding.place_rows(np.ones(4, bool), trainer.active_sharding, (4,))
  outer_hlo = trainer._outer_syncs[0].lower(state, active).compile().as_text()
  assert not COLLECTIVE.findall(inner_hlo)
  assert "all-reduce" in outer_hlo


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


def test_two_processes_match_single_process():
  """(g) Two JAX processes (gloo) agree bit for bit and match a single-process run."""
  env = {k: v for k, v in os.environ.items() if k != "XLA_FLAGS"}
  result = subprocess.run(
    [
      sys.executable,
      os.path.join(REPO, "experiments", "multihost_diloco.py"),
      "--num_processes=2",
      "--timeout=150",
    ],
    env=env,
    cwd=REPO,
    capture_output=True,
    text=True,
    timeout=180,
  )
  assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
  assert "OK: 2 processes agree" in result.stdout


# ----------------------------------------------------------------------------- compression, streaming

from muloco_jax import compression  # noqa: E402

LAYERS, WIDTH = 4, 8


def stacked_loss_fn(params, batch):
  h = batch["x"] @ params["embedding"]
  for i in range(LAYERS):
    h = h + jnp.tanh(h @ params[f"layers_{i}"]["w"])
  logits = (h * params["final_norm"]) @ params["head"]
  return optax.softmax_cross_entropy_with_integer_labels(logits, batch["y"]).mean()


def make_stacked_params(width=WIDTH, outputs=CLASSES, seed=0):
  rng = np.random.default_rng(seed)
  params = {
    "embedding": rng.normal(size=(IN_DIM, width)) / np.sqrt(IN_DIM),
    "final_norm": np.ones(width),
    "head": rng.normal(size=(width, outputs)) / np.sqrt(width),
  }
  for i in range(LAYERS):
    params[f"layers_{i}"] = {"w": rng.normal(size=(width, width)) / np.sqrt(width)}
  return jax.tree.map(lambda x: np.asarray(x, np.float32), params)


def run_stacked(trainer, params, rounds=3, inner_steps=3, rows=16):
  state = trainer.init(params)
  metrics = []
  for r in range(rounds):
    for h in range(inner_steps):
      state, _ = trainer.inner_step(
        state, trainer.shard_batch(make_batch(r * inner_steps + h, rows))
      )
    state, m = trainer.outer_sync(state)
    metrics.append(m)
  return state, metrics


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


def test_streaming_fragments():
  params = make_stacked_params()
  fragments = fragments_lib.split_into_fragments(params, 2)
  assert fragments == (
    ("layers_0", "layers_1", "embedding"),
    ("layers_2", "layers_3", "final_norm", "head"),
  )
  with pytest.raises(ValueError, match="diloco.num_fragments"):
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


@pytest.mark.parametrize(
  "num_workers, fsdp, shape",
  [(4, 0, (4, 2)), (3, 0, (1, 8)), (16, 0, (8, 1)), (2, 0, (2, 4)), (4, 4, (2, 4)), (1, 0, (1, 8))],
)
def test_mesh_for_workers_uses_every_device(num_workers, fsdp, shape):
  trainer = runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1),
    diloco.outer_optimizer(),
    num_workers,
    fsdp=fsdp,
  )
  assert trainer.mesh.size == len(jax.devices()) == 8
  assert (trainer.mesh.shape["worker"], trainer.mesh.shape["fsdp"]) == shape
  assert set(trainer.mesh.devices.flat) == set(jax.devices())


def test_mesh_for_workers_refuses_a_layout_that_leaves_devices_out():
  with pytest.raises(ValueError, match=r"diloco.fsdp=3 .* one of \[2, 4, 8\]"):
    sharding.mesh_for_workers(4, fsdp=3)
  with pytest.raises(ValueError, match=r"diloco.fsdp=1 .* one of \[2, 4, 8\]"):
    sharding.mesh_for_workers(4, fsdp=1)
