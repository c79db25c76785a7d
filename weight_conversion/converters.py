"""From a torch checkpoint object (pth_reader.load_pth) to an encoder directory.

Each kind first extracts the encoder's plain state dict, saying which keys it drops and why:
  simsiam             {'epoch', 'arch', 'state_dict', 'optimizer'}; keeps `module.encoder.*` (a
                      torchvision ResNet), drops the projector `module.encoder.fc.*` and
                      `module.predictor.*`.
  dino                the full training checkpoint {'student', 'teacher', 'optimizer', 'epoch',
                      'args', 'dino_loss'} (teacher by default: `backbone.*`; student:
                      `module.backbone.*`; `head.*` dropped), or the backbone-only weights file
                      (`cls_token`, `pos_embed`, ...).
  torchvision_resnet  a plain torchvision ResNet state dict (`fc.*` classifier dropped).
Then keymaps.load_into_model fills every leaf of the inferred (or --arch) architecture, and
models.save_encoder writes orbax params + manifest (source file sha256, preprocessing, rep_dim).
"""
import hashlib
import math
import os
import re
from typing import Any, Dict, List, Mapping, Optional, Tuple

import jax
import numpy as np
from flax import nnx

from b4b_jax import models
from b4b_jax.models import encoder as encoder_lib
from b4b_jax.models import resnet as resnet_lib
from b4b_jax.models import vit as vit_lib
from b4b_jax.utils import files
from weight_conversion import keymaps
from weight_conversion import pth_reader

KINDS = ("simsiam", "dino", "torchvision_resnet")
# Where the CLI writes the paper's victims when --output is not given (relative to the working
# directory). configs/common.py reads its default victim directories from here, so the README's convert
# commands and the stealing configs' defaults cannot drift apart (tests/test_rehearsal.py runs both).
DEFAULT_OUTPUTS = {"simsiam": "encoders/simsiam_resnet50", "dino": "encoders/dino_vits16"}
DINO_WEIGHTS = ("teacher", "student")


def file_sha256(path: str) -> str:
  h = hashlib.sha256()
  with open(path, "rb") as f:
    for chunk in iter(lambda: f.read(1 << 20), b""):
      h.update(chunk)
  return h.hexdigest()


def _describe(obj) -> str:
  if isinstance(obj, Mapping):
    keys = sorted(str(k) for k in obj)
    return f"a dict with keys {keys[:8]}{' ...' if len(keys) > 8 else ''}"
  return f"a {type(obj).__name__}"


def _tensor_dict(obj, what: str) -> Dict[str, np.ndarray]:
  if not isinstance(obj, Mapping) or not obj:
    raise ValueError(f"{what} should be a non-empty state dict, got {_describe(obj)}")
  bad = [k for k, v in obj.items() if not isinstance(k, str) or not isinstance(v, np.ndarray)]
  if bad:
    raise ValueError(f"{what} is not a state dict of tensors: entries {bad[:5]} are not tensors")
  return dict(obj)


def _strip(key: str, prefixes) -> str:
  for prefix in prefixes:
    if key.startswith(prefix):
      key = key[len(prefix):]
  return key


# ----------------------------------------------------------------------------------------------------
# Extracting the encoder state dict of each checkpoint kind.
# ----------------------------------------------------------------------------------------------------
def extract_simsiam(ckpt) -> Tuple[Dict[str, np.ndarray], List[str], Dict[str, Any]]:
  """(encoder state dict with `module.encoder.` stripped, dropped keys, info)."""
  if not isinstance(ckpt, Mapping) or "state_dict" not in ckpt:
    hint = " (this looks like a DINO checkpoint: use --kind dino)" if isinstance(ckpt, Mapping) and (
        "teacher" in ckpt or "cls_token" in ckpt) else ""
    raise ValueError(f"not a SimSiam checkpoint: expected a dict with 'state_dict', got "
                     f"{_describe(ckpt)}{hint}")
  sd = _tensor_dict(ckpt["state_dict"], "SimSiam checkpoint['state_dict']")
  encoder, dropped = {}, []
  for key, value in sd.items():
    if key.startswith("module.encoder.fc.") or key.startswith("module.predictor."):
      dropped.append(key)  # projector MLP and predictor: SimSiam's training heads, not the encoder
    elif key.startswith("module.encoder."):
      encoder[key[len("module.encoder."):]] = value
    else:
      raise ValueError(f"SimSiam checkpoint['state_dict'] has key {key!r} outside module.encoder.* "
                       f"and module.predictor.*; not a SimSiam checkpoint?")
  if not encoder:
    raise ValueError("SimSiam checkpoint has no module.encoder.* keys")
  info = {"epoch": ckpt.get("epoch"), "checkpoint_arch": ckpt.get("arch")}
  return encoder, sorted(dropped), info


