"""Toy models the DiLoCo, runtime, sharding and fragments tests train, and tree helpers: a
two-layer classifier and a stack of unscanned layers (streaming fragments split it by layer)."""

import jax
import jax.numpy as jnp
import numpy as np
import optax

IN_DIM, HIDDEN, CLASSES = 6, 8, 3


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


def host(tree):
  return jax.tree.map(lambda x: np.asarray(jax.device_get(x)), tree)


def assert_trees_close(a, b, rtol=1e-5, atol=1e-6):
  assert jax.tree.structure(a) == jax.tree.structure(b)
  for x, y in zip(jax.tree.leaves(host(a)), jax.tree.leaves(host(b))):
    np.testing.assert_allclose(x, y, rtol=rtol, atol=atol)
