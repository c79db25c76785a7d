r"""Adaptive attacks against paper-B4B and the hardened defense (issue 12): repeat-and-average (exact
repeats and near-duplicates), canary probing, the naive thief, and the legit digits user; and theft:
every attack of b4b_jax/attacks/strategies/received.py (query once, exact repeats, canary, under the
knee, augmentation flood, random noise, sybil mapper, account rotation, learned denoiser) trains a
small copy on what it received against none / paper / hardened / hardened_no_charge, measured by its
fidelity to the victim on held-out crops (linear R^2, cosine, relative MSE) and a digits probe, beside the legit user's accuracy
(report.md's "Theft" table, utility_theft_frontier.png).

  python -m b4b_jax.main --config=configs/attack_suite.py --workdir=/tmp/attack_suite
  # reuse the victim of an earlier demo (or suite/serve) run instead of training it into <workdir>/demo:
  python -m b4b_jax.main --config=configs/attack_suite.py --workdir=W --config.demo_workdir=/tmp/b4b_demo
  python -m b4b_jax.main --config=configs/attack_suite.py:tiny --workdir=/tmp/attack_suite_tiny  # tests
  python -m b4b_jax.main --config=configs/attack_suite.py:tiny,attack=under_knee --workdir=W  # one theft
  --config.encoder=DIR attacks any encoder directory; random:<arch>@<size> a random-init one (:tiny).

Victim: by default the demo's embedded victim (configs/demo.py: SimSiam resnet18_w0.25 at 16 px,
128-d), trained by the demo's own "victim" stage into demo_workdir (default <workdir>/demo; about 4
minutes on 2 quiet cores) or reused from there, through the same helper as the serve job
(b4b_jax.demo.pipeline.trained_victim).
Defenses (same cost, same hash_center, identity transform so errors compare to the clean answer
directly): paper (the published B4B, noise_keying "per_query"), hardened (the full hardened preset,
b4b_jax.defense.HARDENED: per-input keying, image-keyed noise, repeat_charge 0.25) and the ablation
hardened_no_charge (the same fields with repeat_charge 0; no_charge_ablation=False drops it).
Per seed and defense each attack owns one account: a coverage-raising phase of `coverage_queries`
diverse photo crops, then `max(ns)` copies of each of `targets` held-out crops; err(N) = RMS per
dimension of (mean of the first N answers - clean answer). The cost is calibrated as the demo does
(alpha = alpha_scale x per-dimension std of the server's own representations, beta = beta_fraction x
their coverage). The legit digits user queries through images (api.query), so the image-keyed noise
applies to it.
Expected (issue 12): paper-B4B err(1)/err(100) ~ 10 (sqrt(100)); hardened <= 1.2 for exact repeats and
near-duplicates; canary: under the hardened defense the probe's answers only change when the sigma
level rises, and each read-out is a charged repeat; legit digits drop grows by <= 0.2 points.
Runtime: the error part runs every seed (cheap: queries through the API); the theft rows (a trained
copy per attack and defense, the suite's dearest part) run for theft.seeds = (0,) only. results.json
and report.md carry the wall and CPU seconds of every phase per seed ("Where the time went"); see
docs/defense.md for the measured total: 14 min 25 s wall for the first command above on 2 quiet
cores (victim 4 min, seed 0 with the theft rows 6 min 21 s, seeds 1-2 under 2 min each; 24 min on a
slower machine of the same kind). Measured (3 seeds): paper 10.2x, hardened <= 1.18x; canary pays 11.8x
sigma; legit drop 0; theft copies' R^2 0.25-0.42 under every defense vs 0.20 untrained (no defense
holds at this calibration). :tiny is the test (tests/test_attack_suite.py).
"""
import ml_collections

from b4b_jax import defense
from configs import common
from configs import demo as demo_config


