"""The demo's claim verdicts (b4b_jax/demo/claims.py) on made-up results: the decision rule, the
intervals, and the paired bootstraps checked against direct numpy computations."""
import numpy as np
import pytest

from b4b_jax.demo import claims
from b4b_jax.evaluation import fidelity


@pytest.mark.parametrize("lo,hi,side,margin,expected", [
    (0.2, 0.4, "above", 0.0, claims.HOLDS),
    (0.2, 0.4, "above", 0.2, claims.HOLDS),            # lo exactly threshold + margin
    (0.2, 0.4, "above", 0.25, claims.UNDECIDED),       # inside the margin
    (-0.4, -0.2, "above", 0.1, claims.DOES_NOT_HOLD),
    (-0.4, -0.05, "above", 0.1, claims.UNDECIDED),
    (-0.1, 0.3, "above", 0.0, claims.UNDECIDED),       # straddles
    (-0.4, -0.2, "below", 0.1, claims.HOLDS),
    (0.2, 0.4, "below", 0.1, claims.DOES_NOT_HOLD),
    (-0.1, 0.3, "below", 0.0, claims.UNDECIDED),
])
def test_decide_zero_threshold(lo, hi, side, margin, expected):
  assert claims.decide(lo, hi, 0.0, side, margin) == expected


def test_decide_threshold_shifts_everything():
  # "the legit user loses < 1 point": drop interval [0.1, 0.6] with margin 0.3 -> holds; [0.8, 1.5] -> no.
  assert claims.decide(0.1, 0.6, 1.0, "below", 0.3) == claims.HOLDS
  assert claims.decide(0.1, 0.8, 1.0, "below", 0.3) == claims.UNDECIDED
  assert claims.decide(1.4, 2.5, 1.0, "below", 0.3) == claims.DOES_NOT_HOLD
  assert claims.decide(0.8, 1.5, 1.0, "below", 0.3) == claims.UNDECIDED


@pytest.mark.parametrize("args,match", [
    ((0.0, 1.0, 0.0, "over", 0.0), "side"),
    ((1.0, 0.0, 0.0, "above", 0.0), "inverted"),
    ((0.0, float("nan"), 0.0, "above", 0.0), "finite"),
    ((0.0, 1.0, 0.0, "above", -0.1), "margin"),
])
def test_decide_rejects_bad_input(args, match):
  with pytest.raises(ValueError, match=match):
    claims.decide(*args)


def test_percentile_interval_matches_numpy_and_rejects_bad_input():
  x = np.random.default_rng(0).normal(size=1000)
  lo, hi = claims.percentile_interval(x, 0.9)
  assert (lo, hi) == (np.percentile(x, 5.0), np.percentile(x, 95.0))
  for bad in ([1.0], [[1.0, 2.0]], [1.0, float("inf")]):
    with pytest.raises(ValueError, match="samples"):
      claims.percentile_interval(bad)
  with pytest.raises(ValueError, match="confidence"):
    claims.percentile_interval(x, 1.0)


def test_fidelity_gain_samples_are_paired_and_centred_on_the_gain():
  rng = np.random.default_rng(2)
  y = rng.normal(size=(400, 4))
  good = np.sum((0.3 * rng.normal(size=y.shape)) ** 2, 1)       # R^2 about 0.91
  bad = good + np.sum((0.6 * rng.normal(size=y.shape)) ** 2, 1)  # worse on every row
  gain = claims.fidelity_gain_samples(good, bad, y, num_samples=300)
  full = fidelity.r2_from_terms(good, y) - fidelity.r2_from_terms(bad, y)
  lo, hi = claims.percentile_interval(gain)
  assert lo < full < hi and lo > 0  # paired: the per-row advantage is never lost in resampling
  assert claims.decide(lo, hi, 0.0, "above") == claims.HOLDS
  # Same copy on both sides: every paired sample is exactly 0.
  assert np.all(claims.fidelity_gain_samples(good, good, y, num_samples=20) == 0)
  with pytest.raises(ValueError, match="same rows"):
    claims.fidelity_gain_samples(good[:10], bad, y)


def test_accuracy_drop_samples_cover_the_drop_and_resample_seeds():
  rng = np.random.default_rng(3)
  a = (rng.random((3, 450)) < 0.9).astype(np.float32)
  b = a.copy()
  b[:, :9] = 0.0  # b loses the first 9 images a got right (about 1.8 points)
  drop = 100.0 * (a.mean() - b.mean())
  samples = claims.accuracy_drop_samples(a, b, num_samples=500)
  lo, hi = claims.percentile_interval(samples)
  assert lo <= drop <= hi and lo >= 0
  # Seed-only differences: seed 0 says +3 points, the others 0 -> the samples vary with the seed draw.
  d = a.copy()
  d[0, np.flatnonzero(a[0])[:14]] = 0.0
  spread = claims.accuracy_drop_samples(a, d, num_samples=200)
  assert spread.min() == 0.0 and spread.max() > 2.0
  with pytest.raises(ValueError, match="seeds, images"):
    claims.accuracy_drop_samples(a[0], b[0])


