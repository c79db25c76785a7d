"""Per-user transforms: deterministic per user, different between users, dims, inverses, binary."""
import numpy as np
import pytest

from b4b_jax import defense

D, PAD = 12, 5


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def _cfg(transform, **kw):
  return defense.defense_config("simsiam", transform=transform, pad_dim=PAD, num_projections=2,
                                num_hyperplanes=4, **kw)


_EXPECTED = {  # transform -> (out_dim, {param: shape})
    "identity": (D, {}),
    "diag_affine": (D, {"scale": (D,), "shift": (D,)}),
    "dense_affine": (D, {"matrix": (D, D), "bias": (D,)}),
    "pad_shuffle": (D + PAD, {"pad": (PAD,), "perm": (D + PAD,)}),
    "affine_pad_shuffle": (D + PAD, {"scale": (D,), "shift": (D,), "pad": (PAD,),
                                     "perm": (D + PAD,)}),
    "binary": (2 * D, {"matrix": (D, 2 * D), "bias": (2 * D,)}),
}


@pytest.mark.parametrize("transform", defense.TRANSFORMS)
def test_params_deterministic_per_user_different_between_users_and_seeds(transform):
  cfg = _cfg(transform)
  alice = defense.user_transform_params(cfg, D, "alice")
  out_dim, shapes = _EXPECTED[transform]
  assert defense.out_dim(cfg, D) == out_dim
  assert {k: v.shape for k, v in alice.items()} == shapes  # only dense ones hold a matrix
  again = defense.user_transform_params(cfg, D, "alice")
  bob = defense.user_transform_params(cfg, D, "bob")
  other_seed = defense.user_transform_params(_cfg(transform, seed=1), D, "alice")
  for k in alice:
    np.testing.assert_array_equal(alice[k], again[k])
    assert not np.array_equal(alice[k], bob[k]) and not np.array_equal(alice[k], other_seed[k])
  x = np.random.default_rng(0).standard_normal((7, D)).astype(np.float32)
  y = defense.apply_user_transform(cfg, D, alice, x)
  assert y.shape == (7, out_dim)
  if transform != "identity":
    assert not np.allclose(y, defense.apply_user_transform(cfg, D, bob, x))


@pytest.mark.parametrize("transform", ["diag_affine", "dense_affine", "pad_shuffle",
                                       "affine_pad_shuffle"])
def test_affine_transforms_match_numpy_and_invert_given_the_key(transform):
  cfg = _cfg(transform)
  p = defense.user_transform_params(cfg, D, "carol")
  x = np.random.default_rng(1).standard_normal((9, D)).astype(np.float32)
  y = defense.apply_user_transform(cfg, D, p, x)
  ref = x.astype(np.float64)  # independent numpy forward
  if "scale" in p:
    assert np.all(np.abs(p["scale"]) <= 1) and np.all(np.abs(p["shift"]) <= 1)
    ref = ref * p["scale"] + p["shift"]
  if "matrix" in p:
    assert np.all(np.abs(p["matrix"]) <= 1)
    ref = ref @ p["matrix"] + p["bias"]
  if "perm" in p:
    np.testing.assert_array_equal(np.sort(p["perm"]), np.arange(D + PAD))
    ref = np.concatenate([ref, np.broadcast_to(p["pad"], (len(x), PAD))], axis=1)[:, p["perm"]]
  np.testing.assert_allclose(y, ref, rtol=1e-5, atol=1e-5)
  np.testing.assert_allclose(defense.invert_user_transform(cfg, D, p, y), x, rtol=1e-3, atol=1e-3)


def test_binary_transform_follows_the_paper_construction():
  cfg = _cfg("binary")
  p = defense.user_transform_params(cfg, D, "dave")
  slopes, intercepts = p["matrix"].astype(np.float64), p["bias"].astype(np.float64)
  np.testing.assert_array_equal(slopes[-1], 1.0)  # last row of ones
  # Rows 0..D-2 are -tan(2 pi U): heavy tailed, both signs, |tan| beyond 1 for half of the draws.
  body = slopes[:-1]
  assert (body > 0).mean() == pytest.approx(0.5, abs=0.15)
  assert (np.abs(body) > 1).mean() == pytest.approx(0.5, abs=0.15)
  x = np.random.default_rng(2).uniform(size=(20, D)).astype(np.float32)
  bits = defense.apply_user_transform(cfg, D, p, x)
  scores = x.astype(np.float64) @ slopes - intercepts
  clear = np.abs(scores) > 1e-3 * np.abs(slopes).sum(axis=0)  # away from float32 rounding
  assert clear.mean() > 0.95
  np.testing.assert_array_equal(bits[clear], (scores > 0)[clear].astype(np.float32))
  with pytest.raises(ValueError, match="not invertible"):
    defense.invert_user_transform(cfg, D, p, bits)


