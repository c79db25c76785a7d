"""The demo's stages as functions of (config, inputs) -> JSON-able results (b4b_jax/jobs/demo.py runs
them in order through StageRunner)."""
import os
from typing import Dict

import numpy as np

from b4b_jax import data as data_lib
from b4b_jax import defense as defense_lib
from b4b_jax import models as models_lib
from b4b_jax.attacks import augment
from b4b_jax.demo import claims as claims_lib
from b4b_jax.demo import victim as victim_lib
from b4b_jax.evaluation import embeddings
from b4b_jax.evaluation import fidelity as fidelity_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import remap as remap_lib
from b4b_jax.utils import distributed
from b4b_jax.utils import progress as progress_lib
from configs import steal_simsiam

VICTIM_DIR = "victim_encoder"
ATTACKS_DIR = "attacks"


# ------------------------------------------------------------------------------------------ victim
def trained_victim(demo_cfg, demo_workdir: str, workdir: str):
  """(encoder_dir, calibration dict) of the demo's victim for jobs that serve or attack it (serve,
  attack_suite): the demo's "victim" and "calibration" stages run in demo_workdir (default
  <workdir>/demo), or are reused from an earlier run there (an earlier demo's workdir works as is)."""
  from b4b_jax.demo.stages import StageRunner  # pylint: disable=g-import-not-at-top
  from b4b_jax.utils import metrics as metrics_lib  # pylint: disable=g-import-not-at-top
  demo_dir = demo_workdir or os.path.join(workdir, "demo")
  os.makedirs(demo_dir, exist_ok=True)
  stages = StageRunner(demo_dir, ("victim", "calibration"))
  loaded = {}

  def data():  # only when a stage runs: reusing both costs no data loading
    if not loaded:
      loaded.update(load_data(demo_cfg))
    return loaded

  writer = metrics_lib.MetricsWriter(demo_dir)
  stages.run("victim", lambda: train_victim(demo_cfg, data(), demo_dir, writer))
  encoder_dir = os.path.join(demo_dir, VICTIM_DIR)
  victim = models_lib.load_encoder(encoder_dir)
  calib = stages.run("calibration", lambda: calibrate(demo_cfg, victim, data()))
  writer.close()
  return encoder_dir, calib


# ------------------------------------------------------------------------------------------ data
def load_data(config) -> Dict[str, np.ndarray]:
  """Every image set of the demo, uint8 at the victim's input size (deterministic, cheap to reload)."""
  s = int(config.image_size)
  out = {}
  out["digits_train"], out["digits_train_y"] = data_lib.load_arrays("digits", "train", image_size=s)
  out["digits_test"], out["digits_test_y"] = data_lib.load_arrays("digits", "test", image_size=s)
  out["photos_train"], _ = data_lib.load_arrays("sklearn_photos", "train", image_size=s,
                                                limit=int(config.victim.num_photo_crops),
                                                seed=int(config.seed))
  # Held-out natural-photo crops: where a copy's fidelity to the victim matters most (the thief's domain).
  out["photos_test"], _ = data_lib.load_arrays("sklearn_photos", "test", image_size=s,
                                               limit=int(config.fidelity_photos), seed=int(config.seed))
  return out


def normalizer(encoder):
  mean, std = data_lib.normalization(encoder.manifest["preprocessing"])
  return lambda images: data_lib.normalize(images, mean, std)


def embed(encoder, images: np.ndarray) -> np.ndarray:
  return embeddings.embed_images(encoder, images)


