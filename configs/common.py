"""What the configs share: the `:arg` parser, the stealing config and the evaluation blocks.

Every job that has a defense holds the full `defense_config(...)` block as `config.defense`, so any
defense field is set from the command line the same way on every job:

  --config.defense.lam=1e-5 --config.defense.beta=50 --config.defense.transform=binary
"""
from typing import Any, Dict, Optional

import ml_collections

from b4b_jax.defense import defense_config
from b4b_jax.evaluation import paper_numbers
from weight_conversion import converters

# --------------------------------------------------------------------------------------------------
# The `:arg` string of a config file
# --------------------------------------------------------------------------------------------------
_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def _convert(key: str, raw: str, kind: type) -> Any:
  if kind is bool:
    low = raw.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg {key}={raw!r}: expected a boolean (1/0/true/false)")
  if kind is str:
    return raw
  try:
    value = float(raw)
    if kind is int:
      if value != int(value):
        raise ValueError
      value = int(value)
  except ValueError:
    raise ValueError(f"config arg {key}={raw!r}: expected a {kind.__name__}") from None
  if not value > 0:  # counts, budgets, epochs: zero or negative is a typo, never a request for a default
    raise ValueError(f"config arg {key}={raw!r}: must be > 0")
  return value


def parse_arg(arg: Optional[str], **defaults) -> Dict[str, Any]:
  """Parses `configs/X.py:key=value,flag,...` against declared keys.

  Each key is declared with a default whose type converts the value (bools accept 1/0/true/false/yes/no;
  a bare key means True), or with a type (int, float, bool, str) meaning "no default": None unless given.
  Numbers must be > 0. `parse_arg("tiny,queries=1e5", tiny=False, queries=int)` ->
  {"tiny": True, "queries": 100000}.
  """
  kinds = {k: (v if isinstance(v, type) else type(v)) for k, v in defaults.items()}
  out = {k: (None if isinstance(v, type) else v) for k, v in defaults.items()}
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    if not sep:
      if kinds[key] is not bool:
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _convert(key, raw.strip(), kinds[key])
  return out


def _given(value, default):
  return default if value is None else value


# --------------------------------------------------------------------------------------------------
# The stealing job (configs/steal_simsiam.py, configs/steal_dino.py)
# --------------------------------------------------------------------------------------------------
# Where the paper-scale runs read their inputs; override with --config.victim.encoder_dir=... etc.
# The victims are where the README's convert commands write them (the converter's default outputs).
DEFAULT_ENCODERS = dict(converters.DEFAULT_OUTPUTS)
DEFAULT_IMAGENET = "folder:data/imagenet"

STEAL_ARGS = """Arguments (the `:arg` string of configs/steal_{simsiam,dino}.py):
  defended=0|1     B4B on (the victim's preset: SimSiam lam 1e-6, alpha 1, beta 80 %; DINO lam 1e-6,
                   alpha 1000, beta 60 %; a dense random affine per account, as the paper's e2e runs)
  sybils=N         number of attacker accounts (1-10); the budget is split evenly, each extra account
                   spends `mapping` queries on the overlap with account 1
  protocol=paper|query_once|requery
                   paper (default): the original's regime, one charged pass over the pool in pool
                   order fixes each batch position's sigma, then fresh crops every epoch answered at
                   that sigma by the paper's offline simulation (not charged; reported as such);
                   query_once: each image sent once, E epochs on the kept answers; requery: every
                   view of every epoch is a new charged query (the two stricter online threat models)
  requery=0|1      shorthand for protocol=requery
  queries=N        total queries (paper: 50000 or 100000; the paper protocol charges whole batches of
                   256: 50000 -> 196 batches = 50176, as the original)
  mapping=N        num_queries_mapping (paper: 10000; paper protocol: ceil(N/256) charged batches)
  strategy=NAME    how the query_once protocol asks (b4b_jax/attacks/strategies: query_once,
                   repeat_average, canary; settings in attack.strategy_kwargs)
  epochs=N         stealing epochs (paper: 100)
  loss=infonce|mse|softnn|cosine|huber   (cosine, huber: the noise-robust losses of issue 12)
  mapper=linear|mlp
  center=0|1       centre the responses over each batch (default: on when defended)
  tiny             the small CPU variant (random tiny victim built into the workdir, 16x16 photo crops)
Numbers must be > 0."""


