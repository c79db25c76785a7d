"""Metrics sink for every job: TensorBoard (via clu) and a JSON-lines file in the workdir.

Only process 0 writes (multi-host runs call this on every process; the others log nothing).
"""
import json
import math
import os
from typing import Mapping, Optional

import jax
from clu import metric_writers

METRICS_FILE = "metrics.jsonl"


class MetricsWriter:

  def __init__(self, workdir: str, *, jsonl_name: str = METRICS_FILE):
    self.is_writer = jax.process_index() == 0
    os.makedirs(workdir, exist_ok=True)
    self._tb = metric_writers.create_default_writer(
        workdir, just_logging=not self.is_writer, asynchronous=False)
    self.path = os.path.join(workdir, jsonl_name)

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


def read_metrics(workdir: str, *, stage: Optional[str] = None, jsonl_name: str = METRICS_FILE):
  """All JSONL records of a workdir (optionally of one stage), in write order."""
  path = os.path.join(workdir, jsonl_name)
  if not os.path.exists(path):
    return []
  with open(path) as f:
    records = [json.loads(line) for line in f if line.strip()]
  return [r for r in records if stage is None or r.get("stage") == stage]
