r"""Job "steal": the end-to-end stealing attack (paper section 4.4, Tables 1 and 7) against the API.

  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2 --workdir=DIR

`run(config, workdir)` reads top to bottom: set-up, then three phases, each resumable (killing the run
and starting it again with the same workdir continues and ends with the same result as an
uninterrupted run). `config.attack.protocol` picks the regime ("queries" means something else in each;
results.json and report.md say which ran and what was counted):

  paper (default)     the original code's regime (reference section 5.1-5.3). ONE charged pass over the
                      pool in pool order (queries.plan_paper: unshuffled, drop_last, one window of
                      batches per account, the sybils' mapping batches first) fixes each batch
                      position's sigma, as the API computes it from the account's coverage. Then every
                      epoch the thief trains on fresh RandomResizedCrop + flip views of the same
                      images, answered at the sigma of their batch position with the account's transform.
                      These per-epoch answers are NOT charged; the original never counted them either.
                      They are the paper's offline simulation (attacks/offline.py), computed in this job
                      from the defense's pure functions, never by the API. Queries = the charged pass;
                      the offline views answered are reported beside it.
  query_once          stricter online threat model: each planned image is sent once (one fixed view)
                      through the configured strategy (config.attack.strategy, b4b_jax/attacks/strategies;
                      query_once = each image once), and the stolen model trains E epochs on the kept
                      answers. Queries = charged queries.
  requery_each_epoch  the strictest: every view of every epoch is a new charged query (coverage
                      saturates). Queries = mapping + epochs x images, all charged.

1. Queries. The attacker plans its queries and sends them through `DefendedEncoder` in batches, every
   query charged to the sending account. Extra accounts first query the overlap and fit a mapper into
   account 1's space (protocol.Attacker), on responses x attack.rep_scale (divided back). Saved: the
   responses (query once), the per-row sigma (paper), the mappers, the API's defense state.
2. Training. The stolen ResNet (from scratch) learns to reproduce the responses for E epochs: one jitted
   step over the "data" mesh (attacks/train_state.py; compute_dtype from config or the backend's
   default), seeded epoch orders (the paper protocol keeps the pool order, as the original), optional
   attacker-side SimCLR views. Checkpoints every N steps (with the API's state when training queries
   it), on preemption and after `max_steps_this_run` steps.
3. Evaluation and export. Cosine similarity of the stolen model's representations on held-out images to
   the victim's (dims permitting) and to account 1's noise-free responses (the victim's representations
   under account 1's transform, which the evaluator knows); the stolen encoder as an encoder directory
   (workdir/stolen_encoder, for the linear probes), results.json, report.md.

Data (b4b_jax.data.stream): the pool, its views and the held-out set stream from disk by index; host
memory is bounded by the input pipelines' buffers, not by the pool (query once keeps the views it
trains on, the same pixels every epoch, in memory where they take at most _TRAIN_VIEWS_BYTES). Views
depend only on (seed, epoch, pool index), so a resumed run sends and trains on the same pixels.
Corrupt pool files are skipped and counted before the plan is drawn (results.json "pool"); a missing
victim directory, an empty class folder or a split not sorted into classes is an error before anything
is charged.

Multi-host: every process runs the same (deterministic) API simulation, so all hold identical responses;
for it, each process reads the whole query batch and runs the API data-parallel on its local devices of
the mesh. Training batches: each process reads and feeds only its own slice of every global batch (in
the paper protocol it also computes only the offline answers of its slice). The held-out set: each
process embeds its share, the shares are gathered. Only process 0 writes results.
"""
import dataclasses
import inspect
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
from b4b_jax.attacks import offline as offline_lib
from b4b_jax.attacks import protocol
from b4b_jax.attacks import queries as queries_lib
from b4b_jax.attacks import strategies as strategies_lib
from b4b_jax.attacks import train_state as ts
from b4b_jax.attacks.strategies import received as received_lib
from b4b_jax.evaluation import embeddings
from b4b_jax.evaluation import similarity
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
PROTOCOLS = ("paper", "query_once", "requery_each_epoch")
# What "queries" means in each protocol (results.json "queries"."meaning").
QUERIES_MEANING = {
    "paper": "charged = one pass over the pool in pool order (each batch position's sigma comes from "
             "it); views_answered_offline = the per-epoch fresh views answered at those sigmas by the "
             "paper's offline simulation, never charged (as in the original code)",
    "query_once": "charged = every planned image sent once through the strategy (copies count), "
                  "mapping queries included; the stolen model trains on the kept answers",
    "requery_each_epoch": "charged = mapping queries + every training view of every epoch",
}
# Query once trains every epoch on the views it sent (view epoch 0). Up to this many bytes they are made
# once per training phase and indexed; beyond, every epoch streams them again. Streaming them cost more
# than the pixels: a tf.data pipeline per epoch (~70 ms to start on the 2-core CPU) whose map threads
# shared the cores with the train step. The demo's three attacks (2048 views of 16 px, 480 steps each)
# trained in 22.7 / 21.4 / 22.8 s streaming and 13.8 / 12.8 / 12.5 s kept, the same results to the bit
# (session 30, quiet). 512 MiB holds 50,000 views at 32 px (CIFAR-10's train split) but not at 96 px.
_TRAIN_VIEWS_BYTES = 512 << 20
_POOL_CHECK = os.path.join("attack", "pool_check.json")      # the corrupt-file check, per file list
_EVAL_CHECK = os.path.join("attack", "eval_set_check.json")


