"""The adaptive strategies of issue 12 on tiny data (b4b_jax/attacks/strategies: sybil.py, budget.py,
flood.py, denoise.py): each uses only `api.query`, and each does what it claims, checked against an
independent numpy computation where there is one."""
import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax.attacks import strategies
from b4b_jax.attacks.strategies import budget as budget_lib
from b4b_jax.defense import DefendedEncoder, defense_config

pytestmark = pytest.mark.usefixtures("fast_compiles")
H, D = 6, 16
_W = np.random.default_rng(0).normal(size=(H * H * 3, D)).astype(np.float32) / np.sqrt(H * H * 3)


def encoder(images):
  return jnp.reshape(images, (images.shape[0], -1)) @ _W


def _api(transform="identity", sigma=0.0, **kw):
  cfg = defense_config("simsiam", num_projections=2, num_hyperplanes=4, static_sigma=sigma,
                       transform=transform, pad_dim=8, **kw)
  return DefendedEncoder(encoder, cfg, D, capacity=16)


def _images(n, seed=0):
  return np.random.default_rng(seed).uniform(size=(n, H, H, 3)).astype(np.float32)


def test_alignments_recover_known_maps():
  rng = np.random.default_rng(1)
  x = rng.normal(size=(200, 12))
  q, _ = np.linalg.qr(rng.normal(size=(12, 12)))
  y = 3.0 * x @ q + 0.5
  for kind in ("linear", "procrustes"):
    fitted = strategies.fit_alignment(kind, x[:150], y[:150])
    np.testing.assert_allclose(fitted.apply(x[150:]), y[150:], atol=1e-4)
  # Procrustes needs far fewer pairs than an unconstrained linear map (D + 1 parameters per output).
  few = strategies.fit_alignment("procrustes", x[:14], y[:14])
  np.testing.assert_allclose(few.apply(x[150:]), y[150:], atol=1e-4)
  # bit-flip alignment: target bits = a permutation of the source bits, some complemented.
  bits = (rng.uniform(size=(300, 10)) > 0.5).astype(np.float64)
  perm, flip = rng.permutation(10), rng.uniform(size=10) > 0.5
  target = np.where(flip, 1 - bits[:, perm], bits[:, perm])
  np.testing.assert_array_equal(strategies.fit_alignment("bitflip", bits, target).apply(bits), target)
  mlp = strategies.fit_alignment("mlp", x[:150], y[:150], mlp_epochs=200)
  assert np.mean((mlp.apply(x[150:]) - y[150:]) ** 2) < 0.5 * np.mean((x[150:] - y[150:]) ** 2)
  with pytest.raises(ValueError, match="alignment"):
    strategies.fit_alignment("nope", x, y)


def test_queries_needed_measures_transform_hardening():
  rng = np.random.default_rng(2)
  x = rng.normal(size=(700, 24))
  q, _ = np.linalg.qr(rng.normal(size=(24, 24)))
  y = x @ q + 0.01 * rng.normal(size=(700, 24))
  out = strategies.queries_needed(x, y, kinds=("linear", "procrustes"), overlaps=(30, 100, 400),
                                  holdout=200, tolerance=1.0)
  assert set(out) == {"linear", "procrustes"} and set(out["linear"]["mse"]) == {30, 100, 400}
  # 30 pairs pin a rotation of R^24 but barely determine a 25-parameter-per-output affine map.
  assert out["procrustes"]["needed"] == 30 < out["linear"]["needed"], out


def test_sybil_mapper_puts_every_account_in_the_main_space_through_query_only():
  api = _api("pad_shuffle")
  x = _images(120)
  s = strategies.SybilMapper(api, ["main", "s1", "s2"], overlap=40, alignment="procrustes",
                             batch_size=50)
  stolen = s.steal(x)
  reference = np.asarray(DefendedEncoder(encoder, api._config, D).query("main", x).reps)
  np.testing.assert_allclose(stolen, reference, atol=1e-3)
  common, parts = s.shares(120)
  assert s.queries_sent == {"main": 40 + len(parts[0]), "s1": 40 + len(parts[1]),
                            "s2": 40 + len(parts[2])}
  with pytest.raises(ValueError, match="two accounts"):
    strategies.SybilMapper(api, ["only"])


def test_account_rotation_keeps_every_account_under_its_budget():
  api = _api("dense_affine")
  x = _images(150)
  s = strategies.AccountRotation(api, ["thief"], per_account=60, overlap=30, alignment="linear")
  stolen = s.steal(x)
  assert len(s.accounts) == 4 and max(s.queries_sent.values()) <= 60
  assert all(api.num_queries(a) == s.queries_sent[a] for a in s.accounts)
  reference = np.asarray(DefendedEncoder(encoder, api._config, D).query("thief", x).reps)
  np.testing.assert_allclose(stolen, reference, atol=1e-2 * np.abs(reference).max())


