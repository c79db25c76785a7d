"""Cost function, config validation and LSH coverage against plain numpy references."""
import functools

import numpy as np
import pytest

import jax
import jax.numpy as jnp

from b4b_jax import defense
from b4b_jax.defense import lsh
from b4b_jax.defense import state as state_lib


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


# ---------------------------------------------------------------------------------------------- cost
@pytest.mark.parametrize("coverage,expected", [
    (0, 0.0), (30, 1.77e-4), (50, 5.62e-3), (60, 0.0316), (70, 0.178), (80, 1.0), (90, 5.62),
    (100, 31.6)])
def test_sigma_table_simsiam_preset(coverage, expected):
  p = defense.PRESETS["simsiam"]
  sigma = defense.noise_std(coverage, p["lam"], p["alpha"], p["beta"])
  if expected == 0:
    assert sigma == 0.0
  else:
    assert float(f"{sigma:.3g}") == pytest.approx(expected, rel=1e-9)  # 3 significant digits


def test_sigma_dino_preset_and_array_and_jax_inputs():
  p = defense.PRESETS["dino"]
  cov = np.array([0.0, 40.0, 60.0, 100.0])
  sig = defense.noise_std(cov, **p)
  np.testing.assert_allclose(sig, [0.0, 1.0, 1000.0, 1e9], rtol=2e-3)
  # JAX arrays go through the jnp path (usable under jit) and agree with numpy in float32.
  sig_jax = np.asarray(defense.noise_std(jnp.asarray(cov, jnp.float32), **p))
  np.testing.assert_allclose(sig_jax, sig, rtol=1e-5)
  # Clipped at 0 below zero coverage; independent formula check at an arbitrary point.
  assert defense.noise_std(-5.0, 1e-6, 1.0, 80.0) == 0.0
  assert defense.noise_std(37.0, 1e-4, 2.0, 50.0) == pytest.approx(
      1e-4 * (np.exp(np.log(2.0 / 1e-4) * 37.0 / 50.0) - 1), rel=1e-12)


# -------------------------------------------------------------------------------------------- config
def test_presets_and_overrides():
  c = defense.defense_config("dino", transform="affine_pad_shuffle", static_sigma=0.1, seed=7)
  assert (c.lam, c.alpha, c.beta) == (1e-6, 1000.0, 60.0)
  assert (c.num_projections, c.num_hyperplanes, c.sigma_from) == (20, 12, "after")
  assert c.transform == "affine_pad_shuffle" and c.static_sigma == 0.1 and c.enabled
  assert not defense.defense_config("none").enabled
  assert defense.defense_config().static_sigma is None
  assert defense.defense_config(num_hyperplanes=24).num_hyperplanes == 24


@pytest.mark.parametrize("overrides,match", [
    ({"lam": 0.0}, "lam must be > 0"), ({"lam": -1.0}, "lam must be > 0"),
    ({"alpha": 1e-6}, "alpha must be > lam"), ({"beta": 0.0}, "beta must be > 0"),
    ({"num_hyperplanes": 0}, "num_hyperplanes"), ({"num_hyperplanes": 25}, "num_hyperplanes"),
    ({"num_projections": 0}, "num_projections"), ({"transform": "rotate"}, "unknown transform"),
    ({"pad_dim": -1}, "pad_dim"), ({"binary_ratio": 0.0}, "binary_ratio"),
    ({"sigma_from": "during"}, "sigma_from"), ({"static_sigma": -0.1}, "static_sigma"),
    ({"lam": float("nan")}, "finite"), ({"num_hyperplanes": 12.5}, "num_hyperplanes"),
    ({"bogus": 1}, "unknown defense config field"), ({"seed": 2**40}, "seed")])
def test_invalid_hyperparameters_raise(overrides, match):
  with pytest.raises(ValueError, match=match):
    defense.defense_config("simsiam", **overrides)