# ==================================================================================================
# The config check (run by run_job before the workdir is claimed)
# ==================================================================================================
def validate_config(config: ml_collections.ConfigDict) -> None:
  """Refuses every value that would otherwise fail later (after the workdir is claimed, or after the
  charged query phase), with a ValueError naming the field."""
  ac, tc = config.attack, config.train
  defense_lib.validate_config(config.defense)
  protocol_name = ac.get("protocol")
  if protocol_name not in PROTOCOLS:
    raise ValueError(f"unknown attack.protocol {protocol_name!r}; choose one of {PROTOCOLS}")
  strategy = ac.get("strategy", "query_once")
  if strategy not in strategies_lib.STRATEGIES:
    raise ValueError(f"unknown attack.strategy {strategy!r}; choose one of "
                     f"{sorted(strategies_lib.STRATEGIES)}")
  if strategy in received_lib.STEAL_JOB_MISFITS:
    raise ValueError(f"attack.strategy={strategy!r} does not fit the steal job: "
                     f"{received_lib.STEAL_JOB_MISFITS[strategy]}; run it in the attack suite "
                     f"(configs/attack_suite.py:attack={strategy}), which trains a copy on what it "
                     "received")
  if strategy != "query_once" and protocol_name != "query_once":
    raise ValueError(f"attack.strategy={strategy!r} needs attack.protocol='query_once' (the paper "
                     "protocol's per-epoch answers are simulated offline and re-query charges every "
                     "view as it comes; only the query-once answers come from a strategy)")
  rep_scale = ac.get("rep_scale", 1.0)
  if not (isinstance(rep_scale, (int, float)) and np.isfinite(rep_scale) and rep_scale > 0):
    raise ValueError(f"attack.rep_scale must be a finite number > 0, got {rep_scale!r}")
  dtype = config.get("compute_dtype")
  if dtype is not None and dtype not in ts.COMPUTE_DTYPES:
    raise ValueError(f"compute_dtype must be one of {ts.COMPUTE_DTYPES} (or unset: the backend's "
                     f"default), got {dtype!r}")
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
    if n_map < 1:
      raise ValueError(f"attack.num_queries_mapping must be >= 1 with sybils, got {n_map}")
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
  on_corrupt = config.data.get("on_corrupt", "skip")
  if on_corrupt not in data_lib.stream.ON_CORRUPT:
    raise ValueError(f"data.on_corrupt must be one of {data_lib.stream.ON_CORRUPT}, got {on_corrupt!r}")
  encoder_dir = config.victim.get("encoder_dir")
  if not config.victim.get("build_tiny") and encoder_dir and not os.path.isdir(encoder_dir):
    raise FileNotFoundError(f"victim encoder directory {os.path.abspath(encoder_dir)} does not exist "
                            "(config.victim.encoder_dir; write one with `python -m "
                            "weight_conversion.convert`)")
  if protocol_name == "paper":
    if config.defense.get("noise_keying", "per_query") != "per_query":
      raise ValueError("attack.protocol='paper' simulates the paper's B4B per-epoch answers; with "
                       "defense.noise_keying='per_input' use protocol query_once or requery_each_epoch")
    queries_lib.paper_windows(int(ac.num_queries), int(ac.num_accounts), int(ac.num_queries_mapping),
                              int(ac.query_batch_size))


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
  protocol: str                    # one of PROTOCOLS
  ckpt: ckpt_lib.Checkpointer     # the training checkpoints
  eval_set: "EvalSet"              # the held-out images (streamed)
  victim_eval: np.ndarray          # the victim's representations of them
  responses_eval: np.ndarray       # account 1's noise-free responses to them


