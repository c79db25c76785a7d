"""Probe protocol `paper`: the original's image-level linear probe of a stolen copy (reference §7.4).

The paper's stolen-model numbers come from the original `evaluate_stolen_model.py`: a linear head (fc)
on the frozen backbone, kept in eval mode throughout (BatchNorm running statistics frozen), fc weight
~ N(0, std 0.01) (`normal_(mean=0.0, std=0.01)`), bias 0; cross-entropy; SGD with lr = 0.1 x batch/256,
momentum 0.9, weight decay 0 (PyTorch SGD: buf = m * buf + g, p -= lr * buf); per-epoch cosine
lr_e = lr * 0.5 * (1 + cos(pi * e / E)), e = 0..E-1; batch 256, shuffled, last batch kept.
Images: CIFAR10 train RandomCrop(32, padding 4) + HorizontalFlip + Resize(224), a fresh view every
epoch; CIFAR10 test and SVHN / STL10 / F-MNIST (grey tiled to 3 channels) Resize(224); ToTensor only,
no mean/std normalisation (`input_normalization="none"`; "encoder" uses the encoder's own, as the
stealing queries were normalised).

What differs from the original, on purpose:
  * the epoch is chosen on a validation split carved from train (per seed; those images use the test
    transform), never on test. Reported: the chosen epoch's test top-1 and the last epoch's (the
    original printed test top-1 every epoch and kept `best_acc1`, model selection on test; that number
    is recorded only as a labelled comparison, `best_on_test_top1`);
  * the backbone is frozen and in eval mode, so the head's input is a pure function of the image: the
    backbone runs once per image view (train/val/test once; CIFAR10's augmented train views once per
    epoch) and the head trains on those features, the same computation as the original's forward of
    the whole network per batch.

Pure pieces (`epoch_order`, `sgd_epoch`, `cosine_lr`, `init_head`) are what the torch reference test
checks step by step.
"""
import dataclasses
import functools
import math
from typing import Callable, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from b4b_jax import data as data_lib
from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import paper_numbers

AUGMENT_MODES = ("auto", "on", "off")
INPUT_NORMALIZATIONS = ("none", "encoder")
# Datasets whose train images the original augmented (canonical names, paper_numbers).
AUGMENTED_DATASETS = ("cifar10",)
FC_INIT_STD = 0.01


# ---------------------------------------------------------------- images


class PadCropFlipResize:
  """torchvision RandomCrop(native size, padding=pad) + RandomHorizontalFlip + Resize(size), one HWC
  uint8 image: zero padding, a uniform offset in [0, 2 * pad] per axis, p = 1/2 flip, PIL-like resize.

  Has the `is_random` / `__call__(image, seed)` interface of data.Transform."""
  is_random = True

  def __init__(self, size: int, pad: int = 4, method: str = "bilinear"):
    if int(pad) < 0:
      raise ValueError(f"pad must be >= 0, got {pad}")
    self.size, self.pad, self.method = int(size), int(pad), method
    self._resize = data_lib.Transform("resize", self.size, method=method)

  def __call__(self, image, seed):
    tf = data_lib.preprocess.tf
    image = data_lib.preprocess.to_rgb(tf.convert_to_tensor(image))
    shape = tf.shape(image)
    h, w, p = shape[0], shape[1], self.pad
    padded = tf.pad(image, [[p, p], [p, p], [0, 0]])
    crop_seed, flip_seed = tf.unstack(tf.random.experimental.stateless_split(seed, 2))
    offsets = tf.random.stateless_uniform([2], crop_seed, minval=0, maxval=2 * p + 1, dtype=tf.int32)
    image = padded[offsets[0]:offsets[0] + h, offsets[1]:offsets[1] + w, :]
    image = data_lib.random_flip(image, flip_seed)
    return self._resize(image)

  def __repr__(self):
    return f"PadCropFlipResize(size={self.size}, pad={self.pad}, method={self.method!r})"


