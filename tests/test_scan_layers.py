"""model.scan_layers must not change the algorithm: every per-leaf decision sees the per-layer
shape (muloco_jax.layout), so the scanned model's leading layer axis is a batch axis.

From the same initial weights (the unscanned model's, converted with ``layout.stack_layers``)
a Muon step, an AdamW step and a compressed MuLoCo sync give the same parameters in both
layouts, to float32 round-off.
"""

import functools
import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

import muloco_jax
from muloco_jax import compression, diloco, layout, model, optim

CONFIG = model.model_config("tiny", max_seq_len=32, dtype=jnp.float32)
SCANNED = dataclasses.replace(CONFIG, scan_layers=True)
LR, WD = 0.02, 0.1
# Muon with the default config's settings (muloco coefficients, momentum 0.95, Nesterov,
# spectral scale), float32 Newton-Schulz so that the comparison is tight.
MUON = optim.muon(LR, ns_coeffs="muloco", beta=0.95, weight_decay=WD, compute_dtype=jnp.float32)


def _loss_fn(config):
  net = model.Transformer(config)

  def loss_fn(params, batch):
    logits = net.apply({"params": params}, batch["inputs"])
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  return loss_fn


def _batch(key, shape):
  tokens = jax.random.randint(key, shape + (17,), 0, CONFIG.vocab_size)
  return {"inputs": tokens[..., :-1], "targets": tokens[..., 1:]}


@pytest.fixture(scope="module")
def problem():
  """(unscanned params, scanned params, unscanned grads, scanned grads) of the tiny model."""
  params = model.init_params(CONFIG, jax.random.key(0))
  stacked = layout.stack_layers(params)
  batch = _batch(jax.random.key(1), (4,))
  grads = jax.jit(jax.grad(_loss_fn(CONFIG)))(params, batch)
  stacked_grads = jax.jit(jax.grad(_loss_fn(SCANNED)))(stacked, batch)
  return params, stacked, grads, stacked_grads


def _assert_same(unscanned, scanned, atol, flips=0.0, flip_size=0.0):
  """``scanned`` equals ``unscanned`` converted to the scanned layout, leaf by leaf, except for
  at most a ``flips`` fraction of each leaf's entries, off by at most ``flip_size``."""
  converted = layout.stack_layers(unscanned)
  assert jax.tree.structure(converted) == jax.tree.structure(scanned)
  for (path, a), b in zip(jax.tree_util.tree_leaves_with_path(converted), jax.tree.leaves(scanned)):
    a, b, name = np.asarray(a), np.asarray(b), jax.tree_util.keystr(path)
    off = ~np.isclose(a, b, rtol=1e-5, atol=atol)
    if not flips:
      np.testing.assert_allclose(a, b, rtol=1e-5, atol=atol, err_msg=name)
    assert off.mean() <= flips and np.all(np.abs(a - b)[off] <= flip_size), name


def _one_step(tx, params, grads):
  updates, _ = jax.jit(tx.update)(grads, tx.init(params), params)
  return optax.apply_updates(params, updates)


def test_layouts_convert_and_the_loss_is_the_same_function(problem):
  params, stacked, grads, stacked_grads = problem
  scanned_shapes = jax.eval_shape(lambda: model.init_params(SCANNED, jax.random.key(0)))
  assert jax.tree.map(jnp.shape, stacked) == jax.tree.map(lambda s: s.shape, scanned_shapes)
  assert stacked["layers"]["attn"]["q"]["kernel"].shape == (2, 128, 128)
  assert stacked["layers"]["attn_norm"]["scale"].shape == (2, 128)
  roundtrip = layout.unstack_layers(stacked)
  assert jax.tree.structure(roundtrip) == jax.tree.structure(params)
  jax.tree.map(np.testing.assert_array_equal, roundtrip, params)
  _assert_same(grads, stacked_grads, atol=1e-8)


def test_muon_step_is_the_same_in_both_layouts(problem):
  params, stacked, grads, stacked_grads = problem
  _assert_same(_one_step(MUON, params, grads), _one_step(MUON, stacked, stacked_grads), atol=1e-6)


def test_adamw_step_with_the_matrix_mask_is_the_same_in_both_layouts(problem):
  params, stacked, grads, _ = problem
  tx = optax.adamw(LR, b2=0.99, weight_decay=WD, mask=layout.matrix_mask)
  # The unscanned gradient in the scanned layout (it equals the scanned model's gradient to
  # round-off, see above): Adam's g / (|g| + eps) turns round-off in a gradient entry near
  # eps into an O(lr) difference, which is not what this test is about.
  stacked_grads = layout.stack_layers(grads)
  _assert_same(_one_step(tx, params, grads), _one_step(tx, stacked, stacked_grads), atol=1e-7)


