"""The served demo (configs/demo.py:tiny,served=1) end to end: the legit user and the defended thieves
talk HTTP to real B4B servers on loopback, and what they received equals what the in-process API gives
for the same seeds.

Where served equals in-process, and why the comparison is against an in-process API on uint8 images:
the served API normalises uint8 images inside its jitted call (DefendedEncoder.from_encoder), as the
steal job's in-process API does, so the thieves' whole runs (query log, coverage, sigma, mapper, losses)
must be identical to the in-process steal job on the same config. The in-process demo's legit user
instead sends images normalised on the host (a float path whose last bits can differ, which can move a
representation across an LSH hyperplane), so its served row is compared with the in-process API built
by from_encoder on the same uint8 images, which must be bit-identical.
"""
import json
import os

import numpy as np

from b4b_jax import defense
from b4b_jax import models
from b4b_jax.demo import pipeline
from b4b_jax.jobs.runner import run_job
from configs import demo as demo_config
from tests.test_serve_http import CACHE
from tests.trees import assert_trees_match


def _small(config):
  """The tiny demo made smaller still where it does not touch the served path."""
  config.attack.epochs = 1
  config.probe.seeds = (0,)
  config.claims.bootstrap_samples = 20
  config.remap.overlaps = (16,)
  config.remap.transforms = ("diag_affine",)
  config.fidelity_photos = 128
  config.serve.compilation_cache_dir = CACHE  # shared with the other service tests
  return config


def _json(tree):
  return json.loads(json.dumps(tree))


def _sigma_to_float32_rounding(path: str):
  """The sigma read-outs: the served client reads an account's sigma from the provider's stats
  (DefendedEncoder.stats: noise_std of the coverage on the host, float64), the in-process trace from the
  call's per-row sigma (the same formula on the device, float32); they agree to a few float32 ulps."""
  return (1e-5, 0.0) if "sigma" in path else None


def check_against_in_process(config, workdir: str, results: dict, scratch: str) -> None:
  """The served demo's legit and sybil stages vs the in-process API on the same seeds (module doc)."""
  victim = models.load_encoder(os.path.join(workdir, pipeline.VICTIM_DIR))
  defense_cfg = pipeline.defended_config(config, results["calibration"])
  data = pipeline.load_data(config)
  api = defense.DefendedEncoder.from_encoder(victim, defense_cfg, capacity=int(config.serve.capacity))
  legit = _json(pipeline.legit_users(config, victim, data, defense_cfg, api=api))
  assert_trees_match(results["legit"], legit, "legit", _sigma_to_float32_rounding)
  cfg = pipeline.steal_config(config, workdir, defended=True, accounts=2, defense_cfg=defense_cfg)
  in_process = _json(pipeline.attack_summary(run_job(cfg, os.path.join(scratch, "sybil_in_process"))))
  # Since the noise values changed (2 Dec 2026, session 3) the sybil stage is no longer bit-identical:
  # the second account's mapper validation cosine differed by 6e-8 relative (1.6e-9 with the cosine
  # summed in float64, so its inputs differ in the last bits) while every count and the other mapper
  # metrics matched. The cause is not traced yet: the noise draw does not depend on the batch's size or
  # composition (checked for N = 1..300, D = 64..2048), and the legit stage above stays bit-identical.
  # So: what the API charged and answered (accounts with their mappers, the query log) to float32
  # rounding (rtol 1e-5; integers exact), and the training outcome, which amplifies last-bit differences
  # as in tests/test_multihost.py, to rtol 1e-2 (cosine to the victim: 0.6681 vs 0.6676).
  # Traced since (serve4, docs/serving.md): the servers run one host device and this process eight, and
  # on an AVX2 AMD EPYC the plain jitted encoder already rounds the last row of a 64-row batch a few ulps
  # apart between the two (the served answers equal a 1-device in-process API bit for bit). There the
  # copy's cosine to its training answers, a number near 0, came out 0.04589 served vs 0.04663 in
  # process: relative 1.6e-2, absolute 7e-4. So the training outcome also gets an absolute 1e-2 (on
  # cosines and losses of order 0.1-10; a broken served stage moves them by far more).
  served_sybil, in_process_sybil = results["attack_sybil"], in_process
  assert set(served_sybil) == set(in_process_sybil)
  for key in in_process_sybil:
    trained = key in ("final_loss", "epoch_losses", "similarity_final")
    tolerance = (1e-2, 1e-2) if trained else (1e-5, 0.0)
    assert_trees_match(served_sybil[key], in_process_sybil[key], f"attack_sybil.{key}",
                       lambda path: tolerance)


def test_served_demo_runs_end_to_end_and_answers_as_in_process(tmp_path):
  config = _small(demo_config.get_config("tiny,served=1"))
  workdir = str(tmp_path / "demo")
  results = run_job(config, workdir)

  served = results["served"]
  assert set(served) == {"legit", "attack_b4b", "attack_sybil"}
  assert all(s["url"].startswith("http://127.0.0.1:") for s in served.values())
  with open(os.path.join(workdir, "report.md")) as f:
    assert "## Served over HTTP" in f.read()
  for stage in served:  # every server journaled what it answered and stopped cleanly (exit 0)
    assert os.path.exists(os.path.join(workdir, "served", stage, "service.sqlite"))

  check_against_in_process(config, workdir, _json(results), str(tmp_path))
  assert results["attack_sybil"]["accounts"][0]["charged_queries"] > 0
  assert np.isfinite(results["probes"]["attack_sybil"]["fidelity_r2_photos"])
