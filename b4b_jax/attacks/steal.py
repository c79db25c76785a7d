r"""The end-to-end stealing attack (paper section 4.4, Tables 1 and 7) against the defended API.

  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2 --workdir=DIR

Phases (each resumable; killing the run and starting it again with the same workdir continues and ends
with the same result as an uninterrupted run):

1. Queries. The attacker plans its queries (queries.plan_queries: seeded order, budget split over its
   accounts, the sybil overlap) and sends them through `DefendedEncoder` in batches, every query charged
   to the sending account. Extra accounts first query the overlap and fit a mapper into account 1's
   space (protocol.Attacker). Query-once protocol (default): each planned image is sent once and its
   response kept, so "50k queries" means 50k charged queries. Saved: the responses, the mappers, the
   API's defense state.
2. Training. The stolen ResNet (from scratch) learns to reproduce the responses for E epochs: one jitted
   step over the "data" mesh (train_state.make_train_step), seeded epoch orders, optional attacker-side
   SimCLR views. With `requery_each_epoch`, every view of every epoch is a new charged query instead
   (the API's state is then part of every training checkpoint). Checkpoints every N steps and on
   preemption.
3. Evaluation and export. Cosine similarity of stolen and victim representations on held-out images
   (raw, and after a ridge-regression alignment that undoes any per-user transform), the stolen encoder
   as an encoder directory (workdir/stolen_encoder, for the linear probes), results.json, report.md.

Multi-host: every process runs the same (deterministic) API simulation, so all hold identical responses;
each process feeds its own slice of every global batch; only process 0 writes results.
"""
import os
import time
from typing import Any, Dict

import jax
import ml_collections
import numpy as np
from absl import logging
from flax import nnx
from jax.experimental import multihost_utils

from b4b_jax import data as data_lib
from b4b_jax import defense as defense_lib
from b4b_jax import models as models_lib
from b4b_jax.attacks import losses as losses_lib
from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.attacks import protocol
from b4b_jax.attacks import queries as queries_lib
from b4b_jax.attacks import train_state as ts
from b4b_jax.utils import checkpoint as ckpt_lib
from b4b_jax.utils import distributed
from b4b_jax.utils import files
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib
from b4b_jax.utils.versions import library_versions

STAGE = "steal"
RESULTS = "results.json"
REPORT = "report.md"
STOLEN_ENCODER = "stolen_encoder"
_QUERIES_DIR = os.path.join("attack", "queries")
_API_AFTER_QUERIES = os.path.join("attack", "api_after_queries")
_API_TRAIN = os.path.join("attack", "api_train")
_CHECKPOINTS = "checkpoints"


def after_step(step: int) -> None:
  """Called after every training step (a seam for tests that simulate a crash at a given step)."""
  del step


# --------------------------------------------------------------------------------------------------
# Set-up: victim, API, images
# --------------------------------------------------------------------------------------------------
def load_victim(config: ml_collections.ConfigDict, workdir: str) -> models_lib.Encoder:
  """The victim encoder directory; the CPU variant builds a random tiny one into the workdir first."""
  vc = config.victim
  if vc.get("build_tiny"):
    directory = os.path.join(workdir, "victim_encoder")
    if not os.path.isdir(directory) and jax.process_index() == 0:
      size = int(config.image_size)
      rngs = nnx.Rngs(int(vc.tiny_seed))
      manifest = {"preprocessing": models_lib.default_preprocessing(size, resize=None),
                  "source": {"kind": "random init (tiny CPU victim)", "seed": int(vc.tiny_seed)}}
      if vc.build_tiny.startswith("vit"):
        model = models_lib.create_vit(vc.build_tiny, rngs=rngs, patch_size=int(vc.tiny_patch_size),
                                      img_size=size)
        manifest["representation"] = {"method": "dino_representation", "n_last_blocks": 4}
      else:
        model = models_lib.create_resnet(vc.build_tiny, rngs=rngs, small_input=True)
      models_lib.save_encoder(directory, model, manifest)
    multihost_utils.sync_global_devices("tiny victim written")
    return _load_encoder_cached(directory)
  if not vc.get("encoder_dir"):
    raise ValueError("config.victim.encoder_dir is empty: point it at a converted encoder directory "
                     "(python -m weight_conversion.convert ...) or set victim.build_tiny")
  return _load_encoder_cached(vc.encoder_dir)