def steal_config(victim: str, arg=None) -> ml_collections.ConfigDict:
  """The `steal` job's config for the "simsiam" or "dino" victim (see STEAL_ARGS for `arg`)."""
  if victim not in ("simsiam", "dino"):
    raise ValueError(f"victim must be 'simsiam' or 'dino', got {victim!r}")
  a = parse_arg(arg, tiny=False, defended=False, sybils=1, queries=int, mapping=int, requery=False,
                protocol=str, strategy="query_once", epochs=int, loss="infonce", mapper="linear",
                center=bool)
  aliases = {"paper": "paper", "query_once": "query_once", "requery": "requery_each_epoch",
             "requery_each_epoch": "requery_each_epoch"}
  if a["protocol"] is not None and a["protocol"] not in aliases:
    raise ValueError(f"config arg protocol={a['protocol']!r}: expected paper, query_once or requery")
  if a["requery"] and a["protocol"] not in (None, "requery", "requery_each_epoch"):
    raise ValueError(f"config args requery=1 and protocol={a['protocol']} contradict each other")
  protocol = "requery_each_epoch" if a["requery"] else aliases[a["protocol"] or "paper"]
  tiny = a["tiny"]
  c = ml_collections.ConfigDict()
  c.job = "steal"
  c.seed = 0
  c.num_devices = ml_collections.config_dict.placeholder(int)  # None = all devices
  c.image_size = 16 if tiny else 224

  c.victim = ml_collections.ConfigDict()
  c.victim.encoder_dir = "" if tiny else DEFAULT_ENCODERS[victim]
  # CPU variant: a random-init victim of this architecture is built into workdir/victim_encoder.
  c.victim.build_tiny = ("resnet18_w0.125" if victim == "simsiam" else "vit_tiny") if tiny else ""
  c.victim.tiny_seed = 1234
  c.victim.tiny_patch_size = 4

  # The stealing pool. ImageNet-style class folders (the paper: 100 images per class); images are kept
  # in memory at 256x256 (shorter side 256, centre crop) and the query views are cut from those.
  c.data = ml_collections.ConfigDict()
  if tiny:
    c.data.name, c.data.split, c.data.limit, c.data.image_size = "sklearn_photos", "query", 600, 24
    c.data.transform = None
  else:
    c.data.name, c.data.split, c.data.limit, c.data.image_size = DEFAULT_IMAGENET, "train", None, None
    c.data.transform = {"mode": "center_crop", "size": 256, "resize_size": 256}
  c.data.per_class = None if tiny else 100
  c.data.data_dir = None
  # Undecodable pool / held-out files: "skip" (counted and listed in results.json) or "error".
  c.data.on_corrupt = "skip"

  c.eval = ml_collections.ConfigDict()
  if tiny:
    c.eval.name, c.eval.split, c.eval.limit, c.eval.image_size = "sklearn_photos", "test", 64, 24
    c.eval.transform = None
    c.eval.view_transform = {"mode": "center_crop", "size": 16, "resize_size": 18}
  else:
    c.eval.name, c.eval.split, c.eval.limit, c.eval.image_size = DEFAULT_IMAGENET, "val", 2000, None
    c.eval.transform = {"mode": "center_crop", "size": 256, "resize_size": 256}
    c.eval.view_transform = "dino_eval" if victim == "dino" else "eval_center"
  c.eval.per_class = None
  c.eval.data_dir = None
  c.eval.batch_size = 64 if tiny else 256

  defended = a["defended"]
  c.defense = defense_config(victim, transform="dense_affine") if defended else defense_config("none")

  c.attack = ml_collections.ConfigDict()
  c.attack.num_queries = _given(a["queries"], 512 if tiny else 50_000)
  c.attack.num_accounts = a["sybils"]
  c.attack.num_queries_mapping = _given(a["mapping"], 160 if tiny else 10_000)
  c.attack.query_batch_size = 64 if tiny else 256
  # "paper" (the original's regime: one charged pass, fresh crops every epoch answered offline at the
  # pass's sigmas) | "query_once" | "requery_each_epoch" (the stricter online threat models).
  c.attack.protocol = protocol
  # Mappers are fitted and applied on responses x rep_scale, divided back: the original's x1000 for
  # SimSiam (its features are ~1e-3 per dimension), 1 for DINO (reference section 3.4).
  c.attack.rep_scale = paper_numbers.REP_SCALE.get(victim, 1.0)
  # How the query_once protocol asks for each image (b4b_jax/attacks/strategies); the kwargs below are
  # passed to the strategies whose constructor takes them.
  c.attack.strategy = a["strategy"]
  c.attack.strategy_kwargs = ml_collections.ConfigDict()
  c.attack.strategy_kwargs.copies = 16             # repeat_average, canary
  c.attack.strategy_kwargs.perturbation = "exact"  # repeat_average, canary
  c.attack.strategy_kwargs.switch_sigma = ml_collections.config_dict.placeholder(float)  # canary
  # The view sent for each image when querying once (the full image, centre crop), and the views of
  # the paper and re-query protocols (the original's stealing transform: RandomResizedCrop + flip, new
  # each epoch).
  if tiny:
    c.attack.query_transform = {"mode": "center_crop", "size": 16, "resize_size": 18}
    c.attack.requery_transform = {"mode": "random_resized_crop", "size": 16, "flip": True}
  else:
    c.attack.query_transform = "dino_eval" if victim == "dino" else "eval_center"
    c.attack.requery_transform = "steal_crop"
  c.attack.mapper = ml_collections.ConfigDict()
  c.attack.mapper.kind = a["mapper"]
  c.attack.mapper.epochs = 30 if tiny else 250
  c.attack.mapper.learning_rate = 1e-3 if tiny else 1e-4
  c.attack.mapper.batch_size = 32 if tiny else 64
  c.attack.mapper.val_fraction = 0.2

  c.stolen = ml_collections.ConfigDict()
  c.stolen.arch = "resnet18_w0.125" if tiny else "resnet50"
  c.stolen.small_input = tiny
  c.stolen.out_dim = -1  # auto: a 1x1 conv head to the responses' dim where it differs (DINO: 1536)

  c.train = ml_collections.ConfigDict()
  c.train.epochs = _given(a["epochs"], 3 if tiny else 100)
  c.train.batch_size = 32 if tiny else 256
  c.train.base_lr = 0.4 if tiny else 0.1  # lr = base_lr * batch / 256, cosine decay
  c.train.momentum = 0.9
  c.train.weight_decay = 0.0
  c.train.loss = a["loss"]
  c.train.temperature = ml_collections.config_dict.placeholder(float)  # None: InfoNCE 0.25, SoftNN 1000
  if a["loss"] == "infonce":
    c.train.temperature = 0.25
  c.train.augment = False        # attacker-side SimCLR views (the original's --useaug; off in the paper)
  c.train.center_targets = bool(_given(a["center"], defended))
  # The train step's compute dtype: None = the backend's default (bfloat16 on GPU/TPU, float32 on CPU;
  # attacks/train_state.py default_compute_dtype), or "float32" / "bfloat16".
  c.compute_dtype = ml_collections.config_dict.placeholder(str)

  c.checkpoint_every_steps = 4 if tiny else 1000
  c.checkpoints_to_keep = 2
  c.log_every_steps = 1 if tiny else 100
  c.progress_every_seconds = 10.0
  c.max_steps_this_run = -1      # > 0: stop (with a checkpoint) after this many steps; resume later
  return c


