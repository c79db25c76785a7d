"""Query plans (exact budgets, the sybil overlap), config arguments and the paper's settings."""
import os

import numpy as np
import pytest
from flax import nnx

from b4b_jax.attacks import queries
from b4b_jax.jobs import steal
from b4b_jax.main import run_job
from configs import common
from configs import steal_dino
from configs import steal_simsiam


@pytest.mark.parametrize("accounts,shares", [
    (1, [100_000]), (2, [50_000] * 2), (3, [33_334, 33_333, 33_333]),
    (6, [16_667] * 4 + [16_666] * 2)])
def test_budget_split_matches_the_paper(accounts, shares):
  assert queries.split_budget(100_000, accounts) == shares


def test_plan_charges_every_query_once_and_overlaps_with_account_one():
  plan = queries.plan_queries(2000, 1000, num_accounts=3, num_queries_mapping=100, num_eval=50, seed=3)
  a1, a2, a3 = plan.accounts
  assert [a.num_queries for a in plan.accounts] == [334, 333, 333]
  assert plan.num_queries == 1000
  assert len(a1.mapping_indices) == 0
  # Each sybil's mapping queries are images account 1 also queried (its first ones).
  np.testing.assert_array_equal(a2.mapping_indices, a1.new_indices[:100])
  np.testing.assert_array_equal(a3.mapping_indices, a1.new_indices[:100])
  train = plan.train_indices
  assert len(train) == 334 + 233 + 233 == len(np.unique(train))
  assert not set(plan.eval_indices) & set(train) and len(plan.eval_indices) == 50
  again = queries.plan_queries(2000, 1000, num_accounts=3, num_queries_mapping=100, num_eval=50, seed=3)
  np.testing.assert_array_equal(again.train_indices, train)
  other = queries.plan_queries(2000, 1000, num_accounts=3, num_queries_mapping=100, num_eval=50, seed=4)
  assert not np.array_equal(other.train_indices, train)


def test_plan_rejects_impossible_budgets():
  with pytest.raises(ValueError, match="1..10"):
    queries.plan_queries(100, 10, num_accounts=11)
  with pytest.raises(ValueError, match="mapping overlap"):
    queries.plan_queries(100_000, 20_000, num_accounts=2, num_queries_mapping=10_000)
  with pytest.raises(ValueError, match="pool has 500 images"):
    queries.plan_queries(500, 600)


def test_parse_arg():
  got = common.parse_arg("tiny, defended=1,queries=1e5,loss=mse", tiny=False, defended=False,
                              queries=50_000, loss="infonce")
  assert got == {"tiny": True, "defended": True, "queries": 100_000, "loss": "mse"}
  with pytest.raises(ValueError, match="unknown config arg"):
    common.parse_arg("sybil=2", sybils=1)
  with pytest.raises(ValueError, match="boolean"):
    common.parse_arg("defended=maybe", defended=False)
  with pytest.raises(ValueError, match="int"):
    common.parse_arg("sybils=2.5", sybils=1)


def test_paper_configs():
  c = steal_simsiam.get_config("defended=1,sybils=2,queries=100000")
  assert (c.job, c.attack.num_queries, c.attack.num_accounts, c.attack.num_queries_mapping) == (
      "steal", 100_000, 2, 10_000)
  assert (c.stolen.arch, c.train.epochs, c.train.batch_size, c.train.base_lr, c.train.loss,
          c.train.temperature, c.train.momentum) == ("resnet50", 100, 256, 0.1, "infonce", 0.25, 0.9)
  assert (c.defense.enabled, c.defense.lam, c.defense.alpha, c.defense.beta, c.defense.num_hyperplanes,
          c.defense.transform) == (True, 1e-6, 1.0, 80.0, 12, "dense_affine")
  assert c.attack.mapper.kind == "linear" and c.attack.mapper.learning_rate == 1e-4
  assert c.attack.mapper.batch_size == 64 and c.attack.protocol == "paper"
  assert c.attack.rep_scale == 1000.0 and steal_dino.get_config().attack.rep_scale == 1.0
  assert steal_simsiam.get_config("requery=1").attack.protocol == "requery_each_epoch"
  assert steal_simsiam.get_config("protocol=query_once").attack.protocol == "query_once"
  assert steal_simsiam.get_config("tiny").attack.protocol == "paper"
  with pytest.raises(ValueError, match="protocol"):
    steal_simsiam.get_config("protocol=online")
  d = steal_dino.get_config("defended=1")
  assert (d.defense.alpha, d.defense.beta, d.attack.num_queries) == (1000.0, 60.0, 50_000)
  assert not steal_dino.get_config().defense.enabled
  tiny = steal_dino.get_config("tiny")
  assert tiny.victim.build_tiny == "vit_tiny" and tiny.image_size == 16
  with pytest.raises(ValueError, match="unknown config arg"):
    steal_simsiam.get_config("sybls=2")


def test_stolen_model_gets_the_dino_head_only_when_dims_differ():
  c = steal_simsiam.get_config("tiny")
  same = nnx.eval_shape(lambda: steal._create_stolen(c, 64, 0))  # pylint: disable=protected-access
  assert same.proj is None and same.rep_dim == 64
  other = nnx.eval_shape(lambda: steal._create_stolen(c, 96, 0))  # pylint: disable=protected-access
  assert other.proj is not None and other.rep_dim == 96