# ------------------------------------------------------------------------------------------ victim
def train_victim(config, data, workdir: str, writer) -> dict:
  vc = config.victim
  images = np.concatenate([data["digits_train"], data["photos_train"]])
  pre = models_lib.default_preprocessing(int(config.image_size), resize=None)
  mean = np.asarray(pre["mean"], np.float32)
  std = np.asarray(pre["std"], np.float32)
  size = int(config.image_size)

  def augment_fn(key, x01):
    return augment.simclr_augment(key, x01, size, crop_scale=tuple(vc.crop_scale),
                                  jitter=tuple(vc.jitter))

  total = int(vc.epochs) * (len(images) // int(vc.batch_size))
  progress = progress_lib.Progress("demo/victim", total, every_seconds=float(config.progress_every_seconds))
  backbone, losses = victim_lib.train_simsiam_victim(images, vc, augment_fn=augment_fn,
                                          normalize_fn=lambda x: (x - mean) / std,
                                          progress=progress, metrics_writer=writer, stage="victim")
  manifest = {"preprocessing": pre,
              "source": {"kind": "SimSiam victim trained by the demo", "data": "digits train + "
                         f"{len(data['photos_train'])} sklearn photo crops", "epochs": int(vc.epochs)}}
  distributed.written_by_process_zero(  # multi-host: one writer, then every process loads it
      lambda: models_lib.save_encoder(os.path.join(workdir, VICTIM_DIR), backbone, manifest,
                                      overwrite=True), "demo victim written")
  # Collapse check on the held-out photo crops, through the saved encoder as every later stage sees it.
  stats = victim_lib.collapse_stats(embed(models_lib.load_encoder(os.path.join(workdir, VICTIM_DIR)),
                                          data["photos_test"]))
  victim_lib.check_not_collapsed(stats, float(vc.min_normalized_std))
  return {"epoch_losses": losses, "num_images": int(len(images)), "rep_dim": int(backbone.rep_dim),
          "architecture": vc.backbone, "collapse": stats}


# ------------------------------------------------------------------------------------------ calibration
def calibrate(config, victim, data) -> dict:
  """Sets the cost for this victim from the server's own general-purpose data (the natural-photo crops
  the victim trained on), never from any user's queries:

  * hash_center = their mean representation (see defense_config's hash_center): the hyperplanes then
    cut through the bulk of natural images, as the paper's cut through ImageNet-like representations;
    a narrow task sits in a few cells, diverse queries spread over many.
  * alpha (the noise std at coverage beta) = alpha_scale x their mean per-dimension std, so alpha means
    the same relative damage whatever the representation scale (the paper's DINO needed alpha 1000 vs
    SimSiam's 1 for exactly this reason); lam = lam_ratio x alpha keeps the paper's lam/alpha = 1e-6.
  * beta = beta_fraction x the coverage that `calibration_queries` of those images reach: a user who
    covers that much of the space is priced like a thief.
  """
  dc = config.defense
  photos = data["photos_train"][:int(dc.calibration_queries)]
  server_reps = embed(victim, photos)
  center = server_reps.mean(0)
  per_dim_std = float(server_reps.std(0).mean())
  alpha = float(dc.alpha_scale) * per_dim_std
  lam = float(dc.lam_ratio) * alpha
  probe_cfg = defense_lib.defense_config(
      "simsiam", num_projections=int(dc.num_projections), num_hyperplanes=int(dc.num_hyperplanes),
      lam=lam, alpha=alpha, beta=100.0, hash_center=[float(v) for v in center], seed=int(dc.seed))
  api = defense_lib.DefendedEncoder(None, probe_cfg, server_reps.shape[1], capacity=1)
  api.query_representations("calibration", server_reps)
  coverage = api.coverage("calibration")
  beta = float(dc.beta_fraction) * coverage
  if beta <= 0:
    raise ValueError(f"calibration: the server's own images cover {coverage}% of the buckets; cannot "
                     "set beta (use fewer hyperplanes)")
  return {"center": [float(v) for v in center], "per_dim_std": per_dim_std,
          "mean_norm": float(np.linalg.norm(server_reps, axis=1).mean()),
          "alpha": alpha, "lam": lam, "beta": beta, "calibration_coverage": coverage,
          "calibration_queries": int(len(photos)), "alpha_scale": float(dc.alpha_scale),
          "lam_ratio": float(dc.lam_ratio), "beta_fraction": float(dc.beta_fraction)}


def defended_config(config, calib: dict):
  dc = config.defense
  return defense_lib.defense_config(
      "simsiam", num_projections=int(dc.num_projections), num_hyperplanes=int(dc.num_hyperplanes),
      lam=calib["lam"], alpha=calib["alpha"], beta=calib["beta"], hash_center=calib["center"],
      transform=str(dc.transform), seed=int(dc.seed))


# ------------------------------------------------------------------------------------------ legit users
def legit_users(config, victim, data, defense_cfg, api=None) -> dict:
  """The digits user through the undefended victim and through B4B (images sent to the API), and
  paired bootstrap samples of its top-1 drop (test images and probe seeds resampled). api: a B4B API
  taking uint8 images (the served one with served=1; else a DefendedEncoder on normalised images)."""
  norm = normalizer(victim)
  probe_cfg = config.probe
  clean_train, clean_test = embed(victim, data["digits_train"]), embed(victim, data["digits_test"])
  y_train, y_test = data["digits_train_y"], data["digits_test_y"]
  none = legit_lib.legit_user(clean_train, y_train, clean_test, y_test, defense_config=None,
                              probe_cfg=probe_cfg, return_responses=True)
  images = (data["digits_train"], data["digits_test"]) if api is not None else (
      norm(data["digits_train"]), norm(data["digits_test"]))
  b4b = legit_lib.legit_user(
      images[0], y_train, images[1], y_test,
      defense_config=defense_cfg, probe_cfg=probe_cfg, through_images=True,
      encoder_fn=victim, rep_dim=victim.rep_dim, api=api,
      query_batch_size=int(config.query_batch_size), user="legit-digits", return_responses=True)
  # Per seed and test image: right or wrong (the probe is deterministic, so refitting it on the same
  # responses gives the classifiers behind the numbers above).
  correct = []
  for user in (none, b4b):
    received_train, received_test = user["responses"]
    fitted = linear_probe.run_probe(received_train, y_train, received_test, y_test, probe_cfg)
    correct.append(np.stack([c.predict(received_test) == y_test for c in fitted.classifiers]))
  drop = claims_lib.accuracy_drop_samples(*correct, num_samples=int(config.claims.bootstrap_samples),
                                          seed=int(config.seed))
  return {"none": _strip(none), "b4b": _strip(b4b),
          "scale": legit_lib.representation_scale(clean_train),
          "drop_samples": [float(v) for v in drop]}


def _strip(result: dict) -> dict:
  return {k: v for k, v in result.items() if k not in ("responses",)}


# ------------------------------------------------------------------------------------------ attacks
def steal_config(config, workdir: str, *, defended: bool, accounts: int, defense_cfg, served=None):
  """The stealing job's config (configs/steal_simsiam.py) pointed at the demo's victim and photos
  (served: a served.Served whose API URL the thief queries instead of an in-process API)."""
  ac = config.attack
  c = steal_simsiam.get_config("tiny")
  c.seed = int(config.seed)
  c.image_size = int(config.image_size)
  c.victim.build_tiny = ""
  c.victim.encoder_dir = os.path.join(workdir, VICTIM_DIR)
  c.data.name, c.data.split, c.data.limit = "sklearn_photos", "query", int(ac.num_queries)
  c.data.image_size = int(ac.pool_image_size)
  c.eval.name, c.eval.split, c.eval.limit = "sklearn_photos", "test", int(ac.num_eval_images)
  c.eval.image_size = int(config.image_size)
  c.eval.view_transform = {"mode": "resize", "size": int(config.image_size)}
  c.defense = defense_cfg if defended else defense_lib.defense_config("none")
  c.attack.protocol = "query_once"  # the demo's thief: each crop sent once (charged), E epochs on them
  if served is not None:
    c.victim.api_url, c.victim.api_admin_token_file = served.url, served.token_file
  c.attack.num_queries = int(ac.num_queries)
  c.attack.num_accounts = int(accounts)
  c.attack.num_queries_mapping = int(ac.num_queries_mapping)
  c.attack.query_batch_size = int(config.query_batch_size)
  # The thief's diverse queries: random crops (and flips) of natural-photo crops.
  c.attack.query_transform = {"mode": "random_resized_crop", "size": int(config.image_size),
                              "flip": True, "scale": tuple(ac.query_crop_scale)}
  c.attack.mapper.kind = str(ac.mapper)
  c.attack.mapper.epochs = int(ac.mapper_epochs)
  c.stolen.arch = str(ac.stolen_arch)
  c.stolen.small_input = True
  c.train.epochs = int(ac.epochs)
  c.train.batch_size = int(ac.batch_size)
  c.train.base_lr = float(ac.base_lr)
  c.num_devices = config.get("num_devices")
  c.checkpoint_every_steps = int(ac.checkpoint_every_steps)
  c.log_every_steps = 10
  c.progress_every_seconds = float(config.progress_every_seconds)
  return c


def attack_summary(results: dict) -> dict:
  return {"accounts": results["accounts"], "final_loss": results["final_loss"],
          "similarity_final": results["similarity_final"], "query_log": results["query_log"],
          "num_queries": results["plan"]["num_queries"] if isinstance(results.get("plan"), dict)
          else None, "epoch_losses": results["epoch_losses"]}


# ------------------------------------------------------------------------------------------ probes
def victim_references(victim, data) -> dict:
  return {k: embed(victim, data[k]) for k in ("digits_train", "digits_test", "photos_test")}


def probe_encoder(encoder, data, probe_cfg, victim_reps) -> dict:
  """Digits probe of a copy, and its fidelity to the victim on digits and on held-out photo crops
  (photos: fit on the first half, scored on the second; the per-row residuals are kept for the
  claims' paired bootstrap)."""
  tr, te = embed(encoder, data["digits_train"]), embed(encoder, data["digits_test"])
  probe = linear_probe.run_probe(tr, data["digits_train_y"], te, data["digits_test_y"], probe_cfg)
  photos = embed(encoder, data["photos_test"])
  half = len(photos) // 2
  v_photos = victim_reps["photos_test"]
  resid = fidelity_lib.linear_residuals(photos[:half], v_photos[:half], photos[half:], v_photos[half:])
  return {"test_top1_mean": probe.test_top1_mean, "test_top1_std": probe.test_top1_std,
          "fidelity_r2": fidelity_lib.linear_r2(tr, victim_reps["digits_train"], te,
                                                victim_reps["digits_test"]),
          "fidelity_r2_photos": fidelity_lib.r2_from_terms(resid, v_photos[half:]),
          "_photo_residuals": resid}


def probes(config, victim, data, attack_dirs: Dict[str, str], workdir: str) -> dict:
  """Every copy (and a random network) probed; paired bootstrap samples of the photo-fidelity gain of
  the undefended copy over each other one (the same resampled held-out crops for every copy)."""
  victim_reps = victim_references(victim, data)
  out = {name: probe_encoder(models_lib.load_encoder(os.path.join(d, "stolen_encoder")), data,
                             config.probe, victim_reps) for name, d in attack_dirs.items()}
  out["random_init"] = random_baseline(config, data, config.probe, victim_reps, workdir)
  resid = {name: entry.pop("_photo_residuals") for name, entry in out.items()}
  scored = victim_reps["photos_test"][len(victim_reps["photos_test"]) // 2:]
  out["fidelity_gain_samples"] = {
      other: [float(v) for v in claims_lib.fidelity_gain_samples(
          resid["attack_undefended"], resid[other], scored,
          num_samples=int(config.claims.bootstrap_samples), seed=int(config.seed))]
      for other in ("random_init", "attack_b4b", "attack_sybil")}
  return out


def random_baseline(config, data, probe_cfg, victim_reps, workdir: str) -> dict:
  """A randomly initialised network of the stolen architecture: what stealing must beat."""
  directory = os.path.join(workdir, "random_encoder")
  distributed.written_by_process_zero(lambda: models_lib.save_random_encoder(
      directory, str(config.attack.stolen_arch), image_size=int(config.image_size),
      seed=int(config.seed) + 7, source={"kind": "random init baseline"}), "demo random encoder")
  return probe_encoder(models_lib.load_encoder(directory), data, probe_cfg, victim_reps)


# ------------------------------------------------------------------------------------------ remapping
def remapping(config, victim, data, defense_cfg) -> dict:
  rc = config.remap
  train_x, test_x = embed(victim, data["digits_train"]), embed(victim, data["digits_test"])
  base = defense_cfg.copy_and_resolve_references()
  base.pad_dim = int(rc.pad_dim)
  return remap_lib.remap_experiment(
      train_x, data["digits_train_y"], test_x, data["digits_test_y"], base_defense_config=base,
      transforms=tuple(rc.transforms), noise_modes=tuple(rc.noise_modes), overlaps=tuple(rc.overlaps),
      classifier_cfg=config.probe, mapper_kind=str(rc.mapper),
      query_batch_size=int(config.query_batch_size), seed=int(config.seed))
