"""The paper protocol's offline answers (b4b_jax/attacks/offline.py), checked against numpy.

A tiny traceable "victim" (tanh of a random linear map of the normalised pixels) stands in for the
encoder. The answers must be T_account(victim(view) + sigma z) with the account's own dense affine
transform (the parameters the API draws for that name), fresh z every epoch, a row's answer a function
of (account, epoch, pool index, view) only, and nothing of any API touched.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.attacks import offline

pytestmark = pytest.mark.usefixtures("fast_compiles")

D, S = 16, 4
_W = np.random.default_rng(0).standard_normal((S * S * 3, D)).astype(np.float32) / 8
_MEAN, _STD = (0.5, 0.4, 0.3), (0.2, 0.25, 0.3)
USERS = ["attacker-1", "attacker-2"]


class _Victim:
  rep_dim = D
  params = {"w": jnp.asarray(_W)}
  manifest = {"preprocessing": {"mean": list(_MEAN), "std": list(_STD), "input_size": S}}

  @staticmethod
  def apply_fn(params, x):
    return jnp.tanh(x.reshape(x.shape[0], -1) @ params["w"])


def _clean(images):
  """The victim's representation in numpy (float64), normalised as the manifest says."""
  x = (images.astype(np.float64) / 255.0 - np.asarray(_MEAN)) / np.asarray(_STD)
  return np.tanh(x.reshape(len(x), -1) @ _W.astype(np.float64))


def _images(n, seed=1):
  return np.random.default_rng(seed).integers(0, 256, (n, S, S, 3), dtype=np.uint8)


def _config(**kw):
  return defense.defense_config("simsiam", transform="dense_affine", **kw)


def test_noise_free_answers_are_each_accounts_transform_of_the_victims_representation():
  cfg = _config()
  answers = offline.OfflineAnswers(_Victim(), cfg, USERS)
  images = _images(12)
  accounts = np.array([0, 1] * 6)
  out = answers.answer(images, np.zeros(12), accounts, np.arange(12), epoch=0)
  clean = _clean(images)
  for a, user in enumerate(USERS):
    p = defense.user_transform_params(cfg, D, user)
    rows = accounts == a
    np.testing.assert_allclose(out[rows], clean[rows] @ p["matrix"] + p["bias"], rtol=1e-4, atol=1e-4)
    # Every account is transformed (no identity first account), each its own way.
    assert np.abs(out[rows] - clean[rows]).mean() > 0.1
  other = defense.user_transform_params(cfg, D, USERS[1])
  assert np.abs(out[accounts == 0] - (clean[accounts == 0] @ other["matrix"] + other["bias"])).mean() > 0.1


def test_answers_carry_noise_at_each_rows_sigma_fresh_every_epoch_and_deterministic():
  cfg = _config()
  answers = offline.OfflineAnswers(_Victim(), cfg, USERS)
  n = 256
  images = _images(n, seed=2)
  sigma = np.repeat([0.05, 0.2, 0.8, 2.0], n // 4)
  accounts = np.zeros(n, np.int32)
  pool_indices = np.arange(1000, 1000 + n)
  p = defense.user_transform_params(cfg, D, USERS[0])

  def residual(epoch):
    out = answers.answer(images, sigma, accounts, pool_indices, epoch)
    noised = np.linalg.solve(p["matrix"].T.astype(np.float64), (out - p["bias"]).T).T
    return out, noised - _clean(images)

  out1, r1 = residual(1)
  out2, r2 = residual(2)
  for k, s in enumerate([0.05, 0.2, 0.8, 2.0]):
    block = slice(k * n // 4, (k + 1) * n // 4)
    # 64 rows x 16 dims = 1024 draws per sigma: the sample std is within ~2.2 % (1 s.d.) of sigma.
    assert np.std(r1[block]) == pytest.approx(s, rel=0.1)
    assert np.std(r2[block]) == pytest.approx(s, rel=0.1)
    assert abs(np.mean(r1[block])) < 0.15 * s
  # Fresh noise per epoch: the two epochs' draws are uncorrelated.
  assert abs(np.corrcoef(r1.ravel() / np.repeat(sigma, D), r2.ravel() / np.repeat(sigma, D))[0, 1]) < 0.1
  # Deterministic: the same call again is bit-identical; a row's answer does not depend on its batch.
  np.testing.assert_array_equal(answers.answer(images, sigma, accounts, pool_indices, 1), out1)
  part = slice(37, 101)
  np.testing.assert_array_equal(
      answers.answer(images[part], sigma[part], accounts[part], pool_indices[part], 1), out1[part])
  # The draw is keyed by the pool index and the account too.
  shifted = answers.answer(images, sigma, accounts, pool_indices + 1, 1)
  assert np.abs(shifted - out1).mean() > 0.1 * np.abs(out1 - out2).mean()


def test_undefended_answers_are_the_clean_representation():
  answers = offline.OfflineAnswers(_Victim(), defense.defense_config("none"), USERS)
  images = _images(8)
  out = answers.answer(images, np.ones(8), np.zeros(8, np.int32), np.arange(8), 3)
  np.testing.assert_allclose(out, _clean(images), rtol=1e-5, atol=1e-5)


def test_bad_inputs_and_the_hardened_defense_are_refused():
  with pytest.raises(ValueError, match="per_input"):
    offline.OfflineAnswers(_Victim(), _config(noise_keying="per_input"), USERS)
  answers = offline.OfflineAnswers(_Victim(), _config(), USERS)
  with pytest.raises(ValueError, match="uint8"):
    answers.answer(_images(4).astype(np.float32), np.zeros(4), np.zeros(4, np.int32), np.arange(4), 0)
  with pytest.raises(ValueError, match="sigma must have one entry per image"):
    answers.answer(_images(4), np.zeros(3), np.zeros(4, np.int32), np.arange(4), 0)
