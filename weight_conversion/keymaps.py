"""Explicit, exhaustive maps from PyTorch state-dict keys to our Flax parameter paths.

Our modules mirror torch's names (resnet.py, vit.py), so each target leaf `a/b/0/c/<leaf>` has exactly
one source key `a.b.0.c.<torch leaf>`, given by the LEAF_RULES table with the layout change it needs.
`convert_state_dict` walks every target leaf (all must be filled, shapes checked) and every source key
(each must be used or match the family's explicit ignore list); any mismatch is a ValueError naming keys.
"""
import re
from typing import Callable, Dict, Iterable, List, Mapping, Tuple

import numpy as np


def _conv_kernel(w):  # torch Conv2d OIHW -> flax HWIO
  if w.ndim != 4:
    raise ValueError(f"expected a 4-D conv weight, got shape {w.shape}")
  return w.transpose(2, 3, 1, 0)


def _dense_kernel(w):  # torch Linear [out, in] -> flax [in, out]
  if w.ndim != 2:
    raise ValueError(f"expected a 2-D linear weight, got shape {w.shape}")
  return w.T


def _same(w):
  return w


# (our leaf name, number of dims of our leaf or None) -> (torch leaf name, transform)
LEAF_RULES: Dict[Tuple[str, object], Tuple[str, Callable]] = {
    ("kernel", 4): ("weight", _conv_kernel),
    ("kernel", 2): ("weight", _dense_kernel),
    ("scale", 1): ("weight", _same),           # BatchNorm / LayerNorm gamma
    ("bias", 1): ("bias", _same),
    ("mean", 1): ("running_mean", _same),      # BatchNorm running statistics
    ("var", 1): ("running_var", _same),
    ("cls_token", 3): ("cls_token", _same),
    ("pos_embed", 3): ("pos_embed", _same),
}

# Source keys each family deliberately does not use (regexes on the prefix-stripped key).
IGNORED = {
    # num_batches_tracked only matters for momentum=None BatchNorm; fc is the classifier / SimSiam
    # projector, not part of the encoder.
    "resnet": (r"(^|\.)num_batches_tracked$", r"^fc\."),
    # DINO's projection head (stripped before this point in the full checkpoint) and timm's classifier.
    "vit": (r"^head\.",),
}


def torch_key(target_path: str, ndim: int) -> Tuple[str, Callable]:
  """'layer1/0/conv1/kernel' (4-D) -> ('layer1.0.conv1.weight', OIHW->HWIO)."""
  parts = target_path.split("/")
  rule = LEAF_RULES.get((parts[-1], ndim))
  if rule is None:
    raise ValueError(f"no conversion rule for target leaf {target_path} with {ndim} dims")
  return ".".join(parts[:-1] + [rule[0]]), rule[1]


def convert_state_dict(source: Mapping[str, np.ndarray], targets: Mapping[str, Tuple[int, ...]], *,
                       family: str, what: str = "checkpoint") -> Dict[str, np.ndarray]:
  """Fills every target leaf ({path: shape}) from `source` ({torch key: array}) as float32.

  Raises ValueError naming the first missing key, shape mismatch, or unused source keys.
  """
  ignore = [re.compile(p) for p in IGNORED[family]]
  out: Dict[str, np.ndarray] = {}
  used = set()
  for path, shape in targets.items():
    key, transform = torch_key(path, len(shape))
    if key not in source:
      raise ValueError(f"{what}: missing key {key!r} (needed for {path}); the checkpoint has "
                       f"{len(source)} keys, e.g. {sorted(source)[:5]}")
    value = np.asarray(source[key])
    if "float" not in value.dtype.name:  # float16/32/64, bfloat16 and float8 (ml_dtypes) are fine
      raise ValueError(f"{what}: {key!r} has dtype {value.dtype}, expected floating point")
    try:
      converted = transform(value)
    except ValueError as e:
      raise ValueError(f"{what}: {key!r}: {e}") from None
    if tuple(converted.shape) != tuple(shape):
      raise ValueError(f"{what}: {key!r} has shape {tuple(value.shape)}, which does not fit {path} "
                       f"{tuple(shape)} of this architecture")
    converted = np.ascontiguousarray(converted.astype(np.float32))
    if not np.all(np.isfinite(converted)):
      raise ValueError(f"{what}: {key!r} contains NaN or Inf values")
    out[path] = converted
    used.add(key)
  unused = [k for k in source if k not in used and not any(p.search(k) for p in ignore)]
  if unused:
    raise ValueError(f"{what}: {len(unused)} key(s) not used by the {family} architecture: "
                     f"{sorted(unused)[:10]}; wrong --arch or wrong checkpoint kind?")
  return out


def ignored_keys(source: Iterable[str], family: str) -> List[str]:
  ignore = [re.compile(p) for p in IGNORED[family]]
  return sorted(k for k in source if any(p.search(k) for p in ignore))


def load_into_model(model, source: Mapping[str, np.ndarray], *, family: str, what: str = "checkpoint"):
  """(graphdef, params, batch_stats) of `model` with every leaf taken from the torch state dict."""
  from b4b_jax.models import functional  # pylint: disable=g-import-not-at-top
  graphdef, params, batch_stats = functional.split_model(model)
  flat_p = functional.flatten_state(params)
  flat_b = functional.flatten_state(batch_stats)
  overlap = set(flat_p) & set(flat_b)
  assert not overlap, overlap
  targets = {k: tuple(v.shape) for k, v in {**flat_p, **flat_b}.items()}
  converted = convert_state_dict(source, targets, family=family, what=what)
  params = functional.state_from_flat(params, {k: converted[k] for k in flat_p}, what=what)
  batch_stats = functional.state_from_flat(batch_stats, {k: converted[k] for k in flat_b}, what=what)
  return graphdef, params, batch_stats
