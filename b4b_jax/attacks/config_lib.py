"""The stealing job's config, shared by configs/steal_simsiam.py and configs/steal_dino.py.

Arguments (the `:arg` string of the config file; see config_args.parse_arg):
  defended=0|1     B4B on (the victim's preset: SimSiam lam 1e-6, alpha 1, beta 80 %; DINO lam 1e-6,
                   alpha 1000, beta 60 %; a dense random affine per account, as the paper's e2e runs)
  sybils=N         number of attacker accounts (1-10); the budget is split evenly, each extra account
                   spends `mapping` queries on the overlap with account 1
  queries=N        total charged queries (paper: 50000 or 100000)
  mapping=N        num_queries_mapping (paper: 10000)
  requery=0|1      every view of every epoch is a new charged query (default: query once, train E epochs)
  epochs=N         stealing epochs (paper: 100)
  loss=infonce|mse|softnn
  mapper=linear|mlp
  tiny             the small CPU variant (random tiny victim built into the workdir, 16x16 photo crops)
"""
import ml_collections

from b4b_jax.attacks import config_args
from b4b_jax.defense import defense_config

# Where the paper-scale runs read their inputs; override with --config.victim.encoder_dir=... etc.
DEFAULT_ENCODERS = {"simsiam": "encoders/simsiam_resnet50_100ep_256bs",
                    "dino": "encoders/dino_vits16"}
DEFAULT_IMAGENET = "folder:data/imagenet"


def steal_config(victim: str, arg=None) -> ml_collections.ConfigDict:
  if victim not in ("simsiam", "dino"):
    raise ValueError(f"victim must be 'simsiam' or 'dino', got {victim!r}")
  a = config_args.parse_arg(arg, tiny=False, defended=False, sybils=1, queries=-1, mapping=-1,
                            requery=False, epochs=-1, loss="infonce", mapper="linear", center=-1)
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
  c.defense = (defense_config(victim, transform="dense_affine") if defended else defense_config("none"))

  c.attack = ml_collections.ConfigDict()
  c.attack.num_queries = a["queries"] if a["queries"] > 0 else (512 if tiny else 50_000)
  c.attack.num_accounts = a["sybils"]
  c.attack.num_queries_mapping = a["mapping"] if a["mapping"] >= 0 else (160 if tiny else 10_000)
  c.attack.query_batch_size = 64 if tiny else 256
  c.attack.requery_each_epoch = a["requery"]
  # The view sent for each image when querying once (the full image, centre crop), and the views of
  # the re-query protocol (the original's stealing transform: RandomResizedCrop + flip, new each epoch).
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
  c.train.epochs = a["epochs"] if a["epochs"] > 0 else (3 if tiny else 100)
  c.train.batch_size = 32 if tiny else 256
  c.train.base_lr = 0.4 if tiny else 0.1  # lr = base_lr * batch / 256, cosine decay
  c.train.momentum = 0.9
  c.train.weight_decay = 0.0
  c.train.loss = a["loss"]
  c.train.temperature = ml_collections.config_dict.placeholder(float)  # None: InfoNCE 0.25, SoftNN 1000
  if a["loss"] == "infonce":
    c.train.temperature = 0.25
  c.train.augment = False        # attacker-side SimCLR views (the original's --useaug; off in the paper)
  c.train.center_targets = bool(defended) if a["center"] < 0 else bool(a["center"])

  c.checkpoint_every_steps = 4 if tiny else 1000
  c.checkpoints_to_keep = 2
  c.log_every_steps = 1 if tiny else 100
  c.progress_every_seconds = 10.0
  c.max_steps_this_run = -1      # > 0: stop (with a checkpoint) after this many steps; resume later
  return c
