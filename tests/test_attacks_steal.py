"""End-to-end stealing runs on the CPU variant (tiny random ResNet victim, 16x16 photo crops, 8 devices).

One undefended single-account run (query once) and one B4B-defended two-account run that re-queries
every epoch are shared by the tests; each resume test repeats a run in a fresh workdir, interrupted.
"""
import json
import os
import shutil

import jax
import numpy as np
import pytest
from flax import nnx

from b4b_jax import models
from b4b_jax.jobs import steal
from b4b_jax.main import run_job
from b4b_jax.utils import metrics
from configs import steal_simsiam


@pytest.fixture(scope="module")
def victim_dir(tmp_path_factory):
  directory = str(tmp_path_factory.mktemp("victim") / "encoder")
  model = models.create_resnet("resnet18_w0.125", rngs=nnx.Rngs(1234), small_input=True)
  models.save_encoder(directory, model, {"preprocessing": models.default_preprocessing(16, resize=None)})
  return directory


def _config(victim_dir, arg, **train):
  c = steal_simsiam.get_config("tiny," + arg)
  c.victim.encoder_dir = victim_dir
  c.victim.build_tiny = ""
  c.checkpoint_every_steps = 8
  for k, v in train.items():
    c.train[k] = v
  return c


def _defended_config(victim_dir, protocol="requery"):
  c = _config(victim_dir, f"defended=1,sybils=2,protocol={protocol},epochs=2,queries=384,mapping=128")
  # A random tiny victim fills few of 2^12 buckets; fewer, coarser buckets and a low beta make the
  # cost curve visible within a few hundred queries.
  c.defense.num_hyperplanes = 6
  c.defense.num_projections = 4
  c.defense.lam = 1e-3
  c.defense.alpha = 0.2
  c.defense.beta = 20.0
  return c


@pytest.fixture(scope="module")
def undefended(victim_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("undefended"))
  config = _config(victim_dir, "protocol=query_once,queries=512", epochs=2)
  return config, workdir, run_job(config, workdir)


@pytest.fixture(scope="module")
def defended(victim_dir, tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("defended"))
  config = _defended_config(victim_dir)
  return config, workdir, run_job(config, workdir)


def _stolen_params(workdir):
  enc = models.load_encoder(os.path.join(workdir, steal.STOLEN_ENCODER))
  return jax.tree.map(np.asarray, enc.params)


