"""Tests of muloco_jax.runtime's DiLoCo and DataParallel on the 8 virtual CPU devices (see
conftest.py): the same results on every mesh layout and as the pure functions of
muloco_jax.diloco, FSDP inside each worker, batch and setting validation, what the compiled
programs communicate, and the overlapped streaming sync's fused programs."""

import re

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from muloco_jax import compression, config as config_lib, diloco, optim, runtime, sharding
from muloco_jax.tools import aot
from scanned_mlp import ScannedMLP
from toy_models import assert_trees_close, host, loss_fn, make_batch, make_params


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
  with pytest.raises(ValueError, match="^num_workers=6"):
    runtime.DiLoCo(loss_fn, optax.sgd(0.1), diloco.outer_optimizer(), 6, sharding.make_mesh(4, 1))
  trainer = runtime.DiLoCo(
    loss_fn, optax.sgd(0.1), diloco.outer_optimizer(), 4, sharding.make_mesh(2, 2)
  )
  with pytest.raises(ValueError, match="^global_batch_size=10"):
    trainer.shard_batch(make_batch(0, 10))
  with pytest.raises(ValueError, match="^global_batch_size=12"):
    trainer.shard_batch(make_batch(0, 12))  # 3 rows per worker, data axis 2
  state = trainer.init(make_params())
  with pytest.raises(ValueError, match=r"\[num_workers=4, B/K, ...\]"):
    trainer.inner_step(state, make_batch(0, 16))


COLLECTIVE = re.compile(r"all-reduce|all-gather|reduce-scatter|all-to-all|collective-permute")


def test_inner_step_has_no_collectives():
  """(e) The compiled inner step communicates nothing; the compiled outer sync all-reduces."""
  trainer = runtime.DiLoCo(
    loss_fn, optax.adamw(1e-2), diloco.outer_optimizer(), 4, sharding.make_mesh(4, 1)
  )
  state = trainer.init(make_params())
  batch = trainer.shard_batch(make_batch(0, 16))
  active = sharding.place_rows(np.ones(4, bool), trainer.active_sharding, (4,))
  inner_hlo = trainer._inner_step.lower(state, batch, active).compile().as_text()
  outer_hlo = trainer._outer_syncs[0].lower(state, active).compile().as_text()
  assert not COLLECTIVE.findall(inner_hlo)
  assert "all-reduce" in outer_hlo


# ----------------------------------------------------------------------------
# FSDP inside each worker.

D, H, V, L = 32, 64, 64, 2  # every dimension divisible by 8


FSDP_MODEL = ScannedMLP(vocab=V, width=D, hidden=H, layers=L)
MUON = optim.muon(0.02, shard_axis=sharding.FSDP_AXIS, param_specs=sharding.fsdp_specs)


def run_diloco(mesh, average=None, steps=3):
  trainer = runtime.DiLoCo(
    FSDP_MODEL.loss,
    MUON,
    diloco.outer_optimizer(0.7, 0.9),
    2,
    mesh,
    average=average,
  )
  state = trainer.init(FSDP_MODEL.params())
  for step in range(steps):
    state, _ = trainer.inner_step(state, trainer.shard_batch(FSDP_MODEL.batch(step)))
  state, _ = trainer.outer_sync(state)
  state, _ = trainer.inner_step(state, trainer.shard_batch(FSDP_MODEL.batch(steps)))
  return trainer, state