def test_invalid_preset_and_rep_dim():
  with pytest.raises(ValueError, match="unknown defense preset"):
    defense.defense_config("simclr")
  with pytest.raises(ValueError, match="rep_dim"):
    defense.make_params(defense.defense_config(), 0)
  cfg = defense.defense_config()
  cfg.beta = -3.0  # edited after creation: make_params validates again
  with pytest.raises(ValueError, match="beta"):
    defense.make_params(cfg, 8)


# ------------------------------------------------------------------------------------------ coverage
def _reference_coverage(batches, hyperplanes):
  """The original algorithm per user: per projection the set of tuple(x @ R_p > 0); mean 100*len/2^K."""
  hyperplanes = np.asarray(hyperplanes, np.float64)
  num_proj, _, k = hyperplanes.shape
  sets = {}
  history = []
  for users, reps in batches:
    for user in dict.fromkeys(users):
      rows = np.asarray(reps, np.float64)[np.asarray(users) == user]
      per_proj = sets.setdefault(user, [set() for _ in range(num_proj)])
      for p in range(num_proj):
        per_proj[p].update(map(tuple, (rows @ hyperplanes[p] > 0).astype(int)))
    history.append({u: float(np.mean([100.0 * len(s) / 2**k for s in per_proj]))
                    for u, per_proj in sets.items()})
  return history


def _unambiguous_rows(reps, hyperplanes, margin=1e-3):
  """Rows whose hash cannot depend on float rounding (every |x . r| > margin)."""
  scores = np.einsum("nd,pdk->npk", reps.astype(np.float64), np.asarray(hyperplanes, np.float64))
  return reps[np.abs(scores).min(axis=(1, 2)) > margin]


@pytest.mark.parametrize("num_projections,num_hyperplanes", [(20, 12), (3, 3), (4, 7), (2, 20)])
def test_coverage_matches_set_reference_over_incremental_mixed_batches(num_projections,
                                                                       num_hyperplanes):
  rep_dim, users = 24, ["ann", "bob", "cy"]
  cfg = defense.defense_config("none", num_projections=num_projections,
                               num_hyperplanes=num_hyperplanes)
  api = defense.DefendedEncoder(None, cfg, rep_dim, capacity=4)
  rng = np.random.default_rng(num_hyperplanes)
  pool = _unambiguous_rows(rng.standard_normal((1500, rep_dim)).astype(np.float32),
                           api.params.hyperplanes)
  # Repeated rows (duplicates within and across batches) exercise the dedupe of the OR update.
  pool = np.concatenate([pool[:900], pool[:100]])
  batches, start = [], 0
  for size in (64, 200, 1, 64, 250, 5, 3, 256):  # padded to 64, 256 and 8 rows: 3 compilations
    rows = pool[start:start + size]
    start += size
    batch_users = [users[i] for i in rng.integers(0, len(users), size)]
    batches.append((batch_users, rows))
  history = _reference_coverage(batches, api.params.hyperplanes)
  for (batch_users, rows), expected in zip(batches, history):
    result = api.query_representations(batch_users, rows)
    for u, cov in expected.items():
      assert api.coverage(u) == pytest.approx(cov, rel=1e-12, abs=1e-12)
    for row, u in enumerate(batch_users):  # per-row info is the user's coverage after the batch
      assert result.coverage[row] == pytest.approx(expected[u], rel=1e-6)
  counts = np.asarray(api.state.counts)
  np.testing.assert_array_equal(lsh.popcount(api.state.occupancy), counts)
  assert api.num_queries("ann") + api.num_queries("bob") + api.num_queries("cy") == start


