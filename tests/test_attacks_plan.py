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
  assert c.attack.mapper.batch_size == 64 and not c.attack.requery_each_epoch
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
    ("train.loss", "cosine", "unknown stealing loss"),
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
