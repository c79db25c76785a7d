"""The `paper` stealing protocol end to end on the CPU variant (tiny random ResNet victim, 8 devices).

One B4B-defended two-account run (with costs made visible at this size) is shared: it must charge
exactly one pass (the API's counters and coverage equal a one-pass recomputation, and training charges
nothing). It must train on fresh views every epoch, answered at the sigma of their batch position
(checked against numpy's cost formula of the logged coverage and against the residual of the inverted
transform), with every account transformed, account 2's rows mapped at rep_scale, and
kill-and-resume bit-identical.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax import models
from b4b_jax.attacks import protocol
from b4b_jax.data import preprocess
from b4b_jax.jobs import steal
from b4b_jax.main import run_job
from tests.test_attacks_steal import _defended_config, victim_dir  # noqa: F401  (a shared fixture)


@pytest.fixture(scope="module")
def paper_run(victim_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("paper"))
  config = _defended_config(victim_dir, "paper")  # B4B costs made visible at this size
  assert config.attack.protocol == "paper"
  return config, workdir, run_job(config, workdir)


@pytest.fixture(scope="module")
def restored(paper_run):
  """The finished run's set-up and query phase, restored from its workdir (nothing is charged)."""
  config, workdir, _ = paper_run
  s = steal.set_up(config, workdir)
  q = steal.query_phase(config, workdir, s)
  s.writer.close()
  return s, q


def _sigma(coverage, c):
  """Paper Eq. 1 in numpy: lam * (exp(ln(alpha / lam) * c / beta) - 1)."""
  return c.lam * (np.exp(np.log(c.alpha / c.lam) * np.asarray(coverage, np.float64) / c.beta) - 1)


def test_paper_protocol_charges_exactly_one_pass(paper_run, restored):
  config, _, r = paper_run
  s, q = restored
  bs = config.attack.query_batch_size
  # 384 queries over 2 accounts of 64: windows of (384 // 64) // 2 = 3 batches, 2 of them mapping.
  assert r["protocol"] == "paper"
  assert (r["plan"]["batches_per_account"], r["plan"]["mapping_batches"]) == (3, 2)
  assert r["queries"]["charged"] == r["api"]["total_queries"] == 2 * 3 * bs
  assert r["queries"]["charged_per_account"] == [3 * bs, 3 * bs]
  assert r["queries"]["views_answered_offline"] == r["total_steps"] * config.train.batch_size
  assert r["queries"]["meaning"] == steal.QUERIES_MEANING["paper"]
  assert r["accounts"] == r["accounts_after_queries"]     # training charged nothing
  # A one-pass recomputation: a fresh API, the same views, each account's batches in plan order.
  api = steal.new_api(s.victim, config)
  for a in s.plan.accounts:
    user = protocol.account_name(a.index)
    for indices in (a.mapping_indices, a.new_indices):
      for start in range(0, len(indices), bs):
        api.query(user, s.views.uint8(indices[start:start + bs], 0))
  for a in r["accounts"]:
    assert a["charged_queries"] == api.num_queries(a["user"])
    assert a["coverage"] == pytest.approx(api.coverage(a["user"]), abs=1e-6)
    assert a["sigma"] == pytest.approx(api.sigma(a["user"]), rel=1e-6)
  on_disk = json.load(open(os.path.join(paper_run[1], steal.RESULTS)))
  assert on_disk["protocol"] == "paper" and on_disk["rep_scale"] == 1000.0
  assert "views answered offline (not charged)" in open(os.path.join(paper_run[1], steal.REPORT)).read()


def test_each_rows_sigma_is_the_cost_of_its_batch_positions_coverage(paper_run, restored):
  config, _, r = paper_run
  _, q = restored
  bs = config.attack.query_batch_size
  expected = []
  for account in (1, 2):
    log = [e for e in r["query_log"] if e["account"] == account]
    train = [e for e in log if e["phase"] == "train"]
    assert len(log) == 3 and len(train) == (3 if account == 1 else 1)
    expected += [_sigma(e["coverage"], config.defense) for e in train]
  np.testing.assert_allclose(q.sigma_rows, np.repeat(expected, bs), rtol=1e-4)
  assert len(set(np.round(expected, 6))) == len(expected)  # distinct per position: a mix-up would show


def test_epochs_see_fresh_views_answered_at_their_positions_sigma(paper_run, restored):
  config, _, _ = paper_run
  s, q = restored
  victim = models.load_encoder(config.victim.encoder_dir)
  mean, std = preprocess.normalization(victim.manifest)
  bs = config.train.batch_size
  params = {a: defense.user_transform_params(config.defense, victim.rep_dim, protocol.account_name(a))
            for a in (0, 1)}
  rows_per_position = []
  seen = {}
  for epoch in (0, 1):
    batches = steal._epoch_batches(config, s, q, epoch, 0)  # pylint: disable=protected-access
    for i, (images, targets) in enumerate(batches):
      rows = np.arange(i * bs, (i + 1) * bs)
      seen[(epoch, i)] = images
      clean = np.asarray(victim(((images / 255.0 - mean) / std).astype(np.float32)), np.float64)
      accounts = q.account_rows[rows]
      # Account 2's rows are its answers carried through its mapper at rep_scale: undo that first.
      if np.any(accounts == 1):
        mapped = accounts == 1
        raw = q.offline.answer(images[mapped], q.sigma_rows[rows][mapped], accounts[mapped],
                               s.plan.train_indices[rows][mapped], epoch)
        np.testing.assert_allclose(targets[mapped],
                                   q.attacker.mappers[1].apply(raw * 1000.0) / 1000.0, rtol=1e-5,
                                   atol=1e-6)
        continue
      p = params[0]
      noised = np.linalg.solve(p["matrix"].T.astype(np.float64), (targets - p["bias"]).T).T
      sigma = float(q.sigma_rows[rows][0])
      assert np.all(q.sigma_rows[rows] == sigma)
      rows_per_position.append((sigma, np.std(noised - clean)))
  # Every epoch cuts new crops of the same images.
  for i in range(len(s.plan.train_indices) // bs):
    assert np.abs(seen[(0, i)].astype(int) - seen[(1, i)].astype(int)).mean() > 5
  # The residual noise of each batch has the std of its charged position's sigma (32 x 64 draws each).
  for sigma, measured in rows_per_position:
    assert measured == pytest.approx(sigma, rel=0.1)
  assert max(s for s, _ in rows_per_position) > 1.5 * min(s for s, _ in rows_per_position)


def test_killed_paper_run_resumes_to_the_same_result(paper_run, tmp_path):
  config, workdir, reference = paper_run
  workdir2 = str(tmp_path / "killed")
  stopped = config.copy_and_resolve_references()
  stopped.max_steps_this_run = 11  # checkpoints at 8 and 11; the run has 16 steps
  assert run_job(stopped, workdir2)["status"] == "max_steps_this_run"
  shutil.rmtree(os.path.join(workdir2, "checkpoints", "11"))  # killed before step 11's checkpoint
  r = run_job(config, workdir2)
  assert r["epoch_losses"] == reference["epoch_losses"]
  assert r["accounts"] == reference["accounts"] and r["queries"] == reference["queries"]
  load = lambda w: jax.tree.map(np.asarray, models.load_encoder(  # noqa: E731
      os.path.join(w, steal.STOLEN_ENCODER)).params)
  jax.tree.map(np.testing.assert_array_equal, load(workdir2), load(workdir))