def test_binary_slopes_and_intercepts_are_the_papers_on_the_users_draws():
  """Original code: slopes -tan(2 pi U) (last row ones); each hyperplane passes through a random point
  whose coordinates are picked from np.linspace(0, 1, 1000); intercept b_j = S_j . p_j. The uniforms
  and grid indices are redrawn from the user's key (streams _SLOPES = 6, _POINTS = 7 of
  defense/transforms.py); slopes, grid and intercepts are recomputed in float64 numpy."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  from b4b_jax.defense import keys  # pylint: disable=g-import-not-at-top
  cfg = _cfg("binary")
  p = defense.user_transform_params(cfg, D, "dave")
  m = 2 * D
  key = keys.user_key(keys.stream_key(cfg.seed, "transform"), jnp.asarray(keys.uid_from_name("dave")))
  angles = np.asarray(jax.random.uniform(jax.random.fold_in(key, 6), (D - 1, m)), np.float64)
  points = np.linspace(0, 1, 1000)[np.asarray(jax.random.randint(jax.random.fold_in(key, 7), (D, m),
                                                                 0, 1000))]
  slopes = np.concatenate([-np.tan(2 * np.pi * angles), np.ones((1, m))])
  ours = p["matrix"].astype(np.float64)
  tame = np.abs(slopes) < 1e3  # float32 angles near a pole of tan: relative error grows without bound
  np.testing.assert_allclose(ours[tame], slopes[tame], rtol=1e-3)
  intercepts = np.sum(ours * points, axis=0)
  np.testing.assert_allclose(p["bias"], intercepts, rtol=0,
                             atol=1e-5 * np.abs(ours * points).sum(axis=0).max())
  # Without the draws: every hyperplane meets the unit cube [0, 1]^D (it passes through a point of it).
  low, high = np.minimum(ours, 0).sum(axis=0), np.maximum(ours, 0).sum(axis=0)
  assert np.all((low <= p["bias"]) & (p["bias"] <= high))
  assert np.abs(p["bias"]).min() > 0 and np.ptp(p["bias"]) > 0.5


def test_binary_debinarize_through_the_api_keeps_the_bit_and_is_fresh():
  cfg = _cfg("binary", debinarize=True, static_sigma=0.0)
  api = defense.DefendedEncoder(None, cfg, D)
  x = np.random.default_rng(3).uniform(size=(8, D)).astype(np.float32)
  first, second = api.query_representations("erin", x).reps, api.query_representations("erin", x).reps
  bits = defense.apply_user_transform(_cfg("binary"), D,
                                      defense.user_transform_params(cfg, D, "erin"), x)
  for out in (first, second):
    assert np.all((out > 0.5) == (bits == 1)) and np.all((out > 0) & (out <= 1))
  assert not np.any(first == second)


# identity is covered by the noise tests (returned - clean = noise), affine_pad_shuffle (the composition)
# by the mixed-batch test and the numpy forward above.
@pytest.mark.parametrize("transform", ["diag_affine", "pad_shuffle", "dense_affine", "binary"])
def test_api_applies_the_users_own_transform(transform):
  cfg = _cfg(transform, static_sigma=0.0)  # no noise: the output is exactly T_user(x)
  api = defense.DefendedEncoder(None, cfg, D)
  x = np.random.default_rng(4).standard_normal((6, D)).astype(np.float32)
  out = api.query_representations(["frank", "gina"] * 3, x).reps
  for name, rows in (("frank", [0, 2, 4]), ("gina", [1, 3, 5])):
    expected = defense.apply_user_transform(cfg, D, defense.user_transform_params(cfg, D, name),
                                            x[rows])
    np.testing.assert_allclose(out[rows], expected, rtol=1e-6, atol=1e-6)
