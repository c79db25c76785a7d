"""Sybil protocol (b4b_jax/attacks/protocol.py): the stolen model trains on account k's responses
carried through account k's own mapper, and on account 1's responses as returned.

A real DefendedEncoder (per-user dense affine transforms and B4B noise, so every account answers in its
own space) behind a recording proxy: the test sees exactly what each account received and checks the
training targets row by row against `attacker.mappers[k].apply(received by k)`.

Written against today's Attacker (query-once `collect_training_targets`, re-query `query_rows`); the
stealing trainer's rewrite should keep the same property at whatever its boundary becomes.
"""
import jax.numpy as jnp
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.attacks import protocol
from b4b_jax.attacks import queries
from b4b_jax.attacks import strategies

pytestmark = pytest.mark.usefixtures("fast_compiles")

D = 8
_W = np.random.default_rng(0).standard_normal((2 * 2 * 3, D)).astype(np.float32)
_POOL = np.random.default_rng(1).standard_normal((400, 2, 2, 3)).astype(np.float32)
MAPPER = dict(kind="linear", epochs=3, learning_rate=1e-2, batch_size=8, val_fraction=0.25, seed=0)
# Query batches of 32 only (96 queries per account: 32 mapping + 64 new): one compilation of the API.


def _encoder(images):
  return jnp.tanh(images.reshape(images.shape[0], -1) @ _W)


class _RecordingAPI:
  """Delegates to the real API and keeps every response each user received, in order."""

  def __init__(self, api):
    self._api = api
    self.received = {}

  def __getattr__(self, name):
    return getattr(self._api, name)

  def query(self, user, images):
    result = self._api.query(user, images)
    self.received.setdefault(user, []).append(np.array(result.reps, copy=True))
    return result

  def query_mixed(self, users, images):
    result = self._api.query_mixed(users, images)
    for u in set(users):
      rows = [i for i, v in enumerate(users) if v == u]
      self.received.setdefault(u, []).append(np.array(result.reps[rows], copy=True))
    return result


def _attacker(num_accounts=3):
  cfg = defense.defense_config("simsiam", transform="dense_affine", num_projections=2,
                               num_hyperplanes=4, lam=1e-3, alpha=0.05, beta=50.0)
  api = _RecordingAPI(defense.DefendedEncoder(_encoder, cfg, D))
  plan = queries.plan_queries(len(_POOL), 288, num_accounts=num_accounts, num_queries_mapping=32,
                              seed=0)
  views = lambda idx, epoch: _POOL[idx] + 0.01 * epoch  # noqa: E731
  return protocol.Attacker(api, plan, views, batch_size=32), api, plan


def test_query_once_targets_are_each_accounts_responses_through_its_own_mapper():
  attacker, api, plan = _attacker()
  targets = attacker.collect_training_targets(**MAPPER)
  rows_of = protocol.accounts_of_rows(plan)
  assert targets.shape == (len(plan.train_indices), D)
  assert sorted(attacker.mappers) == [1, 2]
  for a in plan.accounts:
    user = attacker.users[a.index]
    # What this account received for its new images: its last len(new_indices) response rows (the
    # mapping-phase batches come first).
    received = np.concatenate(api.received[user])[-len(a.new_indices):]
    mine = targets[rows_of == a.index]
    if a.index == 0:
      np.testing.assert_array_equal(mine, received)  # account 1's space: used as returned
    else:
      expected = attacker.mappers[a.index].apply(received)
      np.testing.assert_allclose(mine, expected, rtol=1e-6, atol=1e-6)
      # The mapping matters here (another account's transform), so unmapped rows would be caught.
      assert np.abs(received - expected).mean() > 0.1
      other = attacker.mappers[3 - a.index].apply(received)  # the other sybil's mapper
      assert np.abs(other - expected).mean() > 0.05


def test_requery_batches_map_each_row_with_its_accounts_mapper():
  attacker, api, plan = _attacker()
  attacker.mapping_phase_only(**MAPPER)
  rows_of = protocol.accounts_of_rows(plan)
  pick = np.random.default_rng(2).permutation(len(rows_of))[:32]  # a mixed batch, as in training
  for user in api.received:
    api.received[user] = []
  out = attacker.query_rows(rows_of[pick], plan.train_indices[pick], epoch=1)
  for k in range(len(plan.accounts)):
    user = attacker.users[k]
    (received,) = api.received[user]
    mine = out[rows_of[pick] == k]
    if k == 0:
      np.testing.assert_array_equal(mine, received)
    else:
      np.testing.assert_allclose(mine, attacker.mappers[k].apply(received), rtol=1e-6, atol=1e-6)
      assert np.abs(mine - received).mean() > 0.1


