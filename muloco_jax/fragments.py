"""Streaming DiLoCo's fragments (Douillard et al. 2025, arXiv 2501.18512) and the sync schedule.

A fragment is a set of top-level parameter keys synced together; ``None`` is the whole tree
(plain DiLoCo).  ``SyncSchedule`` is the one place that decides which fragments sync at a step.
"""

from __future__ import annotations

import re
from typing import Any, NamedTuple

PyTree = Any
# The top-level parameter keys a fragment holds; None: the whole tree.
Fragment = "tuple[str, ...] | None"


def subtree(tree: PyTree, fragment: Fragment) -> PyTree:
  return tree if fragment is None else {key: tree[key] for key in fragment}


def merge(tree: PyTree, part: PyTree, fragment: Fragment) -> PyTree:
  return part if fragment is None else {**tree, **part}


def split_into_fragments(params: dict, num_fragments: int) -> tuple[tuple[str, ...], ...]:
  """Streaming DiLoCo's fragments: contiguous ranges of the blocks ``layers_0 .. layers_{L-1}``.

  Fragment f holds blocks ``[f L / F, (f + 1) L / F)``; the embedding goes with the first
  fragment and every other top-level parameter (final norm, output head) with the last.
  """
  layers = sorted(
    (k for k in params if re.fullmatch(r"layers_\d+", k)), key=lambda k: int(k.split("_")[1])
  )
  if num_fragments < 1:
    raise ValueError(f"num_fragments={num_fragments} must be >= 1")
  if num_fragments > max(len(layers), 1):
    raise ValueError(
      f"num_fragments={num_fragments} exceeds the {len(layers)} "
      "unscanned layers (streaming needs one parameter key per layer: an unscanned model)"
    )
  if num_fragments == 1:
    return (tuple(params),)
  fragments = [[] for _ in range(num_fragments)]
  for i, key in enumerate(layers):
    fragments[i * num_fragments // len(layers)].append(key)
  for key in params:
    if key not in layers:
      fragments[0 if "embed" in key else -1].append(key)
  return tuple(tuple(f) for f in fragments)


class StepSyncs(NamedTuple):
  """What runs at one step (``SyncSchedule.at``), fragments by number.

  Attributes:
    exchanged: with overlap, the exchanges run in the step's program (beside its inner step).
    adopted: with overlap, the adoptions after the step's inner step, in the same program.
    settled: at the final step with overlap, ``(sync step, fragment)`` of the exchanges still
      in flight, adopted after the step's program.
    synced: the syncs (exchange and adoption at once) after the step's program.
  """

  exchanged: tuple[int, ...]
  adopted: tuple[int, ...]
  settled: tuple[tuple[int, int], ...]
  synced: tuple[int, ...]


class SyncSchedule:
  """Which fragments sync after inner step ``step`` (steps count from 1), and, when the exchange
  overlaps the next ``overlap_steps`` inner steps, when it is issued and when it is adopted.

  With F fragments, fragment f syncs at the steps where (step - offset_f) % H == 0,
  offset_f = floor(H (f + 1) / F), as in the authors' code; F = 1 syncs every H steps.  Without
  overlap the final step syncs every fragment, so the shared parameters include every inner
  step.

  Overlap tau >= 1 (the authors' ``fragment_sync_delay``): a sync at step s exchanges the
  workers' parameters as they are after step s, in the program of step s + 1 (beside its inner
  step), and the workers adopt the result after step s + tau.  tau < H, so a fragment is adopted
  before it is exchanged again.  At the final step exchanges still in flight are adopted, and
  every fragment not adopted at that step syncs at once (the others' shared parameters hold
  their inner steps up to their last exchange, not the ones after it).
  """

  def __init__(self, sync_every: int, num_fragments: int = 1, overlap_steps: int = 0):
    if sync_every < 1:
      raise ValueError(f"sync_every={sync_every} must be >= 1")
    if not 0 <= overlap_steps < sync_every:
      raise ValueError(
        f"overlap_steps={overlap_steps} must be in [0, sync_every={sync_every}): "
        "a fragment's exchange must be adopted before its next sync"
      )
    self.sync_every, self.overlap_steps = sync_every, overlap_steps
    self.offsets = [sync_every * (f + 1) // num_fragments for f in range(num_fragments)]

  def due(self, step: int, final: bool = False) -> list[int]:
    if step < 1:
      return []
    return [
      f for f, offset in enumerate(self.offsets) if final or (step - offset) % self.sync_every == 0
    ]

  def synced_at_once(self, step: int, final: bool = False) -> list[int]:
    """The fragments whose exchange and adoption both run right after ``step``: without overlap
    those ``due``; with overlap none, but at the final step every fragment not adopted then
    (``in_flight`` or ``adopted``): those hold their last exchange already, and another sync
    would step the outer optimizer on a zero pseudogradient (momentum alone moving theta)."""
    if not self.overlap_steps:
      return self.due(step, final)
    if not final:
      return []
    settled = {f for _, f in self.in_flight(step)} | set(self.adopted(step))
    return [f for f in self.due(step, final) if f not in settled]

  def exchanged(self, step: int) -> list[int]:
    """With overlap: the fragments whose exchange runs in the program of ``step``."""
    return self.due(step - 1) if self.overlap_steps else []

  def adopted(self, step: int) -> list[int]:
    """With overlap: the fragments the workers adopt after ``step``."""
    return self.due(step - self.overlap_steps) if self.overlap_steps else []

  def in_flight(self, step: int) -> list[tuple[int, int]]:
    """With overlap: ``(sync step, fragment)`` of the exchanges run by ``step`` and adopted only
    after it."""
    return [(s, f) for s in range(step - self.overlap_steps + 1, step) for f in self.due(s)]

  def at(self, step: int, final: bool = False) -> StepSyncs:
    """Everything that syncs at ``step``: the one answer the runtime's steps and its list of
    compiled programs both follow."""
    return StepSyncs(
      exchanged=tuple(self.exchanged(step)),
      adopted=tuple(self.adopted(step)),
      settled=tuple(self.in_flight(step)) if final and self.overlap_steps else (),
      synced=tuple(self.synced_at_once(step, final)),
    )
