"""Mappers between accounts: carry account k's responses into account 1's representation space.

`fit_mapper(source, target, kind=...)` is the one way to fit one, for the sybil attack and the
remapping experiment alike:
  * "linear" (the paper's choice): one affine layer trained with Adam + MSE (below);
  * "mlp": the original end-to-end code's 3-layer ReLU network, trained the same way;
  * "lstsq": the affine least-squares map in closed form (float64, a tiny ridge relative to the data
    scale: evaluation.least_squares). The best any linear mapper trained on the same pairs can do, so a
    remapping cost measured with it is not inflated by an under-trained optimiser.

Training of "linear" / "mlp": a sybil attacker queries the same images (the overlap) through account 1
and account k, then fits a mapper f with f(response_k) ~ response_1 by MSE. The paper uses a linear model; the original end-to-end
code a 3-layer ReLU MLP (kind="mlp", hidden width = output dim). Training follows the paper's code:
Adam lr 1e-4, batch 64, MSE, a seeded 80/20 split of the overlap. Unlike the original (which kept the
model whose *last validation batch* had the lowest loss), the model is selected on the MSE over the
*whole* validation split, evaluated after every epoch.

Scale: raw SimSiam features are ~1e-3 per dimension and the original multiplied them by 1000 before
mapping (with a scaling bug, reference section 5.3). Here inputs are z-scored per dimension and targets
centred and divided by one global RMS, both with statistics of the training part only. For the linear
mapper this is an exact reparametrisation of an affine map (same function class); the loss stays a plain
MSE up to a constant factor, and the reported errors are in the target's original units.
"""
import dataclasses
import functools
from typing import Any, Dict

import jax
import jax.numpy as jnp
import numpy as np
import optax
from flax import nnx

from b4b_jax.evaluation import least_squares
from b4b_jax.evaluation import similarity

MAPPER_KINDS = ("linear", "mlp", "lstsq")
TRAINED_KINDS = ("linear", "mlp")


class MapperNet(nnx.Module):
  """linear: one affine layer. mlp: Linear-ReLU-Linear-ReLU-Linear with hidden width = out_dim."""

  def __init__(self, in_dim: int, out_dim: int, kind: str, *, rngs: nnx.Rngs):
    if kind not in TRAINED_KINDS:
      raise ValueError(f"unknown trained mapper kind {kind!r}; choose one of {TRAINED_KINDS}")
    dims = [in_dim, out_dim] if kind == "linear" else [in_dim, out_dim, out_dim, out_dim]
    self.layers = nnx.List([nnx.Linear(a, b, rngs=rngs) for a, b in zip(dims[:-1], dims[1:])])

  def __call__(self, x):
    for i, layer in enumerate(self.layers):
      x = layer(x)
      if i < len(self.layers) - 1:
        x = jax.nn.relu(x)
    return x


@dataclasses.dataclass
class Mapper:
  """A fitted mapper: `apply(responses_k)` gives responses in account 1's space."""
  kind: str
  in_dim: int
  out_dim: int
  params: Any            # pure-dict pytree of MapperNet's nnx.Param values
  normalization: Dict[str, np.ndarray]  # in_mean, in_std, out_mean, out_scale
  metrics: Dict[str, float] = dataclasses.field(default_factory=dict)

  def __post_init__(self):
    if self.kind == "lstsq":  # params {"w": [in, out], "b": [out]} in float64, applied on the host
      self._apply = lambda params, _, x: np.asarray(x, np.float64) @ params["w"] + params["b"]
    else:
      graphdef = nnx.graphdef(MapperNet(self.in_dim, self.out_dim, self.kind, rngs=nnx.Rngs(0)))
      self._apply = _make_apply(graphdef)

  def apply(self, x) -> np.ndarray:
    x = np.asarray(x, np.float32)
    if x.ndim != 2 or x.shape[1] != self.in_dim:
      raise ValueError(f"mapper expects [N, {self.in_dim}] responses, got {x.shape}")
    return np.asarray(self._apply(self.params, self.normalization, x), np.float32)

  def __call__(self, x) -> np.ndarray:
    return self.apply(x)

  def state(self) -> dict:
    """Pytree of numpy arrays with flat string keys, for checkpoints (see `from_state`)."""
    flat = {".".join(str(k) for k in path): np.asarray(v)
            for path, v in jax.tree_util.tree_flatten_with_path(self.params)[0]
            for path in [tuple(getattr(p, "key", getattr(p, "idx", p)) for p in path)]}
    return {"params": flat, "normalization": {k: np.asarray(v) for k, v in self.normalization.items()}}

  @classmethod
  def from_state(cls, kind: str, in_dim: int, out_dim: int, state: dict, metrics=None) -> "Mapper":
    params: dict = {}
    for key, value in state["params"].items():
      node = params
      parts = [int(p) if p.isdigit() else p for p in key.split(".")]
      for part in parts[:-1]:
        node = node.setdefault(part, {})
      node[parts[-1]] = np.asarray(value)
    dtype = np.float64 if kind == "lstsq" else np.float32
    norm = {k: np.asarray(v, dtype) for k, v in state["normalization"].items()}
    return cls(kind, in_dim, out_dim, params, norm, dict(metrics or {}))


