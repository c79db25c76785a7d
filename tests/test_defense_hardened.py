"""The hardened defense (noise_keying="per_input", b4b_jax/defense/hardened.py): same answer for the
same or a near-identical input while the sigma level holds, independent noise across accounts, inputs
and levels, the cross-level bound, mixed batches, save/restore, provider stats; and the paper's B4B
unchanged at the default."""
import jax
import ml_collections
import numpy as np
import pytest

from b4b_jax.defense import DefendedEncoder, defense_config, hardened
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import noise as noise_lib
from b4b_jax.defense.config import HARDENING_DEFAULTS

pytestmark = pytest.mark.usefixtures("fast_compiles")
D = 32


def _cfg(**kw):
  base = dict(num_projections=4, num_hyperplanes=6, beta=5.0, noise_keying="per_input")
  base.update(kw)
  return defense_config("simsiam", **base)


def _reps(n, seed=0, d=D):
  return np.random.default_rng(seed).normal(size=(n, d)).astype(np.float32)


def _q(api, user, reps):
  return np.asarray(api.query_representations(user, reps).reps)


def _noise(api, user, reps):
  result = api.query_representations(user, reps)
  return (np.asarray(result.reps) - reps) / np.asarray(result.sigma)[:, None]


def test_same_input_same_account_gets_the_same_answer_and_near_duplicates_mostly_too():
  api = DefendedEncoder(None, _cfg(static_sigma=0.5), D)
  reps = _reps(64)
  result = api.query_representations("alice", reps)
  first = np.asarray(result.reps)
  np.testing.assert_array_equal(_q(api, "alice", reps), first)
  np.testing.assert_array_equal(_q(api, "alice", reps[::-1]), first[::-1])
  jitter = reps + 1e-4 * _reps(64, seed=1)  # ~1e-4 relative: a code flips for few rows, if any
  noise0 = first - reps
  assert np.allclose(result.sigma, 0.5)  # static 0.5 at ratio 2: level -1, applied exactly 0.5
  noise1 = _q(api, "alice", jitter) - jitter
  corr = np.sum(noise0 * noise1, 1) / np.linalg.norm(noise0, axis=1) / np.linalg.norm(noise1, axis=1)
  assert np.mean(corr > 0.999) >= 0.9, corr


def test_noise_is_standard_normal_and_independent_across_accounts_and_distinct_inputs():
  api = DefendedEncoder(None, _cfg(static_sigma=1.0), D)
  reps = _reps(512)
  za, zb = _noise(api, "alice", reps), _noise(api, "bob", reps)
  assert abs(za.std() - 1.0) < 0.03 and abs(za.mean()) < 0.03
  assert abs(np.corrcoef(za.ravel(), zb.ravel())[0, 1]) < 0.04  # 16k samples: std ~0.008
  unit = za / np.linalg.norm(za, axis=1, keepdims=True)
  gram = unit @ unit.T
  off = gram[~np.eye(len(gram), dtype=bool)]
  assert abs(off.mean()) < 0.01 and np.mean(np.abs(off) > 0.9) == 0.0  # no two inputs share noise


def test_sigma_level_rounds_up_by_less_than_the_ratio():
  sigma = np.concatenate([np.geomspace(1e-7, 1e4, 997), 2.0 ** np.arange(-10, 10), [0.0]]).astype(
      np.float32)
  for ratio in (2.0, 1.5):
    level, applied = jax.device_get(hardened.sigma_level(sigma, ratio))
    pos = sigma > 0
    assert np.all(applied[pos] >= sigma[pos]) and np.all(applied[pos] < ratio * sigma[pos] * 1.0001)
    np.testing.assert_allclose(applied[pos], ratio ** level[pos].astype(np.float64), rtol=1e-5)
    assert applied[~pos] == 0