# Float32 round-off differs between layouts (reduction orders); Adam's 1 / sqrt(v) magnifies it
# on rarely-seen embedding rows to ~1e-5.
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
    dp = runtime.DataParallel(FSDP_MODEL.loss, MUON, mesh)
    state = dp.init(FSDP_MODEL.params())
    for step in range(3):
      state, _, _ = dp.train_step(
        state, dp.place_batch(FSDP_MODEL.batch(step), 16), step + 1, False
      )
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
    FSDP_MODEL.loss, MUON, diloco.outer_optimizer(), k, sharding.make_mesh(workers, fsdp)
  )
  state = trainer.abstract_state(FSDP_MODEL.params())
  per_worker = sum(_leaf_bytes((state.worker_params, state.worker_opt_state))) // k
  shared = sum(_leaf_bytes((state.params, state.outer_opt_state)))
  expected = per_worker * (k // workers) / fsdp + shared / (workers * fsdp)
  got = sharding.state_bytes_per_device(state)
  # Scalars and per-worker [K] counts are replicated: at most a few hundred bytes.
  assert expected <= got <= expected + 512, (got, expected)
  replicated = sum(_leaf_bytes(state))
  assert got / replicated <= 1 / (workers * fsdp) + 1e-3
  # The data-parallel state on 8 devices: everything / 8.
  dp = runtime.DataParallel(FSDP_MODEL.loss, MUON, sharding.make_mesh(1, 8))
  dp_state = dp.abstract_state(FSDP_MODEL.params())
  assert sharding.state_bytes_per_device(dp_state) <= sum(_leaf_bytes(dp_state)) / 8 + 512


def _collectives(fn, args, fsdp):
  hlo = fn.lower(*args).compile().as_text()
  return aot.collectives(hlo, fsdp, dcn_crosses_workers=False)["collectives"]


def test_inner_step_stays_inside_workers_and_sync_goes_to_owners():
  """Compiled on 2 workers x fsdp 4: the inner step's collectives (weight gathers, gradient
  reductions, Muon's all-to-alls) never cross workers; the outer sync moves each worker's
  parameters to the owners of the shared shards (all-to-all) and the new ones back (all-gather),
  and all-reduces nothing parameter-sized across workers."""
  trainer = runtime.DiLoCo(
    FSDP_MODEL.loss, MUON, diloco.outer_optimizer(), 2, sharding.make_mesh(2, 4)
  )
  tokens = jax.ShapeDtypeStruct((16, 8), jnp.int32)
  programs = trainer.programs(FSDP_MODEL.params(), {"inputs": tokens, "targets": tokens})
  inner = _collectives(*programs["inner_step"], fsdp=4)
  assert inner and all(c["cross_worker"] == 0 for c in inner.values()), inner
  assert inner["all-to-all"]["count"] >= 1  # Muon's matrices to their owners and back
  outer = _collectives(*programs["outer_sync"], fsdp=4)
  param_bytes = sum(_leaf_bytes(FSDP_MODEL.params()))
  assert outer["all-to-all"]["cross_worker"] >= 1 and outer["all-gather"]["cross_worker"] >= 1
  crossing_all_reduce = outer.get("all-reduce", {"operand_bytes": 0})["operand_bytes"]
  assert crossing_all_reduce < 0.05 * param_bytes, outer


# ----------------------------------------------------------------------------
# Overlapped streaming sync.

# The runtime's fused programs against the algorithm step by step; 37 vocabulary rows, split
# over the owners of a reduce-scatter with padding.
OVERLAP_MODEL = ScannedMLP(vocab=37, width=24, hidden=40, layers=2)


def overlap_batch(step):
  return OVERLAP_MODEL.batch(step, rows=16, seq=6)


K, SYNC_EVERY, STEPS = 2, 4, 11
FRAGMENTS = (("embed", "layers"), ("norm", "head"))
OFFSETS = (2, 4)  # floor(H (f + 1) / F): the authors' staggering
INNER, OUTER = optax.sgd(0.05, momentum=0.9), diloco.outer_optimizer(0.7, 0.9)


def sync_steps(fragment, last):
  return [s for s in range(1, last + 1) if (s - OFFSETS[fragment]) % SYNC_EVERY == 0]


def reference(tau, alpha, average=None):
  """The documented semantics, written out on one device with the pure functions: the sync at
  step s exchanges the parameters as they are after step s (beside inner step s + 1, which does
  not see it), the workers adopt it after step s + tau; the final step adopts what is in flight,
  then syncs every fragment it did not adopt at once."""
  state = diloco.init(OVERLAP_MODEL.params(), INNER, OUTER, K, FRAGMENTS, average)
  inner = jax.jit(lambda s, b: diloco.inner_step(s, b, OVERLAP_MODEL.loss, INNER)[0])
  pending = []  # (adopt after step, fragment)
  for step in range(1, STEPS + 1):
    shared = state
    for f in range(len(FRAGMENTS)):
      if tau and step - 1 in sync_steps(f, step - 1):
        shared, _ = diloco.exchange(shared, OUTER, None, average, FRAGMENTS, f)
        pending.append((step - 1 + tau, f))
    state = inner(state, shard(overlap_batch(step)))
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


def overlap_trainer(tau, alpha, mesh, average=None, adoption="replace"):
  return runtime.DiLoCo(
    OVERLAP_MODEL.loss,
    INNER,
    OUTER,
    K,
    mesh,
    average=average,
    fragments=FRAGMENTS,
    sync_every=SYNC_EVERY,
    overlap_steps=tau,
    mixing=alpha,
    adoption=adoption,
  )


def run_overlapped(tau, alpha, mesh, average=None, adoption="replace"):
  trainer = overlap_trainer(tau, alpha, mesh, average, adoption)
  state = trainer.init(OVERLAP_MODEL.params())
  for step in range(1, STEPS + 1):
    state, _, _ = trainer.train_step(
      state, trainer.shard_batch(overlap_batch(step)), step, step == STEPS
    )
  return host(state)


@pytest.mark.parametrize("tau, alpha", [(0, 0.0), (1, 0.0), (3, 0.5)])
def test_runtime_equals_the_algorithm_written_out(tau, alpha):
  """Streaming with 2 fragments on 2 workers x fsdp 4; tau = 0, alpha = 0 is plain streaming;
  tau = 3 keeps both fragments in flight at once and one of them at the final step."""
  assert_trees_close(
    run_overlapped(tau, alpha, sharding.make_mesh(2, 4)), reference(tau, alpha), atol=2e-5
  )


def test_overlap_with_compressed_reduce_scatter():
  average = diloco.compressed_average(
    compression.CompressionSpec("statistical", bits=4), collective="reduce_scatter"
  )
  assert_trees_close(
    run_overlapped(2, 0.0, sharding.make_mesh(2, 1), average), reference(2, 0.0, average), atol=1e-4
  )


def test_keep_progress_is_replace_without_overlap():
  mesh = sharding.make_mesh(2, 1)
  kept = run_overlapped(0, 0.5, mesh, adoption="keep_progress")
  replaced = run_overlapped(0, 0.5, mesh)
  assert_trees_close(kept._replace(exchanged_params=None), replaced, atol=0)


@pytest.mark.parametrize("alpha", [0.0, 0.5])
def test_keep_progress_adds_the_steps_since_the_exchange(alpha):
  """tau = 1: fragment 0 syncs at step 2, is exchanged beside inner step 3 and adopted after
  it.  Written out: theta_k <- (1 - alpha) (theta + w3_k - w2_k) + alpha w3_k on fragment 0,
  with w2, w3 the workers' parameters after steps 2 and 3 (step 3 from the pure inner step);
  fragment 1 holds w3."""
  trainer = overlap_trainer(1, alpha, sharding.make_mesh(2, 1), adoption="keep_progress")
  state = trainer.init(OVERLAP_MODEL.params())
  for step in (1, 2):
    state, _, _ = trainer.train_step(state, trainer.shard_batch(overlap_batch(step)), step, False)
  before = host(state)
  w3 = host(diloco.inner_step(before, shard(overlap_batch(3)), OVERLAP_MODEL.loss, INNER)[0])
  state, _, syncs = trainer.train_step(state, trainer.shard_batch(overlap_batch(3)), 3, False)
  after = host(state)
  assert len(syncs) == 1  # fragment 0's exchange ran in step 3's program
  for key in FRAGMENTS[0]:
    progress = jax.tree.map(np.subtract, w3.worker_params[key], before.worker_params[key])
    expected = jax.tree.map(
      lambda t, p, w: (1 - alpha) * (t[None] + p) + alpha * w,
      after.params[key],
      progress,
      w3.worker_params[key],
    )
    assert_trees_close(after.worker_params[key], expected, atol=1e-6)
    assert_trees_close(after.exchanged_params[key], before.worker_params[key], atol=0)
  for key in FRAGMENTS[1]:
    assert_trees_close(after.worker_params[key], w3.worker_params[key], atol=1e-6)


def test_adoption_is_validated_by_name():
  with pytest.raises(ValueError, match="^adoption='keep'"):
    overlap_trainer(1, 0.0, sharding.make_mesh(2, 1), adoption="keep")


def test_overlap_changes_the_result():
  """The fused program really delays adoption: tau = 1 differs from tau = 0."""
  mesh = sharding.make_mesh(2, 1)
  delayed, plain = run_overlapped(1, 0.0, mesh), run_overlapped(0, 0.0, mesh)
  differences = [np.abs(a - b).max() for a, b in zip(*map(jax.tree.leaves, (delayed, plain)))]
  assert max(differences) > 1e-3


@pytest.mark.parametrize(
  "kwargs, name",
  [({"overlap_steps": SYNC_EVERY}, "^overlap_steps="), ({"mixing": 1.5}, "^mixing=1.5")],
)
def test_bad_overlap_settings_are_named(kwargs, name):
  with pytest.raises(ValueError, match=name):
    runtime.DiLoCo(
      OVERLAP_MODEL.loss, INNER, OUTER, K, sharding.make_mesh(2, 1), sync_every=SYNC_EVERY, **kwargs
    )


def _muloco_config(overrides):
  """A MuLoCo run (Muon inner steps) on the 8 devices, K=2 workers x fsdp=4 unless overridden."""
  config = config_lib.default_config()
  config.model.size = "tiny"
  config.data.seq_len = 32
  config.train.batch_size = 16
  config.train.num_steps = 8
  config.optimizer.name = "muon"
  config.optimizer.warmup_steps = 2
  config.diloco.num_workers, config.diloco.fsdp, config.diloco.sync_every = 2, 4, 4
  config.update_from_flattened_dict(overrides)
  return config


@pytest.mark.parametrize(
  "overrides",
  [
    {"diloco.num_workers": 4, "diloco.fsdp": 2},
    pytest.param({"diloco.overlap_steps": 1, "diloco.num_fragments": 2}, marks=pytest.mark.slow),
    {"compression.kind": "statistical", "compression.collective": "reduce_scatter"},
    pytest.param({"compression.kind": "statistical"}, marks=pytest.mark.slow),
  ],
  ids=["mean", "streaming_overlap", "compressed_reduce_scatter", "compressed_all_gather"],
)
def test_compiling_a_run_logs_no_involuntary_rematerialization(overrides, capfd):
  """XLA's partitioner logs "Involuntary full rematerialization" when it can only reach a
  sharding by replicating a tensor first (memory and time at scale).  The byte tokenizer's 257
  rows split no way evenly.  On the previous main the mean (K=4 x fsdp=2: the finite check's
  reshape and the worker-split contribution mask against the owners' layout) and reduce_scatter
  (K=2 x fsdp=4) logged it.  Compiled here (no persistent cache): every program of the first
  run but ``init``; of the others, the programs that sync (the first overlapped step)."""
  jobs, _, _ = aot.programs(_muloco_config(overrides), jax.devices(), 257)
  names = [n for n in jobs if n != "init"]
  if "diloco.fsdp" not in overrides:
    names = [n for n in names if n.startswith(("outer_sync", "adoption"))]
    names += [n for n in jobs if n.startswith("overlapped_step")][:1]
  capfd.readouterr()
  for name in names:
    fn, args = jobs[name]
    fn.lower(*args).compile()
  assert "Involuntary full rematerialization" not in capfd.readouterr().err


def _lost_worker_trainer(average=None, k=2, sync_every=6, drops=((1, 2, 4),)):
  return runtime.DiLoCo(
    loss_fn,
    optax.sgd(0.1, momentum=0.9),
    diloco.outer_optimizer(),
    k,
    sharding.make_mesh(k, 1),
    average=average,
    sync_every=sync_every,
    drops=drops,
  )


def test_a_lost_worker_takes_no_steps_and_rejoins_from_the_shared_parameters():
  """Worker 1 lost for steps [2, 4), no sync in the window: it takes no step at 2 and 3, and
  before step 4 restarts from the shared parameters (the initial ones: no sync yet) with fresh
  momentum.  Written out with optax for worker 1; worker 0 never notices."""
  trainer = _lost_worker_trainer()
  sgd = optax.sgd(0.1, momentum=0.9)
  state = trainer.init(make_params())
  after = {}
  for step in range(1, 5):
    state, _, _ = trainer.train_step(state, trainer.shard_batch(make_batch(step, 8)), step, False)
    after[step] = host(state)
  worker_1 = lambda s: jax.tree.map(lambda x: x[1], after[s].worker_params)
  assert_trees_close(worker_1(3), worker_1(1), atol=0)  # no steps while lost
  rows = jax.tree.map(lambda x: x[4:], make_batch(4, 8))  # worker 1's rows of step 4
  grads = jax.grad(loss_fn)(make_params(), rows)
  updates, _ = sgd.update(grads, sgd.init(make_params()))
  assert_trees_close(worker_1(4), optax.apply_updates(make_params(), updates), atol=1e-6)
  # Worker 0 as in a run without the loss.
  alone = _lost_worker_trainer(drops=())
  state = alone.init(make_params())
  for step in range(1, 5):
    state, _, _ = alone.train_step(state, alone.shard_batch(make_batch(step, 8)), step, False)
  worker_0 = lambda s: jax.tree.map(lambda x: x[0], s.worker_params)
  assert_trees_close(worker_0(after[4]), worker_0(host(state)), atol=0)


def test_a_lost_owner_holds_no_buffer_and_a_rejoining_worker_replays_none():
  """reduce_scatter, K=4, H=2, worker 1 lost for steps [3, 5): at the sync of step 4 its chunk
  is requantized without owner error feedback (its buffer r_1 is zero after it, the others'
  are not), and before step 5 its error-feedback buffer e_1, built at the sync of step 2,
  restarts at zero instead of being replayed."""
  average = diloco.compressed_average(
    compression.CompressionSpec("statistical", bits=2), collective="reduce_scatter"
  )
  trainer = _lost_worker_trainer(average, k=4, sync_every=2, drops=((1, 3, 5),))
  state = trainer.init(make_params())
  after = {}
  for step in range(1, 6):
    state, _, _ = trainer.train_step(state, trainer.shard_batch(make_batch(step, 8)), step, False)
    after[step] = host(state).average_state
  norms = lambda tree: np.array(
    [sum(float(np.sum(np.square(x[j]))) for x in jax.tree.leaves(tree)) for j in range(4)]
  )
  owner = norms(after[4].owner_error)
  assert owner[1] == 0 and (np.delete(owner, 1) > 0).all()
  assert norms(after[2].worker_error)[1] > 0  # built while it took part
  assert norms(after[4].worker_error)[1] == norms(after[2].worker_error)[1]  # lost: untouched
  workers = norms(after[5].worker_error)
  assert workers[1] == 0 and (np.delete(workers, 1) > 0).all()