@pytest.mark.parametrize("field,value,match", [
    ("train.loss", "l1", "unknown stealing loss"),
    ("attack.mapper.kind", "conv", "unknown attack.mapper.kind"),
    ("train.base_lr", 0.0, "base_lr"),
    ("train.epochs", 0, "train.epochs"),
    ("attack.num_queries_mapping", 10, "too small to fit the sybil mappers"),
    ("attack.num_queries", -5, "num_queries"),
    ("attack.num_accounts", 0, "num_accounts"),
    ("attack.query_batch_size", 0, "query_batch_size"),
    ("defense.beta", 0.0, "beta"),
    ("defense.lam", 2.0, "alpha must be > lam"),
    ("defense.num_hyperplanes", 30, "num_hyperplanes"),
    ("checkpoint_every_steps", 0, "checkpoint_every_steps"),
    ("attack.protocol", "online", "unknown attack.protocol"),
    ("attack.strategy", "repeat_average", "needs attack.protocol='query_once'"),
    ("attack.strategy", "guess", "unknown attack.strategy"),
    ("attack.strategy", "under_knee", "fewer rows than images.*configs/attack_suite.py"),
    ("attack.strategy", "sybil_mapper", "does not fit the steal job"),
    ("attack.strategy", "account_rotation", "does not fit the steal job"),
    ("attack.strategy", "denoised", "proxy"),
    ("attack.rep_scale", 0.0, "rep_scale"),
    ("compute_dtype", "float16", "compute_dtype"),
    ("attack.num_queries_mapping", 250, "must exceed its 4 mapping batches"),
    ("defense.noise_keying", "per_input", "noise_keying='per_input'"),
])
def test_bad_config_is_refused_before_the_workdir_is_claimed(tmp_path, field, value, match):
  """run_job validates every value before recording the workdir, so the corrected config can use it."""
  c = steal_simsiam.get_config("tiny,sybils=2")
  c.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match):
    run_job(c, str(tmp_path))
  assert os.listdir(tmp_path) == []


@pytest.mark.parametrize("arg", ["queries=-5", "queries=0", "sybils=0", "epochs=-1", "mapping=0"])
def test_non_positive_config_args_are_refused(arg):
  """`value > 0 else default` would silently run the default; a non-positive number is an error."""
  with pytest.raises(ValueError, match=f"config arg {arg.split('=')[0]}=.*must be > 0"):
    steal_simsiam.get_config("tiny," + arg)


# ------------------------------------------------------------------------------- the paper protocol
@pytest.mark.parametrize("num_queries,k,bpa", [(50_000, 2, 97), (100_000, 2, 195), (100_000, 3, 130),
                                               (100_000, 6, 65)])
def test_paper_windows_match_the_originals_worked_examples(num_queries, k, bpa):
  """Reference section 5.3: bpa = floor(num_queries / 256) // k, 40 mapping batches per sybil; every
  batch charged to its account, nothing past the k windows (the original's free window)."""
  plan = queries.plan_paper(100_000, num_queries, num_accounts=k, num_queries_mapping=10_000,
                            batch_size=256)
  assert (plan.batches_per_account, plan.mapping_batches, plan.batch_size) == (bpa, 40, 256)
  first = plan.accounts[0]
  np.testing.assert_array_equal(first.new_indices, np.arange(bpa * 256))   # pool order, unshuffled
  assert len(first.mapping_indices) == 0
  for j, a in enumerate(plan.accounts[1:], start=1):
    # Mapping queries: account 1's first 40 batches (paired images), charged to account j.
    np.testing.assert_array_equal(a.mapping_indices, np.arange(40 * 256))
    np.testing.assert_array_equal(a.new_indices, np.arange((j * bpa + 40) * 256, (j + 1) * bpa * 256))
    assert a.num_queries == bpa * 256
  assert plan.num_queries == k * bpa * 256
  queried = np.concatenate([np.concatenate([a.mapping_indices, a.new_indices]) for a in plan.accounts])
  assert queried.max() < k * bpa * 256        # no leak past the windows
  assert len(np.unique(plan.train_indices)) == len(plan.train_indices) == (k * bpa - (k - 1) * 40) * 256
  assert plan.summary()["batches_per_account"] == bpa


def test_paper_single_account_stops_where_the_original_does():
  # 50k: the original breaks once it has passed 50k, after 196 batches (50,176 queries).
  assert queries.plan_paper(100_000, 50_000, batch_size=256).num_queries == 196 * 256
  # 100k on the 100-per-class pool: the pool ends first (drop_last), 390 batches.
  assert queries.plan_paper(100_000, 100_000, batch_size=256).batches_per_account == 390


def test_paper_plan_refuses_windows_without_room():
  with pytest.raises(ValueError, match="must exceed its 40 mapping batches"):
    queries.plan_paper(100_000, 20_000, num_accounts=2, num_queries_mapping=10_000, batch_size=256)
  with pytest.raises(ValueError, match="need 99840 pool images"):
    queries.plan_paper(50_000, 100_000, num_accounts=2, num_queries_mapping=10_000, batch_size=256)
  with pytest.raises(ValueError, match="holds no batch"):
    queries.plan_paper(100, 1_000, batch_size=256)
