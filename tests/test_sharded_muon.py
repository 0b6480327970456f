"""Muon with Newton-Schulz distributed over an FSDP mesh axis (`shard_axis`, `param_specs`)."""

import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import NamedSharding
from jax.sharding import PartitionSpec as P

from muloco_jax import optim
from muloco_jax.tools.benchmarks.sharded_muon import collectives, dot_flops

# Hidden matrices of several per-layer shapes: wide, tall, three squares, and a scanned stack
# (`layers`: its leading axis is the layer axis) sharing the wide shape: groups of 17 (the tall
# one joins as its transpose) and 3 matrices, no multiple of the fsdp size.  Each spec shards one per-layer dim.
SHAPES = {
  "wide": (16, 40),
  "tall": (40, 16),
  "square_a": (24, 24),
  "square_b": (24, 24),
  "square_c": (24, 24),
  "layers": {"mlp": {"kernel": (15, 16, 40)}},
}
SPECS = {
  "wide": P(None, "fsdp"),
  "tall": P("fsdp", None),
  "square_a": P("fsdp", None),
  "square_b": P(None, "fsdp"),
  "square_c": P("fsdp"),
  "layers": {"mlp": {"kernel": P(None, None, "fsdp")}},
}
is_shape = lambda x: isinstance(x, tuple) and all(isinstance(n, int) for n in x)
is_spec = lambda x: isinstance(x, P)


def _mesh(workers, fsdp):
  devices = np.array(jax.devices()[: workers * fsdp]).reshape(workers, fsdp)
  return jax.sharding.Mesh(devices, ("worker", "fsdp"))


def _normal(shapes, lead=(), seed=0):
  leaves, treedef = jax.tree.flatten(shapes, is_leaf=is_shape)
  keys = jax.random.split(jax.random.key(seed), len(leaves))
  return jax.tree.unflatten(treedef, [jax.random.normal(k, lead + s) for k, s in zip(keys, leaves)])


def _sharded_step(tx, mesh, specs, workers=None, shard_out=True):
  """One update from a fresh state, `tx.update(g, tx.init(g), g)`, jitted with grads (and the
  update, when `shard_out`) sharded as `specs`; with `workers`, vmapped over a leading worker
  axis as DiLoCo does."""
  step = lambda g: tx.update(g, tx.init(g), g)[0]
  if workers:
    step = jax.vmap(step, spmd_axis_name="worker")
    specs = jax.tree.map(lambda s: P("worker", *s), specs, is_leaf=is_spec)
  shardings = jax.tree.map(lambda s: NamedSharding(mesh, s), specs, is_leaf=is_spec)
  out = dict(out_shardings=shardings) if shard_out else {}
  return jax.jit(step, in_shardings=(shardings,), **out)


def _run(step, mesh, grads):
  with jax.set_mesh(mesh):
    return step(grads), step.lower(grads).compile()


def _reference(tx, grads, workers=None):
  """The update without a mesh: each worker's separately."""
  step = lambda g: tx.update(g, tx.init(g), g)[0]
  return jax.jit(jax.vmap(step) if workers else step)(grads)


