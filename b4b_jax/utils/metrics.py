"""Metrics sink for every job: TensorBoard (via clu) and a JSON-lines file in the workdir.

Only process 0 writes (multi-host runs call this on every process; the others log nothing).

Resume and crashes. A resumed job replays the steps after its last checkpoint, and a re-run job logs
its steps again, so metrics.jsonl can hold several records of one (stage, step). The rule is
**(stage, step) is the key, last write wins per value**: `read_metrics` merges all records of a
(stage, step) into one (values of later records replace earlier ones; values only an earlier record
had are kept), in the order the keys first appeared; `MetricsWriter.close()` rewrites the file that way
(atomically), so the file on disk also ends up with one line per (stage, step). A kill mid-write leaves
at most a torn *last* line: `read_metrics` skips it (with a warning) and a new MetricsWriter cuts it
off before appending; a corrupt line anywhere else is a ValueError naming the line. TensorBoard event
files are append-only and keep the replayed points (TensorBoard shows the latest).
"""
import json
import math
import os
from typing import Dict, List, Mapping, Optional, Tuple

import jax
from absl import logging
from clu import metric_writers

from b4b_jax.utils import files

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:

  def __init__(self, workdir: str, *, jsonl_name: str = METRICS_FILE):
    self.is_writer = jax.process_index() == 0
    files.make_dir(workdir)
    self._tb = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=False)
    self.path = os.path.join(workdir, jsonl_name)
    if self.is_writer:
      _cut_torn_tail(self.path)

  def write_scalars(self, step: int, scalars: Mapping[str, float], *, stage: Optional[str] = None,
                    check_finite: bool = False) -> None:
    """Writes scalars; `stage` prefixes TensorBoard tags ("steal/loss") and is a JSONL field."""
    values = {k: float(v) for k, v in scalars.items()}
    if check_finite:
      bad = sorted(k for k, v in values.items() if not math.isfinite(v))
      if bad:
        raise FloatingPointError(f"non-finite metric(s) {bad} at step {step} (stage {stage!r})")
    if not self.is_writer:
      return
    prefix = f"{stage}/" if stage else ""
    self._tb.write_scalars(int(step), {prefix + k: v for k, v in values.items()})
    record = {"step": int(step), **({"stage": stage} if stage else {}), **values}
    with open(self.path, "a") as f:
      f.write(json.dumps(record) + "\n")

  def flush(self) -> None:
    self._tb.flush()

  def close(self) -> None:
    self._tb.close()
    if self.is_writer:
      try:
        compact(self.path)
      except (OSError, ValueError) as e:  # the records stay readable (read_metrics merges them)
        logging.warning("%s: not compacted (%s)", self.path, e)


def _cut_torn_tail(path: str) -> None:
  """Truncates a last line without its newline (a write killed midway), so appends start clean."""
  try:
    with open(path, "rb+") as f:
      f.seek(0, os.SEEK_END)
      size = f.tell()
      if size == 0:
        return
      f.seek(size - 1)
      if f.read(1) == b"\n":
        return
      # Find the end of the last complete line (files are small: scan back in blocks).
      pos = size
      while pos > 0:
        start = max(0, pos - 65536)
        f.seek(start)
        block = f.read(pos - start)
        nl = block.rfind(b"\n")
        if nl >= 0:
          pos = start + nl + 1
          break
        pos = start
      logging.warning("%s: dropping a torn last record (%d bytes) left by an interrupted write", path,
                      size - pos)
      f.truncate(pos)
  except FileNotFoundError:
    pass


def _parse(path: str) -> List[dict]:
  with open(path, encoding="utf-8") as f:
    lines = f.read().split("\n")
  # A complete file ends with "\n": the final element is "". Anything else there is a torn record.
  torn = lines.pop() if lines else ""
  records = []
  for number, line in enumerate(lines, start=1):
    if not line.strip():
      continue
    try:
      record = json.loads(line)
      if not isinstance(record, dict) or "step" not in record:
        raise ValueError("not a metrics record")
    except ValueError as e:
      raise ValueError(f"{path} line {number} is corrupt ({e}): {line[:80]!r}; only a torn last line "
                       f"(an interrupted write) is skipped") from None
    records.append(record)
  if torn.strip():
    try:
      records.append(json.loads(torn))  # a complete record that only lacks its newline
    except ValueError:
      logging.warning("%s: skipping a torn last line (an interrupted write): %r", path, torn[:80])
  return records


def _merge(records: List[dict]) -> List[dict]:
  merged: Dict[Tuple[Optional[str], int], dict] = {}
  for record in records:
    key = (record.get("stage"), int(record["step"]))
    if key in merged:
      merged[key].update(record)
    else:
      merged[key] = dict(record)
  return list(merged.values())


def compact(path: str) -> None:
  """Rewrites `path` with one line per (stage, step) (atomic), if it holds repeats or a torn line."""
  if not os.path.exists(path):
    return
  records = _parse(path)
  merged = _merge(records)
  with open(path, "rb") as f:
    complete = f.read().endswith(b"\n") or os.path.getsize(path) == 0
  if len(merged) != len(records) or not complete:
    files.atomic_write_text(path, "".join(json.dumps(r) + "\n" for r in merged))


def read_metrics(workdir: str, *, stage: Optional[str] = None, jsonl_name: str = METRICS_FILE):
  """All records of a workdir (optionally of one stage), one per (stage, step), in first-write order.

  Records of a replayed (stage, step) are merged, later values winning (see the module docstring).
  """
  path = os.path.join(workdir, jsonl_name)
  if not os.path.exists(path):
    return []
  return [r for r in _merge(_parse(path)) if stage is None or r.get("stage") == stage]