def extract_dino(ckpt, which: str = "teacher"):
  """(ViT backbone state dict, dropped keys, info) from DINO's full checkpoint or weights file."""
  if which not in DINO_WEIGHTS:
    raise ValueError(f"dino weights must be one of {DINO_WEIGHTS}, got {which!r}")
  if not isinstance(ckpt, Mapping):
    raise ValueError(f"not a DINO checkpoint: got {_describe(ckpt)}")
  info: Dict[str, Any] = {}
  if "teacher" in ckpt or "student" in ckpt:
    if which not in ckpt:
      raise ValueError(f"DINO checkpoint has no {which!r} weights (it has {sorted(ckpt)[:8]})")
    sd = _tensor_dict(ckpt[which], f"DINO checkpoint[{which!r}]")
    info.update(format="full_checkpoint", weights=which, epoch=ckpt.get("epoch"))
    args = ckpt.get("args")
    if args is not None and hasattr(args, "arch"):
      info.update(checkpoint_arch=getattr(args, "arch", None),
                  checkpoint_patch_size=getattr(args, "patch_size", None))
  elif "state_dict" in ckpt or any(str(k).startswith("module.encoder.") for k in ckpt):
    raise ValueError(f"not a DINO checkpoint: got {_describe(ckpt)} (this looks like a SimSiam "
                     f"checkpoint: use --kind simsiam)")
  else:
    sd = _tensor_dict(ckpt, "DINO weights file")
    info.update(format="backbone_weights")
  backbone, dropped = {}, []
  for key, value in sd.items():
    bare = _strip(key, ("module.",))
    if bare.startswith("head."):
      dropped.append(key)  # DINO projection head (prototypes): a training-only head
    else:
      backbone[_strip(bare, ("backbone.",))] = value
  if "cls_token" not in backbone or "pos_embed" not in backbone:
    raise ValueError(f"not a DINO ViT checkpoint: no cls_token/pos_embed among keys "
                     f"{sorted(backbone)[:8]}")
  return backbone, sorted(dropped), info


def extract_torchvision(ckpt):
  if isinstance(ckpt, Mapping) and ("state_dict" in ckpt or "teacher" in ckpt):
    raise ValueError(f"not a plain torchvision state dict: got {_describe(ckpt)}; use --kind simsiam "
                     f"or --kind dino for those training checkpoints")
  sd = _tensor_dict(ckpt, "torchvision checkpoint")
  if all(k.startswith("module.") for k in sd):  # saved from a DistributedDataParallel wrapper
    sd = {k[len("module."):]: v for k, v in sd.items()}
  if "conv1.weight" not in sd:
    raise ValueError(f"not a torchvision ResNet state dict: no conv1.weight among {sorted(sd)[:8]}")
  return sd, [], {}