@functools.lru_cache(maxsize=8)
def _make_apply(graphdef):
  @jax.jit
  def apply(params, norm, x):
    model = nnx.merge(graphdef, nnx.State(params) if not isinstance(params, nnx.State) else params)
    z = (x - norm["in_mean"]) / norm["in_std"]
    return model(z) * norm["out_scale"] + norm["out_mean"]
  return apply


def _normalization(x_train: np.ndarray, y_train: np.ndarray) -> Dict[str, np.ndarray]:
  in_mean = x_train.mean(0)
  in_std = x_train.std(0)
  # Constant input columns (e.g. a pad transform's constants) carry no information: leave them unscaled.
  in_std = np.where(in_std > 1e-12 * max(float(in_std.max()), 1e-30), in_std, 1.0)
  out_mean = y_train.mean(0)
  out_scale = float(np.sqrt(np.mean(np.square(y_train - out_mean)))) or 1.0
  f32 = lambda a: np.asarray(a, np.float32)
  return {"in_mean": f32(in_mean), "in_std": f32(in_std), "out_mean": f32(out_mean),
          "out_scale": f32(out_scale)}


def _cosine(a: np.ndarray, b: np.ndarray) -> float:
  return float(np.mean(similarity.cosine_similarity(a, b)))


@functools.lru_cache(maxsize=8)
def _trainer(graphdef, learning_rate: float, batch_size: int, epochs: int, num_train: int):
  """The whole fit as one jitted scan over epochs (cached: sybil accounts share one compilation)."""
  tx = optax.adam(learning_rate)
  steps = num_train // batch_size  # drop the last partial batch, as DataLoader(drop_last) would

  def forward(p, x):
    return nnx.merge(graphdef, nnx.State(p))(x)

  @jax.jit
  def train(p, key, x_tr, y_tr, x_va, y_va, norm):
    def epoch_fn(carry, epoch):
      p, opt, best_p, best_val, best_epoch = carry
      order = jax.random.permutation(jax.random.fold_in(key, epoch), num_train)

      def step(c, i):
        p, opt = c
        idx = jax.lax.dynamic_slice_in_dim(order, i * batch_size, batch_size)
        loss_fn = lambda q: jnp.mean(jnp.square(forward(q, x_tr[idx]) - y_tr[idx]))
        g = jax.grad(loss_fn)(p)
        upd, opt = tx.update(g, opt, p)
        return (optax.apply_updates(p, upd), opt), None

      (p, opt), _ = jax.lax.scan(step, (p, opt), jnp.arange(steps))
      # Model selection on the whole validation split, in the target's original units.
      pred = forward(p, x_va) * norm["out_scale"] + norm["out_mean"]
      val = jnp.mean(jnp.square(pred - y_va))
      better = val < best_val
      best_p = jax.tree.map(lambda new, old: jnp.where(better, new, old), p, best_p)
      best_val = jnp.where(better, val, best_val)
      return (p, opt, best_p, best_val, jnp.where(better, epoch, best_epoch)), val

    init = (p, tx.init(p), p, jnp.asarray(jnp.inf, jnp.float32), jnp.asarray(-1, jnp.int32))
    (_, _, best_p, best_val, best_epoch), curve = jax.lax.scan(epoch_fn, init, jnp.arange(epochs))
    return best_p, best_val, best_epoch, curve

  return train


