"""Checkpoints through orbax: the train state plus the data iterator's position.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so a run killed mid-save keeps every checkpoint it
had finished.  Restoring walks back from the newest checkpoint past any that
fail to load (truncated or corrupt), warning about each and renaming it to
STEP.unreadable (so that the resumed run can save that step again).
"""

from typing import Any

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import orbax.checkpoint as ocp


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`."""

  def __init__(self, directory: str, keep: int, async_save: bool = True):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    self._manager = ocp.CheckpointManager(directory, options=options)

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Starts saving `state` and the iterator position `data_state` at `step`."""
    return self._manager.save(
      step,
      force=force,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
    )

  def restore_latest(self, abstract_state: Any) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that loads, or None.

    `abstract_state` gives the tree, shapes, dtypes and shardings to restore
    into (e.g. `jax.ShapeDtypeStruct`s, or the freshly initialised state).
    """
    for step in sorted(self._manager.all_steps(), reverse=True):
      try:
        restored = self._manager.restore(
          step,
          args=ocp.args.Composite(
            state=ocp.args.StandardRestore(abstract_state), data=ocp.args.JsonRestore()
          ),
        )
      except Exception as e:  # pylint: disable=broad-except  (any unreadable checkpoint)
        aside = self._set_aside(step)
        logging.warning(
          "Checkpoint at step %d could not be restored (%s: %s); moved it to %s "
          "and trying an earlier one.",
          step,
          type(e).__name__,
          e,
          aside,
        )
        continue
      return step, restored.state, restored.data
    return None

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable checkpoint STEP to STEP.unreadable[.N], keeping its files.

    Left in place it would make the manager skip every later save of a step <= STEP, so the
    resumed run could never replace it.
    """
    path = epath.Path(self._manager.directory) / str(step)  # the default step name format
    target, n = path.with_name(f"{step}.unreadable"), 0
    while target.exists():
      n += 1
      target = path.with_name(f"{step}.unreadable.{n}")
    if jax.process_index() == 0:
      path.rename(target)
    if jax.process_count() > 1:
      multihost_utils.sync_global_devices(f"checkpoint_set_aside_{step}")
    self._manager.reload()
    return str(target)

  def wait(self) -> None:
    self._manager.wait_until_finished()

  def close(self) -> None:
    self._manager.close()