def test_compressed_muloco_sync_is_the_same_in_both_layouts(problem):
  """One inner Muon step of K=2 workers, then one 2-bit statistical sync with error feedback."""
  params, stacked, _, _ = problem
  num_workers = 2
  outer_tx = diloco.outer_optimizer(0.7, 0.9)
  average = diloco.compressed_average(
    compression.CompressionSpec("statistical", 2), error_feedback=True
  )
  batch = _batch(jax.random.key(2), (num_workers, 2))

  def run(params, config):
    state = diloco.init(params, MUON, outer_tx, num_workers, average=average)
    loss_fn = _loss_fn(config)
    state, _ = jax.jit(lambda s, b: diloco.inner_step(s, b, loss_fn, MUON))(state, batch)
    return jax.jit(lambda s: diloco.outer_sync(s, MUON, outer_tx, average=average))(state)

  state, metrics = run(params, CONFIG)
  stacked_state, stacked_metrics = run(stacked, SCANNED)
  # The layouts' inner steps differ by float32 round-off, which moves a value across a 2-bit bin
  # edge now and then (shifting that row's bin means a little): allow it in 1% of the entries,
  # each off by well under a bin, nothing more.
  flips = functools.partial(_assert_same, atol=1e-5, flips=1e-2, flip_size=2e-3)
  flips(state.params, stacked_state.params)
  for k in range(num_workers):
    worker = lambda tree: jax.tree.map(lambda x: x[k], tree)
    flips(
      worker(state.average_state.worker_error), worker(stacked_state.average_state.worker_error)
    )
    flips(worker(state.worker_params), worker(stacked_state.worker_params))
  # Per-layer payloads: the same bytes on the wire (one table scale per layer, per-layer rows).
  assert float(metrics["sync_bytes"]) == float(stacked_metrics["sync_bytes"])
  np.testing.assert_allclose(
    metrics["compression_error"], stacked_metrics["compression_error"], rtol=1e-5
  )


def test_labels_and_mask_of_scanned_params():
  """Every (stacked) norm gain is AdamW and undecayed; every stacked kernel is Muon."""
  shapes = jax.eval_shape(lambda: model.init_params(SCANNED, jax.random.key(0)))
  path_leaves, treedef = jax.tree_util.tree_flatten_with_path(shapes)
  labels = treedef.flatten_up_to(muloco_jax.muon_labels(shapes))
  mask = treedef.flatten_up_to(muloco_jax.matrix_mask(shapes))
  seen = set()
  for (path, leaf), label, decayed in zip(path_leaves, labels, mask):
    names = layout.path_names(path)
    gain = names[-1] == "scale"
    expected = "adam" if gain or names[0] in ("embedding", "head") else "muon"
    assert (label, decayed) == (expected, not gain), (names, leaf.shape, label, decayed)
    seen.add((names[0], gain, leaf.ndim))
  # Both stacked gains (L, d) and stacked kernels (L, in, out) were checked.
  assert {("layers", True, 2), ("layers", False, 3)} <= seen
  assert layout.layer_shape(path_leaves[0][0], path_leaves[0][1]) == (CONFIG.vocab_size, 128)


def test_sgd_weight_decay_is_decoupled():
  """Zero gradients: decoupled decay gives p_t = p_0 prod_t (1 - lr_t wd) on matrices only."""
  from muloco_jax import config as config_lib
  from muloco_jax import train

  config = config_lib.default_config()
  config.optimizer.name = "sgd"
  config.optimizer.momentum = 0.9
  config.optimizer.learning_rate = 0.5
  config.optimizer.warmup_steps = 0
  config.optimizer.weight_decay = 0.1
  config.train.num_steps = 4
  tx = train.make_optimizer(config)
  schedule = train.make_schedule(config.optimizer, config.train.num_steps)
  params = {
    "w": jnp.full((3, 4), 2.0),
    "b": jnp.ones(4),
    "layers": {"kernel": jnp.ones((2, 4, 4)), "norm": {"scale": jnp.ones((2, 4))}},
  }
  state, p = tx.init(params), params
  zeros = jax.tree.map(jnp.zeros_like, params)
  for _ in range(2):
    updates, state = tx.update(zeros, state, p)
    p = optax.apply_updates(p, updates)
  lrs = [float(schedule(t)) for t in range(2)]
  assert lrs[0] != lrs[1]
  factor = (1 - lrs[0] * 0.1) * (1 - lrs[1] * 0.1)
  np.testing.assert_allclose(p["w"], 2.0 * factor, rtol=1e-6)
  np.testing.assert_allclose(p["layers"]["kernel"], factor, rtol=1e-6)
  np.testing.assert_array_equal(p["b"], params["b"])
  np.testing.assert_array_equal(p["layers"]["norm"]["scale"], params["layers"]["norm"]["scale"])
