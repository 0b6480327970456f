"""Checkpoints through orbax: the train state plus the data iterator's position.

Saves are asynchronous and atomic (orbax writes to a temporary directory and
renames it when complete), so a run killed mid-save keeps every checkpoint it
had finished.

Restoring walks back from the newest checkpoint and tells three failures apart:

* Incompatible (`IncompatibleCheckpointError`): the checkpoint's metadata reads
  fine, but its state tree, shapes or dtypes differ from this run's (the workdir
  was written with another model size, number of workers, optimizer...).  This
  is decided from the metadata alone, before restoring anything, and stops the
  run before anything under the workdir changes.  The error names the settings
  that differ from those saved in `config.json` beside the checkpoints
  (`Checkpointer.write_config`).
* Transient (`is_transient`): an I/O error that says nothing about the bytes of
  the checkpoint (a timeout, a lost connection, a permission problem, a flaky
  network file system).  The read is retried `RETRIES` times with a doubling
  backoff from `BACKOFF_S`; if it still fails the error propagates and nothing
  is renamed.
* Unreadable (`is_unreadable`): a missing or corrupt file (truncated or garbled
  JSON, tensorstore DATA_LOSS / OUT_OF_RANGE errors, an item missing), or
  metadata that cannot be read at all.  The checkpoint is set aside (renamed
  STEP.unreadable, so that the resumed run can save that step again) and the
  next older one is tried.  Renames happen only once the walk has an outcome (a
  checkpoint restored, or none left), so an incompatible or transient failure
  further back leaves every checkpoint in place.

Any other exception (a bug, MemoryError, ...) propagates at once, renaming nothing.
"""

import json
import re
import time
from typing import Any, Callable, Mapping

from absl import logging
from etils import epath
import jax
from jax.experimental import multihost_utils
import ml_collections
import numpy as np
import orbax.checkpoint as ocp

# Beside the checkpoints: WORKDIR/config.json, the flattened config of the run that last wrote
# them (written by `train.train_and_evaluate` once the compatibility check passed).
CONFIG_FILE = "config.json"
# Transient I/O errors: retried this many times (after the first try), sleeping BACKOFF_S,
# 2 BACKOFF_S, 4 BACKOFF_S, ... between tries.
RETRIES = 3
BACKOFF_S = 0.5

# A missing file or directory means a damaged checkpoint, not a flaky file system.
_MISSING = (FileNotFoundError, NotADirectoryError, IsADirectoryError)
# Tensorstore (used by orbax for arrays) raises ValueError with an absl status code prefix;
# these codes are about the storage service, not about the bytes stored.
_TRANSIENT_STATUS = re.compile(
  r"\b(UNAVAILABLE|DEADLINE_EXCEEDED|RESOURCE_EXHAUSTED|ABORTED|PERMISSION_DENIED|"
  r"UNAUTHENTICATED): "
)
# What reading a damaged checkpoint raises (JSONDecodeError and UnicodeDecodeError are
# ValueErrors, and so are tensorstore's DATA_LOSS, OUT_OF_RANGE, FAILED_PRECONDITION errors;
# KeyError: an item missing from the checkpoint).
_UNREADABLE = (ValueError, KeyError, EOFError) + _MISSING
_EXAMPLES = 3  # differences shown in an error message


class IncompatibleCheckpointError(ValueError):
  """A checkpoint holds a state of another tree, shape or dtype than this run's."""


class _NoMetadataError(ValueError):
  """The checkpoint has no readable state metadata (an unreadable checkpoint)."""


def _chain(error: BaseException):
  """`error` and the exceptions it was raised from or while handling."""
  seen = set()
  while error is not None and id(error) not in seen:
    seen.add(id(error))
    yield error
    error = error.__cause__ or error.__context__


