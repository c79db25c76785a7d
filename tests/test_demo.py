"""The end-to-end demo's small variant, through the real entry point's run_job, in a tmp workdir."""
import json
import math
import os

import pytest

from b4b_jax.jobs.runner import run_job
from configs import demo as demo_config


@pytest.fixture(scope="module")
def demo_run(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("demo"))
  results = run_job(demo_config.get_config("tiny"), workdir)
  return workdir, results


def _numbers(tree):
  if isinstance(tree, dict):
    for v in tree.values():
      yield from _numbers(v)
  elif isinstance(tree, (list, tuple)):
    for v in tree:
      yield from _numbers(v)
  elif isinstance(tree, float):
    yield tree


def test_demo_writes_report_table_plots_and_finite_results(demo_run):
  workdir, results = demo_run
  for name in ("report.md", "results.json", "config.json", "metrics.jsonl", "coverage_vs_queries.png",
               "sigma_vs_queries.png", "remap_cosine_distance.png", "victim_training.png"):
    assert os.path.getsize(os.path.join(workdir, name)) > 0, name
  with open(os.path.join(workdir, "report.md")) as f:
    report = f.read()
  for heading in ("Table 1 layout", "Calibration", "claims at this scale", "Remapping"):
    assert heading in report
  assert "| LEGIT | B4B | all | task |" in report and "| SYBIL | B4B | 2x128 | photos |" in report
  stored = json.load(open(os.path.join(workdir, "results.json")))["results"]
  assert all(math.isfinite(x) for x in _numbers(stored))
  for row in (stored["legit"]["none"], stored["legit"]["b4b"], *stored["probes"].values()):
    assert 0.0 <= row["test_top1_mean"] <= 100.0
    assert row.get("fidelity_r2", 0.0) <= 1.0
  for name in ("attack_undefended", "attack_b4b", "attack_sybil"):
    for account in stored[name]["accounts"]:
      assert 0.0 < account["coverage"] <= 100.0 and account["sigma"] >= 0.0
  # Undefended thief: sigma 0; the defended ones are charged and noised.
  assert all(a["sigma"] == 0.0 for a in stored["attack_undefended"]["accounts"])
  assert stored["attack_b4b"]["accounts"][0]["sigma"] > 0.0
  assert len(stored["attack_sybil"]["accounts"]) == 2
  assert stored["calibration"]["alpha"] > stored["calibration"]["lam"] > 0
  assert len(results["claims"]) == 5
  assert all(isinstance(c["holds"], bool) and c["evidence"] for c in results["claims"])


def test_demo_rerun_resumes_and_refuses_other_config(demo_run):
  workdir, results = demo_run
  stages = sorted(os.listdir(os.path.join(workdir, "stages")))
  mtimes = {s: os.path.getmtime(os.path.join(workdir, "stages", s)) for s in stages}
  again = run_job(demo_config.get_config("tiny"), workdir)
  assert again["table1"] == results["table1"]
  assert {s: os.path.getmtime(os.path.join(workdir, "stages", s)) for s in stages} == mtimes
  other = demo_config.get_config("tiny")
  other.seed = 1
  with pytest.raises(ValueError, match="incompatible earlier run"):
    run_job(other, workdir)
