"""The end-to-end demo's small variant, through the real entry point's run_job, in a tmp workdir."""
import json
import math
import os
import subprocess
import sys

import pytest

from b4b_jax.demo import claims as claims_lib
from b4b_jax.jobs.runner import run_job
from configs import demo as demo_config

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


# A second setting that changes XLA:CPU's floating-point rounding and nothing else: LLVM fast-math changes
# the convolution gradients' bits on a 2-core AVX-512 Xeon and on a 2-core AVX2 AMD EPYC (as one core
# instead of two, or --xla_cpu_max_isa=SSE4_2, do on the Xeon; Eigen's thread setting and the thunk runtime
# change nothing there). README "What varies from machine to machine".
OTHER_ROUNDING = "--xla_cpu_enable_fast_math=true"


def _tiny_demo_subprocess(workdir: str, xla_flags: str) -> subprocess.Popen:
  env = dict(os.environ, XLA_FLAGS=xla_flags, PYTHONPATH=ROOT, TF_CPP_MIN_LOG_LEVEL="2")
  return subprocess.Popen([sys.executable, "-m", "b4b_jax.main", "--config=configs/demo.py:tiny",
                           f"--workdir={workdir}"], cwd=ROOT, env=env, stdout=subprocess.PIPE,
                          stderr=subprocess.STDOUT, text=True)


@pytest.fixture(scope="module")
def demo_runs(tmp_path_factory):
  """The tiny demo twice, side by side (one core each): in this process, as run_job runs it, and in a
  child process under OTHER_ROUNDING (the same 8 virtual devices, so the data-parallel split is the
  same). Returns {"default": (workdir, results), "other_rounding": (workdir, results.json's results)}."""
  other = str(tmp_path_factory.mktemp("demo_other_rounding"))
  proc = _tiny_demo_subprocess(other, f"{os.environ['XLA_FLAGS']} {OTHER_ROUNDING}")
  try:
    workdir = str(tmp_path_factory.mktemp("demo"))
    results = run_job(demo_config.get_config("tiny"), workdir)
    output, _ = proc.communicate(timeout=1800)
  finally:  # never leave a demo running after a failure or a timeout
    if proc.poll() is None:
      proc.kill()
      proc.wait()
  assert proc.returncode == 0, output[-3000:]
  with open(os.path.join(other, "results.json")) as f:
    other_results = json.load(f)["results"]
  return {"default": (workdir, results), "other_rounding": (other, other_results)}


@pytest.fixture(scope="module")
def demo_run(demo_runs):
  return demo_runs["default"]


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
  probe_rows = [v for k, v in stored["probes"].items() if k != "fidelity_gain_samples"]
  assert len(probe_rows) == 4 and set(stored["probes"]["fidelity_gain_samples"]) == {
      "random_init", "attack_b4b", "attack_sybil"}
  for row in (stored["legit"]["none"], stored["legit"]["b4b"], *probe_rows):
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
  for c in results["claims"]:
    assert c["verdict"] in claims_lib.VERDICTS and c["holds"] == (c["verdict"] == claims_lib.HOLDS)
    lo, hi = c["interval"]
    assert lo <= hi and c["evidence"] and c["margin"] >= 0
  assert stored["victim"]["collapse"]["normalized_std"] > demo_config.get_config("tiny").victim.min_normalized_std
  assert len(stored["legit"]["drop_samples"]) == demo_config.get_config("tiny").claims.bootstrap_samples


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


def test_tiny_demo_verdicts_do_not_depend_on_rounding(demo_runs):
  """The tiny demo under two rounding settings: its numbers differ, its verdicts not."""
  with open(os.path.join(demo_runs["default"][0], "results.json")) as f:
    results = {"default": json.load(f)["results"], "other_rounding": demo_runs["other_rounding"][1]}
  a, b = results["default"], results["other_rounding"]
  # The settings really changed the arithmetic (else this test would prove nothing) ...
  assert a["victim"]["epoch_losses"] != b["victim"]["epoch_losses"]
  # ... and no verdict moved.
  assert [c["verdict"] for c in a["claims"]] == [c["verdict"] for c in b["claims"]], (
      [(c["claim"], c["verdict"], c["interval"]) for c in a["claims"]],
      [(c["claim"], c["verdict"], c["interval"]) for c in b["claims"]])