_ENCODERS: Dict[tuple, models_lib.Encoder] = {}


def _load_encoder_cached(directory: str) -> models_lib.Encoder:
  """load_encoder, reusing the object for the same directory and weights within a process (a resumed
  run then reuses the API's compiled victim+defense call)."""
  key = (os.path.abspath(directory), models_lib.read_manifest(directory)["params_sha256"])
  if key not in _ENCODERS:
    _ENCODERS.clear()
    _ENCODERS[key] = models_lib.load_encoder(directory)
  return _ENCODERS[key]


def make_api(victim: models_lib.Encoder, config: ml_collections.ConfigDict):
  # The Encoder itself (with .apply_fn/.params): the API fuses its forward with the defense in one
  # jitted call, weights passed as arguments, and shares that compilation between API instances.
  return defense_lib.DefendedEncoder(victim, config.defense, victim.rep_dim,
                                     capacity=max(8, int(config.attack.num_accounts)))


def _load_split(cfg: ml_collections.ConfigDict, seed: int) -> np.ndarray:
  kind, _ = data_lib.sources.parse_name(cfg.name, cfg.get("data_dir"))
  kwargs = {"data_dir": cfg.get("data_dir"), "limit": cfg.get("limit"), "seed": seed}
  if kind == "bundled":
    kwargs["image_size"] = cfg.get("image_size")
  else:
    kwargs["transform"] = cfg.get("transform")
    kwargs["image_size"] = cfg.get("image_size") if cfg.get("transform") is None else None
    kwargs["per_class"] = cfg.get("per_class")
  images, _ = data_lib.load_arrays(cfg.name, cfg.split, **kwargs)
  if len(images) == 0:
    raise ValueError(f"dataset {cfg.name!r} split {cfg.split!r} gave no images")
  return images


def _transform(spec, size: int):
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  return data_lib.make_transform(spec, size=size)


class Views:
  """Images the attacker sends: uint8 views of pool images, normalised as the victim expects.

  Query-once: one fixed view per image (`query_transform`, epoch 0), cached for the training set.
  Re-query: a fresh view per epoch (`requery_transform`, seeds (seed, epoch, pool index)).
  """

  def __init__(self, pool: np.ndarray, config, mean, std, input_size: int):
    self.pool = pool
    self.seed = int(config.seed)
    self.mean, self.std = mean, std
    self.query_transform = _transform(config.attack.query_transform, input_size)
    self.requery_transform = _transform(config.attack.requery_transform, input_size)
    self._cache_index = None
    self._cache = None

  def cache(self, indices: np.ndarray) -> None:
    """Precomputes the epoch-0 views of `indices` (the query-once training set)."""
    self._cache = data_lib.apply_transform(self.pool[indices], self.query_transform, seed=self.seed,
                                           ids=indices, epoch=0)
    self._cache_index = np.full(len(self.pool), -1, np.int64)
    self._cache_index[indices] = np.arange(len(indices))

  def uint8(self, indices: np.ndarray, epoch: int) -> np.ndarray:
    if epoch == 0:
      if self._cache_index is not None and np.all(self._cache_index[indices] >= 0):
        return self._cache[self._cache_index[indices]]
      return data_lib.apply_transform(self.pool[indices], self.query_transform, seed=self.seed,
                                      ids=indices, epoch=0)
    return data_lib.apply_transform(self.pool[indices], self.requery_transform, seed=self.seed,
                                    ids=indices, epoch=epoch)

  def normalized(self, images_uint8: np.ndarray) -> np.ndarray:
    return data_lib.normalize(images_uint8, self.mean, self.std)

  def __call__(self, indices: np.ndarray, epoch: int) -> np.ndarray:
    return self.normalized(self.uint8(indices, epoch))