def test_a_new_sigma_level_is_a_new_draw_and_the_two_level_bound_holds():
  reps = _reps(2000)
  # static sigma 1.2 and 1.9 share level 1 (applied 2): identical answers, nothing to difference.
  a = _q(DefendedEncoder(None, _cfg(static_sigma=1.2), D), "eve", reps)
  b = _q(DefendedEncoder(None, _cfg(static_sigma=1.9), D), "eve", reps)
  np.testing.assert_array_equal(a, b)
  # Level 0 (applied 1) vs level 1 (applied 2): independent draws. Were it the same z (the naive keyed
  # design), (2 a1 - a2) would recover reps exactly.
  a1 = _q(DefendedEncoder(None, _cfg(static_sigma=0.9), D), "eve", reps)
  z1, z2 = a1 - reps, (b - reps) / 2.0
  assert abs(np.corrcoef(z1.ravel(), z2.ravel())[0, 1]) < 0.03
  naive = 2 * a1 - b
  best = (4 * a1 + b) / 5  # inverse-variance weights 1/1 and 1/4: the best unbiased combination
  err_best = np.sqrt(np.mean((best - reps) ** 2))
  assert np.sqrt(np.mean((naive - reps) ** 2)) > 1.5
  # bound (docs/defense.md): error >= s0 * sqrt(1 - r^-2) = 0.866 for s0 = 1, r = 2 (sampling slack).
  assert err_best >= 0.866 * 0.98 and err_best <= 0.9 * 1.02


def test_mixed_batches_equal_per_user_calls():
  reps = _reps(24)
  users = ["alice", "bob", "carol"] * 8
  mixed_api = DefendedEncoder(None, _cfg(), D)
  mixed = _q(mixed_api, users, reps)
  single_api = DefendedEncoder(None, _cfg(), D)
  for u in ("carol", "alice", "bob"):
    rows = [i for i, v in enumerate(users) if v == u]
    np.testing.assert_array_equal(_q(single_api, u, reps[rows]), mixed[rows])
  assert hardened.provider_stats(mixed_api) == hardened.provider_stats(single_api)


def test_save_restore_unchanged(tmp_path):
  api = DefendedEncoder(None, _cfg(transform="diag_affine"), D)
  reps, more = _reps(40), _reps(16, seed=3)
  api.query_representations("alice", reps)
  api.query_representations("bob", reps[:10])
  api.save(str(tmp_path))
  restored = DefendedEncoder.restore(str(tmp_path), None)
  assert hardened.provider_stats(restored) == hardened.provider_stats(api)
  for u in ("alice", "bob"):
    np.testing.assert_array_equal(_q(restored, u, more), _q(api, u, more))
    np.testing.assert_array_equal(_q(restored, u, reps[:5]), _q(api, u, reps[:5]))
  assert hardened.provider_stats(restored) == hardened.provider_stats(api)


def test_provider_stats_count_repeats_and_bucket_overlap():
  api = DefendedEncoder(None, _cfg(), D)
  reps = _reps(30)
  for _ in range(3):
    api.query_representations("thief", reps[:10])
  api.query_representations("sybil", reps[:10])
  api.query_representations("other", _reps(10, seed=9) * -1.0)
  stats = hardened.provider_stats(api)
  assert stats["thief"]["repeats"] == 20 and stats["thief"]["repeat_share"] == pytest.approx(2 / 3)
  assert stats["sybil"]["repeats"] == 0
  assert stats["sybil"]["bucket_overlap"] == 1.0  # every bucket of the sybil is also the thief's
  occ = np.asarray(api.state.occupancy)[:3]
  # independent reference: per account, shared set bits / own set bits, bit by bit
  bits = np.unpackbits(occ.view(np.uint8), axis=-1).reshape(3, -1).astype(bool)
  for i, name in enumerate(api.users):
    others = np.any(np.delete(bits, i, 0), 0)
    assert stats[name]["bucket_overlap"] == pytest.approx((bits[i] & others).sum() / bits[i].sum())
  # the paper's keying tracks no repeats
  paper = DefendedEncoder(None, defense_config("simsiam", num_projections=4, num_hyperplanes=6), D)
  paper.query_representations("thief", reps)
  assert "repeats" not in hardened.provider_stats(paper)["thief"]