def set_up(config, workdir: str) -> SetUp:
  mesh = distributed.data_mesh(config.get("num_devices"))
  distributed.check_global_batch(int(config.train.batch_size), mesh)
  seed = int(config.seed)
  victim = load_victim(config, workdir)
  pre = victim.manifest["preprocessing"]
  input_size = int(pre["input_size"])

  on_corrupt = config.data.get("on_corrupt", "skip")
  pool = data_lib.stream.open_pool(config.data, seed, on_corrupt=on_corrupt,
                                   check_cache=os.path.join(workdir, _POOL_CHECK))
  eval_pool = data_lib.stream.open_pool(config.eval, seed, on_corrupt=on_corrupt,
                                        check_cache=os.path.join(workdir, _EVAL_CHECK))
  logging.info("stealing pool: %s; held-out set: %s", pool.summary(), eval_pool.summary())
  ac = config.attack
  protocol_name = str(ac.protocol)
  plan = make_plan(config, len(pool))
  logging.info("query plan (%s protocol): %s", protocol_name, plan.summary())
  if len(plan.train_indices) < config.train.batch_size:
    raise ValueError(f"{len(plan.train_indices)} training images are fewer than one batch "
                     f"({config.train.batch_size})")
  views = Views(pool, config, input_size, mesh)
  eval_set = EvalSet(eval_pool, _transform(config.eval.view_transform, input_size), seed,
                     int(config.eval.batch_size))
  victim_eval = eval_set.embed(victim)
  ckpt = ckpt_lib.Checkpointer(os.path.join(workdir, _CHECKPOINTS),
                               max_to_keep=int(config.get("checkpoints_to_keep", 2)))
  return SetUp(mesh=mesh, writer=metrics_lib.MetricsWriter(workdir),
               is_writer=jax.process_index() == 0, victim=victim, views=views, plan=plan,
               protocol=protocol_name, ckpt=ckpt, eval_set=eval_set, victim_eval=victim_eval,
               responses_eval=clean_response_space(config, victim.rep_dim, victim_eval))


def make_plan(config, pool_size: int) -> queries_lib.QueryPlan:
  """The query plan of the configured protocol: the paper's charged pass over the pool in pool order
  (queries.plan_paper), or the seeded plan of the online protocols (queries.plan_queries)."""
  ac = config.attack
  if ac.protocol == "paper":
    return queries_lib.plan_paper(pool_size, int(ac.num_queries), num_accounts=int(ac.num_accounts),
                                  num_queries_mapping=int(ac.num_queries_mapping),
                                  batch_size=int(ac.query_batch_size))
  return queries_lib.plan_queries(pool_size, int(ac.num_queries), num_accounts=int(ac.num_accounts),
                                  num_queries_mapping=int(ac.num_queries_mapping), seed=int(config.seed))


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