def fit_mapper(source, target, *, kind: str = "linear", epochs: int = 250, learning_rate: float = 1e-4,
               batch_size: int = 64, val_fraction: float = 0.2, seed: int = 0,
               ridge: float = 1e-9) -> Mapper:
  """Fits a mapper source -> target on paired rows (source[i] and target[i] answer the same query).

  "lstsq" uses all pairs and only `ridge` (relative to the mean Gram eigenvalue); metrics: train_mse,
  num_train. The trained kinds use the other arguments; their `metrics` hold val_mse (selected
  model, whole validation split, original units), val_mse_unmapped (the MSE of not mapping at all,
  when dims agree), val_cosine / val_cosine_unmapped, train_mse, best_epoch, num_train, num_val,
  val_mse_first_epoch.
  """
  dtype = np.float64 if kind == "lstsq" else np.float32
  source = np.asarray(source, dtype)
  target = np.asarray(target, dtype)
  if source.ndim != 2 or target.ndim != 2 or len(source) != len(target):
    raise ValueError(f"mapper needs paired [N, D] arrays, got source {source.shape}, "
                     f"target {target.shape}")
  if not (np.all(np.isfinite(source)) and np.all(np.isfinite(target))):
    raise ValueError("mapper inputs contain NaN or Inf")
  if kind not in MAPPER_KINDS:
    raise ValueError(f"unknown mapper kind {kind!r}; choose one of {MAPPER_KINDS}")
  if len(source) < 1:
    raise ValueError("mapper needs at least one pair")
  if kind == "lstsq":
    return _fit_lstsq(source, target, ridge)
  if not 0.0 < val_fraction < 1.0:
    raise ValueError(f"val_fraction must be in (0, 1), got {val_fraction}")
  if epochs < 1 or batch_size < 1 or not learning_rate > 0:
    raise ValueError(f"invalid mapper hyperparameters: epochs={epochs}, batch_size={batch_size}, "
                     f"learning_rate={learning_rate}")
  n = len(source)
  num_val = int(round(n * val_fraction))
  num_train = n - num_val
  if num_val < 1 or num_train < batch_size:
    raise ValueError(f"{n} overlap pairs are too few for a {val_fraction:.0%} validation split and "
                     f"batch size {batch_size}")

  perm = np.random.default_rng(seed).permutation(n)
  tr, va = perm[:num_train], perm[num_train:]
  norm = _normalization(source[tr], target[tr])
  x_tr = (source[tr] - norm["in_mean"]) / norm["in_std"]
  y_tr = (target[tr] - norm["out_mean"]) / norm["out_scale"]
  x_va = (source[va] - norm["in_mean"]) / norm["in_std"]

  model = MapperNet(source.shape[1], target.shape[1], kind, rngs=nnx.Rngs(seed))
  graphdef, params = nnx.split(model, nnx.Param)
  params = nnx.to_pure_dict(params)
  train = _trainer(graphdef, float(learning_rate), int(batch_size), int(epochs), int(num_train))
  best_params, best_val, best_epoch, curve = train(params, jax.random.key(seed), x_tr, y_tr, x_va,
                                                   target[va], norm)
  best_params = jax.tree.map(np.asarray, best_params)
  mapper = Mapper(kind, source.shape[1], target.shape[1], best_params, norm)
  mapped_val = mapper.apply(source[va])
  mapped_train = mapper.apply(source[tr])
  metrics = {
      "val_mse": float(best_val),
      "train_mse": float(np.mean(np.square(mapped_train - target[tr]))),
      "val_cosine": _cosine(mapped_val, target[va]),
      "best_epoch": int(best_epoch) + 1,
      "epochs": int(epochs),
      "num_train": int(num_train),
      "num_val": int(num_val),
      "val_mse_first_epoch": float(curve[0]),
  }
  if source.shape[1] == target.shape[1]:
    metrics["val_mse_unmapped"] = float(np.mean(np.square(source[va] - target[va])))
    metrics["val_cosine_unmapped"] = _cosine(source[va], target[va])
  mapper.metrics = metrics
  return mapper


def _fit_lstsq(source: np.ndarray, target: np.ndarray, ridge: float) -> Mapper:
  if not ridge >= 0:
    raise ValueError(f"lstsq mapper ridge must be >= 0, got {ridge}")
  (_, w, b), = least_squares.fit(source, target, [float(ridge)])
  mapper = Mapper("lstsq", source.shape[1], target.shape[1], {"w": w, "b": b}, {})
  mapper.metrics = {"train_mse": float(np.mean(np.square(mapper.apply(source) - target))),
                    "num_train": int(len(source))}
  return mapper