def test_hardened_preset_is_the_full_defense():
  from b4b_jax.defense import HARDENED  # pylint: disable=g-import-not-at-top
  cfg = defense_config("simsiam", hardened=True, num_projections=4, num_hyperplanes=6)
  assert {k: cfg[k] for k in HARDENED} == HARDENED
  # every part of the hardened defense: per-input keying, all noise image-keyed, repeats charged
  assert (cfg.noise_keying, cfg.image_weight, cfg.image_lengthscale, cfg.repeat_charge) == (
      "per_input", 1.0, 0.3, 0.25)
  assert set(HARDENED) == set(HARDENING_DEFAULTS)  # the preset sets every hardening field
  assert defense_config("dino", hardened=True).alpha == defense_config("dino").alpha  # the preset's cost
  ablation = defense_config("simsiam", hardened=True, num_projections=4, num_hyperplanes=6,
                            repeat_charge=0.0)  # overrides apply on top
  assert ablation.repeat_charge == 0.0 and ablation.image_weight == 1.0
  assert defense_config("simsiam", hardened=False).to_dict() == defense_config("simsiam").to_dict()
  # a repeat costs coverage under the preset and not under the ablation
  reps = _reps(16)
  sigmas = {}
  for name, c in (("preset", cfg), ("ablation", ablation)):  # beta 80 %: below saturation
    api = DefendedEncoder(None, c, D)
    for _ in range(3):
      api.query_representations("u", reps)
    sigmas[name] = api.sigma("u")
  assert 3 * sigmas["ablation"] < sigmas["preset"] < 1e6  # charge 0.25: ~9x here (charge 1: >1e3x)


def test_paper_b4b_is_the_default_and_matches_the_per_query_formula():
  cfg = defense_config("simsiam", num_projections=4, num_hyperplanes=6, beta=5.0)
  assert {k: cfg[k] for k in HARDENING_DEFAULTS} == HARDENING_DEFAULTS
  assert cfg.noise_keying == "per_query"
  # a config written before the hardening fields existed gives bit-identical answers
  old = ml_collections.ConfigDict({k: v for k, v in cfg.to_dict().items() if k not in HARDENING_DEFAULTS})
  reps = _reps(12)
  a, b = DefendedEncoder(None, cfg, D), DefendedEncoder(None, old, D)
  for _ in range(2):
    np.testing.assert_array_equal(_q(a, "u", reps), _q(b, "u", reps))
  assert a.state.fine_occupancy is None
  # the per-query formula, computed here from the key derivation (docs/defense.md), not from step.py
  api = DefendedEncoder(None, cfg, D)
  api.query_representations("u", reps)  # batch 0
  result = api.query_representations("u", reps)  # batch 1
  out, sigma = np.asarray(result.reps), np.asarray(result.sigma)
  base = keys_lib.user_key(keys_lib.stream_key(0, "noise"), keys_lib.uid_from_name("u"))
  for r in (0, 5):
    key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(base, 1), r), 0)
    z = np.asarray(noise_lib.standard_normal(key[None], D))[0]  # defense/noise.py's N(0, 1) draw
    np.testing.assert_allclose(out[r], reps[r] + sigma[r] * z, rtol=1e-6, atol=1e-6)
  # ...whose repeats average away (what the hardening is for)
  z0 = (_q(api, "u", reps) - reps) / sigma[:, None]
  z1 = (_q(api, "u", reps) - reps) / sigma[:, None]
  assert abs(np.corrcoef(z0.ravel(), z1.ravel())[0, 1]) < 0.2


@pytest.mark.parametrize("field,value", [("noise_keying", "per_user"), ("fine_code_bits", 0),
                                         ("fine_code_bits", 25), ("fine_codes", 0),
                                         ("sigma_level_ratio", 1.0), ("sigma_level_ratio", True)])
def test_bad_hardening_fields_raise_naming_the_field(field, value):
  with pytest.raises(ValueError, match=field):
    defense_config("simsiam", **{field: value})


def _state_arrays(api):
  from b4b_jax.defense import state as state_lib
  return state_lib.state_to_numpy(api.state)


