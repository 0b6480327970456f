"""What a parameter leaf is, per layer: path names, stacked (scan) axes, per-layer shape.

With ``model.scan_layers=True`` the transformer's blocks live under one ``nn.scan`` module
named ``layers`` and every block parameter gets a leading layer axis: kernels ``(L, in, out)``,
norm gains ``(L, d)``.  Without scan they are ``layers_0 ... layers_{L-1}`` with kernels
``(in, out)`` and gains ``(d,)``.  The algorithm must not depend on that choice, so every
per-leaf decision (Muon or AdamW, weight decay or not, which axes Newton-Schulz treats as a
matrix, compress or send exactly, quantizer statistics) is taken on the *per-layer* shape,
and a stacked leaf is handled as a batch of its layers (optax's ``MuonDimensionNumbers``
call such axes batch axes).

The rule that says how many leading axes of a leaf are layer-stack axes is
``stacked_axes(path, leaf)``; public functions that take a tree accept a replacement as the
keyword argument ``stacked_axes``.
"""

from __future__ import annotations

import re
from collections.abc import Mapping
from typing import Any, Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np

# Names of the nn.scan modules whose parameters carry a leading layer axis (ours; MaxText's
# decoder uses the same name).
SCANNED_NAMES = ("layers",)

StackedAxesFn = Callable[[tuple, Any], int]


def path_names(path: Sequence[Any]) -> list[str]:
  """The components of a pytree key path as strings.

  ``DictKey`` -> its key, ``GetAttrKey`` -> its attribute name, ``SequenceKey`` -> its index,
  ``FlattenedIndexKey`` -> its index; anything else -> ``str(key)``.
  """
  names = []
  for key in path:
    if isinstance(key, jax.tree_util.DictKey):
      names.append(str(key.key))
    elif isinstance(key, jax.tree_util.GetAttrKey):
      names.append(str(key.name))
    elif isinstance(key, jax.tree_util.SequenceKey):
      names.append(str(key.idx))
    elif isinstance(key, jax.tree_util.FlattenedIndexKey):
      names.append(str(key.key))
    else:
      names.append(str(key))
  return names


def stacked_axes(path: Sequence[Any], leaf: Any) -> int:
  """Number of leading layer-stack (scan) axes of a leaf: the default rule.

  1 when a component of the path is exactly one of ``SCANNED_NAMES``, else 0.  ``leaf`` is
  unused by this rule; replacements may look at it.
  """
  del leaf
  return int(any(name in SCANNED_NAMES for name in path_names(path)))


def _num_stacked(path, leaf, rule: StackedAxesFn) -> int:
  s = int(rule(path, leaf))
  ndim = len(np.shape(leaf))
  if not 0 <= s <= ndim:
    raise ValueError(
      f"{jax.tree_util.keystr(tuple(path))} of shape {np.shape(leaf)} cannot have {s} "
      "stacked layer axes."
    )
  return s


def layer_shape(
  path: Sequence[Any], leaf: Any, *, stacked_axes: StackedAxesFn = stacked_axes
) -> tuple[int, ...]:
  """The shape of one layer of the leaf: its shape without the stacked axes."""
  return tuple(np.shape(leaf))[_num_stacked(path, leaf, stacked_axes) :]


def layer_ndim(
  path: Sequence[Any], leaf: Any, *, stacked_axes: StackedAxesFn = stacked_axes
) -> int:
  """The rank of one layer of the leaf."""
  return len(layer_shape(path, leaf, stacked_axes=stacked_axes))


def matrix_mask(params: Any, *, stacked_axes: StackedAxesFn = stacked_axes) -> Any:
  """True where the per-layer rank is >= 2: the leaves that get weight decay.

  Kernels, embedding and head are decayed; norm gains (stacked or not), biases and scalars
  are not.
  """
  return jax.tree_util.tree_map_with_path(
    lambda path, leaf: layer_ndim(path, leaf, stacked_axes=stacked_axes) >= 2, params
  )


# ----------------------------------------------------------------------------- layout conversion


def _numbered(tree: Mapping, name: str) -> dict[int, str]:
  pattern = re.compile(rf"{re.escape(name)}_(\d+)")
  found = {}
  for key in tree:
    match = pattern.fullmatch(str(key))
    if match:
      found[int(match.group(1))] = key
  return found


def stack_layers(params: Any, name: str = "layers") -> Any:
  """Unscanned -> scanned layout: ``{name}_0 .. {name}_{L-1}`` become one ``{name}`` entry
  whose leaves have a leading L axis.

  Applies at every level of nested mappings (e.g. ``{"params": {...}}``); the other entries
  are kept as they are.  The numbered blocks must be ``0 .. L-1`` and share one structure.
  """
  if not isinstance(params, Mapping):
    return params
  numbered = _numbered(params, name)
  if not numbered:
    return {key: stack_layers(value, name) for key, value in params.items()}
  if name in params:
    raise ValueError(f"Both {name!r} and {name}_i entries are present; cannot stack.")
  if sorted(numbered) != list(range(len(numbered))):
    raise ValueError(f"{name}_i entries must be numbered 0..L-1, got indices {sorted(numbered)}.")
  blocks = [params[numbered[i]] for i in range(len(numbered))]
  out = {key: value for key, value in params.items() if key not in numbered.values()}
  out[name] = jax.tree.map(lambda *xs: jnp.stack(xs), *blocks)
  return out


def unstack_layers(params: Any, name: str = "layers") -> Any:
  """Scanned -> unscanned layout: ``{name}``, whose leaves have a leading L axis, becomes
  ``{name}_0 .. {name}_{L-1}``.

  Applies at every level of nested mappings; the inverse of ``stack_layers``.
  """
  if not isinstance(params, Mapping):
    return params
  if name not in params:
    return {key: unstack_layers(value, name) for key, value in params.items()}
  stacked = params[name]
  lengths = {np.shape(x)[0] if np.ndim(x) else None for x in jax.tree.leaves(stacked)}
  if len(lengths) != 1 or None in lengths:
    raise ValueError(f"The leaves under {name!r} do not share one leading layer axis: {lengths}.")
  (num_layers,) = lengths
  clashes = list(_numbered(params, name).values())
  if clashes:
    raise ValueError(f"Both {name!r} and {clashes} are present; cannot unstack.")
  out = {key: value for key, value in params.items() if key != name}
  for i in range(num_layers):
    out[f"{name}_{i}"] = jax.tree.map(lambda x, i=i: x[i], stacked)
  return out