# --------------------------------------------------------------------------------------------------
# The evaluation jobs (configs/{probe,legit,remap,coverage,embeddings}.py)
# --------------------------------------------------------------------------------------------------
# The paper's four downstream tasks, as TFDS names.
PAPER_DATASETS = ("cifar10", "stl10", "svhn_cropped", "fashion_mnist")
# The small CPU variants: a random tiny ResNet on scikit-learn's bundled digits (offline, seconds).
TINY_ENCODER = "random:resnet18_w0.125@16"
TINY_DATASET = "digits"


def tiny_arg(arg, name: str, *, variants=()) -> bool:
  """For configs whose only arguments are "tiny" and a few named variants; True for "tiny"."""
  allowed = (None, "", "tiny") + tuple(variants)
  if arg not in allowed:
    raise ValueError(f"configs/{name}.py takes no argument or one of {allowed[2:]}, got {arg!r}")
  return arg == "tiny"


def source_block(*, tiny: bool) -> ml_collections.ConfigDict:
  """Where representations come from: `encoder` + datasets, or precomputed .npz files (npz_dir)."""
  c = ml_collections.ConfigDict()
  # An encoder directory (converted checkpoint / trained victim), a stealing workdir (its
  # stolen_encoder/ is used) or random:<arch>@<size>. Required unless npz_dir has every dataset.
  c.encoder = TINY_ENCODER if tiny else ml_collections.config_dict.placeholder(str)
  c.data_dir = ml_collections.config_dict.placeholder(str)   # TFDS data_dir / folder root
  # A directory of <dataset>.npz files (what the embeddings job writes to WORKDIR/embeddings); a dataset
  # found there is read instead of embedded.
  c.npz_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = "train"
  c.test_split = "test"
  c.train_limit = 384 if tiny else ml_collections.config_dict.placeholder(int)
  c.test_limit = 192 if tiny else ml_collections.config_dict.placeholder(int)
  c.batch_size = 64 if tiny else 256       # embedding batch (images per device call)
  # Image transform before normalisation: None = the encoder manifest's eval transform; or a preset
  # name of b4b_jax.data (e.g. "resize": the paper's SimSiam embeddings use Resize(224), no crop).
  c.transform = ml_collections.config_dict.placeholder(str)
  return c


