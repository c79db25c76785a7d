"""The defense benchmark job (tiny variant) through the real entry point's run_job."""
import json
import os

import pytest

from b4b_jax import main
from b4b_jax.utils import metrics
from configs import defense_benchmark


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _config(arg):
  return defense_benchmark.get_config(arg)


def test_tiny_benchmark_job_writes_results_report_and_metrics(tmp_path):
  full = _config(None)
  assert (full.benchmark.rep_dim, full.benchmark.num_projections, full.benchmark.num_hyperplanes,
          full.benchmark.batch_size) == (2048, 20, 12, 256)
  assert full.benchmark.num_reps >= 20000 and tuple(full.benchmark.users_mixed) == (1, 64, 1024)
  workdir = str(tmp_path / "bench")
  main.run_job(_config("tiny"), workdir)
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  c = results["coverage_update"]
  # Same hyperplanes, same data: our coverage equals the original algorithm's.
  assert c["ours_final_coverage"] == pytest.approx(c["original_final_coverage"], abs=1e-4)
  assert c["ours_reps_per_s"] > 0 and c["original_reps_per_s"] > 0
  assert set(results["serving"]["by_users"]) == {"1", "4", "16"}
  assert results["state_bytes_per_user"] == 4 * 2 * 4 + 4 * 4 + 4 + 4 + 8  # P=4, K=6: 2 words
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "original algorithm" in report and "(d) defense state per user" in report
  stages = {r.get("stage") for r in metrics.read_metrics(workdir)}
  assert stages == {"coverage_update", "matmul_floor", "serving", "state"}
  with pytest.raises(ValueError, match="unknown variant"):
    _config("huge")
