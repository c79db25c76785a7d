r"""Job "steal": the end-to-end stealing attack (paper section 4.4, Tables 1 and 7) against the API.

  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2 --workdir=DIR

`run(config, workdir)` reads top to bottom: set-up, then three phases, each resumable (killing the run
and starting it again with the same workdir continues and ends with the same result as an
uninterrupted run):

1. Queries. The attacker plans its queries (queries.plan_queries: seeded order, budget split over its
   accounts, the sybil overlap) and sends them through `DefendedEncoder` in batches, every query charged
   to the sending account. Extra accounts first query the overlap and fit a mapper into account 1's
   space (protocol.Attacker). Query-once protocol (default): each planned image is sent once and its
   response kept, so "50k queries" means 50k charged queries. Saved: the responses, the mappers, the
   API's defense state.
2. Training. The stolen ResNet (from scratch) learns to reproduce the responses for E epochs: one jitted
   step over the "data" mesh (attacks/train_state.py), seeded epoch orders, optional attacker-side
   SimCLR views. With `requery_each_epoch`, every view of every epoch is a new charged query instead
   (the API's state is then part of every training checkpoint). Checkpoints every N steps, on
   preemption and after `max_steps_this_run` steps.
3. Evaluation and export. Cosine similarity of the stolen model's representations on held-out images to
   the victim's (dims permitting) and to account 1's noise-free responses (the victim's representations
   under account 1's transform, which the evaluator knows); the stolen encoder as an encoder directory
   (workdir/stolen_encoder, for the linear probes), results.json, report.md.

Multi-host: every process runs the same (deterministic) API simulation, so all hold identical responses;
each process feeds its own slice of every global batch; only process 0 writes results.
"""
import dataclasses
import os
import shutil
import time
from typing import Any, Dict, List, Optional

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
from b4b_jax.evaluation import embeddings
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
VICTIM_ENCODER = "victim_encoder"   # the CPU variant's random victim
_QUERIES_DIR = os.path.join("attack", "queries")
_API_AFTER_QUERIES = os.path.join("attack", "api_after_queries")
_API_TRAIN = os.path.join("attack", "api_train")
_CHECKPOINTS = "checkpoints"