def _assert_close(actual, expected):
  for a, e in zip(jax.tree.leaves(actual), jax.tree.leaves(expected)):
    np.testing.assert_allclose(np.asarray(a), np.asarray(e), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
@pytest.mark.parametrize("workers, fsdp", [(None, 8), (2, 4)])
def test_sharded_scale_by_muon_equals_unsharded(workers, fsdp, method):
  mesh = _mesh(workers or 1, fsdp)
  grads = _normal(SHAPES, (workers,) if workers else ())
  kwargs = dict(ns_coeffs="muloco", ns_method=method)
  tx = optim.scale_by_muon(shard_axis="fsdp", param_specs=SPECS, **kwargs)
  update, _ = _run(_sharded_step(tx, mesh, SPECS, workers), mesh, grads)
  _assert_close(update, _reference(optim.scale_by_muon(**kwargs), grads, workers))


@pytest.mark.parametrize("specs_as", ["tree", "function"])
def test_sharded_muon_optimizer_equals_unsharded(specs_as):
  shapes = {
    "embedding": {"embedding": (64, 16)},
    "final_norm": {"scale": (16,)},
    "layers": {
      "attn": {"q": {"kernel": (3, 16, 16)}, "o": {"kernel": (3, 16, 16)}},
      "attn_norm": {"scale": (3, 16)},
      "mlp": {"up": {"kernel": (3, 16, 40)}, "down": {"kernel": (3, 40, 16)}},
    },
    "head": {"kernel": (16, 64)},
  }
  # FSDP: the largest per-layer dimension (first on a tie); never a layer axis.
  specs = {
    "embedding": {"embedding": P("fsdp")},
    "final_norm": {"scale": P("fsdp")},
    "layers": {
      "attn": {"q": {"kernel": P(None, "fsdp")}, "o": {"kernel": P(None, "fsdp")}},
      "attn_norm": {"scale": P(None, "fsdp")},
      "mlp": {"up": {"kernel": P(None, None, "fsdp")}, "down": {"kernel": P(None, "fsdp")}},
    },
    "head": {"kernel": P(None, "fsdp")},
  }
  mesh = _mesh(1, 8)
  grads = _normal(shapes)
  kwargs = dict(weight_decay=0.1, ns_coeffs="muloco")
  if specs_as == "tree":
    given = specs
  else:  # a function of the Muon params (the rest masked out), by path
    by_path = {
      jax.tree_util.keystr(path): spec
      for path, spec in jax.tree_util.tree_leaves_with_path(specs, is_leaf=is_spec)
    }
    given = lambda muon_params: jax.tree_util.tree_map_with_path(
      lambda path, _: by_path[jax.tree_util.keystr(path)], muon_params
    )
  tx = optim.muon(1e-2, shard_axis="fsdp", param_specs=given, **kwargs)
  update, compiled = _run(_sharded_step(tx, mesh, specs), mesh, grads)
  _assert_close(update, _reference(optim.muon(1e-2, **kwargs), grads))
  assert "all-to-all" in collectives(compiled.as_text())


@pytest.mark.parametrize("workers, fsdp", [(None, 8), (2, 4)])
def test_update_leaves_come_out_as_their_param_specs(workers, fsdp):
  """With no out_shardings, each leaf of the update is sharded as `param_specs` says, also
  where its group's stack went back over the other fan axis (square_b's fan-out)."""
  mesh = _mesh(workers or 1, fsdp)
  grads = _normal(SHAPES, (workers,) if workers else ())
  tx = optim.scale_by_muon(shard_axis="fsdp", param_specs=SPECS)
  update, _ = _run(_sharded_step(tx, mesh, SPECS, workers, shard_out=False), mesh, grads)
  for u, spec in zip(jax.tree.leaves(update), jax.tree.leaves(SPECS, is_leaf=is_spec)):
    expected = NamedSharding(mesh, P("worker", *spec) if workers else spec)
    assert u.sharding.is_equivalent_to(expected, u.ndim), (u.sharding.spec, expected.spec)


def _newton_schulz_flops_per_device(shapes, fsdp, method):
  """Each group of N matrices of one wide shape (a tall one transposed) padded to a multiple of
  fsdp: N / fsdp each."""
  counts = {}
  for shape in jax.tree.leaves(shapes, is_leaf=is_shape):
    wide = tuple(sorted(shape[-2:]))
    counts[wide] = counts.get(wide, 0) + math.prod(shape[:-2])
  flops = lambda s: optim.newton_schulz_flops(s, 5, method=method)
  every = sum(n * flops(s) for s, n in counts.items())
  ours = sum(-(-n // fsdp) * flops(s) for s, n in counts.items())
  return ours, every


@pytest.mark.parametrize("method", ["newton_schulz", "gram"])
@pytest.mark.parametrize("workers, fsdp", [(None, 8), (2, 4)])
def test_each_device_orthogonalizes_its_share(workers, fsdp, method):
  """Per device, the sharded program's matmul flops are those of its ceil(N / F) matrices of
  each shape (well under 2 / F of all of them; with "gram", Gram Newton-Schulz's on the wide
  and tall ones), moved by all-to-alls, never gathered; the program without shard_axis on the
  same sharded inputs does more."""
  mesh = _mesh(workers or 1, fsdp)
  grads = _normal(SHAPES, (workers,) if workers else ())
  sharded = optim.scale_by_muon(shard_axis="fsdp", param_specs=SPECS, ns_method=method)
  unsharded = optim.scale_by_muon(ns_method=method)
  _, compiled = _run(_sharded_step(sharded, mesh, SPECS, workers), mesh, grads)
  _, unsharded = _run(_sharded_step(unsharded, mesh, SPECS, workers), mesh, grads)
  hlo = compiled.as_text()
  found = collectives(hlo)
  assert found.keys() == {"all-to-all"}, found
  ours, every = _newton_schulz_flops_per_device(SHAPES, fsdp, method)
  assert dot_flops(hlo) == pytest.approx(ours, rel=1e-3)
  assert dot_flops(hlo) < 2 / fsdp * every
  assert dot_flops(hlo) < dot_flops(unsharded.as_text())


def test_dot_flops_counts_loop_iterations():
  """XLA's cost analysis counts a loop body once; `dot_flops` counts it per iteration."""
  x = jnp.ones((32, 32))
  five = jax.jit(lambda x: jax.lax.fori_loop(0, 5, lambda i, c: c @ c, x)).lower(x).compile()
  assert dot_flops(five.as_text()) == 5 * 2 * 32**3


def test_zero_matrix_orthogonalizes_to_zero():
  """The padding of a sharded stack relies on it (the norm's eps keeps 0 / 0 away)."""
  for compute_dtype in (None, jnp.bfloat16):
    x = optim.orthogonalize(jnp.zeros((2, 8, 12)), "muloco", compute_dtype=compute_dtype)
    assert not np.any(np.asarray(x))


@pytest.mark.parametrize("mesh_shape", [None, (8, 1)])
def test_shard_axis_without_it_in_the_mesh_is_the_unsharded_path(mesh_shape):
  """No mesh in context, or an fsdp axis of size 1: the path without shard_axis, bit for bit."""
  grads = _normal(SHAPES)
  plain = optim.scale_by_muon()
  sharded = optim.scale_by_muon(shard_axis="fsdp", param_specs=SPECS)
  if mesh_shape is None:
    update = _reference(sharded, grads)
  else:
    mesh = _mesh(*mesh_shape)
    update, compiled = _run(_sharded_step(sharded, mesh, SPECS), mesh, grads)
    assert "all-to-all" not in collectives(compiled.as_text())
  for a, e in zip(jax.tree.leaves(update), jax.tree.leaves(_reference(plain, grads))):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(e))


def test_explicit_shard_axis_is_refused():
  mesh = jax.make_mesh((1, 8), ("worker", "fsdp"), axis_types=(jax.sharding.AxisType.Explicit,) * 2)
  tx = optim.scale_by_muon(shard_axis="fsdp", param_specs=SPECS)
  with pytest.raises(ValueError, match="type Auto"):
    _run(_sharded_step(tx, mesh, SPECS), mesh, _normal(SHAPES))