def test_one_key_and_two_key_sorts_update_occupancy_identically():  # the hashed picking's fallback
  rng = np.random.default_rng(0)
  k, users, n = 9, 5, 300
  occupancy = jnp.asarray(rng.integers(0, 2**32, (users, 3, 16), dtype=np.uint32) & 0x01010101)
  counts = jnp.asarray(lsh.popcount(occupancy).astype(np.int32))
  user_per_row = jnp.asarray(rng.integers(-1, users + 1, n).astype(np.int32))  # incl. ignored rows
  buckets = jnp.asarray(rng.integers(0, 40, (n, 3)).astype(np.int32))  # many duplicates
  add = jax.jit(lsh.add_buckets, static_argnums=(4, 5, 6))  # one compilation instead of op by op
  one = add(occupancy, counts, user_per_row, buckets, k, True, 0)  # hash_rounds=0: the sort alone
  two = add(occupancy, counts, user_per_row, buckets, k, False, 0)
  for a, b in zip(one, two):
    np.testing.assert_array_equal(np.asarray(a), np.asarray(b))
  expected = _or_reference(occupancy, user_per_row, buckets)  # independent: OR of the bits in numpy
  np.testing.assert_array_equal(np.asarray(one[0]), expected[0])
  np.testing.assert_array_equal(np.asarray(one[1]), expected[1])


@pytest.mark.parametrize("run", [1, 2, 4, 5, 16, 17, 40])
def test_runs_of_rows_by_user_update_occupancy_as_the_hashed_picking(run):
  """add_buckets finds a user's repeated buckets by comparing each row with the ones before it (rows
  sorted by user) when no user has more than 1, 4 or 16 rows in the call, else by the hashed picking.
  One user has `run` rows (the longest run), the first and the last of them with the same bucket, so a
  branch too short for the run, or comparing too few rows back, adds that bit twice; the others have a
  row each; ignored rows (more than any run) must not matter. Against an OR of the bits in numpy, and
  against the hashed picking alone (max_runs=())."""
  rng = np.random.default_rng(run)
  k, capacity, others = 6, 40, 20
  users = np.concatenate([np.zeros(run, np.int32), 1 + np.arange(others, dtype=np.int32),
                          np.full(30, capacity, np.int32), [-1]])
  buckets = rng.integers(0, 64, (len(users), 3)).astype(np.int32)
  buckets[:run] = np.stack([rng.permutation(64)[:run] for _ in range(3)], axis=1)  # distinct ...
  perm = rng.permutation(len(users))
  users, buckets = users[perm], buckets[perm]
  mine = np.flatnonzero(users == 0)
  buckets[mine[-1], 1] = buckets[mine[0], 1]  # ... but for the first and the last row in projection 1
  buckets = jnp.asarray(buckets)
  occupancy = jnp.asarray(rng.integers(0, 2**32, (capacity, 3, 2), dtype=np.uint32) & 0x01010101)
  counts = jnp.asarray(lsh.popcount(occupancy).astype(np.int32))
  add = jax.jit(lsh.add_buckets, static_argnums=(4, 5, 6, 7))
  ours = add(occupancy, counts, jnp.asarray(users), buckets, k, True, 4, (1, 4, 16))
  hashed = add(occupancy, counts, jnp.asarray(users), buckets, k, True, 4, ())
  expected = _or_reference(occupancy, users, buckets)
  for a, b, e in zip(ours, hashed, expected):
    np.testing.assert_array_equal(np.asarray(a), e)
    np.testing.assert_array_equal(np.asarray(b), e)


