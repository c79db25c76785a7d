"""The demo's claim logic (b4b_jax/demo/report.py `claims`) on made-up results: each claim holds when
its numbers say so and fails when only its own numbers are reversed (a flipped comparison is caught).

Written against today's five claims; they are found by a phrase of their text, so a rewrite of the
claims needs only the phrases and the fields below updated.
"""
import copy

import pytest

from b4b_jax.demo import report


def _probe(top1, r2, r2_photos):
  return {"test_top1_mean": top1, "test_top1_std": 0.5, "fidelity_r2": r2, "fidelity_r2_photos": r2_photos}


def _results():
  """Every claim holds, each by a clear margin."""
  return {
      "legit": {"none": {"test_top1_mean": 90.0},
                "b4b": {"test_top1_mean": 89.6, "account": {"coverage": 5.0, "num_queries": 500}}},
      "probes": {"attack_undefended": _probe(80.0, 0.70, 0.60),
                 "attack_b4b": _probe(60.0, 0.40, 0.30),
                 "attack_sybil": _probe(62.0, 0.45, 0.35),
                 "random_init": _probe(50.0, 0.20, 0.10)},
      "attack_b4b": {"accounts": [{"coverage": 30.0, "charged_queries": 512}]},
  }


# claim phrase -> edits of the made-up results that make exactly that claim false
CASES = {
    "than a random network": [
        lambda r: r["probes"]["random_init"].update(fidelity_r2_photos=0.65),
        lambda r: r["probes"]["random_init"].update(fidelity_r2=0.75),  # on digits only
        lambda r: r["probes"]["random_init"].update(fidelity_r2_photos=0.60),  # a tie is not better
    ],
    "lose < 1 point": [
        lambda r: r["legit"]["b4b"].update(test_top1_mean=88.5),
        lambda r: r["legit"]["b4b"].update(test_top1_mean=89.0),  # exactly 1 point
    ],
    "single-account copy is worse": [
        lambda r: r["probes"]["attack_b4b"].update(fidelity_r2_photos=0.65),
        lambda r: r["probes"]["attack_b4b"].update(test_top1_mean=81.0),  # accuracy higher
    ],
    "Sybil accounts do not recover": [
        lambda r: r["probes"]["attack_sybil"].update(fidelity_r2_photos=0.61),
        lambda r: r["probes"]["attack_sybil"].update(fidelity_r2_photos=0.60),
    ],
    "cover fewer buckets": [
        lambda r: r["legit"]["b4b"]["account"].update(coverage=31.0),
        lambda r: r["attack_b4b"]["accounts"].append({"coverage": 4.0, "charged_queries": 512}),
    ],
}


def _verdicts(results):
  out = report.claims(results)
  verdicts = {}
  for phrase in CASES:
    (match,) = [c for c in out if phrase in c[0]]
    verdicts[phrase] = match[1]
    assert isinstance(match[1], bool) and match[2]
  assert len(out) == len(CASES)
  return verdicts


def test_all_claims_hold_on_results_that_support_them():
  assert all(_verdicts(_results()).values())


@pytest.mark.parametrize("phrase", list(CASES))
def test_each_claim_fails_when_only_its_numbers_are_reversed(phrase):
  for i, edit in enumerate(CASES[phrase]):
    results = copy.deepcopy(_results())
    edit(results)
    verdicts = _verdicts(results)
    assert verdicts[phrase] is False, (phrase, i)
    assert all(v for p, v in verdicts.items() if p != phrase), (phrase, i, verdicts)
