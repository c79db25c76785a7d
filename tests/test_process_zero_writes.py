"""Multi-host runs: only process 0 writes. Simulated by making jax.process_index() return 1 for the
shared writers every job uses (metrics, workdir records, results / report, plots); the same calls as
process 0 write each file (so a writer that never writes would fail too)."""
import os

import jax
import ml_collections
import pytest

from b4b_jax.evaluation import report
from b4b_jax.utils import metrics
from b4b_jax.utils import workdir as workdir_lib


def _write_everything(directory):
  config = ml_collections.ConfigDict({"job": "probe", "seed": 0})
  workdir_lib.prepare_workdir(directory, config, "probe")
  writer = metrics.MetricsWriter(directory)
  writer.write_scalars(1, {"loss": 0.5}, stage="probe")
  writer.flush()
  writer.close()
  plot = report.line_plot(os.path.join(directory, "curve.png"), [{"label": "a", "x": [0, 1],
                                                                  "y": [1, 2]}], xlabel="x", ylabel="y")
  report.write_experiment(directory, "test", {"top1": 1.0}, config=config, plots=[plot])


def _files(directory):
  return sorted(os.path.relpath(os.path.join(r, f), directory)
                for r, _, fs in os.walk(directory) for f in fs)


@pytest.mark.parametrize("process", [0, 1])
def test_only_process_zero_writes(process, tmp_path, monkeypatch):
  monkeypatch.setattr(jax, "process_index", lambda backend=None: process)
  directory = str(tmp_path / "run")
  _write_everything(directory)
  written = _files(directory)
  if process == 0:
    for name in ("run_info.json", "config.json", "metrics.jsonl", "curve.png", "results.json",
                 "report.md"):
      assert name in written, (name, written)
    assert any(f.startswith("events.out.tfevents") for f in written), written  # TensorBoard
  else:
    assert written == [], written