def test_journal_replay_writes_the_seen_codes_exactly_like_live_queries(tmp_path):
  """Snapshot + replay of the journaled charge codes (result.buckets: P LSH buckets + the seen code)
  ends bit-identical to the uninterrupted state, repeat counts and all later answers included."""
  live = DefendedEncoder(None, _cfg(), D, capacity=2)
  reps = _reps(60)
  rng = np.random.default_rng(2)

  def call(i):  # many repeats (30 inputs), so the seen-code state matters
    rows = rng.integers(0, 30, 8 + i)
    return live.query_representations([f"u{j}" for j in rng.integers(0, 3, len(rows))], reps[rows])

  for i in range(2):
    call(i)
  live.save(str(tmp_path / "snap"))
  results = [call(i) for i in range(2, 6)]
  assert all(r.buckets.shape[1] == 4 + hardened.seen_columns(live._settings) for r in results)
  journal = [(list(r.users), r.buckets.copy()) for r in results]
  revived = DefendedEncoder.restore(str(tmp_path / "snap"), None)
  for users, codes in journal:
    revived.replay(users, codes)
  a, b = _state_arrays(live), _state_arrays(revived)
  assert a.keys() == b.keys() and "fine_occupancy" in a
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  assert hardened.provider_stats(revived) == hardened.provider_stats(live)
  assert sum(r["repeats"] for r in hardened.provider_stats(live).values()) > 0
  users = ["u0", "u2", "u1"] * 4
  np.testing.assert_array_equal(_q(live, users, reps[:12]), _q(revived, users, reps[:12]))
  # A journal entry without the seen-code column (or with one out of range) is refused, state unchanged.
  from b4b_jax.defense import BadInputError
  a = _state_arrays(revived)
  for codes in (journal[0][1][:, :4], np.concatenate([journal[0][1][:, :4], np.full(
      (len(journal[0][0]), 1), 1 << 16, np.int32)], axis=1)):
    with pytest.raises(BadInputError, match="replay"):
      revived.replay(journal[0][0], codes)
  b2 = _state_arrays(revived)
  for k in a:
    np.testing.assert_array_equal(a[k], b2[k], err_msg=k)


# ------------------------------------------------------------------ image-keyed noise (image_weight)
_W_ENC = np.random.default_rng(7).normal(size=(8 * 8 * 3, D)).astype(np.float32) / 8.0


def _encoder(images):
  import jax.numpy as jnp
  # An elementwise product and a fixed-length sum (not a dot, whose CPU rounding depends on the batch
  # shape), so batches of any size give bit-identical rows.
  return jnp.tanh(jnp.sum(images.reshape(images.shape[0], -1, 1) * _W_ENC[None], axis=1))


def _images(n, seed=0):
  """Smooth random 8x8 RGB images in [0, 1] (distinct low-frequency content per image)."""
  rng = np.random.default_rng(seed)
  coarse = rng.uniform(0, 1, size=(n, 3, 3, 3)).astype(np.float32)
  return np.asarray(jax.image.resize(coarse, (n, 8, 8, 3), "linear"), np.float32)


def _img_noise(api, user, images):
  clean = np.asarray(_encoder(images))
  result = api.query(user, images)
  return (np.asarray(result.reps) - clean) / np.asarray(result.sigma)[:, None]


def _corr(a, b):
  return np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)


def test_image_descriptor_is_flip_brightness_and_contrast_invariant():
  x = _images(16)
  d = np.asarray(hardened.image_descriptor(x, 4))
  np.testing.assert_allclose(np.asarray(hardened.image_descriptor(x[:, :, ::-1], 4)), d, atol=1e-6)
  np.testing.assert_allclose(np.asarray(hardened.image_descriptor(0.5 * x + 0.2, 4)), d, atol=1e-5)
  np.testing.assert_allclose(np.linalg.norm(d, axis=1), 1.0, atol=1e-5)
  # numpy reference for an exactly divisible grid (antialiased linear = 2x2 area mean at factor 2).
  g = x.mean(-1)
  g = 0.5 * (g + g[:, :, ::-1])
  ref = g.reshape(16, 4, 2, 4, 2).mean((2, 4)).reshape(16, 16)
  ref = ref - ref.mean(1, keepdims=True)
  ref /= np.linalg.norm(ref, axis=1, keepdims=True)
  np.testing.assert_allclose(d, ref, atol=1e-5)
  assert not np.any(np.asarray(hardened.image_descriptor(np.full((2, 8, 8, 3), 0.3), 4)))


