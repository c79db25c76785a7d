"""configs/attack_suite.py:tiny end to end (job "attack_suite"): every output written, the exact-repeat
attack wins against paper-B4B and gains nothing against the hardened defense, and every theft attack
(strategies/received.py) trains a real copy against every defense, each receiving what it claims."""
import json
import os

import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.attacks.strategies import received
from b4b_jax.jobs import attack_suite as attack_suite_job
from b4b_jax.jobs import runner
from configs import attack_suite

pytestmark = pytest.mark.usefixtures("fast_compiles")


def test_attack_suite_tiny_end_to_end(tmp_path):
  config = attack_suite.get_config("tiny")
  runner.run_job(config, str(tmp_path))
  for name in ("results.json", "report.md", "error_ratio_vs_n.png", "metrics.jsonl",
               "utility_theft_frontier.png"):
    assert os.path.getsize(tmp_path / name) > 0, name
  with open(tmp_path / "results.json") as f:
    results = json.load(f)
  ratio = results["summary"]["error_ratio"]
  n = str(max(config.ns))
  assert ratio["paper"]["repeat_exact"][n]["min"] > 0.6 * max(config.ns) ** 0.5
  # hardened = the full preset (repeat charge included); the ablation keeps the keyed noise only
  assert config.hardened.to_dict() == defense.HARDENED and config.hardened.repeat_charge > 0
  assert ratio["hardened"]["repeat_exact"][n]["max"] <= 1.2
  assert ratio["hardened_no_charge"]["repeat_exact"][n]["max"] == pytest.approx(1.0)
  seed = results["seeds"]["0"]
  assert seed["provider"]["hardened"]["repeat_exact"]["repeats"] > 0
  assert set(seed["legit"]) == {"none", "paper", "hardened", "hardened_no_charge", "paper sigma=1std",
                                "hardened sigma=1std"}
  # repeat_charge: the repeat thief pays for its repeats in sigma; the query-once thief does not.
  hard, keyed = seed["attacks"]["hardened"], seed["attacks"]["hardened_no_charge"]
  assert hard["repeat_exact"]["sigma"] > keyed["repeat_exact"]["sigma"]
  assert hard["query_once"]["sigma"] == pytest.approx(keyed["query_once"]["sigma"], rel=0.5)
  assert set(seed["timings"]) >= {"seed", "error: repeats", "legit", "theft: train copy"}
  # the static rows apply the same sigma under both keyings
  assert seed["legit"]["paper sigma=1std"]["sigma"] == seed["legit"]["hardened sigma=1std"]["sigma"] > 0
  assert "| repeat_jitter | hardened |" in (tmp_path / "report.md").read_text()
  _check_theft(config, results, (tmp_path / "report.md").read_text())


def _check_theft(config, results, report):
  tc = config.theft
  theft = results["seeds"]["0"]["theft"]
  assert set(theft) == {"untrained_copy", "none", "paper", "hardened", "hardened_no_charge"}
  assert set(results["summary"]["theft"]["paper"]) == set(tc.attacks) == set(received.ATTACKS) - {
      f"repeat_{p}" for p in ("jitter", "shift", "jpeg", "crop_flip")}
  n = tc.images
  for d in ("none", "paper", "hardened", "hardened_no_charge"):
    rows = theft[d]
    assert rows["query_once"]["queries"] == rows["query_once"]["pairs"] == n
    assert rows["repeat_exact"]["queries"] == tc.copies * n and rows["repeat_exact"]["pairs"] == n
    assert rows["under_knee"]["queries"] == rows["under_knee"]["pairs"] == tc.under_knee_budget
    assert rows["augmentation_flood"]["pairs"] == (tc.flood_weak + tc.flood_strong) * n
    assert rows["random_noise"]["pairs"] == rows["random_noise"]["queries"] == n + tc.noise_count
    assert len(rows["sybil_mapper"]["accounts"]) == 2
    rotation = rows["account_rotation"]["accounts"]
    assert len(rotation) >= 2 and max(a["queries"] for a in rotation) <= tc.per_account
    for attack, r in rows.items():
      assert all(np.isfinite([r["copy"]["r2"], r["copy"]["cosine"], r["copy"]["probe_top1"]])), (d, attack)
    assert (rows["query_once"]["sigma_max"] == 0) == (d == "none")
  # a copy is trained, not faked: its loss fell, and it is closer to the victim than the untrained copy
  once = theft["none"]["query_once"]["copy"]
  assert once["loss_last"] < once["loss_first"]
  assert once["rel_mse"] < theft["untrained_copy"]["rel_mse"]
  # repeat_charge makes the repeat thief's answers (and so its copy) far worse than without the charge
  keyed = theft["hardened_no_charge"]
  assert theft["hardened"]["repeat_exact"]["sigma_max"] > keyed["repeat_exact"]["sigma_max"]
  assert theft["hardened"]["repeat_exact"]["copy"]["rel_mse"] > keyed["repeat_exact"]["copy"]["rel_mse"]
  # the canary reads fresh noise under paper-B4B (and switches to repeats); under the hardened keying
  # its answers repeat while the sigma level holds (the whole tiny run), so it reads none
  assert "True" in theft["paper"]["canary"]["note"] and "False" in keyed["canary"]["note"]
  assert "| account_rotation | hardened_no_charge |" in report and "| (untrained copy) |" in report
  assert "| copy R^2 |" in report


def test_each_theft_attack_is_selectable():
  for attack in received.ATTACKS:
    config = attack_suite.get_config(f"tiny,attack={attack}")
    assert config.theft.attacks == (attack,)
    attack_suite_job.validate_config(config)
  assert attack_suite.get_config("attack=under_knee").theft.images > 64  # the full size
  with pytest.raises(ValueError, match="unknown theft attack"):
    attack_suite_job.validate_config(attack_suite.get_config("tiny,attack=steal_everything"))
  with pytest.raises(ValueError, match="takes 'tiny'"):
    attack_suite.get_config("tiny,huge")
  config = attack_suite.get_config("tiny")
  config.theft.per_account = config.theft.overlap
  with pytest.raises(ValueError, match="per_account"):
    attack_suite_job.validate_config(config)
  config = attack_suite.get_config("tiny")
  config.theft.loss = "l1"
  with pytest.raises(ValueError, match="loss"):
    attack_suite_job.validate_config(config)
  config = attack_suite.get_config("tiny")
  config.theft.eval_images = 3  # the linear R^2 needs >= 2 rows to fit and >= 2 to score
  with pytest.raises(ValueError, match="eval_images"):
    attack_suite_job.validate_config(config)


def test_attack_suite_refuses_bad_config():
  config = attack_suite.get_config("tiny")
  config.ns = (4, 16)
  with pytest.raises(ValueError, match="include 1"):
    runner.run_job(config, "/nonexistent/never/created")
  config = attack_suite.get_config("tiny")
  config.hardened.noise_keying = "per_user"
  with pytest.raises(ValueError, match="noise_keying"):
    runner.run_job(config, "/nonexistent/never/created")
