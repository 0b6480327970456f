"""Metrics: one JSON object per logged step in WORKDIR/metrics.jsonl, plus TensorBoard.

A vector metric (one value per worker) is written to JSON as a list and to
TensorBoard as one scalar per entry (`name/0`, `name/1`, ...).
"""

import json
import os
from typing import Any

import numpy as np
from tensorboardX import SummaryWriter


def _plain(value: Any) -> Any:
  value = np.asarray(value)
  return value.item() if value.ndim == 0 else value.tolist()


def read_metrics(workdir: str) -> list[dict]:
  """All records of WORKDIR/metrics.jsonl, in order."""
  path = os.path.join(workdir, "metrics.jsonl")
  if not os.path.exists(path):
    return []
  with open(path) as f:
    return [json.loads(line) for line in f if line.strip()]


class MetricsWriter:
  """Appends metrics records; only the primary process writes."""

  def __init__(self, workdir: str, enabled: bool = True):
    self._enabled = enabled
    self._path = os.path.join(workdir, "metrics.jsonl")
    self._tb = SummaryWriter(os.path.join(workdir, "tensorboard")) if enabled else None

  def truncate_after(self, step: int) -> None:
    """Drops records past `step`: a resumed run rewrites them as it goes."""
    if self._enabled:
      kept = [r for r in read_metrics(os.path.dirname(self._path)) if r["step"] <= step]
      with open(self._path, "w") as f:
        f.writelines(json.dumps(r) + "\n" for r in kept)

  def write(self, step: int, metrics: dict[str, Any]) -> None:
    if not self._enabled or not metrics:
      return
    record = {"step": int(step), **{k: _plain(v) for k, v in metrics.items()}}
    with open(self._path, "a") as f:
      f.write(json.dumps(record) + "\n")
    for name, value in record.items():
      if name == "step":
        continue
      values = np.atleast_1d(value)
      if np.ndim(value) == 0:
        self._tb.add_scalar(name, float(value), step)
      else:
        for i, v in enumerate(values):
          self._tb.add_scalar(f"{name}/{i}", float(v), step)

  def close(self) -> None:
    if self._tb is not None:
      self._tb.close()