def test_image_keyed_noise_holds_for_near_duplicates_and_stays_independent_elsewhere():
  api = DefendedEncoder(_encoder, _cfg(static_sigma=1.0, image_weight=1.0, image_lengthscale=0.3,
                                       image_grid=4), D)
  x = _images(256)
  z = _img_noise(api, "alice", x)
  assert abs(z.std() - 1.0) < 0.05 and abs(z.mean()) < 0.05  # exactly N(0, 1) given the image
  np.testing.assert_array_equal(_img_noise(api, "alice", x), z)  # deterministic
  # A mirrored image has the same descriptor, hence the same noise (the representation differs).
  np.testing.assert_allclose(_img_noise(api, "alice", x[:, :, ::-1]), z, atol=1e-5)
  # A small pixel perturbation keeps almost all of it (a 1/255 jitter flips no descriptor bit: smooth).
  jitter = np.clip(x + np.random.default_rng(1).uniform(-2 / 255, 2 / 255, x.shape), 0, 1)
  assert np.median(_corr(_img_noise(api, "alice", jitter.astype(np.float32)), z)) > 0.99
  # Another account: independent. Distinct images: nearly independent (collision rate measured).
  assert abs(np.corrcoef(z.ravel(), _img_noise(api, "bob", x).ravel())[0, 1]) < 0.03
  unit = z / np.linalg.norm(z, axis=1, keepdims=True)
  off = (unit @ unit.T)[np.triu_indices(len(z), 1)]
  assert abs(off.mean()) < 0.05 and np.mean(off > 0.5) < 0.02, (off.mean(), np.mean(off > 0.5))


def test_cosine_is_within_float32_rounding_of_float64_and_falls_back_past_its_range():
  """hardened.cosine (a vectorised cos for the image features) against float64 numpy: every float32
  in [-200, 200] at a 1e-4 step (past +-64 quadrants), within 1.5e-7; where some argument is past
  its exact range, or not finite, the call is jnp.cos's, bit for bit."""
  cosine = jax.jit(hardened.cosine)
  grid = np.linspace(-200, 200, 4_000_001).astype(np.float32)
  err = np.abs(np.asarray(cosine(jax.numpy.asarray(grid)), np.float64) - np.cos(grid.astype(np.float64)))
  assert err.max() < 1.5e-7, err.max()
  for bad in (3e5, np.inf, np.nan):
    x = np.concatenate([grid[::1000], [bad]]).astype(np.float32)
    np.testing.assert_array_equal(np.asarray(cosine(jax.numpy.asarray(x))),
                                  np.asarray(jax.jit(jax.numpy.cos)(jax.numpy.asarray(x))))
  assert cosine(jax.numpy.zeros((0, 3))).shape == (0, 3)


# Fewer rows than one matmul's; groups over several small matmuls; groups of ~75 rows: a 64-row matmul
# and 8-row ones for the rest, the last reaching back into the big one's; a group of ~843 rows in a call
# of 900: one matmul of each size of hardened._ROWS_PER_DOT, the last 8-row one reaching back.
@pytest.mark.parametrize("n,num_accounts,num_levels,big_group",
                         [(5, 3, 2, 0), (41, 3, 2, 0), (150, 2, 1, 0), (900, 3, 1, 843)])