def probe_transforms(dataset: str, size: int, *, augment: str = "auto", pad: int = 4):
  """(train transform, eval transform) of the original probe for `dataset` at `size` pixels."""
  if augment not in AUGMENT_MODES:
    raise ValueError(f"augment must be one of {AUGMENT_MODES}, got {augment!r}")
  resize = data_lib.Transform("resize", int(size))
  on = (paper_numbers.canonical_dataset(dataset) in AUGMENTED_DATASETS if augment == "auto"
        else augment == "on")
  return (PadCropFlipResize(size, pad) if on else resize), resize


def probe_encoder(encoder, input_normalization: str = "none"):
  """The encoder as the probe feeds it: ToTensor only ("none", the original) or its own mean/std."""
  if input_normalization not in INPUT_NORMALIZATIONS:
    raise ValueError(f"input_normalization must be one of {INPUT_NORMALIZATIONS}, got "
                     f"{input_normalization!r}")
  if input_normalization == "encoder":
    return encoder
  return embeddings_lib.EncoderView(encoder, normalization="unit")


def embed_view(encoder, dataset: str, split: str, transform, *, seed: int, epoch: int,
               batch_size: int, data_dir=None, limit=None):
  """Features [N, D] and labels [N] of one pass over a split; example i of a random transform draws
  from example_seed(seed, epoch, i), so every epoch has its own views and a rerun the same ones."""
  # Streamed; each process embeds its share on its devices (embeddings.embed_split).
  return embeddings_lib.embed_split(encoder, dataset, split, transform=transform, batch_size=batch_size,
                                    data_dir=data_dir, limit=limit, seed=seed, epoch=epoch)


# ---------------------------------------------------------------- the head's optimisation (pure)


def cosine_lr(base_lr: float, batch_size: int, epoch: int, epochs: int) -> float:
  """The original's adjust_learning_rate: (base_lr * batch / 256) * 0.5 * (1 + cos(pi * e / E))."""
  init_lr = base_lr * batch_size / 256
  return init_lr * 0.5 * (1.0 + math.cos(math.pi * epoch / epochs))


def init_head(seed: int, dim: int, num_classes: int) -> dict:
  """fc weight ~ N(0, 0.01^2) (std 0.01), bias 0; w is [D, C] (torch's fc.weight transposed)."""
  key = jax.random.fold_in(jax.random.key(int(seed)), 0x1ead)
  return {"w": FC_INIT_STD * jax.random.normal(key, (dim, num_classes), jnp.float32),
          "b": jnp.zeros((num_classes,), jnp.float32)}