# --------------------------------------------------------------------------------------------------
# Evaluation helpers
# --------------------------------------------------------------------------------------------------
def embed_images(fn, params, batch_stats, images: np.ndarray, mesh, batch_size: int) -> np.ndarray:
  """Stolen-model representations of uint8 images, padded batches over the mesh; all on every host."""
  n_dev = mesh.devices.size
  batch_size = max(n_dev, batch_size // n_dev * n_dev)
  nproc, pidx = jax.process_count(), jax.process_index()
  out = []
  for start in range(0, len(images), batch_size):
    chunk = images[start:start + batch_size]
    padded = np.zeros((batch_size,) + images.shape[1:], images.dtype)
    padded[:len(chunk)] = chunk
    local = padded.reshape(nproc, -1, *images.shape[1:])[pidx]
    reps = fn(params, batch_stats, distributed.global_batch(local, mesh))
    out.append(np.asarray(multihost_utils.process_allgather(reps, tiled=True))[:len(chunk)])
  return np.concatenate(out)


def victim_representations(victim, images_normalized: np.ndarray, batch_size: int) -> np.ndarray:
  return np.concatenate([np.asarray(victim(images_normalized[i:i + batch_size]))
                         for i in range(0, len(images_normalized), batch_size)])


def _mean_cosine(a, b) -> float:
  num = np.sum(a * b, axis=1)
  den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return float(np.mean(num / np.maximum(den, 1e-12)))


def clean_response_space(config, rep_dim: int, victim_reps: np.ndarray) -> np.ndarray:
  """Account 1's responses without noise: its per-user transform applied to clean victim outputs.

  The evaluator (not the attacker) knows the API's secrets; this is the space the stolen model was
  trained to reproduce, so it measures the theft whatever transform the API applies.
  """
  if not config.defense.enabled or config.defense.transform == "identity":
    return np.asarray(victim_reps, np.float32)
  user = protocol.account_name(0)
  params = defense_lib.user_transform_params(config.defense, rep_dim, user)
  return defense_lib.apply_user_transform(config.defense, rep_dim, params, victim_reps)


def similarity(stolen: np.ndarray, victim: np.ndarray, responses: np.ndarray, *,
               centered: bool) -> Dict[str, float]:
  """Mean cosine similarities on held-out images.

  cosine_to_victim: stolen vs the victim's own representation (dims permitting; the paper's
  undefended setting, where the responses are the victim's representations).
  cosine_to_responses: stolen vs account 1's noise-free responses (centred over the images when the
  attack trained on centred targets).
  """
  out: Dict[str, float] = {}
  if stolen.shape == victim.shape:
    out["cosine_to_victim"] = _mean_cosine(stolen, victim)
  if centered:
    stolen = stolen - stolen.mean(0)
    responses = responses - responses.mean(0)
  out["cosine_to_responses"] = _mean_cosine(stolen, responses)
  return out


# --------------------------------------------------------------------------------------------------
# The job
# --------------------------------------------------------------------------------------------------
def _step_config(config, input_size, mean, std, total_steps) -> ts.StepConfig:
  tc = config.train
  return ts.StepConfig(
      loss=tc.loss, temperature=tc.get("temperature"),
      learning_rate=ts.scaled_learning_rate(tc.base_lr, tc.batch_size), total_steps=int(total_steps),
      momentum=float(tc.momentum), weight_decay=float(tc.weight_decay),
      mean=tuple(float(m) for m in mean), std=tuple(float(s) for s in std), augment=bool(tc.augment),
      input_size=int(input_size), center_targets=bool(tc.center_targets))


def _validate(config) -> None:
  """Checks what would otherwise fail only after the (charged) query phase."""
  ac, tc = config.attack, config.train
  losses_lib.get_loss(tc.loss, temperature=tc.get("temperature"))
  if ac.mapper.kind not in mapper_lib.MAPPER_KINDS:
    raise ValueError(f"unknown attack.mapper.kind {ac.mapper.kind!r}; choose one of "
                     f"{mapper_lib.MAPPER_KINDS}")
  if not 0.0 < ac.mapper.val_fraction < 1.0:
    raise ValueError(f"attack.mapper.val_fraction must be in (0, 1), got {ac.mapper.val_fraction}")
  if ac.num_accounts > 1:
    n_map = int(ac.num_queries_mapping)
    n_val = int(round(n_map * ac.mapper.val_fraction))
    if n_val < 1 or n_map - n_val < ac.mapper.batch_size:
      raise ValueError(f"attack.num_queries_mapping={n_map} is too small to fit the sybil mappers "
                       f"(validation {ac.mapper.val_fraction:.0%}, batch {ac.mapper.batch_size})")
  if tc.epochs < 1 or tc.batch_size < 2:
    raise ValueError(f"train.epochs must be >= 1 and train.batch_size >= 2, got {tc.epochs}, "
                     f"{tc.batch_size}")
  if not tc.base_lr > 0:
    raise ValueError(f"train.base_lr must be > 0, got {tc.base_lr}")
  if ac.query_batch_size < 1:
    raise ValueError(f"attack.query_batch_size must be >= 1, got {ac.query_batch_size}")


def run_steal(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the attack into `workdir`; returns the results dict (also in results.json)."""
  _validate(config)
  t_start = time.time()
  timings: Dict[str, float] = {}
  is_writer = jax.process_index() == 0
  mesh = distributed.data_mesh(config.get("num_devices"))
  global_batch_size = int(config.train.batch_size)
  distributed.check_global_batch(global_batch_size, mesh)
  writer = metrics_lib.MetricsWriter(workdir)
  seed = int(config.seed)

  victim = load_victim(config, workdir)
  pre = victim.manifest["preprocessing"]
  input_size = int(pre["input_size"])
  mean, std = data_lib.normalization(pre)
  api = make_api(victim, config)
  target_dim = api.out_dim

  pool = _load_split(config.data, seed)
  ac = config.attack
  plan = queries_lib.plan_queries(len(pool), int(ac.num_queries), num_accounts=int(ac.num_accounts),
                                  num_queries_mapping=int(ac.num_queries_mapping), seed=seed)
  logging.info("query plan: %s", plan.summary())
  views = Views(pool, config, mean, std, input_size)
  requery = bool(ac.requery_each_epoch)
  mapper_kwargs = dict(kind=ac.mapper.kind, epochs=int(ac.mapper.epochs),
                       learning_rate=float(ac.mapper.learning_rate),
                       batch_size=int(ac.mapper.batch_size),
                       val_fraction=float(ac.mapper.val_fraction), seed=seed)
  train_indices = plan.train_indices
  row_accounts = protocol.accounts_of_rows(plan)
  if len(train_indices) < global_batch_size:
    raise ValueError(f"{len(train_indices)} training images are fewer than one batch "
                     f"({global_batch_size})")

  timings["setup"] = time.time() - t_start
  # ---------------------------------------------------------------- phase 1: queries
  t_phase = time.time()
  query_progress = progress_lib.Progress(
      f"{STAGE}/queries", -(-plan.num_queries // int(ac.query_batch_size)) + len(plan.accounts),
      unit="batch", every_seconds=float(config.get("progress_every_seconds", 10.0)))
  counter = {"batches": 0}

  def on_batch(entry: protocol.QueryLogEntry):
    counter["batches"] += 1
    prefix = f"account{entry.account}"
    writer.write_scalars(counter["batches"], {f"{prefix}/coverage": entry.coverage,
                                              f"{prefix}/sigma": entry.sigma,
                                              f"{prefix}/charged_queries": entry.num_queries},
                         stage=f"{STAGE}/queries")
    query_progress.update(counter["batches"], account=entry.account, coverage=entry.coverage,
                          sigma=entry.sigma)

  attacker = protocol.Attacker(api, plan, views, batch_size=int(ac.query_batch_size), on_batch=on_batch)
  queries_dir = os.path.join(workdir, _QUERIES_DIR)
  if not requery:
    views.cache(train_indices)
  if os.path.isdir(queries_dir) and ckpt_lib.Checkpointer(queries_dir).latest_step() is not None:
    logging.info("resuming: query phase already done (%s)", queries_dir)
    saved, meta = ckpt_lib.load_pytree(queries_dir)
    api = defense_lib.DefendedEncoder.restore(os.path.join(workdir, _API_AFTER_QUERIES),
                                              victim)
    attacker.api = api
    targets = None if requery else np.asarray(saved["targets"], np.float32)
    protocol.restore_mappers(attacker, saved.get("mappers", {}), meta.get("mapper_metrics", {}),
                             kind=ac.mapper.kind, in_dim=target_dim, out_dim=target_dim)
    attacker.log = [protocol.QueryLogEntry(**e) for e in meta.get("query_log", [])]
  else:
    t0 = time.time()
    if requery:
      attacker.mapping_phase_only(**mapper_kwargs)
      targets = None
    else:
      targets = attacker.collect_training_targets(**mapper_kwargs)
    logging.info("query phase: %d charged queries in %.1fs", plan.num_queries, time.time() - t0)
    api.save(os.path.join(workdir, _API_AFTER_QUERIES))
    tree = {"mappers": protocol.mapper_states(attacker)}
    if targets is not None:
      tree["targets"] = targets
    meta = {"query_log": [e.to_dict() for e in attacker.log],
            "mapper_metrics": {str(k): m.metrics for k, m in attacker.mappers.items()},
            "accounts_after_queries": attacker.account_summary(), "seconds": time.time() - t0}
    ckpt_lib.save_pytree(queries_dir, tree, meta)
  accounts_after_queries = attacker.account_summary()
  timings["queries"] = time.time() - t_phase
  t_phase = time.time()

  # ---------------------------------------------------------------- phase 2: training
  steps_per_epoch = len(train_indices) // global_batch_size
  total_steps = steps_per_epoch * int(config.train.epochs)
  step_cfg = _step_config(config, input_size, mean, std, total_steps)
  model = _create_stolen(config, target_dim, seed)
  graphdef, params, batch_stats = models_lib.split_model(model)
  state = jax.tree.map(np.asarray, ts.init_state(params, batch_stats, step_cfg))
  train_step = ts.make_train_step(graphdef, step_cfg, mesh)
  embed_fn = ts.make_embed_fn(graphdef, mesh, step_cfg.mean, step_cfg.std)

  eval_images = _load_split(config.eval, seed)
  eval_images = data_lib.apply_transform(eval_images, _transform(config.eval.view_transform, input_size),
                                         seed=seed)
  victim_eval = victim_representations(victim, views.normalized(eval_images),
                                       int(config.eval.batch_size))
  responses_eval = clean_response_space(config, victim.rep_dim, victim_eval)
  centered = bool(config.train.center_targets)

  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, _CHECKPOINTS),
                               max_to_keep=int(config.get("checkpoints_to_keep", 2)))
  meta: Dict[str, Any]
  if ckpt.latest_step() is not None:
    abstract = ckpt_lib.abstract_like(distributed.replicate(state, mesh))
    state, meta = ckpt.restore(abstract)
    logging.info("resuming training at step %d/%d", int(meta["step"]), total_steps)
    if requery:
      api = defense_lib.DefendedEncoder.restore(
          os.path.join(workdir, _API_TRAIN, f"step_{int(meta['step']):09d}"), victim)
      attacker.api = api
  else:
    state = distributed.replicate(state, mesh)
    initial = similarity(embed_images(embed_fn, state["params"], state["batch_stats"], eval_images, mesh,
                                      int(config.eval.batch_size)), victim_eval, responses_eval,
                         centered=centered)
    meta = {"step": 0, "epoch_losses": [], "partial_losses": [], "initial_eval": initial}
  timings["train_setup"] = time.time() - t_phase
  start_step = int(meta["step"])
  epoch_losses = list(meta["epoch_losses"])
  partial = list(meta["partial_losses"])
  pending = []  # device scalars of losses not yet fetched
  key = jax.random.key(seed + 1)
  train_progress = progress_lib.Progress(f"{STAGE}/train", total_steps, start_step=start_step,
                                         every_seconds=float(config.get("progress_every_seconds", 10.0)))
  max_this_run = int(config.get("max_steps_this_run", -1))
  nproc, pidx = jax.process_count(), jax.process_index()
  local_rows = global_batch_size // nproc
  order_epoch, order = None, None
  step = start_step
  stopped = None
  t_train = time.time()

  def save(step_now: int):
    partial_now = partial + [float(x) for x in jax.device_get(pending)]
    if requery:
      api.save(os.path.join(workdir, _API_TRAIN, f"step_{step_now:09d}"))
    # Host copies: the state is replicated, and orbax would otherwise slice every replica on device.
    ckpt.save(step_now, jax.device_get(state), {"step": step_now, "epoch_losses": epoch_losses,
                                "partial_losses": partial_now, "initial_eval": meta["initial_eval"]})
    ckpt.wait_until_finished()
    if requery and is_writer:
      _prune_api_states(os.path.join(workdir, _API_TRAIN), keep=ckpt.all_steps())

  while step < total_steps:
    epoch, i = divmod(step, steps_per_epoch)
    if order_epoch != epoch:
      order = np.random.default_rng([seed, 7, epoch]).permutation(len(train_indices))
      order_epoch = epoch
    rows = order[i * global_batch_size:(i + 1) * global_batch_size]
    if requery:
      images = views.uint8(train_indices[rows], epoch + 1)
      batch_targets = attacker.query_rows(row_accounts[rows], train_indices[rows], epoch=epoch + 1,
                                          images=views.normalized(images))
    else:
      images = views.uint8(train_indices[rows], 0)
      batch_targets = targets[rows]
    local = slice(pidx * local_rows, (pidx + 1) * local_rows)
    state, step_metrics = train_step(state, distributed.global_batch(images[local], mesh),
                                     distributed.global_batch(batch_targets[local], mesh), key)
    step += 1
    pending.append(step_metrics["loss"])
    if step == start_step + 1:
      jax.block_until_ready(step_metrics)
      timings["first_step_incl_compile"] = time.time() - t_train
    if i + 1 == steps_per_epoch:  # epoch done: one host sync for its mean loss
      losses = partial + [float(x) for x in jax.device_get(pending)]
      if not np.all(np.isfinite(losses)):
        raise FloatingPointError(f"non-finite stealing loss in epoch {epoch + 1} (step {step})")
      epoch_losses.append(float(np.mean(losses)))
      partial, pending = [], []
      writer.write_scalars(step, {"epoch_loss": epoch_losses[-1], "epoch": epoch + 1}, stage=STAGE)
    if step % int(config.log_every_steps) == 0 or step == total_steps:
      scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      writer.write_scalars(step, scalars, stage=STAGE, check_finite=True)
      if requery:
        for s in attacker.account_summary():
          writer.write_scalars(step, {f"account{s['account']}/coverage": s["coverage"],
                                      f"account{s['account']}/sigma": s["sigma"]}, stage=STAGE)
      train_progress.update(step, loss=scalars["loss"], epoch=epoch + 1)
    after_step(step)
    if step < total_steps:
      if step % int(config.checkpoint_every_steps) == 0:
        save(step)
      if ckpt.reached_preemption(step):
        save(step)
        stopped = "preempted"
        break
      if max_this_run > 0 and step - start_step >= max_this_run:
        save(step)
        stopped = "max_steps_this_run"
        break
  train_seconds = time.time() - t_train
  timings["train"] = train_seconds
  t_phase = time.time()
  if stopped:
    ckpt.close()
    writer.close()
    logging.info("stopped at step %d/%d (%s); run again with the same workdir to resume", step,
                 total_steps, stopped)
    return {"status": stopped, "step": step, "total_steps": total_steps}
  if ckpt.latest_step() != total_steps:
    save(total_steps)
  ckpt.close()

  # ---------------------------------------------------------------- phase 3: evaluation and export
  stolen_eval = embed_images(embed_fn, state["params"], state["batch_stats"], eval_images, mesh,
                             int(config.eval.batch_size))
  final = similarity(stolen_eval, victim_eval, responses_eval, centered=centered)
  timings["final_eval"] = time.time() - t_phase
  params_host = jax.device_get(state["params"])
  stats_host = jax.device_get(state["batch_stats"])
  results = {
      "status": "done", "step": step, "total_steps": total_steps, "steps_per_epoch": steps_per_epoch,
      "config": config.to_dict(), "versions": library_versions(), "plan": plan.summary(),
      "protocol": "requery_each_epoch" if requery else "query_once",
      "accounts_after_queries": accounts_after_queries, "accounts": attacker.account_summary(),
      "api": {k: v for k, v in api.stats().items() if k != "config"},
      "query_log": [e.to_dict() for e in attacker.log],
      "epoch_losses": epoch_losses, "final_loss": epoch_losses[-1] if epoch_losses else None,
      "similarity_initial": meta["initial_eval"], "similarity_final": final,
      "num_eval_images": int(len(eval_images)), "target_dim": int(target_dim),
      "stolen_architecture": model.architecture(), "timings_this_run": timings,
      "seconds_this_run": time.time() - t_start, "num_devices": int(mesh.devices.size),
      "num_processes": int(jax.process_count()),
  }
  if is_writer:
    manifest = {"preprocessing": dict(pre),
                "source": {"kind": "stolen", "workdir": os.path.abspath(workdir),
                           "victim": victim.manifest.get("source"), "protocol": results["protocol"],
                           "num_queries": plan.num_queries, "num_accounts": len(plan.accounts),
                           "defense_enabled": bool(config.defense.enabled)}}
    models_lib.save_encoder(os.path.join(workdir, STOLEN_ENCODER), (graphdef, params_host, stats_host),
                            manifest, overwrite=True)
    files.atomic_write_json(os.path.join(workdir, RESULTS), results)
    files.atomic_write_text(os.path.join(workdir, REPORT), render_report(results))
  writer.close()
  return results


def _create_stolen(config, target_dim: int, seed: int):
  sc = config.stolen
  small = bool(sc.get("small_input", False))
  natural = nnx.eval_shape(lambda: models_lib.create_resnet(sc.arch, rngs=nnx.Rngs(0),
                                                            small_input=small)).feature_dim
  out_dim = sc.get("out_dim", -1)
  if out_dim is None or out_dim < 0:  # auto: the 1x1 conv head only where the dims differ (DINO)
    out_dim = None if natural == target_dim else int(target_dim)
  return models_lib.create_resnet(sc.arch, rngs=nnx.Rngs(seed), out_dim=out_dim, small_input=small)


def _prune_api_states(directory: str, keep) -> None:
  import shutil  # pylint: disable=g-import-not-at-top
  keep_names = {f"step_{int(s):09d}" for s in keep}
  for name in os.listdir(directory):
    if name.startswith("step_") and name not in keep_names:
      shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


def render_report(r: Dict[str, Any]) -> str:
  c = r["config"]
  lines = [
      "# Stealing attack", "",
      f"- victim: `{c['victim'].get('encoder_dir') or c['victim'].get('build_tiny')}`; stolen: "
      f"`{r['stolen_architecture']['name']}` -> {r['target_dim']}-d",
      f"- defense: {'B4B' if c['defense']['enabled'] else 'none'} (transform "
      f"`{c['defense']['transform']}`, lam {c['defense']['lam']}, alpha {c['defense']['alpha']}, "
      f"beta {c['defense']['beta']}%)",
      f"- protocol: {r['protocol']}; {r['plan']['num_queries']} planned queries over "
      f"{len(r['accounts'])} account(s); loss `{c['train']['loss']}`; {c['train']['epochs']} epochs, "
      f"{r['total_steps']} steps", "",
      "| account | charged queries | coverage % | sigma | mapper val MSE | mapper val cos (unmapped) |",
      "|---|---|---|---|---|---|",
  ]
  for a in r["accounts"]:
    m = a.get("mapper", {})
    unmapped = m.get("val_cosine_unmapped", float("nan")) if m else None
    mapper_cols = (f"{m['val_mse']:.4g} | {m['val_cosine']:.4f} ({unmapped:.4f})" if m else "- | -")
    lines.append(f"| {a['account']} | {a['charged_queries']} | {a['coverage']:.2f} | {a['sigma']:.4g} | "
                 f"{mapper_cols} |")
  fi, fl = r["similarity_initial"], r["similarity_final"]
  lines += ["", "| similarity to the victim (held-out) | initial | final |", "|---|---|---|"]
  for k in sorted(fl):
    lines.append(f"| {k} | {fi.get(k, float('nan')):.4f} | {fl[k]:.4f} |")
  losses = r["epoch_losses"]
  if losses:
    lines += ["", f"Loss: first epoch {losses[0]:.4f}, last epoch {losses[-1]:.4f}."]
  lines += ["", "Probe the stolen encoder (`stolen_encoder/`) with the evaluation jobs for the paper's "
            "downstream accuracies.", ""]
  return "\n".join(lines)