# ------------------------------------------------------------------- rep_scale, strategies, paper pass
def test_mappers_are_fitted_and_applied_at_rep_scale():
  """rep_scale: the mapper sees responses x rep_scale, its outputs are divided back."""
  attacker, _, plan = _attacker(num_accounts=2)
  attacker.rep_scale = 1000.0
  attacker.mapping_phase_only(**MAPPER)
  mapper = attacker.mappers[1]
  # Fitted on scaled pairs: its normalisation statistics are 1000x those of the raw responses.
  raw = attacker.query(1, plan.accounts[1].mapping_indices[:8], phase="mapping")
  x = np.random.default_rng(3).standard_normal((5, D)).astype(np.float32)
  np.testing.assert_allclose(attacker.map_rows(np.ones(5, np.int32), x),
                             mapper.apply(x * 1000.0) / 1000.0, rtol=1e-6)
  assert np.abs(mapper.normalization["in_mean"]).max() > 100 * np.abs(raw).mean()


def _spec(cls, **kwargs):
  return protocol.StrategySpec(cls, kwargs, to_strategy=lambda v: v, to_api=lambda x: x)


def test_query_once_targets_come_from_the_configured_strategy():
  """The strategy seam: RepeatAverage sends `copies` copies of every image (all charged to the
  account) and its targets are the averages of what the account received."""
  attacker, api, plan = _attacker(num_accounts=1)
  attacker.strategy = _spec(strategies.RepeatAverage, copies=3)
  targets = attacker.collect_training_targets(**MAPPER)
  user = attacker.users[0]
  assert attacker.api.num_queries(user) == 3 * len(plan.train_indices)
  received = np.concatenate(api.received[user])
  # RepeatAverage sends each batch's 3 copies as one block: [copy0 rows, copy1 rows, copy2 rows].
  expected = np.concatenate([received[i * 96:(i + 1) * 96].reshape(3, 32, D).mean(0)
                             for i in range(len(received) // 96)])
  np.testing.assert_allclose(targets, expected, rtol=1e-5, atol=1e-6)
  assert len(attacker.log) == len(received) // 32   # every charged call logged


def test_query_once_strategy_gives_the_plain_answers():
  plain, _, _ = _attacker(num_accounts=1)
  seam, _, _ = _attacker(num_accounts=1)
  seam.strategy = _spec(strategies.QueryOnce)
  np.testing.assert_array_equal(seam.collect_training_targets(**MAPPER),
                                plain.collect_training_targets(**MAPPER))


def test_strategy_spec_refuses_unknown_arguments():
  with pytest.raises(ValueError, match="takes no argument"):
    _spec(strategies.QueryOnce, copies=3)


def test_paper_pass_charges_each_window_once_and_returns_each_rows_sigma():
  cfg = defense.defense_config("simsiam", transform="dense_affine", num_projections=2,
                               num_hyperplanes=4, lam=1e-3, alpha=0.05, beta=50.0)
  api = _RecordingAPI(defense.DefendedEncoder(_encoder, cfg, D))
  plan = queries.plan_paper(len(_POOL), 384, num_accounts=2, num_queries_mapping=40, batch_size=32)
  assert (plan.batches_per_account, plan.mapping_batches) == (6, 2)
  attacker = protocol.Attacker(api, plan, lambda idx, epoch: _POOL[idx], batch_size=32)
  sigma = attacker.charge_paper_pass(num_pairs=40, **MAPPER)
  assert [api.num_queries(u) for u in attacker.users] == [192, 192]
  assert sigma.shape == (len(plan.train_indices),)
  # Each row's sigma is the sigma its batch was answered with: the log of that account's train batches.
  logged = {a: [e.sigma for e in attacker.log if e.account == a + 1 and e.phase == "train"]
            for a in (0, 1)}
  np.testing.assert_allclose(sigma, np.repeat(logged[0] + logged[1], 32), rtol=1e-6)
  assert len(logged[0]) == 6 and len(logged[1]) == 4
  # Account 2's batches come after its 2 mapping batches, so its coverage (and sigma) count them.
  mapping_log = [e for e in attacker.log if e.account == 2 and e.phase == "mapping"]
  assert len(mapping_log) == 2 and mapping_log[-1].num_queries == 64
  assert attacker.mappers[1].metrics["num_train"] + attacker.mappers[1].metrics["num_val"] == 40
