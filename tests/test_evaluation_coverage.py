"""Coverage and cost curves through the defense: monotone, bounded by 100, wide query sets cover more
than narrow ones, per-bucket counts agree with the API's coverage, sigma curves follow Eq. (1)."""
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.evaluation import api_client
from b4b_jax.evaluation import coverage_curves

DIM, N, BATCH = 16, 512, 128


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def query_sets():
  rng = np.random.default_rng(0)
  # "Downstream": one tight cluster (a narrow task); "diverse": isotropic (an ImageNet-like spread).
  narrow = (rng.normal(size=DIM) + 0.05 * rng.normal(size=(N, DIM))).astype(np.float32)
  diverse = rng.normal(size=(N, DIM)).astype(np.float32)
  return {"narrow": narrow, "diverse": diverse}


@pytest.fixture(scope="module")
def base():
  return defense.defense_config("simsiam", num_projections=3)


def test_coverage_curves_are_monotone_bounded_and_ordered(query_sets, base):
  curves = coverage_curves.coverage_vs_queries(query_sets, base_config=base, bucket_bits=(4, 8),
                                               batch_size=BATCH)
  assert set(curves) == {"4", "8"}
  for k, per_set in curves.items():
    for name, c in per_set.items():
      cov = np.asarray(c["coverage"])
      assert c["num_queries"] == list(range(BATCH, N + 1, BATCH))
      assert np.all(np.diff(cov) >= 0), (k, name, cov)
      assert np.all((cov > 0) & (cov <= 100.0))
    # A wide query distribution occupies more buckets than a narrow task.
    assert per_set["diverse"]["coverage"][-1] > 3 * per_set["narrow"]["coverage"][-1]
  # 16 buckets are nearly all hit by 512 isotropic queries; 256 buckets are not.
  assert curves["4"]["diverse"]["coverage"][-1] > 90.0
  assert curves["8"]["diverse"]["coverage"][-1] < curves["4"]["diverse"]["coverage"][-1]


def test_queries_per_bucket_agree_with_the_api_coverage(query_sets, base):
  cfg = coverage_curves.counting_config(base, 6)
  planes = np.asarray(defense.make_params(cfg, DIM).hyperplanes, np.float64)  # [P, D, K]
  assert not cfg.get("hash_center", False)  # hyperplanes through the origin, as the original
  scores = np.einsum("nd,pdk->npk", query_sets["diverse"].astype(np.float64), planes)
  reps = query_sets["diverse"][np.abs(scores).min(axis=(1, 2)) > 1e-4]  # no float32 rounding ties
  scores = scores[np.abs(scores).min(axis=(1, 2)) > 1e-4]
  per_bucket = coverage_curves.queries_per_bucket(reps, base_config=base, num_hyperplanes=6)
  counts = np.asarray(per_bucket["queries"])
  assert np.all(np.diff(counts) <= 0)              # busiest bucket first
  assert counts.sum() == pytest.approx(len(reps))  # every query lands in one bucket per projection
  # Numpy reference (the original's buckets.py): code = bits of (x . r_k > 0), counted per projection.
  codes = ((scores > 0) * (1 << np.arange(6))).sum(-1)  # [N, P]
  ref = np.stack([np.sort(np.bincount(codes[:, p], minlength=64))[::-1] for p in range(codes.shape[1])])
  np.testing.assert_allclose(counts, ref.mean(0)[:len(counts)], rtol=1e-12)
  assert np.all(ref.mean(0)[len(counts):] == 0)
  assert per_bucket["occupied_pct"] == pytest.approx(100.0 * np.mean((ref > 0).sum(1)) / 64)
  api = api_client.representation_api(coverage_curves.counting_config(base, 6), DIM)
  api.query_representations("u", reps)
  assert per_bucket["occupied_pct"] == pytest.approx(api.coverage("u"), rel=1e-6)


def test_sigma_curves_follow_the_cost_function():
  curves = coverage_curves.sigma_vs_coverage([{"lam": 1e-6, "alpha": 1.0, "beta": 80.0}],
                                             num_points=11)
  sigma = dict(zip(np.round(curves[0]["coverage"]).astype(int), curves[0]["sigma"]))
  # The paper's values (reference §3.2) for lambda=1e-6, alpha=1, beta=80%.
  for c, ref in ((0, 0.0), (30, 1.77e-4), (60, 0.0316), (80, 1.0), (100, 31.6)):
    assert sigma[c] == pytest.approx(ref, rel=5e-3, abs=1e-12)
  by_queries = coverage_curves.sigma_vs_queries(
      {"s": {"num_queries": [1, 2], "coverage": [0.0, 80.0]}}, lam=1e-6, alpha=1.0, beta=80.0)
  np.testing.assert_allclose(by_queries["s"]["sigma"], [0.0, 1.0 - 1e-6], rtol=1e-5)


def test_bad_coverage_inputs_raise(base):
  with pytest.raises(ValueError, match="at least one query set"):
    coverage_curves.coverage_vs_queries({}, base_config=base)
  with pytest.raises(ValueError, match="one encoder"):
    coverage_curves.coverage_vs_queries({"a": np.ones((4, 3)), "b": np.ones((4, 5))}, base_config=base)
  with pytest.raises(ValueError, match="batch_size"):
    coverage_curves.coverage_vs_queries({"a": np.ones((4, 3), np.float32)}, base_config=base,
                                        batch_size=0, bucket_bits=(4,))
