"""Linear probes on frozen embeddings: the accuracy every B4B claim is measured with.

Two probes share one protocol (the test split is used once, after the model is chosen):
  * `train_linear_probe`: a linear softmax classifier trained with Adam (batch 64, as the paper's
    embedding probes) or SGD+momentum with a cosine schedule; each seed carves its own validation split
    from train, the epoch with the best validation top-1 is kept, and only that model sees test.
    All seeds train at once (vmapped), one jitted call per epoch (a lax.scan over the epoch's
    minibatches), so a 50k x 2048 probe runs at matmul speed on a CPU.
  * `ridge_probe`: closed-form ridge regression on one-hot targets; the ridge strength is chosen on the
    validation split, then the probe is refitted on the whole train split. Seconds instead of minutes.

Embeddings of different encoders differ in scale by ~1000x (SimSiam vs DINO, or a noised API), so the
features are normalised first ("standardize" per dimension, "l2" per row, or "none"), with statistics
from the train split only. Accuracies are in percent, as in the paper's tables.
"""
import dataclasses
import functools
import math
from typing import Callable, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np
import optax

from b4b_jax.evaluation import least_squares

NORMALIZATIONS = ("none", "standardize", "l2")
METHODS = ("adam", "sgd", "ridge")
DEFAULT_RIDGE_GRID = tuple(10.0 ** e for e in range(-4, 6))


# ---------------------------------------------------------------- input checks and normalisation


def check_embeddings(x, y, name: str, *, num_classes: Optional[int] = None):
  """Returns (float32 [N, D], int32 [N]) or raises ValueError naming what is wrong."""
  x = np.asarray(x)
  y = np.asarray(y)
  if x.ndim != 2:
    raise ValueError(f"{name} embeddings must have shape [N, D], got shape {x.shape}")
  if y.shape != (x.shape[0],):
    raise ValueError(f"{name} labels must have shape [{x.shape[0]}], got shape {y.shape}")
  if x.shape[0] == 0:
    raise ValueError(f"{name} split is empty")
  if not np.issubdtype(x.dtype, np.number):
    raise ValueError(f"{name} embeddings must be numeric, got dtype {x.dtype}")
  if not np.issubdtype(y.dtype, np.integer):
    raise ValueError(f"{name} labels must be integers, got dtype {y.dtype}")
  x = x.astype(np.float32)
  if not np.all(np.isfinite(x)):
    raise ValueError(f"{name} embeddings contain NaN or Inf")
  if y.min() < 0 or (num_classes is not None and y.max() >= num_classes):
    raise ValueError(f"{name} labels must lie in [0, {num_classes}), got range [{y.min()}, {y.max()}]")
  return x, y.astype(np.int32)


@dataclasses.dataclass(frozen=True)
class Normalizer:
  """Feature normalisation fitted on train embeddings, applied identically to every split."""
  kind: str
  mean: Optional[np.ndarray] = None
  scale: Optional[np.ndarray] = None

  @classmethod
  def fit(cls, kind: str, train_x: np.ndarray) -> "Normalizer":
    if kind not in NORMALIZATIONS:
      raise ValueError(f"unknown normalization {kind!r}; choose one of {NORMALIZATIONS}")
    if kind != "standardize":
      return cls(kind)
    x = np.asarray(train_x, np.float64)
    mean = x.mean(0)
    std = x.std(0)
    # Constant columns (e.g. the pad constants of a pad+shuffle transform) carry no information: map them
    # to 0 instead of dividing by ~0; the floor is relative so it works at any representation scale.
    floor = max(float(std.max()) * 1e-6, 1e-30)
    return cls(kind, mean.astype(np.float32), np.maximum(std, floor).astype(np.float32))

  def __call__(self, x):
    x = np.asarray(x, np.float32)
    if self.kind == "standardize":
      return (x - self.mean) / self.scale
    if self.kind == "l2":
      norm = np.linalg.norm(x, axis=1, keepdims=True)
      return x / np.maximum(norm, 1e-30)
    return x


def split_train_val(n: int, val_fraction: float, seed: int):
  """Seeded random split of train indices into (train_part, val_part); val is never empty."""
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1) (the epoch is chosen on validation, never on "
                     f"test), got {val_fraction}")
  num_val = int(round(n * val_fraction))
  if num_val < 1 or num_val >= n:
    raise ValueError(f"val_fraction={val_fraction} of {n} train examples leaves an empty train or "
                     f"validation part")
  perm = np.random.default_rng(seed).permutation(n)
  return np.sort(perm[num_val:]), np.sort(perm[:num_val])