# ------------------------------------------------------------------ report.claims on made-up results
# The wiring from results to verdicts: which statistic, which side, which margin. Each case moves one
# number so that exactly one claim changes its verdict; a reversed comparison or a swapped operand in
# report.claims breaks at least one case.
def _results(und=0.8, rnd=0.6, b4b=0.6, syb=0.65, none_top1=90.0, b4b_top1=89.8, legit_cov=10.0,
             thief_cov=50.0):
  def gains(centre):  # a tight bootstrap cloud around the gain
    return list(centre + np.linspace(-0.01, 0.01, 50))
  probes = {"attack_undefended": {"fidelity_r2_photos": und}, "attack_b4b": {"fidelity_r2_photos": b4b},
            "attack_sybil": {"fidelity_r2_photos": syb}, "random_init": {"fidelity_r2_photos": rnd},
            "fidelity_gain_samples": {"random_init": gains(und - rnd), "attack_b4b": gains(und - b4b),
                                      "attack_sybil": gains(und - syb)}}
  drop = none_top1 - b4b_top1
  legit = {"none": {"test_top1_mean": none_top1},
           "b4b": {"test_top1_mean": b4b_top1,
                   "traces": {"train": {"num_queries": [400], "coverage": [legit_cov / 4]},
                              "test": {"num_queries": [1000], "coverage": [legit_cov]}}},
           "drop_samples": list(drop + np.linspace(-0.05, 0.05, 50))}
  log = [{"account": 1, "num_queries": 500, "coverage": thief_cov / 2},
         {"account": 1, "num_queries": 1000, "coverage": thief_cov},
         {"account": 1, "num_queries": 2000, "coverage": 99.0},
         {"account": 2, "num_queries": 1000, "coverage": 0.0}]
  return {"legit": legit, "probes": probes, "attack_b4b": {"query_log": log}}


def _verdicts(**changes):
  import configs.demo as demo_config
  from b4b_jax.demo import report
  return [c["verdict"] for c in report.claims(_results(**changes), demo_config.get_config())]


_ALL_HOLD = [claims.HOLDS] * 5


@pytest.mark.parametrize("changes,index,expected", [
    ({}, None, None),
    ({"und": 0.61, "b4b": 0.5, "syb": 0.5}, 0, claims.UNDECIDED),         # stolen barely above random
    ({"rnd": 0.9, "b4b": 0.5, "syb": 0.5}, 0, claims.DOES_NOT_HOLD),      # stolen below random
    ({"b4b_top1": 88.5}, 1, claims.DOES_NOT_HOLD),                        # drop 1.5
    ({"b4b_top1": 89.1}, 1, claims.UNDECIDED),                            # drop 0.9: inside the margin
    ({"b4b_top1": 90.5}, 1, claims.HOLDS),                                # a gain is no loss
    ({"b4b": 0.85}, 2, claims.DOES_NOT_HOLD),                             # B4B copy better
    ({"syb": 0.9}, 3, claims.DOES_NOT_HOLD),                              # sybils beat undefended
    ({"legit_cov": 60.0}, 4, claims.DOES_NOT_HOLD),                       # legit covers more
    ({"thief_cov": 12.0}, 4, claims.UNDECIDED),                           # 2 points: inside 5
])
def test_report_claims_wiring(changes, index, expected):
  verdicts = _verdicts(**changes)
  want = list(_ALL_HOLD)
  if index is not None:
    want[index] = expected
  assert verdicts == want


def test_report_claims_compares_coverage_at_the_legit_users_query_count():
  # The thief's coverage is read at <= the legit user's 1000 queries (50 %), not at its last entry (99 %).
  from b4b_jax.demo import report
  import configs.demo as demo_config
  out = report.claims(_results(legit_cov=60.0), demo_config.get_config())
  assert out[4]["verdict"] == claims.DOES_NOT_HOLD and out[4]["estimate"] == pytest.approx(-10.0)


def test_report_claims_compares_coverage_at_the_thiefs_query_count_when_it_sent_fewer():
  # A thief with 500 queries against a legit user's 1000: the legit account is read at <= 500 queries
  # (its 400-query entry, legit_cov / 4), not at its 1000 (the tiny demo's 256 vs 1797 case).
  from b4b_jax.demo import report
  import configs.demo as demo_config
  results = _results(legit_cov=60.0, thief_cov=40.0)
  results["attack_b4b"]["query_log"] = [e for e in results["attack_b4b"]["query_log"]
                                        if e["num_queries"] <= 500]
  out = report.claims(results, demo_config.get_config())
  assert out[4]["estimate"] == pytest.approx(40.0 / 2 - 60.0 / 4)
  assert "legit 15.00% after 400 queries; thief 20.00% after 500 queries" in out[4]["evidence"]


def test_report_claims_estimates_are_the_stated_differences():
  from b4b_jax.demo import report
  import configs.demo as demo_config
  out = report.claims(_results(), demo_config.get_config())
  assert [c["estimate"] for c in out] == pytest.approx([0.8 - 0.6, 90.0 - 89.8, 0.8 - 0.6, 0.8 - 0.65,
                                                         50.0 - 10.0])
  assert [c["side"] for c in out] == ["above", "below", "above", "above", "above"]
