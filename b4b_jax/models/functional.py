"""The functional boundary: NNX modules become (graphdef, params, batch_stats) pytrees once, and plain
jax.jit code works on those. Under jit with the batch sharded over a "data" mesh, BatchNorm statistics
are means over the whole global batch (SyncBN, as SimSiam trains): jnp.mean sees the global array.

Also flat views of a state ({"layer1/0/conv1/kernel": array}) used by checkpoints and weight converters.
"""
from typing import Any, Dict, Tuple

import jax
import jax.numpy as jnp
import numpy as np
from flax import nnx


def split_model(model: nnx.Module) -> Tuple[nnx.GraphDef, nnx.State, nnx.State]:
  """(graphdef, params, batch_stats); batch_stats is empty for models without BatchNorm."""
  graphdef, params, batch_stats, rest = nnx.split(model, nnx.Param, nnx.BatchStat, ...)
  if jax.tree.leaves(rest):
    raise ValueError(f"model holds state other than Param/BatchStat, which split_model would drop: "
                     f"{sorted(path_to_str(p) for p, _ in nnx.to_flat_state(rest))}")
  return graphdef, params, batch_stats


def merge_model(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State) -> nnx.Module:
  return nnx.merge(graphdef, params, batch_stats, copy=True)


def apply_model(graphdef: nnx.GraphDef, params: nnx.State, batch_stats: nnx.State, x: jax.Array, *,
                train: bool, method: str = "__call__", compute_dtype=None,
                **kwargs) -> Tuple[Any, nnx.State]:
  """Runs `model.<method>(x, train=train)` and returns (output, new batch_stats).

  Pure (usable inside jax.jit/grad): batch_stats only change in the returned copy, and only when train.
  compute_dtype (e.g. jnp.bfloat16): mixed precision. The float32 params and the input are cast to it
  for the forward (under jax.grad the gradients still arrive in float32, params' dtype), BatchNorm
  keeps its statistics and running averages in float32 (layers.BatchNorm), and floating outputs are
  returned as float32. None: everything in the params' dtype, as before.
  """
  if compute_dtype is not None and jnp.dtype(compute_dtype) != jnp.float32:
    cast = lambda a: a.astype(compute_dtype) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    out, new_stats = apply_model(graphdef, jax.tree.map(cast, params), batch_stats, cast(x),
                                 train=train, method=method, **kwargs)
    to32 = lambda a: a.astype(jnp.float32) if jnp.issubdtype(a.dtype, jnp.floating) else a  # noqa: E731
    return jax.tree.map(to32, out), new_stats
  # copy=True: fresh Variables, so the caller's states are never mutated and the module lives at the
  # current trace level (merging inside jax.grad under jax.jit would otherwise reuse outer Variables).
  model = nnx.merge(graphdef, params, batch_stats, copy=True)
  fn = getattr(model, method)
  out = fn(x, train=train, **kwargs) if method == "__call__" else fn(x, **kwargs)
  _, _, new_batch_stats = nnx.split(model, nnx.Param, nnx.BatchStat)
  return out, new_batch_stats


def path_to_str(path) -> str:
  return "/".join(str(k) for k in path)


def flatten_state(state: nnx.State) -> Dict[str, Any]:
  """{"layer1/0/conv1/kernel": array, ...} in the state's (sorted) order."""
  return {path_to_str(path): var.get_value() for path, var in nnx.to_flat_state(state)}


def state_from_flat(template: nnx.State, flat: Dict[str, Any], *, what: str = "state") -> nnx.State:
  """A copy of `template` (concrete or abstract) whose leaves are `flat`'s arrays.

  Every template leaf must be present with the same shape; extra keys are an error. dtype is cast to
  the template's. Errors name the key.
  """
  entries = list(nnx.to_flat_state(template))
  expected = {path_to_str(p) for p, _ in entries}
  missing = sorted(expected - set(flat))
  extra = sorted(set(flat) - expected)
  if missing or extra:
    raise ValueError(f"{what} does not match the model: missing {missing[:10]}"
                     f"{' ...' if len(missing) > 10 else ''}, unexpected {extra[:10]}"
                     f"{' ...' if len(extra) > 10 else ''}")
  new = []
  for path, var in entries:
    key = path_to_str(path)
    ref = var.get_value()
    value = flat[key]
    if tuple(np.shape(value)) != tuple(ref.shape):
      raise ValueError(f"{what}: {key} has shape {tuple(np.shape(value))}, the model expects "
                       f"{tuple(ref.shape)}")
    new.append((path, var.replace(np.asarray(value).astype(ref.dtype, copy=False)
                                  if isinstance(value, np.ndarray) else value.astype(ref.dtype))))
  return nnx.from_flat_state(new)


def state_to_nested(state: nnx.State) -> Dict[str, Any]:
  """Nested dict with string keys (list indices as "0", "1", ...): what orbax stores."""
  nested: Dict[str, Any] = {}
  for key, value in flatten_state(state).items():
    node = nested
    parts = key.split("/")
    for part in parts[:-1]:
      node = node.setdefault(part, {})
    node[parts[-1]] = value
  return nested


def nested_to_flat(nested: Dict[str, Any], prefix: str = "") -> Dict[str, Any]:
  flat = {}
  for k, v in nested.items():
    key = f"{prefix}/{k}" if prefix else str(k)
    if isinstance(v, dict):
      flat.update(nested_to_flat(v, key))
    else:
      flat[key] = v
  return flat
