"""Resumable stages: each stage's result is a JSON file written atomically when the stage ends, so a
re-run with the same workdir skips finished stages and redoes at most the one that was interrupted.

Multi-host: every process runs every stage (same result), process 0 alone writes the markers, and all
processes follow process 0's view of which stages are done."""
import os
import time
from typing import Any, Callable, Dict

from absl import logging

from b4b_jax.utils import distributed
from b4b_jax.utils import files
from b4b_jax.utils import progress as progress_lib

STAGES_DIR = "stages"


class StageRunner:

  def __init__(self, workdir: str, stage_names, *, print_fn=None):
    self.workdir = workdir
    self.names = list(stage_names)
    self.results: Dict[str, Any] = {}
    self.seconds: Dict[str, float] = {}
    self._progress = progress_lib.Progress("demo", len(self.names), unit="stage", every_seconds=0,
                                           print_fn=print_fn)
    if distributed.is_writer():
      os.makedirs(os.path.join(workdir, STAGES_DIR), exist_ok=True)

  def path(self, name: str) -> str:
    return os.path.join(self.workdir, STAGES_DIR, f"{name}.json")

  def run(self, name: str, fn: Callable[[], Any]) -> Any:
    """Returns the stage's stored result, computing (and storing) it first if the stage has not run."""
    index = self.names.index(name) + 1
    path = self.path(name)
    if distributed.agree(os.path.exists(path)):
      stored = files.read_json(path)
      self.results[name] = stored["result"]
      self.seconds[name] = stored["seconds"]
      logging.info("[demo] stage %d/%d %s: done in an earlier run, reusing its result", index,
                   len(self.names), name)
    else:
      logging.info("[demo] stage %d/%d %s: starting", index, len(self.names), name)
      t0 = time.time()
      result = fn()
      self.seconds[name] = time.time() - t0
      record = {"result": result, "seconds": self.seconds[name]}
      if distributed.is_writer():
        files.atomic_write_json(path, record)
      # The JSON form, as a resumed run sees it.
      self.results[name] = files.json_form(record)["result"]
    self._progress.update(index, force=True, last=name)
    return self.results[name]