def test_loss_falls_and_stolen_representations_move_toward_the_victim(undefended):
  config, workdir, r = undefended
  assert r["status"] == "done" and r["step"] == r["total_steps"] == 2 * (512 // 32)
  assert r["epoch_losses"][-1] < r["epoch_losses"][0] - 0.1
  before, after = r["similarity_initial"]["cosine_to_victim"], r["similarity_final"]["cosine_to_victim"]
  assert after > before + 0.1
  # Undefended: identity transform, no noise, so the response space is the victim's own space.
  assert r["similarity_final"]["cosine_to_responses"] == pytest.approx(after)
  (account,) = r["accounts"]
  assert account["charged_queries"] == 512 and account["sigma"] == 0.0
  # Written results: JSON, report, metrics (JSONL), and a loadable stolen encoder directory that
  # reproduces the trained model's representations.
  on_disk = json.load(open(os.path.join(workdir, steal.RESULTS)))
  assert on_disk["similarity_final"] == r["similarity_final"] and on_disk["versions"]["jax"]
  assert "cosine_to_victim" in open(os.path.join(workdir, steal.REPORT)).read()
  losses = [m["loss"] for m in metrics.read_metrics(workdir, stage="steal") if "loss" in m]
  assert len(losses) == r["total_steps"]
  enc = models.load_encoder(os.path.join(workdir, steal.STOLEN_ENCODER))
  assert enc.rep_dim == 64 and enc.manifest["source"]["num_queries"] == 512
  images = np.random.default_rng(0).integers(0, 256, (8, 16, 16, 3), dtype=np.uint8)
  x = (images / 255.0 - np.asarray(enc.manifest["preprocessing"]["mean"])) / np.asarray(
      enc.manifest["preprocessing"]["std"])
  graphdef, params, batch_stats = enc.graphdef, enc.params["params"], enc.params["batch_stats"]
  expected, _ = models.apply_model(graphdef, params, batch_stats, x.astype(np.float32), train=False)
  np.testing.assert_allclose(np.asarray(enc(x.astype(np.float32))), np.asarray(expected), rtol=1e-4,
                             atol=1e-5)


def test_query_once_run_resumes_to_the_same_result(undefended, victim_dir, tmp_path):
  config, workdir, reference = undefended
  workdir2 = str(tmp_path / "resumed")
  stopped = config.copy_and_resolve_references()
  stopped.max_steps_this_run = 7  # a volatile field: same experiment, stops with a checkpoint
  assert run_job(stopped, workdir2)["status"] == "max_steps_this_run"
  r = run_job(config, workdir2)
  assert r["epoch_losses"] == reference["epoch_losses"]
  assert r["similarity_final"] == reference["similarity_final"]
  jax.tree.map(np.testing.assert_array_equal, _stolen_params(workdir2), _stolen_params(workdir))


def test_defended_accounts_are_charged_and_sigma_rises_with_coverage(defended):
  _, _, r = defended
  assert r["protocol"] == "requery_each_epoch"
  first, second = r["accounts"]
  # Re-query protocol: the overlap once (128 each), then every view of both epochs is charged
  # (the budget of 384 is split 192 + 192; account 2's share has 128 mapping and 64 new images).
  assert first["charged_queries"] == 128 + 2 * 192
  assert second["charged_queries"] == 128 + 2 * 64
  assert r["api"]["total_queries"] == first["charged_queries"] + second["charged_queries"]
  for account in (1, 2):
    log = [e for e in r["query_log"] if e["account"] == account]
    coverage = np.array([e["coverage"] for e in log])
    sigma = np.array([e["sigma"] for e in log])
    assert np.all(np.diff(coverage) >= 0) and coverage[-1] > coverage[0] > 0
    # sigma is the cost function of the coverage: it rises whenever coverage does.
    order = np.argsort(coverage, kind="stable")
    assert np.all(np.diff(sigma[order]) >= -1e-9) and sigma[-1] > sigma[0] > 0
    assert [e["num_queries"] for e in log] == sorted(e["num_queries"] for e in log)
  assert r["epoch_losses"][-1] < r["epoch_losses"][0]
  # The stolen model moves toward account 1's (transformed) response space.
  before = r["similarity_initial"]["cosine_to_responses"]
  assert r["similarity_final"]["cosine_to_responses"] > before + 0.1


def test_sybil_mapper_brings_responses_closer_to_account_one(defended):
  _, _, r = defended
  m = r["accounts"][1]["mapper"]
  assert m["num_train"] + m["num_val"] == 128
  assert m["val_cosine"] > 0.8 and m["val_cosine"] > m["val_cosine_unmapped"] + 0.5
  assert m["val_mse"] < 0.1 * m["val_mse_unmapped"]
  assert "mapper" not in r["accounts"][0]


def test_killed_defended_run_resumes_to_the_same_result(defended, tmp_path):
  config, workdir, reference = defended
  workdir2 = str(tmp_path / "killed")
  stopped = config.copy_and_resolve_references()
  stopped.max_steps_this_run = 11  # checkpoints at 8 (every 8 steps) and 11; the run has 16 steps
  assert run_job(stopped, workdir2)["status"] == "max_steps_this_run"
  # What a kill after step 11 but before its checkpoint leaves: the checkpoint (and the API state) of
  # step 8, and metrics of steps 9-11. The resumed run redoes steps 9-11, re-charging their queries
  # from the API state of step 8.
  shutil.rmtree(os.path.join(workdir2, "checkpoints", "11"))
  shutil.rmtree(os.path.join(workdir2, "attack", "api_train", f"step_{11:09d}"))
  r = run_job(config, workdir2)
  assert r["epoch_losses"] == reference["epoch_losses"]
  assert r["accounts"] == reference["accounts"]
  jax.tree.map(np.testing.assert_array_equal, _stolen_params(workdir2), _stolen_params(workdir))


def test_workdir_of_another_experiment_is_refused(undefended, victim_dir):
  _, workdir, _ = undefended
  with pytest.raises(ValueError, match="incompatible"):
    run_job(_config(victim_dir, "queries=256"), workdir)


def test_query_once_trains_on_the_views_it_streamed_before(undefended, tmp_path, monkeypatch):
  """Query once keeps its training views in memory (steal._TRAIN_VIEWS_BYTES): the run equals one that
  streams them every epoch, and streams them once less per epoch."""
  config, _, reference = undefended
  calls = []
  stream = steal.Views.stream
  monkeypatch.setattr(steal.Views, "stream", lambda self, *a: calls.append(a) or stream(self, *a))
  kept = run_job(config, str(tmp_path / "kept"))
  kept_calls, calls[:] = len(calls), []
  monkeypatch.setattr(steal, "_TRAIN_VIEWS_BYTES", 0)
  streamed = run_job(config, str(tmp_path / "streamed"))
  assert len(calls) == kept_calls + config.train.epochs
  for r in (kept, streamed):
    assert r["epoch_losses"] == reference["epoch_losses"]
    assert r["similarity_final"] == reference["similarity_final"]
  jax.tree.map(np.testing.assert_array_equal, _stolen_params(str(tmp_path / "kept")),
               _stolen_params(str(tmp_path / "streamed")))