def is_transient(error: BaseException) -> bool:
  """Whether `error` (or one it was raised from) is an I/O error worth retrying.

  Transient: every OSError except those of a missing file or directory (FileNotFoundError,
  NotADirectoryError, IsADirectoryError), i.e. TimeoutError, ConnectionError (incl.
  BrokenPipeError), PermissionError, InterruptedError, BlockingIOError and plain OSErrors
  such as EIO or ESTALE; and tensorstore errors with the status UNAVAILABLE,
  DEADLINE_EXCEEDED, RESOURCE_EXHAUSTED, ABORTED, PERMISSION_DENIED or UNAUTHENTICATED.
  PermissionError rarely goes away on a retry, but it says nothing about the checkpoint
  either, so it must not get one set aside.
  """
  for e in _chain(error):
    if isinstance(e, OSError) and not isinstance(e, _MISSING):
      return True
    if isinstance(e, ValueError) and _TRANSIENT_STATUS.search(str(e)):
      return True
  return False


def is_unreadable(error: BaseException) -> bool:
  """Whether `error`, raised reading a checkpoint, means the checkpoint is damaged."""
  return isinstance(error, _UNREADABLE) and not is_transient(error)


def flatten_config(config: ml_collections.ConfigDict | Mapping) -> dict[str, Any]:
  """{"model.size": "tiny", "train.num_steps": 300, ...}: the leaves under dotted names."""
  config = config.to_dict() if hasattr(config, "to_dict") else dict(config)
  flat = {}
  for key, value in config.items():
    if isinstance(value, Mapping):
      flat.update({f"{key}.{k}": v for k, v in flatten_config(value).items()})
    else:
      flat[key] = value
  return flat


def _jsonable(config) -> dict[str, Any]:
  """`flatten_config(config)` as it reads back from JSON (tuples as lists, others as repr)."""
  return json.loads(json.dumps(flatten_config(config), default=repr))


def _key_name(key) -> str:
  for attribute in ("key", "name", "idx"):  # DictKey / FlattenedIndexKey, GetAttrKey, SequenceKey
    if hasattr(key, attribute):
      return str(getattr(key, attribute))
  return str(key)


def _path_name(path) -> str:
  return ".".join(_key_name(k) for k in path)


def _named_leaves(tree) -> dict[str, Any]:
  """{"params.embed": leaf, ...}, named as orbax names them (NamedTuples as dicts, tuples as
  lists)."""
  flat, _ = jax.tree_util.tree_flatten_with_path(tree)
  return {_path_name(path): leaf for path, leaf in flat}


def _arrays(tree) -> dict[str, tuple[tuple[int, ...], np.dtype]]:
  """{"params.embed": (shape, dtype), ...} of a tree of arrays, ShapeDtypeStructs or orbax
  array metadata (`_named_leaves`)."""
  return {
    name: (tuple(leaf.shape), np.dtype(leaf.dtype))
    if hasattr(leaf, "shape") and hasattr(leaf, "dtype")
    else (np.shape(leaf), np.result_type(leaf))
    for name, leaf in _named_leaves(tree).items()
  }


def _laid_out_as(structure, leaves_by_name: dict[str, Any]):
  """`structure`'s containers with each leaf replaced by the leaf of its name: moves a state
  between its own containers (NamedTuples, None for an absent buffer) and those a checkpoint
  holds (dicts, lists, empty ones), which `structure_differences` has matched by name."""
  return jax.tree_util.tree_map_with_path(
    lambda path, _: leaves_by_name[_path_name(path)], structure
  )


def _describe(array: tuple[tuple[int, ...], np.dtype]) -> str:
  shape, dtype = array
  return f"{list(shape)} {dtype.name}"


def structure_differences(saved_metadata, abstract_state) -> list[str]:
  """How the arrays of a checkpoint's state metadata differ from `abstract_state`'s
  (names only on one side, shapes or dtypes); [] when they match."""
  saved = _arrays(saved_metadata)
  ours = _arrays(abstract_state)
  differences = [
    f"{name}: {_describe(saved[name])} in the checkpoint, {_describe(ours[name])} in this run"
    for name in sorted(saved.keys() & ours.keys())
    if saved[name] != ours[name]
  ]
  differences += [f"{name}: only in the checkpoint" for name in sorted(saved.keys() - ours.keys())]
  differences += [f"{name}: only in this run" for name in sorted(ours.keys() - saved.keys())]
  return differences