def probe_block(*, tiny: bool, paper: bool = False) -> ml_collections.ConfigDict:
  """The linear probe on embeddings (Adam, batch 64, 3 runs, as the original's embedding probes).

  paper=True: the original's setting for the legit/victim rows (reference §7.5): raw features (times
  the job's rep_scale), no standardisation (it would cancel Table 8's diagonal affine and pad), and the
  original's Adam learning rate and epochs per encoder and task (paper_numbers.EMBEDDING_PROBE_HPARAMS;
  learning_rate/epochs below are used for other tasks). The epoch is chosen on validation either way.
  """
  c = ml_collections.ConfigDict()
  c.method = "adam"              # "adam" | "sgd" | "ridge" (closed form, ridge strength on validation)
  c.epochs = 5 if tiny else 50
  c.batch_size = 64
  # paper: the original's per-task values on x rep_scale features; else on standardised features.
  c.learning_rate = 1e-4 if paper else 1e-3
  c.paper_hparams = bool(paper)
  c.momentum = 0.9               # sgd only
  c.weight_decay = 0.0
  c.val_fraction = 0.1           # carved from train (per seed) to choose the epoch; never test
  # "standardize" | "l2" | "none"; statistics from train only.
  c.normalization = "none" if paper else "standardize"
  c.seeds = (0, 1) if tiny else (0, 1, 2)
  c.ridge_alphas = tuple(10.0 ** e for e in range(-4, 6))
  return c


def paper_probe_block(*, tiny: bool) -> ml_collections.ConfigDict:
  """Probe protocol `paper`: the original's image-level probe of a stolen copy (reference §7.4,
  b4b_jax/evaluation/paper_probe.py)."""
  c = ml_collections.ConfigDict()
  c.epochs = 8 if tiny else 100  # the original's argparse default (its bash scripts passed 1)
  c.batch_size = 32 if tiny else 256
  c.base_lr = 8.0 if tiny else 0.1  # lr = base_lr * batch_size / 256, per-epoch cosine
  c.momentum = 0.9
  c.weight_decay = 0.0
  c.val_fraction = 0.1           # carved from train (per seed) to choose the epoch; never test
  c.seeds = (0,)                 # the original ran once
  c.augment = "auto"             # auto: CIFAR10 RandomCrop(32, pad 4) + flip, as the original; on | off
  c.pad = 1 if tiny else 4
  c.input_normalization = "none"  # the original: ToTensor only; "encoder": the encoder's mean/std
  c.image_size = ml_collections.config_dict.placeholder(int)  # None: the encoder's input size (224)
  c.embed_batch_size = 64 if tiny else 256
  return c


def evaluation_defense(preset: str = "simsiam", *, tiny: bool) -> ml_collections.ConfigDict:
  """The full defense block of an evaluation job (b4b_jax.defense.defense_config)."""
  if tiny:
    # A few hundred queries of a tiny encoder: fewer projections/buckets and a lower beta, so coverage
    # and the B4B cost are visible at this scale (the paper's setting is P=20, K=12, beta=80%).
    return defense_config(preset, num_projections=4, num_hyperplanes=8, beta=20.0, pad_dim=16)
  return defense_config(preset)