# ----------------------------------------------------------------------------------------------------
# Architecture inference from shapes (checked against --arch when given).
# ----------------------------------------------------------------------------------------------------
def infer_resnet(sd: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  block = "bottleneck" if "layer1.0.conv3.weight" in sd else "basic"
  depths = []
  for stage in range(1, 5):
    indices = {int(m.group(1)) for k in sd for m in [re.match(rf"layer{stage}\.(\d+)\.", k)] if m}
    depths.append(len(indices))
  names = [n for n, (b, d) in resnet_lib.RESNET_DEPTHS.items()
           if b == block and tuple(d) == tuple(depths)]
  if not names:
    raise ValueError(f"checkpoint has {block} blocks per stage {depths}, which is no ResNet-18/34/50")
  stem = sd["conv1.weight"]
  width = stem.shape[0] / 64
  name = names[0] if width == 1 else f"{names[0]}_w{width:g}"
  return {"name": name, "kwargs": {"out_dim": None, "small_input": stem.shape[-1] == 3}}


def infer_vit(sd: Mapping[str, np.ndarray]) -> Dict[str, Any]:
  dim = sd["pos_embed"].shape[-1]
  names = [n for n, (d, _, _) in vit_lib.VIT_SIZES.items() if d == dim]
  if not names:
    raise ValueError(f"pos_embed has width {dim}; known ViTs have {sorted(vit_lib.VIT_SIZES.items())}")
  if "patch_embed.proj.weight" not in sd:
    raise ValueError("DINO checkpoint lacks patch_embed.proj.weight")
  patch = int(sd["patch_embed.proj.weight"].shape[-1])
  side = math.isqrt(sd["pos_embed"].shape[1] - 1)
  return {"name": names[0], "kwargs": {"patch_size": patch, "img_size": side * patch}}


def _resolve_arch(inferred: Dict[str, Any], arch: Optional[str]) -> Dict[str, Any]:
  if arch is None or arch == inferred["name"]:
    return inferred
  # DINO names its models vit_small etc.; also accept "vit_small16"/"vit_small8"-style spellings.
  if arch.startswith("vit") and re.fullmatch(rf"{inferred['name']}_?(?:patch)?"
                                             rf"{inferred['kwargs']['patch_size']}", arch):
    return inferred
  raise ValueError(f"--arch {arch!r} does not match the checkpoint, whose shapes are those of "
                   f"{inferred['name']} {inferred['kwargs']}")


# ----------------------------------------------------------------------------------------------------
# The conversion.
# ----------------------------------------------------------------------------------------------------
def _preprocessing(kind: str) -> Dict[str, Any]:
  if kind == "dino":  # DINO's eval_linear: Resize(256, bicubic), CenterCrop(224), ImageNet stats
    return models.default_preprocessing(224, resize=256, interpolation="bicubic")
  return models.default_preprocessing(224, resize=256, interpolation="bilinear")


def convert_checkpoint(kind: str, checkpoint: str, output: str, *, arch: Optional[str] = None,
                       dino_weights: str = "teacher", n_last_blocks: int = 4,
                       overwrite: bool = False) -> Dict[str, Any]:
  """Converts `checkpoint` into the encoder directory `output`; returns the manifest written."""
  if kind not in KINDS:
    raise ValueError(f"kind must be one of {KINDS}, got {kind!r}")
  output = os.path.abspath(output)
  # Every path problem fails here, before the (slow) read and conversion.
  if os.path.isdir(checkpoint):
    raise files.PathError(f"checkpoint {checkpoint} is a directory, not a .pth file")
  if os.path.exists(checkpoint) and not os.path.isfile(checkpoint):
    raise files.PathError(f"checkpoint {checkpoint} is not a regular file (a device or pipe)")
  if not os.path.isfile(checkpoint):
    raise FileNotFoundError(f"checkpoint {checkpoint} does not exist")
  try:
    encoder_lib.check_replaceable(output, overwrite=overwrite)
  except ValueError as e:
    if not overwrite and os.path.lexists(output):
      raise ValueError(f"{output} already exists; choose a new directory or pass --overwrite") from e
    raise
  digest = file_sha256(checkpoint)
  ckpt = pth_reader.load_pth(checkpoint)
  what = f"{os.path.basename(checkpoint)} ({kind})"
  if kind == "simsiam":
    sd, dropped, info = extract_simsiam(ckpt)
  elif kind == "dino":
    sd, dropped, info = extract_dino(ckpt, dino_weights)
  else:
    sd, dropped, info = extract_torchvision(ckpt)
  family = "vit" if kind == "dino" else "resnet"
  architecture = _resolve_arch(infer_vit(sd) if family == "vit" else infer_resnet(sd), arch)
  abstract = nnx.eval_shape(lambda: models.build_model(architecture, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats = keymaps.load_into_model(abstract, sd, family=family, what=what)
  ignored = keymaps.ignored_keys(sd, family)
  if family == "vit":
    if not 1 <= n_last_blocks <= len(abstract.blocks):
      raise ValueError(f"n_last_blocks must be in [1, {len(abstract.blocks)}], got {n_last_blocks}")
    representation = {"method": "dino_representation", "n_last_blocks": int(n_last_blocks)}
  else:
    representation = {"method": "forward"}
  source = {"kind": kind, "file": os.path.basename(checkpoint), "sha256": digest,
            "dropped_keys": dropped, "ignored_keys": ignored,
            **{k: v for k, v in info.items() if v is not None and isinstance(v, (str, int, float))}}
  manifest = {"architecture": architecture, "representation": representation,
              "preprocessing": _preprocessing(kind), "source": source}
  return models.save_encoder(output, (graphdef, jax.tree.map(np.asarray, params),
                                      jax.tree.map(np.asarray, batch_stats)),
                             manifest, overwrite=overwrite)
