"""configs/attack_suite.py:tiny end to end (job "attack_suite"): every output written, the exact-repeat
attack wins against paper-B4B and gains nothing against the hardened defense."""
import json
import os

import pytest

from b4b_jax.jobs import runner
from configs import attack_suite

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_attack_suite_tiny_end_to_end(tmp_path):
  config = attack_suite.get_config("tiny")
  runner.run_job(config, str(tmp_path))
  for name in ("results.json", "report.md", "error_ratio_vs_n.png", "metrics.jsonl"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  ratio = results["summary"]["error_ratio"]
  n = str(max(config.ns))
  assert ratio["paper"]["repeat_exact"][n]["min"] > 0.6 * max(config.ns) ** 0.5
  assert ratio["hardened"]["repeat_exact"][n]["max"] == pytest.approx(1.0)
  seed = results["seeds"]["0"]
  assert seed["provider"]["hardened"]["repeat_exact"]["repeats"] > 0
  assert set(seed["legit"]) == {"none", "paper", "hardened", "charged", "paper sigma=1std",
                                "hardened sigma=1std", "charged sigma=1std"}
  # repeat_charge: the repeat thief pays for its repeats in sigma; the query-once thief does not.
  charged, hard = seed["attacks"]["charged"], seed["attacks"]["hardened"]
  assert charged["repeat_exact"]["sigma"] > hard["repeat_exact"]["sigma"]
  assert charged["query_once"]["sigma"] == pytest.approx(hard["query_once"]["sigma"], rel=0.5)
  # the static rows apply the same sigma under both keyings
  assert seed["legit"]["paper sigma=1std"]["sigma"] == seed["legit"]["hardened sigma=1std"]["sigma"] > 0
  assert "| repeat_jitter | hardened |" in (tmp_path / "report.md").read_text()


def test_attack_suite_refuses_bad_config():
  config = attack_suite.get_config("tiny")
  config.ns = (4, 16)
  with pytest.raises(ValueError, match="include 1"):
    runner.run_job(config, "/nonexistent/never/created")
  config = attack_suite.get_config("tiny")
  config.hardened.noise_keying = "per_user"
  with pytest.raises(ValueError, match="noise_keying"):
    runner.run_job(config, "/nonexistent/never/created")