# ==================================================================================================
# The config check (run by run_job before the workdir is claimed)
# ==================================================================================================
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses every value that would otherwise fail later (after the workdir is claimed, or after the
  charged query phase), with a ValueError naming the field."""
  ac, tc = config.attack, config.train
  defense_lib.validate_config(config.defense)
  if not 1 <= ac.num_accounts <= queries_lib.MAX_ACCOUNTS:
    raise ValueError(f"attack.num_accounts must be in 1..{queries_lib.MAX_ACCOUNTS}, got "
                     f"{ac.num_accounts}")
  if ac.num_queries < 1:
    raise ValueError(f"attack.num_queries must be >= 1, got {ac.num_queries}")
  if ac.query_batch_size < 1:
    raise ValueError(f"attack.query_batch_size must be >= 1, got {ac.query_batch_size}")
  losses_lib.get_loss(tc.loss, temperature=tc.get("temperature"))
  if ac.mapper.kind not in mapper_lib.TRAINED_KINDS:
    raise ValueError(f"unknown attack.mapper.kind {ac.mapper.kind!r}; choose one of "
                     f"{mapper_lib.TRAINED_KINDS}")
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
  for name in ("checkpoint_every_steps", "log_every_steps"):
    if config[name] < 1:
      raise ValueError(f"{name} must be >= 1, got {config[name]}")
  if config.eval.batch_size < 1:
    raise ValueError(f"eval.batch_size must be >= 1, got {config.eval.batch_size}")


# ==================================================================================================
# The job
# ==================================================================================================
def run(config: ml_collections.ConfigDict, workdir: str) -> Dict[str, Any]:
  """Runs (or resumes) the attack into `workdir`; returns the results dict (also in results.json)."""
  t_start = time.time()
  timings = {}
  setup = set_up(config, workdir)
  timings["setup"] = time.time() - t_start

  t = time.time()
  queried = query_phase(config, workdir, setup)
  timings["queries"] = time.time() - t

  t = time.time()
  trained = train_phase(config, workdir, setup, queried)
  timings.update(trained.timings, train=time.time() - t - trained.timings["train_setup"])
  if trained.stopped:
    setup.writer.close()
    logging.info("stopped at step %d/%d (%s); run again with the same workdir to resume",
                 trained.step, trained.total_steps, trained.stopped)
    return {"status": trained.stopped, "step": trained.step, "total_steps": trained.total_steps}

  t = time.time()
  results = evaluate_and_export(config, workdir, setup, queried, trained)
  timings["final_eval"] = time.time() - t
  results.update(timings_this_run=timings, seconds_this_run=time.time() - t_start)
  if setup.is_writer:
    files.atomic_write_json(os.path.join(workdir, RESULTS), results)
    files.atomic_write_text(os.path.join(workdir, REPORT), render_report(results))
  setup.writer.close()
  return results


# ==================================================================================================
# Set-up: victim, API config, images, the query plan, the held-out evaluation set
# ==================================================================================================
@dataclasses.dataclass
class SetUp:
  mesh: jax.sharding.Mesh
  writer: metrics_lib.MetricsWriter
  is_writer: bool
  victim: models_lib.Encoder
  views: "Views"
  plan: queries_lib.QueryPlan
  ckpt: ckpt_lib.Checkpointer     # the training checkpoints
  eval_images: np.ndarray          # uint8 held-out views
  victim_eval: np.ndarray          # the victim's representations of them
  responses_eval: np.ndarray       # account 1's noise-free responses to them


def set_up(config, workdir: str) -> SetUp:
  mesh = distributed.data_mesh(config.get("num_devices"))
  distributed.check_global_batch(int(config.train.batch_size), mesh)
  seed = int(config.seed)
  victim = load_victim(config, workdir)
  pre = victim.manifest["preprocessing"]
  input_size = int(pre["input_size"])

  pool = _load_split(config.data, seed)
  ac = config.attack
  plan = queries_lib.plan_queries(len(pool), int(ac.num_queries), num_accounts=int(ac.num_accounts),
                                  num_queries_mapping=int(ac.num_queries_mapping), seed=seed)
  logging.info("query plan: %s", plan.summary())
  if len(plan.train_indices) < config.train.batch_size:
    raise ValueError(f"{len(plan.train_indices)} training images are fewer than one batch "
                     f"({config.train.batch_size})")
  views = Views(pool, config, input_size)
  if not ac.requery_each_epoch:
    views.cache(plan.train_indices)

  eval_images = data_lib.apply_transform(_load_split(config.eval, seed),
                                         _transform(config.eval.view_transform, input_size), seed=seed)
  victim_eval = embeddings.embed_images(victim, eval_images, batch_size=int(config.eval.batch_size))
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, _CHECKPOINTS),
                               max_to_keep=int(config.get("checkpoints_to_keep", 2)))
  return SetUp(mesh=mesh, writer=metrics_lib.MetricsWriter(workdir),
               is_writer=jax.process_index() == 0, victim=victim, views=views, plan=plan, ckpt=ckpt,
               eval_images=eval_images, victim_eval=victim_eval,
               responses_eval=clean_response_space(config, victim.rep_dim, victim_eval))


def load_victim(config, workdir: str) -> models_lib.Encoder:
  """The victim encoder directory; the CPU variant writes a random tiny one into the workdir first."""
  vc = config.victim
  if vc.get("build_tiny"):
    directory = os.path.join(workdir, VICTIM_ENCODER)
    if jax.process_index() == 0:
      models_lib.save_random_encoder(directory, vc.build_tiny, image_size=int(config.image_size),
                                     seed=int(vc.tiny_seed), patch_size=int(vc.tiny_patch_size),
                                     source={"kind": "random init (tiny CPU victim)"})
    multihost_utils.sync_global_devices("tiny victim written")
    return models_lib.load_encoder(directory)
  if not vc.get("encoder_dir"):
    raise ValueError("config.victim.encoder_dir is empty: point it at a converted encoder directory "
                     "(python -m weight_conversion.convert ...) or set victim.build_tiny")
  return models_lib.load_encoder(vc.encoder_dir)


def new_api(victim: models_lib.Encoder, config) -> defense_lib.DefendedEncoder:
  # The one way to serve an encoder: uint8 views in, the manifest's normalisation and the forward fused
  # with the defense in one jitted call, weights passed as arguments.
  return defense_lib.DefendedEncoder.from_encoder(victim, config.defense,
                                                  capacity=max(8, int(config.attack.num_accounts)))


def _load_split(cfg, seed: int) -> np.ndarray:
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
  """Images the attacker sends: uint8 views of pool images (the API normalises them as the victim's
  manifest says).

  Query-once: one fixed view per image (`query_transform`, epoch 0), cached for the training set.
  Re-query: a fresh view per epoch (`requery_transform`, seeds (seed, epoch, pool index)).
  """

  def __init__(self, pool: np.ndarray, config, input_size: int):
    self.pool = pool
    self.seed = int(config.seed)
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

  def __call__(self, indices: np.ndarray, epoch: int) -> np.ndarray:
    return self.uint8(indices, epoch)


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


# ==================================================================================================
# Phase 1: queries
# ==================================================================================================
@dataclasses.dataclass
class Queried:
  attacker: protocol.Attacker          # its API is the latest saved state (see _latest_api)
  targets: Optional[np.ndarray]        # query once: [num_train, D] responses in account 1's space
  accounts_after_queries: List[dict]


def query_phase(config, workdir: str, s: SetUp) -> Queried:
  """Sends the planned queries (or restores what an earlier run received)."""
  ac = config.attack
  requery = bool(ac.requery_each_epoch)
  queries_dir = os.path.join(workdir, _QUERIES_DIR)
  done = os.path.isdir(queries_dir) and ckpt_lib.Checkpointer(queries_dir).latest_step() is not None
  api = _latest_api(config, workdir, s) if done else new_api(s.victim, config)
  progress = progress_lib.Progress(
      f"{STAGE}/queries", -(-s.plan.num_queries // int(ac.query_batch_size)) + len(s.plan.accounts),
      unit="batch", every_seconds=float(config.get("progress_every_seconds", 10.0)))
  attacker = protocol.Attacker(
      api, s.plan, s.views, batch_size=int(ac.query_batch_size),
      on_batch=lambda entry: _log_query_batch(s.writer, progress, len(attacker.log), entry))

  if done:
    logging.info("resuming: query phase already done (%s)", queries_dir)
    saved, meta = ckpt_lib.load_pytree(queries_dir)
    protocol.restore_mappers(attacker, saved.get("mappers", {}), meta.get("mapper_metrics", {}),
                             kind=ac.mapper.kind, in_dim=api.out_dim, out_dim=api.out_dim)
    attacker.log = [protocol.QueryLogEntry(**e) for e in meta.get("query_log", [])]
    targets = None if requery else np.asarray(saved["targets"], np.float32)
    return Queried(attacker, targets, meta["accounts_after_queries"])

  t0 = time.time()
  mapper_kwargs = dict(kind=ac.mapper.kind, epochs=int(ac.mapper.epochs),
                       learning_rate=float(ac.mapper.learning_rate),
                       batch_size=int(ac.mapper.batch_size),
                       val_fraction=float(ac.mapper.val_fraction), seed=int(config.seed))
  if requery:
    attacker.mapping_phase_only(**mapper_kwargs)
    targets = None
  else:
    targets = attacker.collect_training_targets(**mapper_kwargs)
  logging.info("query phase: %d charged queries in %.1fs", s.plan.num_queries, time.time() - t0)
  api.save(os.path.join(workdir, _API_AFTER_QUERIES))
  tree = {"mappers": protocol.mapper_states(attacker)}
  if targets is not None:
    tree["targets"] = targets
  meta = {"query_log": [e.to_dict() for e in attacker.log],
          "mapper_metrics": {str(k): m.metrics for k, m in attacker.mappers.items()},
          "accounts_after_queries": attacker.account_summary(), "seconds": time.time() - t0}
  if s.is_writer:  # one process writes (every process holds the same responses)
    ckpt_lib.save_pytree(queries_dir, tree, meta)
  return Queried(attacker, targets, meta["accounts_after_queries"])


def _latest_api(config, workdir: str, s: SetUp) -> defense_lib.DefendedEncoder:
  """The API as an earlier run left it: at its latest training checkpoint when training re-queries,
  else right after the query phase."""
  step = s.ckpt.latest_step()
  if config.attack.requery_each_epoch and step is not None:
    path = os.path.join(workdir, _API_TRAIN, f"step_{int(step):09d}")
  else:
    path = os.path.join(workdir, _API_AFTER_QUERIES)
  return defense_lib.DefendedEncoder.restore(path, s.victim)


def _log_query_batch(writer, progress, batch: int, entry: protocol.QueryLogEntry) -> None:
  prefix = f"account{entry.account}"
  writer.write_scalars(batch, {f"{prefix}/coverage": entry.coverage, f"{prefix}/sigma": entry.sigma,
                               f"{prefix}/charged_queries": entry.num_queries},
                       stage=f"{STAGE}/queries")
  progress.update(batch, account=entry.account, coverage=entry.coverage, sigma=entry.sigma)


# ==================================================================================================
# Phase 2: training
# ==================================================================================================
@dataclasses.dataclass
class Trained:
  state: dict                        # the train state (train_state.init_state's pytree), replicated
  graphdef: Any
  architecture: dict
  step: int
  total_steps: int
  steps_per_epoch: int
  epoch_losses: List[float]
  initial_eval: Dict[str, float]
  stolen: models_lib.Encoder         # the stolen model as an Encoder (embeds with any of its weights)
  stopped: Optional[str]             # None, "preempted" or "max_steps_this_run"
  timings: Dict[str, float]


def train_phase(config, workdir: str, s: SetUp, q: Queried) -> Trained:
  """Trains the stolen model from its latest checkpoint until the end, preemption or
  max_steps_this_run; returns its final (or interrupted) state."""
  t_phase = time.time()
  tc, seed = config.train, int(config.seed)
  requery = bool(config.attack.requery_each_epoch)
  api = q.attacker.api
  batch_size = int(tc.batch_size)
  steps_per_epoch = len(s.plan.train_indices) // batch_size
  total_steps = steps_per_epoch * int(tc.epochs)
  pre = s.victim.manifest["preprocessing"]
  step_cfg = _step_config(config, pre, total_steps)

  model = _create_stolen(config, api.out_dim, seed)
  graphdef, params, batch_stats = models_lib.split_model(model)
  stolen = models_lib.Encoder(graphdef, params, batch_stats,
                              {"rep_dim": api.out_dim, "preprocessing": dict(pre),
                               "representation": {"method": "forward"},
                               "architecture": model.architecture()})
  state = jax.tree.map(np.asarray, ts.init_state(params, batch_stats, step_cfg))
  train_step = ts.make_train_step(graphdef, step_cfg, s.mesh)
  if s.ckpt.latest_step() is not None:
    state, meta = s.ckpt.restore(ckpt_lib.abstract_like(distributed.replicate(state, s.mesh)))
    logging.info("resuming training at step %d/%d", int(meta["step"]), total_steps)
  else:
    state = distributed.replicate(state, s.mesh)
    meta = {"step": 0, "epoch_losses": [], "partial_losses": [],
            "initial_eval": _similarity(config, s, stolen, state)}
  timings = {"train_setup": time.time() - t_phase}

  start_step = step = int(meta["step"])
  epoch_losses = list(meta["epoch_losses"])
  partial = list(meta["partial_losses"])  # losses of the current epoch before the last checkpoint
  pending = []                            # device scalars of this epoch's losses, not yet fetched
  key = jax.random.key(seed + 1)
  progress = progress_lib.Progress(f"{STAGE}/train", total_steps, start_step=start_step,
                                   every_seconds=float(config.get("progress_every_seconds", 10.0)))
  max_this_run = int(config.get("max_steps_this_run", -1))
  local_rows = batch_size // jax.process_count()
  local = slice(jax.process_index() * local_rows, (jax.process_index() + 1) * local_rows)
  stopped = None
  t_train = time.time()

  while step < total_steps:
    epoch, i = divmod(step, steps_per_epoch)
    images, targets = _batch(config, s, q, epoch, i)
    state, step_metrics = train_step(state, distributed.global_batch(images[local], s.mesh),
                                     distributed.global_batch(targets[local], s.mesh), key)
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
      s.writer.write_scalars(step, {"epoch_loss": epoch_losses[-1], "epoch": epoch + 1}, stage=STAGE)
    if step % int(config.log_every_steps) == 0 or step == total_steps:
      scalars = {k: float(v) for k, v in jax.device_get(step_metrics).items()}
      s.writer.write_scalars(step, scalars, stage=STAGE, check_finite=True)
      if requery:
        for a in q.attacker.account_summary():
          s.writer.write_scalars(step, {f"account{a['account']}/coverage": a["coverage"],
                                        f"account{a['account']}/sigma": a["sigma"]}, stage=STAGE)
      progress.update(step, loss=scalars["loss"], epoch=epoch + 1)

    if step == total_steps:
      break
    if s.ckpt.reached_preemption(step):
      stopped = "preempted"
    elif max_this_run > 0 and step - start_step >= max_this_run:
      stopped = "max_steps_this_run"
    if stopped or step % int(config.checkpoint_every_steps) == 0:
      _save_checkpoint(workdir, s, api if requery else None, step, state,
                       {"step": step, "epoch_losses": epoch_losses,
                        "partial_losses": partial + [float(x) for x in jax.device_get(pending)],
                        "initial_eval": meta["initial_eval"]})
    if stopped:
      break

  if not stopped and s.ckpt.latest_step() != total_steps:
    _save_checkpoint(workdir, s, api if requery else None, total_steps, state,
                     {"step": total_steps, "epoch_losses": epoch_losses, "partial_losses": [],
                      "initial_eval": meta["initial_eval"]})
  s.ckpt.close()
  return Trained(state=state, graphdef=graphdef, architecture=model.architecture(), step=step,
                 total_steps=total_steps, steps_per_epoch=steps_per_epoch, epoch_losses=epoch_losses,
                 initial_eval=meta["initial_eval"], stolen=stolen, stopped=stopped, timings=timings)


def _batch(config, s: SetUp, q: Queried, epoch: int, i: int):
  """Global batch i of `epoch`: (uint8 images, targets); rows from a permutation seeded by the epoch."""
  batch_size = int(config.train.batch_size)
  train_indices = s.plan.train_indices
  rows = np.random.default_rng([int(config.seed), 7, epoch]).permutation(len(train_indices))[
      i * batch_size:(i + 1) * batch_size]
  if not config.attack.requery_each_epoch:
    return s.views.uint8(train_indices[rows], 0), q.targets[rows]
  # Re-query: every view of every epoch is a new charged query, each row sent by its own account.
  images = s.views.uint8(train_indices[rows], epoch + 1)
  targets = q.attacker.query_rows(protocol.accounts_of_rows(s.plan)[rows], train_indices[rows],
                                  epoch=epoch + 1, images=images)
  return images, targets


def _step_config(config, pre, total_steps: int) -> ts.StepConfig:
  tc = config.train
  mean, std = data_lib.normalization(pre)
  return ts.StepConfig(
      loss=tc.loss, temperature=tc.get("temperature"),
      learning_rate=ts.scaled_learning_rate(tc.base_lr, tc.batch_size), total_steps=int(total_steps),
      momentum=float(tc.momentum), weight_decay=float(tc.weight_decay),
      mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std), augment=bool(tc.augment),
      input_size=int(pre["input_size"]), center_targets=bool(tc.center_targets))


def _create_stolen(config, target_dim: int, seed: int):
  sc = config.stolen
  small = bool(sc.get("small_input", False))
  natural = nnx.eval_shape(lambda: models_lib.create_resnet(sc.arch, rngs=nnx.Rngs(0),
                                                            small_input=small)).feature_dim
  out_dim = sc.get("out_dim", -1)
  if out_dim is None or out_dim < 0:  # auto: the 1x1 conv head only where the dims differ (DINO)
    out_dim = None if natural == target_dim else int(target_dim)
  return models_lib.create_resnet(sc.arch, rngs=nnx.Rngs(seed), out_dim=out_dim, small_input=small)


def _save_checkpoint(workdir: str, s: SetUp, api, step: int, state, meta: dict) -> None:
  """The train state at `step` (and, when training re-queries, the API's state at that step)."""
  if api is not None:
    api.save(os.path.join(workdir, _API_TRAIN, f"step_{step:09d}"))
  # Host copies: the state is replicated, and orbax would otherwise slice every replica on device.
  s.ckpt.save(step, jax.device_get(state), meta)
  s.ckpt.wait_until_finished()
  if api is not None and s.is_writer:  # keep the API states of the checkpoints orbax kept
    keep = {f"step_{int(k):09d}" for k in s.ckpt.all_steps()}
    directory = os.path.join(workdir, _API_TRAIN)
    for name in os.listdir(directory):
      if name.startswith("step_") and name not in keep:
        shutil.rmtree(os.path.join(directory, name), ignore_errors=True)


# ==================================================================================================
# Phase 3: evaluation and export
# ==================================================================================================
def evaluate_and_export(config, workdir: str, s: SetUp, q: Queried, t: Trained) -> Dict[str, Any]:
  """Final similarities, the stolen encoder directory, the results dict (written by run)."""
  final = _similarity(config, s, t.stolen, t.state)
  api = q.attacker.api
  protocol_name = "requery_each_epoch" if config.attack.requery_each_epoch else "query_once"
  results = {
      "status": "done", "step": t.step, "total_steps": t.total_steps,
      "steps_per_epoch": t.steps_per_epoch, "config": config.to_dict(), "versions": library_versions(),
      "plan": s.plan.summary(), "protocol": protocol_name,
      "accounts_after_queries": q.accounts_after_queries, "accounts": q.attacker.account_summary(),
      "api": {k: v for k, v in api.stats().items() if k != "config"},
      "query_log": [e.to_dict() for e in q.attacker.log],
      "epoch_losses": t.epoch_losses, "final_loss": t.epoch_losses[-1] if t.epoch_losses else None,
      "similarity_initial": t.initial_eval, "similarity_final": final,
      "num_eval_images": int(len(s.eval_images)), "target_dim": int(api.out_dim),
      "stolen_architecture": t.architecture, "num_devices": int(s.mesh.devices.size),
      "num_processes": int(jax.process_count()),
  }
  if s.is_writer:
    manifest = {"preprocessing": dict(s.victim.manifest["preprocessing"]),
                "source": {"kind": "stolen", "workdir": os.path.abspath(workdir),
                           "victim": s.victim.manifest.get("source"), "protocol": protocol_name,
                           "num_queries": s.plan.num_queries, "num_accounts": len(s.plan.accounts),
                           "defense_enabled": bool(config.defense.enabled)}}
    host = jax.device_get((t.state["params"], t.state["batch_stats"]))
    models_lib.save_encoder(os.path.join(workdir, STOLEN_ENCODER), (t.graphdef, *host), manifest,
                            overwrite=True)
  return results


def _similarity(config, s: SetUp, stolen: models_lib.Encoder, state) -> Dict[str, float]:
  """Mean cosine similarities of the stolen model (weights from `state`) on the held-out images.

  cosine_to_victim: to the victim's own representations (dims permitting; the paper's undefended
  setting, where the responses are the victim's representations).
  cosine_to_responses: to account 1's noise-free responses (centred over the images when the attack
  trained on centred targets).
  """
  weights = jax.device_get({"params": state["params"], "batch_stats": state["batch_stats"]})
  reps = embeddings.embed_images(stolen, s.eval_images, batch_size=int(config.eval.batch_size),
                                 params=weights)
  out: Dict[str, float] = {}
  if reps.shape == s.victim_eval.shape:
    out["cosine_to_victim"] = _mean_cosine(reps, s.victim_eval)
  responses = s.responses_eval
  if config.train.center_targets:
    reps, responses = reps - reps.mean(0), responses - responses.mean(0)
  out["cosine_to_responses"] = _mean_cosine(reps, responses)
  return out


def _mean_cosine(a, b) -> float:
  num = np.sum(a * b, axis=1)
  den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return float(np.mean(num / np.maximum(den, 1e-12)))


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