def served_api(config):
  """The served API (config.victim.api_url, b4b_jax.serve) when the thief talks HTTP, else None. Its
  accounts' keys are created with the provider's admin token (victim.api_admin_token_file), which also
  gives the coverage/sigma read-outs the in-process API gives the evaluator; the defense state lives
  in the server, so nothing of it is saved here (a re-run after a kill re-sends, and is charged again,
  what the killed run sent after its last checkpoint)."""
  url = config.victim.get("api_url")
  if not url:
    return None
  if jax.process_count() > 1:
    raise ValueError("victim.api_url: a served victim is queried by one process; run single-host")
  from b4b_jax.serve import client as client_lib  # pylint: disable=g-import-not-at-top
  with open(config.victim.api_admin_token_file) as f:
    token = f.read().strip()
  return client_lib.RemoteDefendedEncoder(url, admin_token=token,
                                          batch_size=int(config.attack.query_batch_size))


def new_api(victim: models_lib.Encoder, config) -> defense_lib.DefendedEncoder:
  served = served_api(config)
  if served is not None:
    return served
  # The one way to serve an encoder: uint8 views in, the manifest's normalisation and the forward fused
  # with the defense in one jitted call, weights passed as arguments.
  return defense_lib.DefendedEncoder.from_encoder(victim, config.defense,
                                                  capacity=max(8, int(config.attack.num_accounts)))


def _transform(spec, size: int):
  if hasattr(spec, "to_dict"):
    spec = spec.to_dict()
  return data_lib.make_transform(spec, size=size)


class Views:
  """Images the attacker sends: uint8 views of pool images, streamed from disk (the API normalises
  them as the victim's manifest says).

  View epoch 0 is what the query phase sends: `query_transform` (the query-once and re-query protocols'
  fixed view, e.g. the centre crop) or, in the paper protocol, `requery_transform` (the original's
  charged pass ran its stealing loader's crops). View epoch e + 1 is training epoch e's fresh
  `requery_transform` view (RandomResizedCrop + flip). Image i's view at epoch e is drawn from
  example_seed(seed, e, i) alone, so it is the same in every run, batch and process.
  `for_api` puts a batch on this process's devices of the mesh, sharded along "data", so the API's
  fused encoder + defense call runs data-parallel.
  """

  def __init__(self, pool: data_lib.stream.Pool, config, input_size: int, mesh: jax.sharding.Mesh):
    self.pool = pool
    self.seed = int(config.seed)
    self.query_transform = _transform(config.attack.query_transform, input_size)
    self.requery_transform = _transform(config.attack.requery_transform, input_size)
    self.batch_size = int(config.attack.query_batch_size)
    local = [d for d in mesh.devices.flat if d.process_index == jax.process_index()]
    self.api_mesh = jax.sharding.Mesh(np.asarray(local), (distributed.DATA_AXIS,))
    paper = config.attack.protocol == "paper"
    self.first_transform = self.requery_transform if paper else self.query_transform

  def transform(self, epoch: int):
    return self.first_transform if epoch == 0 else self.requery_transform

  def uint8(self, indices: np.ndarray, epoch: int) -> np.ndarray:
    return data_lib.stream.views(self.pool, indices, self.transform(epoch), seed=self.seed, epoch=epoch,
                                 batch_size=max(len(indices), 1))

  def stream(self, indices: np.ndarray, epoch: int, batch_size: int):
    """uint8 numpy batches of the views of `indices`, in order, read ahead by the pipeline."""
    return data_lib.stream.view_batches(self.pool, indices, self.transform(epoch), seed=self.seed,
                                        epoch=epoch, batch_size=batch_size)

  def batches(self, indices: np.ndarray, epoch: int, batch_size: int):
    """What protocol.Attacker sends: the views of `indices` in batches, on this process's devices."""
    return (self.for_api(b) for b in self.stream(indices, epoch, batch_size))

  def for_api(self, images: np.ndarray):
    n = self.api_mesh.devices.size
    if n == 1 or len(images) % n:  # a short last batch runs undivided (the API pads it itself)
      return images
    return jax.device_put(images, distributed.batch_sharded(self.api_mesh))

  def __call__(self, indices: np.ndarray, epoch: int):
    return self.for_api(self.uint8(indices, epoch))