# ---------------------------------------------------------------- results


@dataclasses.dataclass
class SeedResult:
  seed: int
  test_top1: float                 # percent, of the model chosen on validation
  val_top1: float                  # percent, best validation accuracy
  selected: float                  # the chosen epoch (1-based) or ridge strength
  val_curve: list                  # validation top-1 per epoch (or per ridge strength)
  train_loss_curve: list = dataclasses.field(default_factory=list)
  test_curve: Optional[list] = None  # diagnostics only (record_test_curve=True); never used to choose


@dataclasses.dataclass(frozen=True)
class LinearClassifier:
  """A fitted probe: normalisation (train statistics) + affine map to class logits."""
  normalizer: Normalizer
  w: np.ndarray   # [D, C]
  b: np.ndarray   # [C]

  def logits(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != self.w.shape[0]:
      raise ValueError(f"classifier expects [N, {self.w.shape[0]}] embeddings, got {x.shape}")
    return self.normalizer(x) @ self.w + self.b

  def predict(self, x) -> np.ndarray:
    return np.argmax(self.logits(x), axis=1)

  def top1(self, x, y) -> float:
    """Top-1 accuracy in percent."""
    return 100.0 * float(np.mean(self.predict(x) == np.asarray(y)))


@dataclasses.dataclass
class ProbeResult:
  method: str
  normalization: str
  num_classes: int
  test_top1_mean: float
  test_top1_std: float
  seeds: list
  # One fitted classifier per seed (the model chosen on validation); not part of the JSON results.
  classifiers: list = dataclasses.field(default_factory=list, repr=False)

  def to_dict(self) -> dict:
    d = dataclasses.asdict(self)
    d.pop("classifiers")
    return d

  def summary(self) -> dict:
    return {"method": self.method, "test_top1_mean": self.test_top1_mean,
            "test_top1_std": self.test_top1_std, "num_seeds": len(self.seeds),
            "selected": [s.selected for s in self.seeds]}


def _finish(method, normalization, num_classes, seed_results, classifiers) -> ProbeResult:
  accs = np.array([s.test_top1 for s in seed_results])
  return ProbeResult(method=method, normalization=normalization, num_classes=int(num_classes),
                     test_top1_mean=float(accs.mean()), test_top1_std=float(accs.std()),
                     seeds=seed_results, classifiers=classifiers)


def _check_inputs(train_x, train_y, test_x, test_y, num_classes):
  """Validates both splits; test may be None (fit only). Returns arrays and the class count."""
  train_x, train_y = check_embeddings(train_x, train_y, "train")
  num_classes = int(num_classes or int(train_y.max()) + 1)
  train_x, train_y = check_embeddings(train_x, train_y, "train", num_classes=num_classes)
  if test_x is None:
    return train_x, train_y, None, None, num_classes
  test_x, test_y = check_embeddings(test_x, test_y, "test", num_classes=num_classes)
  if test_x.shape[1] != train_x.shape[1]:
    raise ValueError(f"train and test embeddings differ in dimension: {train_x.shape[1]} vs "
                     f"{test_x.shape[1]}")
  return train_x, train_y, test_x, test_y, num_classes


# ---------------------------------------------------------------- gradient probe (Adam / SGD)


def _make_optimizer(method, learning_rate, momentum, weight_decay, total_steps):
  if method == "adam":
    opt = optax.adam(learning_rate)
  else:  # sgd: momentum + per-step cosine schedule, as the original stolen-model probe
    opt = optax.sgd(optax.cosine_decay_schedule(learning_rate, max(total_steps, 1)), momentum=momentum)
  if weight_decay:
    opt = optax.chain(optax.add_decayed_weights(weight_decay), opt)
  return opt


def _accuracy_counts(params, x, y):
  logits = x @ params["w"] + params["b"]
  return jnp.sum(jnp.argmax(logits, -1) == y)


def _loss_fn(params, x, y, mask):
  logits = x @ params["w"] + params["b"]
  losses = optax.softmax_cross_entropy_with_integer_labels(logits, y)
  return jnp.sum(losses * mask) / jnp.sum(mask)


@functools.partial(jax.jit, static_argnames=("opt_spec", "batch_size"))
def _epoch(params, opt_state, best, keys, x_all, y_all, train_idx, val_idx, *, opt_spec, batch_size):
  """One epoch for every seed (vmapped): shuffle, scan the minibatches, score validation, keep best.

  Module-level and keyed by static hyperparameters, so repeated probes of the same shapes (seeds,
  legit-user rows, remap subsets) reuse one compiled function.
  """
  opt = _make_optimizer(*opt_spec)
  num_train = train_idx.shape[1]
  num_batches = math.ceil(num_train / batch_size)
  padded = num_batches * batch_size

  def one_seed(params, opt_state, best, key, train_idx, val_idx):
    perm = jax.random.permutation(key, num_train)
    # The last, partial batch is padded with repeats that carry zero weight (like drop_last=False).
    order = jnp.concatenate([perm, perm[:padded - num_train]]).reshape(num_batches, batch_size)
    mask = (jnp.arange(padded) < num_train).astype(jnp.float32).reshape(num_batches, batch_size)

    def step(carry, batch):
      params, opt_state = carry
      rows, m = batch
      idx = train_idx[rows]
      loss, grads = jax.value_and_grad(_loss_fn)(params, x_all[idx], y_all[idx], m)
      updates, opt_state = opt.update(grads, opt_state, params)
      return (optax.apply_updates(params, updates), opt_state), loss * jnp.sum(m)

    (params, opt_state), losses = jax.lax.scan(step, (params, opt_state), (order, mask))
    val_correct = _accuracy_counts(params, x_all[val_idx], y_all[val_idx])
    # Strictly better only: on ties the earlier epoch stays selected.
    improved = val_correct > best["val_correct"]
    best = {"params": jax.tree.map(lambda new, old: jnp.where(improved, new, old), params,
                                   best["params"]),
            "val_correct": jnp.where(improved, val_correct, best["val_correct"])}
    return params, opt_state, best, jnp.sum(losses) / num_train, val_correct, improved

  return jax.vmap(one_seed)(params, opt_state, best, keys, train_idx, val_idx)


@functools.partial(jax.jit, static_argnames=("opt_spec",))
def _init_opt_state(params, *, opt_spec):
  return jax.vmap(_make_optimizer(*opt_spec).init)(params)


@jax.jit
def _test_correct(params, x, y):
  return jax.vmap(_accuracy_counts, in_axes=(0, None, None))(params, x, y)


def train_linear_probe(train_x, train_y, test_x, test_y, *, num_classes: Optional[int] = None,
                       method: str = "adam", epochs: int = 50, batch_size: int = 64,
                       learning_rate: float = 1e-3, momentum: float = 0.9, weight_decay: float = 0.0,
                       val_fraction: float = 0.1, normalization: str = "standardize",
                       seeds: Sequence[int] = (0, 1, 2), record_test_curve: bool = False,
                       on_epoch: Optional[Callable[[int, dict], None]] = None) -> ProbeResult:
  """Linear probe trained by gradient descent; epoch chosen on validation; test top-1 over seeds.

  Args:
    train_x, train_y, test_x, test_y: embeddings [N, D] and integer labels [N].
    method: "adam" (the paper's embedding probes) or "sgd" (momentum, cosine schedule).
    val_fraction: share of train held out (per seed) to choose the epoch.
    record_test_curve: also record test top-1 after every epoch, for diagnostics only.
    on_epoch: called as on_epoch(epoch, {"train_loss": [...], "val_top1": [...]}) (progress/metrics).
  """
  if method not in ("adam", "sgd"):
    raise ValueError(f"unknown gradient probe method {method!r}; choose 'adam' or 'sgd' "
                     f"(or use ridge_probe)")
  for name, value in (("epochs", epochs), ("batch_size", batch_size)):
    if not isinstance(value, (int, np.integer)) or value < 1:
      raise ValueError(f"{name} must be a positive integer, got {value!r}")
  if not learning_rate > 0:
    raise ValueError(f"learning_rate must be > 0, got {learning_rate}")
  if not seeds:
    raise ValueError("seeds must name at least one seed")
  train_x, train_y, test_x, test_y, num_classes = _check_inputs(train_x, train_y, test_x, test_y,
                                                                num_classes)

  normalizer = Normalizer.fit(normalization, train_x)
  x_all = jnp.asarray(normalizer(train_x))
  y_all = jnp.asarray(train_y)
  splits = [split_train_val(len(train_y), val_fraction, int(s)) for s in seeds]
  train_idx = jnp.asarray(np.stack([s[0] for s in splits]))
  val_idx = jnp.asarray(np.stack([s[1] for s in splits]))
  num_train, num_val = train_idx.shape[1], val_idx.shape[1]
  batch_size = min(batch_size, num_train)
  dim = x_all.shape[1]

  # Only SGD's schedule depends on the step count; Adam probes of any length share one compilation.
  total_steps = epochs * math.ceil(num_train / batch_size) if method == "sgd" else 0
  opt_spec = (method, float(learning_rate), float(momentum), float(weight_decay), total_steps)
  keys = jnp.stack([jax.random.key(int(s)) for s in seeds])

  def init(key):
    # N(0, 0.01) weights, zero bias (the original probe's fc init).
    w = 0.01 * jax.random.normal(jax.random.fold_in(key, 0), (dim, num_classes))
    return {"w": w, "b": jnp.zeros((num_classes,))}

  params = jax.vmap(init)(keys)
  opt_state = _init_opt_state(params, opt_spec=opt_spec)
  best = {"params": jax.tree.map(jnp.copy, params),
          "val_correct": jnp.full((len(seeds),), -1, jnp.int32)}
  has_test = test_x is not None
  if has_test:
    test_xn, test_yn = jnp.asarray(normalizer(test_x)), jnp.asarray(test_y)
  elif record_test_curve:
    raise ValueError("record_test_curve needs test embeddings")

  best_epoch = np.zeros(len(seeds), np.int64)
  val_curves, loss_curves, test_curves = [], [], []
  for epoch in range(1, epochs + 1):
    epoch_keys = jax.vmap(jax.random.fold_in, in_axes=(0, None))(keys, epoch)
    params, opt_state, best, loss, val_correct, improved = _epoch(
        params, opt_state, best, epoch_keys, x_all, y_all, train_idx, val_idx, opt_spec=opt_spec,
        batch_size=batch_size)
    loss = np.asarray(loss)
    if not np.all(np.isfinite(loss)):
      raise FloatingPointError(f"linear probe loss is not finite at epoch {epoch} (learning_rate "
                               f"{learning_rate} too high?)")
    val_top1 = 100.0 * np.asarray(val_correct) / num_val
    best_epoch = np.where(np.asarray(improved), epoch, best_epoch)
    val_curves.append(val_top1)
    loss_curves.append(loss)
    if record_test_curve:
      test_curves.append(100.0 * np.asarray(_test_correct(params, test_xn, test_yn)) / len(test_y))
    if on_epoch is not None:
      on_epoch(epoch, {"train_loss": loss.tolist(), "val_top1": val_top1.tolist()})

  if has_test:
    test_top1 = 100.0 * np.asarray(_test_correct(best["params"], test_xn, test_yn)) / len(test_y)
  else:
    test_top1 = np.full(len(seeds), np.nan)
  best_w, best_b = np.asarray(best["params"]["w"]), np.asarray(best["params"]["b"])
  classifiers = [LinearClassifier(normalizer, best_w[i], best_b[i]) for i in range(len(seeds))]
  results = []
  for i, seed in enumerate(seeds):
    results.append(SeedResult(
        seed=int(seed), test_top1=float(test_top1[i]),
        val_top1=float(100.0 * int(best["val_correct"][i]) / num_val), selected=int(best_epoch[i]),
        val_curve=[float(v[i]) for v in val_curves], train_loss_curve=[float(v[i]) for v in loss_curves],
        test_curve=[float(v[i]) for v in test_curves] if record_test_curve else None))
  return _finish(method, normalization, num_classes, results, classifiers)


# ---------------------------------------------------------------- closed-form ridge probe


def ridge_probe(train_x, train_y, test_x, test_y, *, num_classes: Optional[int] = None,
                alphas: Sequence[float] = DEFAULT_RIDGE_GRID, val_fraction: float = 0.1,
                normalization: str = "standardize", seeds: Sequence[int] = (0,)) -> ProbeResult:
  """Closed-form ridge probe; strength chosen on each seed's validation split, refit on all of train.

  One pass over the data: the moments of all of train are computed once; each seed's train part is
  all-of-train minus its (small) validation part. The refits on all of train (every strength, from one
  eigendecomposition) are shared by the seeds.
  """
  if not alphas or any(not a > 0 for a in alphas):
    raise ValueError(f"ridge alphas must be a non-empty list of positive numbers, got {alphas}")
  if not seeds:
    raise ValueError("seeds must name at least one seed")
  train_x, train_y, test_x, test_y, num_classes = _check_inputs(train_x, train_y, test_x, test_y,
                                                                num_classes)
  normalizer = Normalizer.fit(normalization, train_x)
  x = normalizer(train_x)
  offset = x.mean(0, dtype=np.float64)
  xc = (x - offset).astype(np.float32)
  onehot = np.eye(num_classes)[train_y]
  alphas = sorted(alphas, reverse=True)  # ties go to the strongest regularisation
  everything = least_squares.moments(xc, onehot)
  refits = [(w, b) for _, w, b in least_squares.solve(everything, alphas)]

  results, classifiers = [], []
  for seed in seeds:
    tr, va = split_train_val(len(train_y), val_fraction, int(seed))
    xv = xc[va].astype(np.float64)
    val_curve = []
    subset = everything - least_squares.moments(xc[va], onehot[va])
    for _, w, b in least_squares.solve(subset, alphas):
      val_curve.append(100.0 * float(np.mean(np.argmax(xv @ w + b, 1) == train_y[va])))
    best = int(np.argmax(val_curve))
    w, b = refits[best]
    classifier = LinearClassifier(normalizer, w.astype(np.float32), (b - offset @ w).astype(np.float32))
    classifiers.append(classifier)
    test_top1 = classifier.top1(test_x, test_y) if test_x is not None else float("nan")
    results.append(SeedResult(seed=int(seed), test_top1=test_top1, val_top1=val_curve[best],
                              selected=float(alphas[best]), val_curve=val_curve))
  return _finish("ridge", normalization, num_classes, results, classifiers)


def run_probe(train_x, train_y, test_x, test_y, cfg, *, num_classes=None, on_epoch=None,
              record_test_curve: bool = False) -> ProbeResult:
  """Dispatches on a probe config (fields of configs' `probe` block) to the gradient or ridge probe.

  test_x/test_y may be None to only fit (then test_top1 is NaN; use `.classifiers`).
  record_test_curve: gradient probes also record test top-1 per epoch (diagnostics; ridge ignores it).
  """
  method = cfg.get("method", "adam")
  if method not in METHODS:
    raise ValueError(f"unknown probe method {method!r}; choose one of {METHODS}")
  common = dict(num_classes=num_classes, val_fraction=cfg.get("val_fraction", 0.1),
                normalization=cfg.get("normalization", "standardize"),
                seeds=tuple(cfg.get("seeds", (0, 1, 2))))
  if method == "ridge":
    return ridge_probe(train_x, train_y, test_x, test_y,
                       alphas=tuple(cfg.get("ridge_alphas", DEFAULT_RIDGE_GRID)), **common)
  return train_linear_probe(
      train_x, train_y, test_x, test_y, method=method, epochs=cfg.get("epochs", 50),
      batch_size=cfg.get("batch_size", 64), learning_rate=cfg.get("learning_rate", 1e-3),
      momentum=cfg.get("momentum", 0.9), weight_decay=cfg.get("weight_decay", 0.0),
      on_epoch=on_epoch, record_test_curve=record_test_curve, **common)


def check_probe_config(cfg) -> None:
  """Raises ValueError naming the first invalid field of a probe config (before any job starts)."""
  method = cfg.get("method", "adam")
  if method not in METHODS:
    raise ValueError(f"probe.method must be one of {METHODS}, got {method!r}")
  if cfg.get("normalization", "standardize") not in NORMALIZATIONS:
    raise ValueError(f"probe.normalization must be one of {NORMALIZATIONS}, got "
                     f"{cfg.get('normalization')!r}")
  if not 0.0 < cfg.get("val_fraction", 0.1) < 1.0:
    raise ValueError(f"probe.val_fraction must be in (0, 1), got {cfg.get('val_fraction')}")
  if not tuple(cfg.get("seeds", (0,))):
    raise ValueError("probe.seeds must name at least one seed")
  if method == "ridge":
    alphas = tuple(cfg.get("ridge_alphas", DEFAULT_RIDGE_GRID))
    if not alphas or any(not a > 0 for a in alphas):
      raise ValueError(f"probe.ridge_alphas must be positive numbers, got {alphas}")
    return
  for name in ("epochs", "batch_size"):
    if cfg.get(name, 1) < 1:
      raise ValueError(f"probe.{name} must be >= 1, got {cfg.get(name)}")
  if not cfg.get("learning_rate", 1e-3) > 0:
    raise ValueError(f"probe.learning_rate must be > 0, got {cfg.get('learning_rate')}")