def config_differences(saved: Mapping[str, Any], config: Mapping[str, Any]) -> list[str]:
  """The flattened settings that differ: ["model.size is 'tiny' there, 'small' now", ...]."""
  missing = object()
  lines = []
  for name in sorted(saved.keys() | config.keys()):
    then, now = saved.get(name, missing), config.get(name, missing)
    if then != now:
      then = "absent" if then is missing else repr(then)
      now = "absent" if now is missing else repr(now)
      lines.append(f"{name} is {then} there, {now} now")
  return lines


class Checkpointer:
  """Keeps the last `keep` checkpoints of a run under `directory`.

  `config_path` (e.g. WORKDIR/config.json) is where `write_config` saves the run's
  settings, and where an `IncompatibleCheckpointError` finds the checkpoint's ones.
  """

  def __init__(
    self,
    directory: str,
    keep: int,
    async_save: bool = True,
    config_path: str | None = None,
  ):
    options = ocp.CheckpointManagerOptions(
      max_to_keep=keep, create=True, enable_async_checkpointing=async_save
    )
    # Handlers registered up front, so that item metadata can be read before any restore.
    handlers = {"state": ocp.StandardCheckpointHandler(), "data": ocp.JsonCheckpointHandler()}
    self._manager = ocp.CheckpointManager(directory, options=options, item_handlers=handlers)
    self._config_path = epath.Path(config_path) if config_path else None

  @property
  def directory(self) -> epath.Path:
    return epath.Path(self._manager.directory)

  def save(self, step: int, state: Any, data_state: dict, force: bool = False) -> bool:
    """Starts saving `state` and the iterator position `data_state` at `step`."""
    return self._manager.save(
      step,
      force=force,
      args=ocp.args.Composite(
        state=ocp.args.StandardSave(state), data=ocp.args.JsonSave(data_state)
      ),
    )

  def restore_latest(
    self, abstract_state: Any, config: ml_collections.ConfigDict | Mapping | None = None
  ) -> tuple[int, Any, dict] | None:
    """(step, state, data_state) of the newest checkpoint that loads, or None.

    `abstract_state` gives the tree, shapes, dtypes and shardings to restore
    into (e.g. `jax.ShapeDtypeStruct`s, or the freshly initialised state).
    `config`, this run's settings, only serves to name the settings that differ
    in an `IncompatibleCheckpointError`.

    Raises:
      IncompatibleCheckpointError: the newest checkpoint whose metadata reads holds
        another tree, shapes or dtypes than `abstract_state`.  Nothing was changed.
      OSError (or a tensorstore ValueError): a transient error outlasted the retries.
        Nothing was changed.
    """
    unreadable = []  # steps, newest first: set aside once the walk has an outcome
    result = None
    for step in sorted(
      self._retrying("listing the checkpoints", self._manager.all_steps), reverse=True
    ):
      try:
        metadata = self._retrying(f"reading checkpoint {step}", lambda: self._state_metadata(step))
        differences = structure_differences(metadata, abstract_state)
        if not differences:
          # Restored into the checkpoint's own containers, then into this run's: the arrays
          # match by name, and a container that changed type between versions (a dict of
          # buffers that became a NamedTuple) holds no array of its own.
          target = _laid_out_as(metadata, _named_leaves(abstract_state))
          restored = self._retrying(
            f"restoring checkpoint {step}",
            lambda: self._manager.restore(
              step,
              args=ocp.args.Composite(
                state=ocp.args.StandardRestore(target), data=ocp.args.JsonRestore()
              ),
            ),
          )
      except Exception as e:  # pylint: disable=broad-except
        if not is_unreadable(e):
          raise
        self._warn_unreadable(step, e)
        unreadable.append(step)
        continue
      if differences:
        raise IncompatibleCheckpointError(self._incompatible_message(step, differences, config))
      result = step, _laid_out_as(abstract_state, _named_leaves(restored.state)), restored.data
      break
    for step in unreadable:
      logging.warning("Moved the unreadable checkpoint %d to %s.", step, self._set_aside(step))
    return result

  def latest_arrays(self) -> dict[str, tuple[tuple[int, ...], np.dtype]] | None:
    """{"worker_params.embed": (shape, dtype), ...} of the newest checkpoint whose metadata
    reads (None: no checkpoint)."""
    for step in sorted(self._retrying("listing the checkpoints", self._manager.all_steps))[::-1]:
      try:
        return _arrays(self._state_metadata(step))
      except Exception as e:  # pylint: disable=broad-except
        if not is_unreadable(e):
          raise
    return None

  def write_config(self, config: ml_collections.ConfigDict | Mapping) -> None:
    """Saves the flattened `config` to `config_path` (process 0; replaces it atomically)."""
    if self._config_path is None or jax.process_index() != 0:
      return
    text = json.dumps(_jsonable(config), indent=2, sort_keys=True) + "\n"
    temporary = self._config_path.with_name(self._config_path.name + ".tmp")
    temporary.write_text(text)
    temporary.replace(self._config_path)

  def saved_config(self) -> dict[str, Any] | None:
    """The flattened settings of the run that last wrote the checkpoints (None: unreadable)."""
    if self._config_path is None:
      return None
    try:
      return json.loads(self._config_path.read_text())
    except (OSError, ValueError):
      return None

  def _state_metadata(self, step: int):
    """The checkpoint's state metadata tree (orbax ArrayMetadata leaves)."""
    metadata = self._manager.metadata(step).item_metadata
    tree = getattr(metadata["state"], "tree", None) if metadata is not None else None
    if tree is None:  # e.g. state/_METADATA missing: orbax returns no tree rather than failing
      raise _NoMetadataError(f"checkpoint {step} has no state metadata")
    return tree

  def _incompatible_message(self, step: int, differences: list[str], config) -> str:
    saved = self.saved_config()
    if config is None:
      settings = "was saved by another configuration"
    elif saved is None:
      settings = (
        f"was saved by another configuration (which settings differ is unknown: there is no "
        f"readable {self._config_path or CONFIG_FILE})"
      )
    else:
      changed = config_differences(saved, _jsonable(config))
      settings = (
        f"was saved by a run with other settings ({self._config_path}): {'; '.join(changed)}"
        if changed
        else f"was saved by a run with this run's settings ({self._config_path}) but by code "
        "that laid out the state differently"
      )
    shown = "; ".join(differences[:_EXAMPLES])
    if len(differences) > _EXAMPLES:
      shown += f"; and {len(differences) - _EXAMPLES} more"
    count = f"{len(differences)} arrays differ" if len(differences) > 1 else "1 array differs"
    resume = f"the settings in {self._config_path}" if saved is not None else "its settings"
    return (
      f"The checkpoint {self.directory / str(step)} {settings}. Its state does not fit the one "
      f"this config builds ({count}: {shown}). Nothing was changed. "
      f"To start a fresh run, use another --workdir or delete {self.directory}; to resume the "
      f"run of the checkpoint, rerun it with {resume}."
    )

  def _retrying(self, what: str, read: Callable[[], Any]) -> Any:
    """`read()`, retried on transient I/O errors (RETRIES times, doubling backoff)."""
    for attempt in range(RETRIES + 1):
      try:
        return read()
      except Exception as e:  # pylint: disable=broad-except
        if not is_transient(e):
          raise
        if attempt == RETRIES:
          logging.error(
            "%s failed %d times with transient I/O errors, the last %s: %s; giving up, "
            "with every checkpoint left in place.",
            what.capitalize(),
            attempt + 1,
            type(e).__name__,
            e,
          )
          raise
        delay = BACKOFF_S * 2**attempt
        logging.warning(
          "%s failed (%s: %s); retrying in %.1f s.", what.capitalize(), type(e).__name__, e, delay
        )
        time.sleep(delay)
    raise AssertionError("unreachable")

  def _warn_unreadable(self, step: int, error: BaseException) -> None:
    logging.warning(
      "Checkpoint at step %d could not be restored (%s: %s); trying an earlier one.",
      step,
      type(error).__name__,
      error,
    )

  def _set_aside(self, step: int) -> str:
    """Renames an unreadable checkpoint STEP to STEP.unreadable[.N], keeping its files.

    Left in place it would make the manager skip every later save of a step <= STEP, so the
    resumed run could never replace it.
    """
    path = self.directory / str(step)  # the default step name format
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