class EvalSet:
  """The held-out images, streamed: each process embeds its share on its devices; shares gathered."""

  def __init__(self, pool: data_lib.stream.Pool, transform, seed: int, batch_size: int):
    self.pool, self.transform, self.seed, self.batch_size = pool, transform, seed, batch_size

  def __len__(self) -> int:
    return len(self.pool)

  def embed(self, encoder, params=None) -> np.ndarray:
    share = data_lib.stream.host_slice(len(self.pool))
    ids = np.arange(len(self.pool))[share]
    reps = [embeddings.embed_images(encoder, b, batch_size=self.batch_size, params=params)
            for b in data_lib.stream.view_batches(self.pool, ids, self.transform, seed=self.seed,
                                                  epoch=0, batch_size=self.batch_size)]
    local = np.concatenate(reps) if reps else np.zeros((0, encoder.rep_dim), np.float32)
    return data_lib.stream.gather_rows(ids, local)[0]


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
  # paper: the sigma each training row's charged batch was answered with (plan.train_indices order),
  # the account of each row, and the offline simulation of the per-epoch answers.
  sigma_rows: Optional[np.ndarray] = None
  account_rows: Optional[np.ndarray] = None
  offline: Optional[offline_lib.OfflineAnswers] = None


def query_phase(config, workdir: str, s: SetUp) -> Queried:
  """Sends the planned queries (or restores what an earlier run received)."""
  ac = config.attack
  queries_dir = os.path.join(workdir, _QUERIES_DIR)
  # Process 0's view (it alone writes queries_dir): every process takes the same branch.
  done = distributed.agree(os.path.isdir(queries_dir) and ckpt_lib.Checkpointer(
      queries_dir, process_local=True).latest_step() is not None)
  api = _latest_api(config, workdir, s) if done else new_api(s.victim, config)
  progress = progress_lib.Progress(
      f"{STAGE}/queries", -(-s.plan.num_queries // int(ac.query_batch_size)) + len(s.plan.accounts),
      unit="batch", every_seconds=float(config.get("progress_every_seconds", 10.0)))
  attacker = protocol.Attacker(
      api, s.plan, s.views, batch_size=int(ac.query_batch_size),
      on_batch=lambda entry: _log_query_batch(s.writer, progress, len(attacker.log), entry),
      rep_scale=float(ac.rep_scale), strategy=_strategy_spec(config, s))
  paper = s.protocol == "paper"
  offline = offline_lib.OfflineAnswers(s.victim, config.defense, attacker.users) if paper else None
  account_rows = protocol.accounts_of_rows(s.plan)

  if done:
    logging.info("resuming: query phase already done (%s)", queries_dir)
    saved, meta = ckpt_lib.load_pytree(queries_dir)
    protocol.restore_mappers(attacker, saved.get("mappers", {}), meta.get("mapper_metrics", {}),
                             kind=ac.mapper.kind, in_dim=api.out_dim, out_dim=api.out_dim)
    attacker.log = [protocol.QueryLogEntry(**e) for e in meta.get("query_log", [])]
    targets = np.asarray(saved["targets"], np.float32) if "targets" in saved else None
    sigma_rows = np.asarray(saved["sigma_rows"], np.float64) if "sigma_rows" in saved else None
    return Queried(attacker, targets, meta["accounts_after_queries"], sigma_rows, account_rows, offline)

  t0 = time.time()
  mapper_kwargs = dict(kind=ac.mapper.kind, epochs=int(ac.mapper.epochs),
                       learning_rate=float(ac.mapper.learning_rate),
                       batch_size=int(ac.mapper.batch_size),
                       val_fraction=float(ac.mapper.val_fraction), seed=int(config.seed))
  targets = sigma_rows = None
  if s.protocol == "requery_each_epoch":
    attacker.mapping_phase_only(**mapper_kwargs)
  elif paper:
    sigma_rows = attacker.charge_paper_pass(num_pairs=int(ac.num_queries_mapping), **mapper_kwargs)
  else:
    targets = attacker.collect_training_targets(**mapper_kwargs)
  logging.info("query phase: %d charged queries in %.1fs", api.stats()["total_queries"],
               time.time() - t0)
  if not config.victim.get("api_url"):  # a served API keeps its own state
    api.save(os.path.join(workdir, _API_AFTER_QUERIES))
  tree = {"mappers": protocol.mapper_states(attacker)}
  if targets is not None:
    tree["targets"] = targets
  if sigma_rows is not None:
    tree["sigma_rows"] = sigma_rows
  meta = {"query_log": [e.to_dict() for e in attacker.log],
          "mapper_metrics": {str(k): m.metrics for k, m in attacker.mappers.items()},
          "accounts_after_queries": attacker.account_summary(), "seconds": time.time() - t0}
  if s.is_writer:  # one process writes (every process holds the same responses)
    ckpt_lib.save_pytree(queries_dir, tree, meta)
  return Queried(attacker, targets, meta["accounts_after_queries"], sigma_rows, account_rows, offline)


def _strategy_spec(config, s: SetUp) -> Optional[protocol.StrategySpec]:
  """The query-once protocol's strategy (config.attack.strategy, with the fields of
  config.attack.strategy_kwargs its constructor takes); None in the other protocols."""
  if s.protocol != "query_once":
    return None
  ac = config.attack
  cls = strategies_lib.STRATEGIES[ac.strategy]
  accepted = inspect.signature(cls.__init__).parameters
  given = ac.get("strategy_kwargs")
  given = given.to_dict() if hasattr(given, "to_dict") else dict(given or {})
  kwargs = {k: v for k, v in given.items() if k in accepted and v is not None}
  if "seed" in accepted:
    kwargs.setdefault("seed", int(config.seed))
  if "canary" in accepted and "canary" not in kwargs:  # the first training image's view rides along
    kwargs["canary"] = s.views.uint8(s.plan.train_indices[:1], 0)[0].astype(np.float32) / 255.0
  return protocol.StrategySpec(
      cls, kwargs, to_strategy=lambda views: np.asarray(views, np.float32) / np.float32(255.0),
      to_api=lambda x01: np.clip(np.round(np.asarray(x01, np.float32) * 255.0), 0, 255).astype(np.uint8))


def _latest_api(config, workdir: str, s: SetUp) -> defense_lib.DefendedEncoder:
  """The API as an earlier run left it: at its latest training checkpoint when training re-queries,
  else right after the query phase."""
  served = served_api(config)
  if served is not None:
    return served
  step = s.ckpt.latest_step()
  if s.protocol == "requery_each_epoch" and step is not None:
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
  requery = s.protocol == "requery_each_epoch"
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
  stopped = None
  t_train = time.time()
  batches = None  # this epoch's batches, streamed (from the resumed batch on)
  train_views = _query_once_views(s)

  while step < total_steps:
    epoch, i = divmod(step, steps_per_epoch)
    if batches is None or i == 0:
      batches = _epoch_batches(config, s, q, epoch, i, train_views)
    images, targets = next(batches)
    state, step_metrics = train_step(state, distributed.global_batch(images, s.mesh),
                                     distributed.global_batch(targets, s.mesh), key)
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


def _query_once_views(s: SetUp) -> Optional[np.ndarray]:
  """uint8 views of every training row (s.plan.train_indices' view epoch 0) in row order, for query
  once within _TRAIN_VIEWS_BYTES; else None (other protocols train on fresh views each epoch)."""
  if s.protocol != "query_once":
    return None
  transform = s.views.transform(0)
  size = transform.output_size if transform is not None else None
  if size is None:  # the pool's own image size, known only for an in-memory pool
    if s.views.pool.streams_from_disk:
      return None
    size = s.views.pool.images.shape[1:3]
  if len(s.plan.train_indices) * int(np.prod(size)) * 3 > _TRAIN_VIEWS_BYTES:
    return None
  return s.views.uint8(s.plan.train_indices, 0)


def _epoch_batches(config, s: SetUp, q: Queried, epoch: int, start: int,
                   train_views: Optional[np.ndarray] = None):
  """(this process's uint8 images, its targets) for batches start, start + 1, ... of `epoch`;
  train_views: _query_once_views, the query-once images to index instead of streaming them.

  Query once and re-query: global batch i is rows [i*B, (i+1)*B) of a permutation of the training rows
  seeded by the epoch. Paper: the pool order, as the original's unshuffled loader, so batch i holds the
  same images every epoch, in fresh views. Each process takes its contiguous slice of every batch; the
  views stream ahead of the train step.
  """
  batch_size = int(config.train.batch_size)
  train_indices = s.plan.train_indices
  steps = len(train_indices) // batch_size
  if s.protocol == "paper":
    order = np.arange(len(train_indices))
  else:
    order = np.random.default_rng([int(config.seed), 7, epoch]).permutation(len(train_indices))
  rows = order[start * batch_size:steps * batch_size].reshape(-1, batch_size)
  local = data_lib.stream.host_slice(batch_size)
  if s.protocol == "paper":
    mine = rows[:, local]
    images = s.views.stream(train_indices[mine.reshape(-1)], epoch + 1, mine.shape[1])
    for r, batch in zip(mine, images):
      # The paper's offline simulation (attacks/offline.py): NOT charged, never through the API.
      answers = q.offline.answer(batch, q.sigma_rows[r], q.account_rows[r], train_indices[r], epoch)
      yield batch, q.attacker.map_rows(q.account_rows[r], answers)
    return
  if s.protocol == "query_once":
    # Query once: the epoch-0 views, whose responses are the targets; this process reads only its rows.
    mine = rows[:, local]
    if train_views is not None:
      for r in mine:
        yield train_views[r], q.targets[r]
      return
    images = s.views.stream(train_indices[mine.reshape(-1)], 0, mine.shape[1])
    for r, batch in zip(mine, images):
      yield batch, q.targets[r]
    return
  # Re-query: every view of every epoch is a new charged query, each row sent by its own account. The
  # API simulation runs on every process, so each reads the whole global batch.
  accounts = protocol.accounts_of_rows(s.plan)
  images = s.views.stream(train_indices[rows.reshape(-1)], epoch + 1, batch_size)
  for r, batch in zip(rows, images):
    targets = q.attacker.query_rows(accounts[r], train_indices[r], epoch=epoch + 1,
                                    images=s.views.for_api(batch))
    yield batch[local], targets[local]


def _step_config(config, pre, total_steps: int) -> ts.StepConfig:
  tc = config.train
  mean, std = data_lib.normalization(pre)
  return ts.StepConfig(
      loss=tc.loss, temperature=tc.get("temperature"),
      learning_rate=ts.scaled_learning_rate(tc.base_lr, tc.batch_size), total_steps=int(total_steps),
      momentum=float(tc.momentum), weight_decay=float(tc.weight_decay),
      mean=tuple(float(m) for m in mean), std=tuple(float(v) for v in std), augment=bool(tc.augment),
      input_size=int(pre["input_size"]), center_targets=bool(tc.center_targets),
      compute_dtype=compute_dtype(config))


def compute_dtype(config) -> str:
  """The train step's compute dtype: config.compute_dtype, or the backend's default when unset."""
  return config.get("compute_dtype") or ts.default_compute_dtype()


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
  if hasattr(api, "base_url"):  # a served API (served_api) keeps its own state
    api = None
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
  protocol_name = s.protocol
  stats = api.stats()
  offline_views = t.step * int(config.train.batch_size) if protocol_name == "paper" else 0
  results = {
      "status": "done", "step": t.step, "total_steps": t.total_steps,
      "steps_per_epoch": t.steps_per_epoch, "config": config.to_dict(), "versions": library_versions(),
      "plan": s.plan.summary(), "protocol": protocol_name,
      "queries": {"meaning": QUERIES_MEANING[protocol_name], "requested": int(config.attack.num_queries),
                  "charged": int(stats["total_queries"]),
                  "charged_per_account": [a["charged_queries"] for a in q.attacker.account_summary()],
                  "views_answered_offline": offline_views},
      "rep_scale": float(config.attack.rep_scale),
      "strategy": q.attacker.strategy.name if q.attacker.strategy else None,
      "compute_dtype": compute_dtype(config),
      "accounts_after_queries": q.accounts_after_queries, "accounts": q.attacker.account_summary(),
      "api": {k: v for k, v in stats.items() if k != "config"},
      "query_log": [e.to_dict() for e in q.attacker.log],
      "epoch_losses": t.epoch_losses, "final_loss": t.epoch_losses[-1] if t.epoch_losses else None,
      "similarity_initial": t.initial_eval, "similarity_final": final,
      "num_eval_images": int(len(s.eval_set)), "target_dim": int(api.out_dim),
      "pool": s.views.pool.summary(), "eval_set": s.eval_set.pool.summary(),
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
  reps = s.eval_set.embed(stolen, params=weights)
  out: Dict[str, float] = {}
  if reps.shape == s.victim_eval.shape:
    out["cosine_to_victim"] = _mean_cosine(reps, s.victim_eval)
  responses = s.responses_eval
  if config.train.center_targets:
    reps, responses = reps - reps.mean(0), responses - responses.mean(0)
  out["cosine_to_responses"] = _mean_cosine(reps, responses)
  return out


def _mean_cosine(a, b) -> float:
  return float(np.mean(similarity.cosine_similarity(a, b)))


def render_report(r: Dict[str, Any]) -> str:
  c = r["config"]
  lines = [
      "# Stealing attack", "",
      f"- victim: `{c['victim'].get('encoder_dir') or c['victim'].get('build_tiny')}`; stolen: "
      f"`{r['stolen_architecture']['name']}` -> {r['target_dim']}-d",
      f"- defense: {'B4B' if c['defense']['enabled'] else 'none'} (transform "
      f"`{c['defense']['transform']}`, lam {c['defense']['lam']}, alpha {c['defense']['alpha']}, "
      f"beta {c['defense']['beta']}%)",
      f"- protocol: `{r['protocol']}`; {r['queries']['charged']} charged queries over "
      f"{len(r['accounts'])} account(s) (requested {r['queries']['requested']}), "
      f"{r['queries']['views_answered_offline']} views answered offline (not charged); rep_scale "
      f"{r['rep_scale']:g}; loss `{c['train']['loss']}`; {c['train']['epochs']} epochs, "
      f"{r['total_steps']} steps",
      f"- what \"queries\" means here: {r['queries']['meaning']}",
      f"- stealing pool: {r['pool']['num_images']} images of `{r['pool']['name']}`/{r['pool']['split']}"
      f" ({r['pool']['skipped_corrupt']} undecodable file(s) skipped); held-out: "
      f"{r['num_eval_images']} images", "",
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
