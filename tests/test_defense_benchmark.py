"""The defense benchmark (benchmarks/defense.py), tiny variant, as `python -m benchmarks.defense` runs it."""
import json
import mmap
import os

import jax.numpy as jnp
import pytest

from benchmarks import defense as defense_benchmark
from b4b_jax.utils import metrics

# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_tiny_benchmark_writes_results_report_and_metrics(tmp_path):
  full = defense_benchmark.FULL
  assert (full["rep_dim"], full["num_projections"], full["num_hyperplanes"], full["batch_size"]) == (
      2048, 20, 12, 256)
  assert full["num_reps"] >= 20000 and tuple(full["users_mixed"]) == (1, 64, 1024)
  workdir = str(tmp_path / "bench")
  defense_benchmark.main(["--tiny", "--workdir", workdir])
  with open(os.path.join(workdir, "results.json")) as f:
    results = json.load(f)
  c = results["coverage_update"]
  # Same hyperplanes, same data: our coverage equals the original algorithm's.
  assert c["ours_final_coverage"] == pytest.approx(c["original_final_coverage"], abs=1e-4)
  assert c["ours_reps_per_s"] > 0 and c["original_reps_per_s"] > 0
  assert set(results["serving"]["by_users"]) == {"1", "4", "16"}
  assert results["serving"]["noise_only_reps_per_s"] > 0
  for row in results["serving"]["by_users"].values():
    assert row["full_defense"]["page_faults_per_call"] >= 0
  assert results["state_bytes_per_user"] == 4 * 2 * 4 + 4 * 4 + 4 + 4 + 8  # P=4, K=6: 2 words
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  assert "original algorithm" in report and "(d) defense state per user" in report
  # This test process's malloc settings, named in results and report (host_memory.setting()).
  assert f"host memory: {results['host_memory']} " in report
  assert results["host_memory"] in ("keep", "serving", "default")
  assert report.count("page faults a call") == 3  # one per serving row
  stages = {r.get("stage") for r in metrics.read_metrics(workdir)}
  assert stages == {"coverage_update", "matmul_floor", "serving", "state"}


def test_encoder_overhead_section_times_forward_and_defended_forward():
  settings = dict(defense_benchmark.TINY, encoders=("resnet18_w0.25",), encoder_batch=4, encoder_size=32)
  seen = []
  results = defense_benchmark.run(**settings, log=seen.append)
  row = results["encoders"]["resnet18_w0.25"]
  assert row["rep_dim"] == 128 and row["forward_ms"] > 0 and row["defended_ms"] > 0
  # The overhead is the step timed alone over the forward; the fused call's difference is the check.
  assert row["defense_ms"] > 0
  assert row["overhead_share"] == pytest.approx(row["defense_ms"] / row["forward_ms"])
  assert row["fused_difference"] == pytest.approx((row["defended_ms"] - row["forward_ms"]) / row["forward_ms"])
  assert any(line.startswith("(e) defense overhead") for line in seen)
  assert any("defense step alone" in line and "check, jitted together" in line for line in seen)


def test_best_seconds_counts_the_page_faults_of_each_functions_best_trial():
  """A function that maps a fresh 64 MiB buffer per call faults every page in again; one that reuses its
  memory does not. The mapping is mmap's own, not malloc's: malloc may serve 64 MiB from memory the
  process already holds (a heap earlier tests grew, or host_memory's keep, under which malloc never maps)
  and then reuses the freed buffer's pages; the first version, a bytearray, saw 0 faults in CI."""
  size = 64 * 1024 * 1024
  kept = bytearray(size)

  def fresh():
    with mmap.mmap(-1, size) as buffer:  # anonymous, unmapped on close
      buffer[::4096] = b"\x01" * (size // 4096)  # one byte per page: every page faulted in
    return jnp.zeros(())

  def reused():
    kept[::4096] = b"\x01" * (size // 4096)  # one byte per page of the same buffer
    return jnp.zeros(())

  faults = {}
  seconds = defense_benchmark._best_seconds({"fresh": fresh, "reused": reused}, 2, 3, faults=faults)
  assert set(seconds) == set(faults) == {"fresh", "reused"}
  # 16,384 pages of 4 KiB (32 where the kernel maps transparent huge pages for it); reused: ~0.
  assert faults["fresh"] >= 32 and faults["fresh"] > 10 * max(faults["reused"], 1), faults