def epoch_order(seed: int, epoch: int, rows: np.ndarray, batch_size: int):
  """(order [B, bs] row indices, mask [B, bs]) of one shuffled epoch over `rows` (the seed's train
  part), last batch partial (DataLoader drop_last=False): padded with weight-0 repeats."""
  rows = np.asarray(rows)
  perm = rows[np.random.default_rng([int(seed), int(epoch), 0x5eed]).permutation(len(rows))]
  num_batches = -(-len(rows) // batch_size)
  pad = num_batches * batch_size - len(rows)
  order = np.concatenate([perm, perm[:pad]]).reshape(num_batches, batch_size)
  mask = (np.arange(num_batches * batch_size) < len(rows)).reshape(num_batches, batch_size)
  return order.astype(np.int32), mask.astype(np.float32)


def _batch_loss(params, x, y, mask):
  logits = x @ params["w"] + params["b"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * mask) / jnp.sum(mask)  # CrossEntropyLoss's mean over the real rows


def _sgd_epoch_one(params, buf, feats, labels, order, mask, lr, momentum, weight_decay):
  def step(carry, batch):
    params, buf = carry
    rows, m = batch
    loss, grads = jax.value_and_grad(_batch_loss)(params, feats[rows], labels[rows], m)
    # torch.optim.SGD (dampening 0, not Nesterov): g += wd * p; buf = m * buf + g; p -= lr * buf.
    grads = jax.tree.map(lambda g, p: g + weight_decay * p, grads, params)
    buf = jax.tree.map(lambda b, g: momentum * b + g, buf, grads)
    params = jax.tree.map(lambda p, b: p - lr * b, params, buf)
    return (params, buf), loss

  (params, buf), losses = jax.lax.scan(step, (params, buf), (order, mask))
  return params, buf, losses


@functools.partial(jax.jit, donate_argnums=(0, 1))
def sgd_epoch(params, buf, feats, labels, order, mask, lr, momentum, weight_decay):
  """One epoch for S seeds at once: params/buf leaves [S, ...], order [S, B, bs], mask [B, bs]; the
  lr is an argument, so the whole cosine schedule compiles once. Returns (params, buf, losses [S, B])."""
  return jax.vmap(_sgd_epoch_one, in_axes=(0, 0, None, None, 0, None, None, None, None))(
      params, buf, feats, labels, order, mask, lr, momentum, weight_decay)


@jax.jit
def _correct(params, x, y):
  return jax.vmap(lambda p: jnp.sum(jnp.argmax(x @ p["w"] + p["b"], -1) == y))(params)


@jax.jit
def _correct_rows(params, x, y, rows):
  return jax.vmap(lambda p, r: jnp.sum(jnp.argmax(x[r] @ p["w"] + p["b"], -1) == y[r]))(params, rows)


# ---------------------------------------------------------------- the probe


@dataclasses.dataclass
class PaperSeedResult:
  seed: int
  chosen_epoch: int             # 1-based epoch with the best validation top-1 (earliest on ties)
  val_top1: float               # percent, at the chosen epoch
  test_top1: float              # percent, the chosen epoch's head
  test_top1_last: float         # percent, the last epoch's head
  val_curve: list
  train_loss_curve: list
  test_curve: list              # diagnostics only: never used to choose


@dataclasses.dataclass
class PaperProbeResult:
  protocol: str
  num_classes: int
  test_top1_mean: float         # of the epochs chosen on validation
  test_top1_std: float
  test_top1_last_mean: float
  test_top1_last_std: float
  best_on_test_top1_mean: float  # the original's best_acc1 (chosen on test): a comparison only
  settings: dict
  seeds: list

  def to_dict(self) -> dict:
    return dataclasses.asdict(self)


def train_head(train_feats_fn: Callable[[int], np.ndarray], train_y, val_x, test_x, test_y, *,
               train_rows: Sequence[np.ndarray], val_rows: Sequence[np.ndarray], seeds, epochs: int,
               batch_size: int, base_lr: float, momentum: float, weight_decay: float, num_classes: int,
               on_epoch=None):
  """Trains one head per seed on features; chooses the epoch on validation only.

  train_feats_fn(epoch) -> features [N_train, D] of that epoch's train views (row i = image i);
  val_x [N_train, D] the train images under the eval transform, read at each seed's `val_rows`;
  test_x / test_y only score the heads. Returns [PaperSeedResult].
  """
  s = len(seeds)
  dim = val_x.shape[1]
  params = {k: jnp.stack([init_head(int(seed), dim, num_classes)[k] for seed in seeds])
            for k in ("w", "b")}
  buf = jax.tree.map(jnp.zeros_like, params)
  train_y = jnp.asarray(train_y)
  val_xj = jnp.asarray(val_x)
  val_rows_j = jnp.asarray(np.stack(val_rows))
  test_xj, test_yj = jnp.asarray(test_x), jnp.asarray(test_y)
  n_val = len(val_rows[0])
  best = {"params": jax.tree.map(jnp.copy, params), "correct": np.full(s, -1), "epoch": np.zeros(s, int)}
  val_curves, loss_curves, test_curves = [], [], []
  batch_size = min(int(batch_size), len(train_rows[0]))
  for epoch in range(epochs):
    feats = jnp.asarray(train_feats_fn(epoch))
    orders = [epoch_order(seed, epoch, rows, batch_size) for seed, rows in zip(seeds, train_rows)]
    order = jnp.asarray(np.stack([o for o, _ in orders]))
    mask = jnp.asarray(orders[0][1])
    lr = cosine_lr(base_lr, batch_size, epoch, epochs)
    params, buf, losses = sgd_epoch(params, buf, feats, train_y, order, mask, jnp.float32(lr),
                                    jnp.float32(momentum), jnp.float32(weight_decay))
    losses = np.asarray(losses)
    # Mean loss over the epoch's examples (each batch's mean weighted by its real rows).
    weights = np.asarray(mask).sum(1)
    loss = (losses * weights).sum(1) / weights.sum()
    if not np.all(np.isfinite(loss)):
      raise FloatingPointError(f"paper probe loss is not finite at epoch {epoch + 1}")
    val_correct = np.asarray(_correct_rows(params, val_xj, train_y, val_rows_j))
    improved = val_correct > best["correct"]  # strictly: ties keep the earlier epoch
    best["params"] = jax.tree.map(
        lambda new, old: jnp.where(jnp.asarray(improved).reshape((-1,) + (1,) * (new.ndim - 1)),
                                   new, old), params, best["params"])
    best["correct"] = np.where(improved, val_correct, best["correct"])
    best["epoch"] = np.where(improved, epoch + 1, best["epoch"])
    val_curves.append(100.0 * val_correct / n_val)
    loss_curves.append(loss)
    test_curves.append(100.0 * np.asarray(_correct(params, test_xj, test_yj)) / len(test_y))
    if on_epoch is not None:
      on_epoch(epoch + 1, {"train_loss": loss.tolist(), "val_top1": val_curves[-1].tolist(),
                           "lr": lr})
  chosen = 100.0 * np.asarray(_correct(best["params"], test_xj, test_yj)) / len(test_y)
  out = []
  for i, seed in enumerate(seeds):
    out.append(PaperSeedResult(
        seed=int(seed), chosen_epoch=int(best["epoch"][i]),
        val_top1=float(100.0 * best["correct"][i] / n_val), test_top1=float(chosen[i]),
        test_top1_last=float(test_curves[-1][i]), val_curve=[float(v[i]) for v in val_curves],
        train_loss_curve=[float(v[i]) for v in loss_curves],
        test_curve=[float(v[i]) for v in test_curves]))
  return out


def paper_probe(encoder, dataset: str, *, cfg, data_dir=None, train_split: str = "train",
                test_split: str = "test", train_limit=None, test_limit=None, seed: int = 0,
                clean=None, on_epoch=None) -> PaperProbeResult:
  """The original's image-level probe of `encoder` (a models.Encoder, e.g. a stolen copy) on a dataset.

  cfg: the `probe` block of configs/probe.py (protocol "paper"). clean: optional precomputed
  {"train_x", "train_y", "test_x", "test_y"} under the eval transform (the job's cache); computed if None.
  """
  check_config(cfg)
  view = probe_encoder(encoder, cfg.input_normalization)
  size = int(cfg.image_size or encoder.input_size)
  train_tf, eval_tf = probe_transforms(dataset, size, augment=cfg.augment, pad=cfg.pad)
  common = dict(data_dir=data_dir, seed=seed, batch_size=cfg.embed_batch_size)
  if clean is None:
    clean = clean_features(encoder, dataset, cfg=cfg, train_split=train_split, test_split=test_split,
                           train_limit=train_limit, test_limit=test_limit, **common)
  train_y, test_y = np.asarray(clean["train_y"]), np.asarray(clean["test_y"])
  num_classes = int(max(train_y.max(), test_y.max())) + 1
  linear_probe.check_embeddings(clean["train_x"], train_y, "train")
  linear_probe.check_embeddings(clean["test_x"], test_y, "test")
  seeds = tuple(int(s) for s in cfg.seeds)
  splits = [linear_probe.split_train_val(len(train_y), cfg.val_fraction, s) for s in seeds]

  def train_feats(epoch):
    if not train_tf.is_random:
      return clean["train_x"]
    x, y = embed_view(view, dataset, train_split, train_tf, epoch=epoch, limit=train_limit, **common)
    if not np.array_equal(y, train_y):
      raise ValueError(f"{dataset} {train_split}: the augmented pass read other labels than the clean "
                       "pass (a non-deterministic dataset order?)")
    return x

  results = train_head(train_feats, train_y, clean["train_x"], clean["test_x"], test_y,
                       train_rows=[tr for tr, _ in splits], val_rows=[va for _, va in splits],
                       seeds=seeds, epochs=int(cfg.epochs), batch_size=int(cfg.batch_size),
                       base_lr=float(cfg.base_lr), momentum=float(cfg.momentum),
                       weight_decay=float(cfg.weight_decay), num_classes=num_classes,
                       on_epoch=on_epoch)
  batch_size = min(int(cfg.batch_size), len(splits[0][0]))   # as train_head: at most the train part
  chosen = np.array([r.test_top1 for r in results])
  last = np.array([r.test_top1_last for r in results])
  best_on_test = np.array([max(r.test_curve) for r in results])
  settings = {"train_transform": repr(train_tf), "eval_transform": repr(eval_tf),
              "input_normalization": cfg.input_normalization, "epochs": int(cfg.epochs),
              "batch_size": batch_size, "lr": float(cfg.base_lr) * batch_size / 256,
              "momentum": float(cfg.momentum),
              "weight_decay": float(cfg.weight_decay), "schedule": "per-epoch cosine",
              "fc_init": f"N(0, std {FC_INIT_STD}), bias 0", "val_fraction": float(cfg.val_fraction),
              "num_train": int(len(train_y)), "num_test": int(len(test_y)),
              "rep_dim": int(clean["train_x"].shape[1])}
  return PaperProbeResult(
      protocol="paper", num_classes=num_classes, test_top1_mean=float(chosen.mean()),
      test_top1_std=float(chosen.std()), test_top1_last_mean=float(last.mean()),
      test_top1_last_std=float(last.std()), best_on_test_top1_mean=float(best_on_test.mean()),
      settings=settings, seeds=results)


def clean_features(encoder, dataset: str, *, cfg, data_dir=None, train_split="train",
                   test_split="test", train_limit=None, test_limit=None, seed: int = 0,
                   batch_size: int = 256) -> dict:
  """Train and test features under the eval transform (Resize), as the probe's encoder sees them."""
  view = probe_encoder(encoder, cfg.input_normalization)
  _, eval_tf = probe_transforms(dataset, int(cfg.image_size or encoder.input_size), augment="off")
  out = {"meta": {"dataset": dataset, "protocol": "paper", "transform": repr(eval_tf),
                  "input_normalization": cfg.input_normalization}}
  for key, split, limit in (("train", train_split, train_limit), ("test", test_split, test_limit)):
    out[f"{key}_x"], out[f"{key}_y"] = embed_view(view, dataset, split, eval_tf, seed=seed, epoch=0,
                                                  batch_size=batch_size, data_dir=data_dir,
                                                  limit=limit)
  return out


def check_config(cfg) -> None:
  """Raises ValueError naming the first invalid field of a paper-probe block."""
  if cfg.augment not in AUGMENT_MODES:
    raise ValueError(f"probe.augment must be one of {AUGMENT_MODES}, got {cfg.augment!r}")
  if cfg.input_normalization not in INPUT_NORMALIZATIONS:
    raise ValueError(f"probe.input_normalization must be one of {INPUT_NORMALIZATIONS}, got "
                     f"{cfg.input_normalization!r}")
  for name in ("epochs", "batch_size", "embed_batch_size"):
    if not isinstance(cfg[name], int) or cfg[name] < 1:
      raise ValueError(f"probe.{name} must be a positive integer, got {cfg[name]!r}")
  if not cfg.base_lr > 0:
    raise ValueError(f"probe.base_lr must be > 0, got {cfg.base_lr}")
  if not 0.0 <= cfg.momentum < 1.0 or cfg.weight_decay < 0:
    raise ValueError(f"probe.momentum must be in [0, 1) and probe.weight_decay >= 0, got "
                     f"{cfg.momentum} / {cfg.weight_decay}")
  if not 0.0 < cfg.val_fraction < 1.0:
    raise ValueError(f"probe.val_fraction must be in (0, 1) (the epoch is chosen on validation, never "
                     f"on test), got {cfg.val_fraction}")
  if not tuple(cfg.seeds):
    raise ValueError("probe.seeds must name at least one seed")
  if cfg.pad < 0 or (cfg.image_size is not None and cfg.image_size < 1):
    raise ValueError(f"probe.pad must be >= 0 and probe.image_size None or >= 1, got {cfg.pad} / "
                     f"{cfg.image_size}")
