"""A small scanned model for runtime tests: embedding, a stack of MLP blocks, norm gain, head."""

import dataclasses

import jax
import jax.numpy as jnp
import numpy as np
import optax


@dataclasses.dataclass(frozen=True)
class ScannedMLP:
  vocab: int
  width: int
  hidden: int
  layers: int = 2

  def params(self, seed=0):
    rng = np.random.default_rng(seed)
    normal = lambda *shape: (rng.normal(size=shape) / np.sqrt(shape[-2])).astype(np.float32)
    return {
      "embed": {"embedding": rng.normal(size=(self.vocab, self.width)).astype(np.float32)},
      "layers": {
        "up": {"kernel": normal(self.layers, self.width, self.hidden)},
        "down": {"kernel": normal(self.layers, self.hidden, self.width)},
      },
      "norm": {"scale": np.ones(self.width, np.float32)},
      "head": {"kernel": normal(self.width, self.vocab)},
    }

  @staticmethod
  def loss(params, batch):
    x = params["embed"]["embedding"][batch["inputs"]]

    def block(x, layer):
      return x + jnp.tanh(x @ layer["up"]["kernel"]) @ layer["down"]["kernel"], None

    x, _ = jax.lax.scan(block, x, params["layers"])
    x = x * params["norm"]["scale"] / jnp.sqrt(jnp.mean(x * x, -1, keepdims=True) + 1e-6)
    logits = x @ params["head"]["kernel"]
    return optax.softmax_cross_entropy_with_integer_labels(logits, batch["targets"]).mean()

  def batch(self, step, rows=16, seq=8):
    tokens = np.random.default_rng(100 + step).integers(0, self.vocab, size=(rows, seq + 1))
    return {"inputs": tokens[:, :-1], "targets": tokens[:, 1:]}