def test_keyed_weight_sum_equals_one_draw_per_row(n, num_accounts, num_levels, big_group):
  """The grouped loop (one W per account and level, applied a few rows at a time) against the plain
  per-row formula: each row's own W drawn from its own key, the product in float64 numpy."""
  rng = np.random.default_rng(n)
  f, dim = 6, 5
  accounts = rng.integers(0, 2**32, size=(num_accounts, 2), dtype=np.uint64).astype(np.uint32)
  which = rng.integers(0, num_accounts, size=n)
  if big_group:  # account 0 has exactly big_group rows, anywhere in the call
    which = rng.permutation(np.concatenate([np.zeros(big_group, int),
                                            rng.integers(1, num_accounts, size=n - big_group)]))
  uids = accounts[which]
  level = rng.integers(-num_levels, 0, size=n).astype(np.int32)
  level[n // 2] = hardened._NO_NOISE_LEVEL  # sigma 0 (padding, rejected rows): no draw, zeros
  feats = rng.normal(size=(n, f)).astype(np.float32)
  stream = keys_lib.stream_key(3, "image_noise")
  got = np.asarray(hardened.keyed_weight_sum(stream, jax.numpy.asarray(uids), jax.numpy.asarray(level),
                                             jax.numpy.asarray(feats), dim))
  assert len({(*uids[i], level[i]) for i in range(n)}) < n  # some rows share their W
  weights_of = {}
  for i in range(n):
    if level[i] == hardened._NO_NOISE_LEVEL:
      np.testing.assert_array_equal(got[i], 0.0)
      continue
    if (*uids[i], level[i]) not in weights_of:  # the formula per row; drawn once per key for speed
      key = jax.random.fold_in(jax.random.fold_in(jax.random.fold_in(stream, uids[i, 0]), uids[i, 1]),
                               level[i])
      weights_of[(*uids[i], level[i])] = np.asarray(noise_lib.standard_normal(key[None], f * dim),
                                                    np.float64).reshape(f, dim)
    np.testing.assert_allclose(got[i], feats[i].astype(np.float64) @ weights_of[(*uids[i], level[i])],
                               rtol=1e-5, atol=1e-5)


def test_keyed_weight_sum_reads_a_cache_entry_only_where_its_account_and_level_match():
  """An entry holding the row's own (uids, level) is read instead of drawing (planted as 2 W, so its
  use shows); entries of another level or account, and rows pointing nowhere (-1), draw W."""
  rng = np.random.default_rng(7)
  f, dim, n = 6, 5, 40
  accounts = rng.integers(0, 2**32, size=(4, 2), dtype=np.uint64).astype(np.uint32)
  which = rng.permutation(np.arange(n) % 4)
  uids, level = accounts[which], np.full((n,), -2, np.int32)
  feats = rng.normal(size=(n, f)).astype(np.float32)
  stream = keys_lib.stream_key(3, "image_noise")
  jnp = jax.numpy

  def true_weights(a, lvl):
    return np.asarray(hardened.draw_weights(stream, jnp.uint32(accounts[a, 0]), jnp.uint32(accounts[a, 1]),
                                            jnp.int32(lvl), f, dim))

  cache = {"weights": jnp.asarray(np.stack([2 * true_weights(0, -2), 3 * true_weights(1, -3),
                                            4 * true_weights(2, -2)])),
           "uids": jnp.asarray(np.stack([accounts[0], accounts[1], accounts[2] ^ np.uint32(1)])),
           "levels": jnp.asarray(np.asarray([-2, -3, -2], np.int32))}
  index = np.asarray([0, 1, 2, -1], np.int32)[which]  # account 1: stale level; 2: wrong uid; 3: none
  got = np.asarray(hardened.keyed_weight_sum(stream, jnp.asarray(uids), jnp.asarray(level),
                                             jnp.asarray(feats), dim, cache, jnp.asarray(index)))
  plain = np.asarray(hardened.keyed_weight_sum(stream, jnp.asarray(uids), jnp.asarray(level),
                                               jnp.asarray(feats), dim))
  for a in range(4):
    rows = which == a
    expected = feats[rows].astype(np.float64) @ true_weights(a, -2).astype(np.float64)
    np.testing.assert_allclose(got[rows], (2 if a == 0 else 1) * expected, rtol=1e-5, atol=1e-5)
    np.testing.assert_allclose(plain[rows], expected, rtol=1e-5, atol=1e-5)


def _corrupt_noise_cache(api):
  """Doubles every cached W on device (white box: shows whether a call read them)."""
  cache = api._noise_weights  # pylint: disable=protected-access
  arrays = cache._arrays  # pylint: disable=protected-access
  cache._arrays = dict(arrays, weights=2 * arrays["weights"])  # pylint: disable=protected-access


@pytest.mark.parametrize("cache_entries", [0, 2, 64])  # none; fewer than the accounts (evictions); all
def test_noise_weight_cache_changes_no_answer(cache_entries):
  """Answers equal an API without the cache through first calls, level changes (beta small: coverage
  moves sigma across levels), returning accounts, evictions and calls with more accounts than entries;
  and from an account's third call at a level on, the cached W is what the call reads."""
  entry_mib = 256 * D * 4 / 2**20  # the preset's image_features x D float32
  cached = DefendedEncoder(_encoder, _cfg(image_weight=1.0, beta=2.0,
                                          noise_cache_mib=cache_entries * entry_mib), D, capacity=8)
  plain = DefendedEncoder(_encoder, _cfg(image_weight=1.0, beta=2.0, noise_cache_mib=0.0), D,
                          capacity=8)
  assert cached._noise_weights.bound == cache_entries  # pylint: disable=protected-access
  calls = [(["alice"] * 6, 0), (["alice"] * 6, 1), (["alice", "bob"] * 3, 2), (["alice"] * 6, 3),
           (["bob", "carol", "dave"] * 2, 4), (["alice", "bob", "carol", "dave"] * 2, 5),
           (["carol"] * 6, 6), (["alice", "carol"] * 3, 7)]
  levels = set()
  for users, seed in calls:
    x = _images(len(users), seed=seed)
    a, b = cached.query_mixed(users, x), plain.query_mixed(users, x)
    np.testing.assert_allclose(a.reps, b.reps, rtol=1e-6, atol=1e-6)
    np.testing.assert_array_equal(a.sigma, b.sigma)
    levels |= set(np.round(np.log2(a.sigma[a.sigma > 0])).astype(int).tolist())
  assert len(levels) > 1  # some account's level moved during the calls
  # An account whose level moves after its W was cached: the next calls at the new level read the new W.
  few, many = _images(2, seed=10), _images(48, seed=11)
  applied = []
  for x in (few, few, many, many):
    got, want = cached.query("erin", x), plain.query("erin", x)
    np.testing.assert_allclose(got.reps, want.reps, rtol=1e-6, atol=1e-6)
    applied.append(float(got.sigma[0]))
  assert applied[0] == applied[1] < applied[2] == applied[3], applied  # one level, then a higher one
  if cache_entries:
    _corrupt_noise_cache(cached)
  got, want = cached.query("erin", many), plain.query("erin", many)
  np.testing.assert_array_equal(got.sigma, want.sigma)
  noise_got, noise_want = got.reps - _encoder(many), want.reps - _encoder(many)
  np.testing.assert_allclose(noise_got, (2 if cache_entries else 1) * noise_want, rtol=1e-5, atol=1e-6)


def test_noise_weight_cache_is_sized_by_the_account_slots_from_the_first_call():
  """min(bound, capacity) entries from the first image call (so the served step compiles with the
  cache once), grown with the slots; a call with more accounts than entries still answers alike."""
  cached = DefendedEncoder(_encoder, _cfg(image_weight=1.0), D, capacity=2)
  plain = DefendedEncoder(_encoder, _cfg(image_weight=1.0, noise_cache_mib=0.0), D, capacity=2)
  assert cached._noise_weights.entries() == 0  # pylint: disable=protected-access
  x = _images(4, seed=12)
  cached.query("alice", x), plain.query("alice", x)
  assert cached._noise_weights.entries() == 2  # pylint: disable=protected-access
  users = ["alice", "bob", "carol", "dave", "erin"] * 2
  for name in users[1:5]:  # 5 accounts: the slots double twice, and the cache's entries with them
    cached.register(name)
  assert cached.capacity == 8 and cached._noise_weights.entries() == 8  # pylint: disable=protected-access
  for seed in (13, 13, 14):  # the second and third calls write and read the five accounts' W
    x = _images(len(users), seed=seed)
    np.testing.assert_allclose(cached.query_mixed(users, x).reps, plain.query_mixed(users, x).reps,
                               rtol=1e-6, atol=1e-6)


def test_noise_cache_mib_is_checked_and_optional():
  with pytest.raises(ValueError, match="noise_cache_mib"):
    _cfg(noise_cache_mib=-1.0)
  old = _cfg(image_weight=1.0).to_dict()
  del old["noise_cache_mib"]  # a config (or checkpoint) written before the field existed
  api = DefendedEncoder(_encoder, ml_collections.ConfigDict(old), D)
  assert api._noise_weights.bound == 512 * 2**20 // (256 * D * 4)  # pylint: disable=protected-access


@pytest.mark.parametrize("weight", [0.7, 1.0])  # 1.0: the served default (no fine-code draws at all)
def test_image_keyed_mixed_batches_equal_per_user_calls_and_replay_is_unchanged(tmp_path, weight):
  cfg = _cfg(image_weight=weight)
  x = _images(24, seed=3)
  users = ["alice", "bob", "carol"] * 8
  mixed_api = DefendedEncoder(_encoder, cfg, D, capacity=4)
  mixed = mixed_api.query_mixed(users, x)
  single_api = DefendedEncoder(_encoder, cfg, D, capacity=4)
  for u in ("carol", "alice", "bob"):
    rows = [i for i, v in enumerate(users) if v == u]
    # Equal up to the float rounding of the descriptor's reductions at another batch shape (~1e-7,
    # as the encoder's own forward pass); the keys, codes and draws are the same.
    np.testing.assert_allclose(np.asarray(single_api.query(u, x[rows]).reps),
                               np.asarray(mixed.reps)[rows], atol=2e-5)
  # The image part adds no state: the journal's charge codes replay it bit-identically.
  fresh = DefendedEncoder(_encoder, cfg, D, capacity=4)
  fresh.replay(list(mixed.users), mixed.buckets)
  a, b = _state_arrays(mixed_api), _state_arrays(fresh)
  for k in a:
    np.testing.assert_array_equal(a[k], b[k], err_msg=k)
  # Save/restore: the same answers afterwards.
  mixed_api.save(str(tmp_path))
  restored = DefendedEncoder.restore(str(tmp_path), _encoder)
  y = _images(8, seed=4)
  np.testing.assert_array_equal(np.asarray(restored.query("alice", y).reps),
                                np.asarray(mixed_api.query("alice", y).reps))


def test_repeat_charge_raises_sigma_for_repeats_only():
  cfg = _cfg(repeat_charge=4.0, beta=95.0)
  reps = _reps(64, seed=5)
  api = DefendedEncoder(None, cfg, D, capacity=4)
  plain = DefendedEncoder(None, _cfg(beta=95.0), D, capacity=4)
  for a in (api, plain):
    a.query_representations("once", reps)            # 64 distinct inputs: no repeat
    for _ in range(4):
      a.query_representations("again", reps[:16])   # 48 repeats
  assert hardened.provider_stats(api)["again"]["repeats"] == 48
  assert api.sigma("once") == plain.sigma("once")
  # 48 repeats x 4 buckets each = 192 of 2^6 buckets per projection: charged to full coverage.
  from b4b_jax.defense import cost
  s = api._settings
  expected = float(cost.noise_std(100.0, s.lam, s.alpha, s.beta))
  assert api.sigma("again") == pytest.approx(expected, rel=1e-6) and expected > plain.sigma("again")
  # The step applies the charged sigma (hardened rounds it up to its level).
  got = api.query_representations("again", reps[:1]).sigma[0]
  assert got >= expected * (1 - 1e-6) and got < 2.0 * expected
  with pytest.raises(ValueError, match="repeat_charge"):
    DefendedEncoder(None, defense_config("simsiam", repeat_charge=1.0), D)