def get_config(arg=None):
  parts = [p for p in (arg or "").split(",") if p]
  tiny = "tiny" in parts
  only = [p[len("attack="):] for p in parts if p.startswith("attack=")]
  bad = [p for p in parts if p != "tiny" and not p.startswith("attack=")]
  if bad or len(only) > 1:
    raise ValueError(f"configs/attack_suite.py takes 'tiny' and/or 'attack=NAME' (one theft attack), "
                     f"got {arg!r}")
  c = ml_collections.ConfigDict()
  c.job = "attack_suite"
  # "" = the demo's trained victim (configs/demo.py; trained into demo_workdir, default <workdir>/demo,
  # or reused from an earlier demo run named there); or an encoder directory, or random:<arch>@<size>
  # (:tiny, so the test trains no victim).
  c.encoder = "random:resnet18_w0.125@16" if tiny else ""
  c.demo_workdir = ""
  c.demo = demo_config.get_config()
  c.seeds = (0,) if tiny else (0, 1, 2)
  c.coverage_queries = 128 if tiny else 3000
  c.targets = 4 if tiny else 16              # x max(ns) copies each: RMS over targets x 128 dims
  c.ns = (1, 4, 16) if tiny else (1, 4, 16, 64, 100)
  c.perturbations = ("exact", "jitter") if tiny else ("exact", "jitter", "shift", "jpeg", "crop_flip")
  c.query_batch_size = 64
  c.canary = True
  c.legit = True
  c.legit_limit = 128 if tiny else 0        # digits train images (0 = all); the test split is kept whole
  # Extra legit rows at a constant sigma of m x per-dimension std (the cost leaves the digits user
  # almost noise free, so these show what the hardened keying costs when there is noise).
  c.legit_static_sigmas = (1.0,)
  # The cost, calibrated on the server's own photo crops (as the demo).
  c.calibration = ml_collections.ConfigDict()
  # beta = the coverage of as many server images as the thief's coverage phase sends: the thief ends
  # that phase near sigma = alpha (a per-dimension std), far up the cost curve, as in the issue.
  c.calibration.queries = 128 if tiny else 2048
  c.calibration.alpha_scale = 1.0
  c.calibration.lam_ratio = 1e-6
  c.calibration.beta_fraction = 1.0
  c.defense = ml_collections.ConfigDict()
  c.defense.num_projections = 20
  c.defense.num_hyperplanes = 8
  c.defense.seed_offset = 0                  # defense seed = seed + seed_offset
  # The hardened defense: the full preset (b4b_jax.defense.HARDENED = defense_config(hardened=True):
  # per_input keying, image-keyed noise w = 1, l = 0.3, grid 4, F = 256, repeat_charge 0.25); paper-B4B is
  # the same cost without these fields. Any field can be overridden (--config.hardened.image_weight=0.5).
  c.hardened = ml_collections.ConfigDict(dict(defense.HARDENED))
  # An ablation row "hardened_no_charge" = the hardened fields with repeat_charge 0 (keyed noise only,
  # repeats flagged but not charged); skipped when False or when hardened already charges nothing.
  c.no_charge_ablation = True
  # Theft: each attack (b4b_jax/attacks/strategies/received.py ATTACKS) sends the same `images` photo
  # crops from fresh accounts to none / paper / hardened / charged; a small copy trains `steps` steps
  # on what it received (the steal job's train step) and is measured on `eval_images` held-out crops
  # and by a digits probe. `attack=NAME` in the config argument runs that attack alone.
  c.theft = ml_collections.ConfigDict()
  c.theft.enabled = True
  c.theft.seeds = (0,)                      # theft rows for these seeds only (() = every seed)
  c.theft.attacks = tuple(only) if only else (
      "query_once", "repeat_exact", "canary", "under_knee", "augmentation_flood", "random_noise",
      "sybil_mapper", "account_rotation", "denoised")
  c.theft.images = 64 if tiny else 1000
  # Held-out crops each copy is scored on: the linear R^2 (evaluation/fidelity.py) fits a map from the
  # copy's 128-d features on the first half and scores the second, so the full size keeps 512 rows per
  # half (4 per fitted dimension); cosine and rel MSE use all of them.
  c.theft.eval_images = 64 if tiny else 1024
  c.theft.arch = "resnet18_w0.125"
  c.theft.init_seed_offset = 1000           # copy init seed = seed + this (never the random victim's)
  c.theft.steps = 8 if tiny else 100
  c.theft.batch_size = 16 if tiny else 64
  # The thief trains on its answers standardised per dimension (their mean and std over what it
  # received; attacks/stolen_copy.target_scaler) and reads its copy's outputs back through the inverse:
  # on raw answers MSE is spent on the representations' shared mean and 100 steps learn little else
  # (the copies' linear R^2 then sits at the untrained copy's). False: raw answers.
  c.theft.standardize_targets = True
  c.theft.loss = "mse"                      # any of attacks.losses' robust set: mse, cosine, huber, infonce
  c.theft.base_lr = 0.4
  c.theft.copies = 4 if tiny else 8         # repeat_*, canary (after it switches)
  # canary: switch to repeats once it reads noise above float rounding (the same image's clean answer
  # moves ~1e-7 between batch shapes: that is no noise; 0 made the switch depend on rounding luck).
  c.theft.canary_switch_sigma = 1e-4
  c.theft.under_knee_budget = 16 if tiny else 128
  c.theft.selection = "coverage_aware"
  c.theft.flood_weak = 2
  c.theft.flood_strong = 2
  c.theft.noise_count = 64 if tiny else 250
  c.theft.overlap = 16 if tiny else 100      # sybil_mapper, account_rotation
  c.theft.per_account = 40 if tiny else 400  # account_rotation: queries per account (overlap included)
  c.theft.alignment = "linear"
  c.theft.proxy_images = 64 if tiny else 512  # denoised: the (oracle) proxy's clean answers
  c.probe = common.probe_block(tiny=True)
  c.probe.method = "ridge"
  c.probe.seeds = (0,) if tiny else (0, 1, 2)
  return c