def _or_reference(occupancy, user_per_row, buckets):
  """numpy: every valid row's bucket bits OR-ed into its user's words, and the popcounts."""
  expected = np.asarray(occupancy).copy()
  for row, u in enumerate(np.asarray(user_per_row)):
    if 0 <= u < expected.shape[0]:
      for p, b in enumerate(np.asarray(buckets)[row]):
        expected[u, p, b // 32] |= np.uint32(1) << np.uint32(b % 32)
  return expected, lsh.popcount(expected)


@pytest.mark.parametrize("users,n,k,bucket_range", [(1, 500, 12, 4096), (300, 600, 9, 40),
                                                    (1000, 1024, 12, 4096), (3, 64, 16, 65536)])
def test_hashed_sorted_and_fallback_updates_equal_a_numpy_or(users, n, k, bucket_range):
  rng = np.random.default_rng(users)
  words = lsh.words_per_projection(k)
  occupancy = jnp.asarray(rng.integers(0, 2**32, (users, 3, words), dtype=np.uint32) & 0x01010101)
  counts = jnp.asarray(lsh.popcount(occupancy).astype(np.int32))
  user_per_row = jnp.asarray(rng.integers(-1, users + 1, n).astype(np.int32))  # incl. ignored rows
  buckets = jnp.asarray(rng.integers(0, bucket_range, (n, 3)).astype(np.int32))
  expected = _or_reference(occupancy, user_per_row, buckets)
  add = jax.jit(lsh.add_buckets, static_argnums=(4, 5, 6))
  for rounds in (0, 1, 4):  # the sort alone, one hashed round (+ the sort if unsettled), the default
    got = add(occupancy, counts, user_per_row, buckets, k, None, rounds)
    np.testing.assert_array_equal(np.asarray(got[0]), expected[0], err_msg=f"rounds={rounds}")
    np.testing.assert_array_equal(np.asarray(got[1]), expected[1], err_msg=f"rounds={rounds}")


def test_flat_and_per_axis_state_indexing_update_occupancy_identically(monkeypatch):
  # add_buckets indexes the state flat (one int32 per update) and per axis only where a flat index
  # could overflow int32 (from 838,860 users at K=12, P=20): the same update either way.
  rng = np.random.default_rng(3)
  users, n, k = 40, 256, 9
  occupancy = jnp.asarray(rng.integers(0, 2**32, (users, 3, 16), dtype=np.uint32) & 0x01010101)
  counts = jnp.asarray(lsh.popcount(occupancy).astype(np.int32))
  user_per_row = jnp.asarray(rng.integers(-1, users + 1, n).astype(np.int32))
  buckets = jnp.asarray(rng.integers(0, 1 << k, (n, 3)).astype(np.int32))
  flat = lsh.add_buckets(occupancy, counts, user_per_row, buckets, k)
  monkeypatch.setattr(lsh, "_MAX_FLAT_INDEX", 0)
  per_axis = lsh.add_buckets(occupancy, counts, user_per_row, buckets, k)
  expected = _or_reference(occupancy, user_per_row, buckets)
  for got in (flat, per_axis):
    np.testing.assert_array_equal(np.asarray(got[0]), expected[0])
    np.testing.assert_array_equal(np.asarray(got[1]), expected[1])


@pytest.mark.parametrize("single_key", [False, True])  # the pair compared as two gathers or one key
def test_hashed_picking_chooses_one_row_per_pair_and_settles_one_user_in_one_round(single_key):
  rng = np.random.default_rng(1)
  n, k = 1024, 12
  pick = jax.jit(functools.partial(lsh.hashed_representatives, single_key=single_key),
                 static_argnums=(3, 4))
  buckets = rng.integers(0, 1 << k, (3, n)).astype(np.int32)
  one_user = np.zeros((3, n), np.int32)
  chosen, unsettled = pick(one_user, buckets, jnp.ones((3, n), bool), k, 1)
  assert not np.any(unsettled)  # the first slot is injective on one user's buckets
  for p in range(3):  # exactly the first row of each distinct bucket (the table keeps the least row)
    first_rows = np.unique(buckets[p], return_index=True)[1]
    np.testing.assert_array_equal(np.flatnonzero(np.asarray(chosen[p])), np.sort(first_rows))
  # Many users: collisions in round 1 leave pairs unsettled; later rounds settle (almost) all; every
  # settled pair has exactly one chosen row, unsettled and non-pending rows none.
  users = rng.integers(0, 1024, (3, n)).astype(np.int32)
  pending = jnp.asarray(rng.random((3, n)) < 0.9)
  after_one = pick(users, buckets, pending, k, 1)[1]
  chosen, unsettled = map(np.asarray, pick(users, buckets, pending, k, 4))
  assert np.sum(after_one) > 10 and np.sum(unsettled) < np.sum(after_one)
  for p in range(3):
    groups = {}
    for row in np.flatnonzero(np.asarray(pending[p])):
      groups.setdefault((users[p, row], buckets[p, row]), []).append(row)
    for rows in groups.values():
      picked = int(np.sum(chosen[p, rows]))
      assert picked == (0 if unsettled[p, rows[0]] else 1)
      assert np.all(unsettled[p, rows] == unsettled[p, rows[0]])  # a pair settles as a whole
    assert not np.any(chosen[p, ~np.asarray(pending[p])])


def test_bucket_bits_are_strict_and_packed_in_hyperplane_order():
  hyperplanes = np.array([[[1.0, -1.0, 0.5]], [[0.0, 2.0, -3.0]]], np.float32)  # P=2, D=1, K=3
  projection = lsh.projection_matrix(jnp.asarray(hyperplanes))
  reps = jnp.array([[1.0], [-1.0], [0.0]], jnp.float32)
  ids = np.asarray(lsh.bucket_ids(reps, projection, 3))
  # x=1: p0 bits (1,0,1) -> 1 + 4 = 5; p1 bits (0 [0 > 0 is false], 1, 0) -> 2.
  # x=-1: p0 (0,1,0) -> 2; p1 (0,0,1) -> 4.   x=0: every score is 0 -> bucket 0.
  np.testing.assert_array_equal(ids, [[5, 2], [2, 4], [0, 0]])


def test_step_ignores_padding_rows_and_counts_a_users_rows_as_one_batch():
  cfg = defense.defense_config("simsiam", num_projections=2, num_hyperplanes=5)
  params = defense.make_params(cfg, 8)
  state = defense.init_state(params, 3)
  for slot in range(3):
    state = defense.set_uid(state, slot, defense.uid_from_name(f"user{slot}"))
  reps = np.random.default_rng(0).standard_normal((6, 8)).astype(np.float32)
  users = jnp.array([1, -1, 1, 7, 2, 1], jnp.int32)  # -1 and 7 (>= capacity) are padding
  state, returned, info = defense.defense_step(params, state, users, jnp.asarray(reps))
  np.testing.assert_array_equal(np.asarray(state.num_queries), [0, 3, 1])
  np.testing.assert_array_equal(np.asarray(state.num_batches), [0, 1, 1])
  np.testing.assert_array_equal(np.asarray(returned)[[1, 3]], 0.0)
  np.testing.assert_array_equal(np.asarray(info["sigma"])[[1, 3]], 0.0)
  assert np.asarray(info["sigma"])[0] == np.asarray(info["sigma"])[2] == np.asarray(info["sigma"])[5]
  assert bool(info["all_finite"])


@pytest.mark.parametrize("num_users", [1, 5, 1024, 3_000_000])  # 3e6 x 1000 rows overflows one key
def test_rows_by_user_is_a_stable_sort_by_slot(num_users):
  from b4b_jax.defense import lsh  # pylint: disable=g-import-not-at-top
  rng = np.random.default_rng(num_users)
  users = rng.integers(0, min(num_users, 7) + 1, 1000).astype(np.int32)  # slot num_users: no user
  users[rng.random(1000) < 0.2] = num_users
  order, sorted_users = jax.jit(lsh.rows_by_user, static_argnums=1)(jnp.asarray(users), num_users)
  expected = np.argsort(users, kind="stable")
  np.testing.assert_array_equal(np.asarray(order), expected)
  np.testing.assert_array_equal(np.asarray(sorted_users), users[expected])


def test_step_finite_check_from_the_hashing_scores_is_exact():
  """The step reads finiteness off the hashing scores and checks reps itself only when a score is not
  finite: a NaN or inf in a counted row rejects the call (state bit-identical), one in a padding row
  does not, and finite values large enough to overflow the scores are still accepted."""
  cfg = defense.defense_config("simsiam", num_projections=2, num_hyperplanes=4)
  params = defense.make_params(cfg, 8)

  def fresh():
    state = defense.init_state(params, 2)
    return defense.set_uid(state, 0, defense.uid_from_name("user0"))

  reps = np.random.default_rng(0).standard_normal((4, 8)).astype(np.float32)
  users = jnp.array([0, 0, 5, 0], jnp.int32)          # row 2 is padding
  for bad in (np.nan, np.inf, -np.inf):
    x = reps.copy()
    x[1, 3] = bad
    state, _, info = defense.defense_step(params, fresh(), users, jnp.asarray(x))
    assert not bool(info["all_finite"]), bad
    assert int(np.asarray(state.num_queries).sum()) == 0 and int(np.asarray(state.counts).sum()) == 0
    x = reps.copy()
    x[2, 3] = bad                                     # only in the ignored row
    state, _, info = defense.defense_step(params, fresh(), users, jnp.asarray(x))
    assert bool(info["all_finite"]), bad
    assert int(np.asarray(state.num_queries)[0]) == 3
  huge = np.full((4, 8), 3e38, np.float32)            # finite, but x @ R overflows float32
  state, _, info = defense.defense_step(params, fresh(), users, jnp.asarray(huge))
  assert bool(info["all_finite"]) and int(np.asarray(state.num_queries)[0]) == 3


def test_state_layout_and_bytes_per_user():
  params = defense.make_params(defense.defense_config(), 2048)
  assert params.hyperplanes.shape == (20, 2048, 12)
  state = defense.init_state(params, 4)
  assert state.occupancy.shape == (4, 20, 128) and state.occupancy.dtype == jnp.uint32
  per_user = defense.state_bytes_per_user(params)
  assert per_user == defense.state_bytes_per_user(state) == 10336 <= 16 * 1024
  grown = defense.grow_state(state, 9)
  assert grown.capacity == 9 and state_lib.STATE_FIELDS == tuple(vars(grown).keys())
  # K = 20 works (2^20 buckets, 32768 words per projection).
  params20 = defense.make_params(defense.defense_config(num_projections=2, num_hyperplanes=20), 4)
  assert defense.init_state(params20, 1).occupancy.shape == (1, 2, 32768)


def test_hash_center_shifts_every_hyperplane_to_the_center():
  """hash_center c: buckets are those of the numpy reference on (x - c), for every projection."""
  rng = np.random.default_rng(3)
  reps = np.abs(rng.standard_normal((64, 6))).astype(np.float32)  # one orthant, like post-ReLU features
  center = reps.mean(0)
  cfg = defense.defense_config("simsiam", num_projections=3, num_hyperplanes=4,
                               hash_center=[float(v) for v in center])
  params = defense.make_params(cfg, 6)
  ids = np.asarray(lsh.bucket_ids(reps, params.projection, 4, params.threshold))
  hyper = np.asarray(params.hyperplanes)
  for p in range(3):
    bits = ((reps - center) @ hyper[p]) > 0
    np.testing.assert_array_equal(ids[:, p], bits @ (1 << np.arange(4)))
  # Centred hashing of one-orthant data reaches more buckets than hashing through the origin.
  plain = np.asarray(lsh.bucket_ids(reps, params.projection, 4))
  assert len(set(ids[:, 0].tolist())) >= len(set(plain[:, 0].tolist()))
  api = defense.DefendedEncoder(None, cfg, 6)
  api.query_representations("u", reps)
  expected = np.mean([len(set(ids[:, p].tolist())) / 16 * 100 for p in range(3)])
  assert abs(api.coverage("u") - expected) < 1e-4
  with pytest.raises(ValueError, match="hash_center has 6 values.*dimension 5"):
    defense.make_params(cfg, 5)
  with pytest.raises(ValueError, match="hash_center must be"):
    defense.defense_config("simsiam", hash_center=[1.0, float("nan")])


def test_sigma_is_capped_and_finite_far_past_beta():
  """Far past beta the exponential overflows float32; sigma stops at 1e6 x alpha (DINO's 100 % value)."""
  assert defense.noise_std(100.0, 1e-6, 1000.0, 60.0) == pytest.approx(1e9, rel=1e-3)
  big = defense.noise_std(np.array([50.0, 100.0]), 1e-6, 1.0, 5.0)
  np.testing.assert_allclose(big, [1e6, 1e6])
  traced = defense.noise_std(jnp.asarray([100.0], jnp.float32), 1e-6, 1.0, 2.0)
  assert np.isfinite(np.asarray(traced)).all() and float(traced[0]) == pytest.approx(1e6, rel=1e-5)