def test_subset_selection_balanced_and_coverage_aware():
  rng = np.random.default_rng(3)
  feats = np.concatenate([rng.normal(loc=c, size=(60, 8)) for c in (-3.0, 0.0, 3.0)])
  labels = np.repeat([0, 1, 2], 60)
  picks = strategies.select_subset("class_balanced", feats, 12, labels=labels)
  assert np.bincount(labels[picks]).tolist() == [4, 4, 4]
  aware = strategies.select_subset("coverage_aware", feats, 12, seed=0)
  rand = strategies.select_subset("random", feats, 12, seed=0)
  assert len(set(aware)) == 12 and len(set(rand)) == 12
  codes = budget_lib.attacker_lsh_codes(feats, 10, 0)
  assert len(set(codes[aware])) < len(set(codes[rand]))  # fewer of the thief's own buckets
  assert len(set(labels[aware])) == 3                     # yet spread over the data
  api = _api()
  s = strategies.UnderKnee(api, ["k"], budget=10, selection="random", batch_size=8)
  out = s.steal(_images(40))
  assert out.shape == (10, D) and api.num_queries("k") == 10
  with pytest.raises(ValueError, match="budget"):
    strategies.select_subset("random", feats, 0)


def test_augmentation_flood_and_random_noise_send_what_they_say():
  api = _api()
  x = _images(5)
  flood = strategies.AugmentationFlood(api, ["f"], weak=2, strong=1, batch_size=4)
  views = flood.views(x)
  assert views.shape == (3, 5, H, H, 3) and views.min() >= 0 and views.max() <= 1
  sent, answers = flood.flood(x)
  np.testing.assert_allclose(answers, np.asarray(encoder(jnp.asarray(sent))), atol=1e-5)
  noise = strategies.RandomNoise(api, ["n"], count=7)
  assert noise.steal(x).shape == (5, D) and api.num_queries("n") == 12


def test_linear_denoiser_is_the_wiener_filter_and_helps_against_b4b():
  rng = np.random.default_rng(4)
  scales = np.linspace(0.2, 2.0, 8)
  clean = rng.normal(size=(4000, 8)) * scales + 1.0
  sigma = 0.7
  den = strategies.LinearDenoiser(copies=4, seed=0).fit(clean, sigma)
  # Independent reference: mu + C (C + sigma^2 I)^-1 (y - mu) with the population covariance.
  c = np.diag(scales ** 2)
  wiener = np.linalg.solve(c + sigma ** 2 * np.eye(8), c)
  np.testing.assert_allclose(den.w, wiener, atol=0.03)
  test = rng.normal(size=(2000, 8)) * scales + 1.0
  noisy = test + sigma * rng.normal(size=test.shape)
  assert np.mean((den.apply(noisy) - test) ** 2) < 0.8 * np.mean((noisy - test) ** 2)
  # Through the API: a thief with a proxy (here: the victim itself on other images) and the sigma.
  api = _api(sigma=0.5)
  proxy = np.asarray(encoder(jnp.asarray(_images(400, seed=9))))
  s = strategies.DenoisedQueryOnce(api, ["d"], proxy_clean=proxy, sigma=0.5)
  x = _images(200, seed=10)
  truth = np.asarray(encoder(jnp.asarray(x)))
  raw = strategies.QueryOnce(api, ["r"]).steal(x)
  assert np.mean((s.steal(x) - truth) ** 2) < np.mean((raw - truth) ** 2)


def test_robust_losses_match_numpy():
  rng = np.random.default_rng(5)
  a, b = rng.normal(size=(6, 4)).astype(np.float32), rng.normal(size=(6, 4)).astype(np.float32)
  cos = np.sum(a * b, 1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
  assert float(strategies.robust_loss("cosine", a, b)) == pytest.approx(1 - cos.mean(), rel=1e-5)
  d = 0.5 * np.sqrt(np.mean(b * b))
  r = np.abs(a - b)
  huber = np.where(r <= d, 0.5 * r * r, d * (r - 0.5 * d)).mean()
  assert float(strategies.robust_loss("huber", a, b, delta=0.5)) == pytest.approx(huber, rel=1e-5)
  assert float(strategies.robust_loss("mse", a, b)) == pytest.approx(np.mean((a - b) ** 2), rel=1e-5)
  assert np.isfinite(float(strategies.robust_loss("infonce", a, b)))
  with pytest.raises(ValueError, match="loss"):
    strategies.robust_loss("l7", a, b)
