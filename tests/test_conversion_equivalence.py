"""Released-checkpoint layouts -> CLI -> load_encoder, against the real PyTorch models.

SimSiam: torchvision resnet50 with random weights and random BatchNorm running statistics, saved like
SimSiam's checkpoint_0099.pth.tar. DINO: timm vit_small_patch16_224 (DINO's ViT-S/16 architecture and key
names) saved like dino_deitsmall16_pretrain_full_checkpoint.pth and like the backbone-only weights file.
Tolerance (issue 3): max|diff| <= 1e-4 * max|torch| and per-row cosine >= 0.99999 at highest precision.
"""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import torch

from b4b_jax import models
from tests.torch_reference import assert_no_default_values
from tests.torch_reference import write_dino_checkpoint
from tests.torch_reference import write_simsiam_checkpoint
from weight_conversion import convert

N_IMAGES = 2


def _assert_matches(ours, ref):
  ours, ref = np.asarray(ours, np.float64), np.asarray(ref, np.float64)
  assert ours.shape == ref.shape
  max_diff = np.abs(ours - ref).max()
  print(f"max|diff| = {max_diff:.3g} = {max_diff / np.abs(ref).max():.3g} x max|torch|")
  assert max_diff <= 1e-4 * np.abs(ref).max(), (max_diff, np.abs(ref).max())
  cos = (ours * ref).sum(1) / (np.linalg.norm(ours, axis=1) * np.linalg.norm(ref, axis=1))
  print(f"min cosine = {cos.min():.9f}")
  assert cos.min() >= 0.99999, cos


def _images(seed):
  x = np.random.RandomState(seed).randn(N_IMAGES, 3, 224, 224).astype(np.float32)
  return x, x.transpose(0, 2, 3, 1)


def _run_cli(*args):
  assert convert.main([str(a) for a in args]) == 0


# ----------------------------------------------------------------------------------------------------
# SimSiam ResNet-50
# ----------------------------------------------------------------------------------------------------
@pytest.fixture(scope="module")
def simsiam(tmp_path_factory):
  root = tmp_path_factory.mktemp("simsiam")
  path = root / "checkpoint_0099.pth.tar"
  model = write_simsiam_checkpoint(path)
  net = model.module.encoder.eval()
  net.fc = torch.nn.Identity()
  assert_no_default_values(net)  # convs random at init, every BatchNorm randomised
  return path, net, root


def test_simsiam_resnet50_matches_torch(simsiam):
  path, net, root = simsiam
  out_dir = root / "encoder"
  _run_cli("--kind", "simsiam", "--checkpoint", path, "--output", out_dir, "--arch", "resnet50")
  encoder = models.load_encoder(str(out_dir))
  manifest = json.load(open(out_dir / "manifest.json"))
  assert manifest["rep_dim"] == encoder.rep_dim == 2048
  assert manifest["architecture"]["name"] == "resnet50"
  assert manifest["source"]["file"] == "checkpoint_0099.pth.tar"
  assert manifest["source"]["sha256"] == __import__("hashlib").sha256(path.read_bytes()).hexdigest()
  assert any(k.startswith("module.predictor.") for k in manifest["source"]["dropped_keys"])
  assert any(k.startswith("module.encoder.fc.") for k in manifest["source"]["dropped_keys"])
  assert manifest["preprocessing"]["mean"] == [0.485, 0.456, 0.406]
  x_nchw, x_nhwc = _images(0)
  with torch.no_grad():
    ref = net(torch.from_numpy(x_nchw)).numpy()
  ours = encoder(x_nhwc)
  assert ours.shape == (N_IMAGES, 2048)
  _assert_matches(ours, ref)
  assert float(jnp.min(ours)) >= 0  # post-ReLU average pool


def test_simsiam_refusals(simsiam, tmp_path):
  path, _, root = simsiam
  # The SimSiam file is not a DINO checkpoint, and the wrong --arch is named.
  with pytest.raises(ValueError, match="--kind simsiam"):
    convert.converters.convert_checkpoint("dino", str(path), str(tmp_path / "a"))
  with pytest.raises(ValueError, match="does not match the checkpoint"):
    convert.converters.convert_checkpoint("simsiam", str(path), str(tmp_path / "b"), arch="resnet34")
  # An existing output directory is refused by the CLI (exit code 2) and left as it was.
  existing = tmp_path / "existing"
  existing.mkdir()
  (existing / "keep.txt").write_text("mine")
  assert convert.main(["--kind", "simsiam", "--checkpoint", str(path), "--output", str(existing)]) == 2
  assert os.listdir(existing) == ["keep.txt"]
  assert not (tmp_path / "a").exists() and not (tmp_path / "b").exists()


# ----------------------------------------------------------------------------------------------------
# DINO ViT-S/16
# ----------------------------------------------------------------------------------------------------
def _torch_dino_reference(vit, x):
  """DINO's eval_linear: get_intermediate_layers(x, 4) (each through norm), CLS tokens concatenated."""
  with torch.no_grad():
    t = vit.patch_embed(x)
    t = vit._pos_embed(t)  # pylint: disable=protected-access
    t = vit.norm_pre(t)
    cls = []
    for i, block in enumerate(vit.blocks):
      t = block(t)
      if i >= len(vit.blocks) - 4:
        cls.append(vit.norm(t)[:, 0])
    return torch.cat(cls, dim=-1).numpy(), vit(x).numpy()


@pytest.fixture(scope="module")
def dino(tmp_path_factory):
  root = tmp_path_factory.mktemp("dino")
  full = root / "dino_deitsmall16_pretrain_full_checkpoint.pth"
  teacher, student = write_dino_checkpoint(full)
  weights = root / "dino_deitsmall16_pretrain.pth"
  torch.save(teacher.state_dict(), weights)  # the backbone-only release file (teacher, bare keys)
  return full, weights, teacher, student, root


def test_dino_vit_small_matches_torch(dino):
  full, _, teacher, _, root = dino
  out_dir = root / "teacher"
  _run_cli("--kind", "dino", "--checkpoint", full, "--output", out_dir, "--arch", "vit_small")
  encoder = models.load_encoder(str(out_dir))
  assert encoder.rep_dim == 1536
  assert encoder.manifest["source"]["weights"] == "teacher"
  assert encoder.manifest["source"]["epoch"] == 800
  assert encoder.manifest["preprocessing"]["interpolation"] == "bicubic"
  x_nchw, x_nhwc = _images(1)
  ref_rep, ref_cls = _torch_dino_reference(teacher, torch.from_numpy(x_nchw))
  ours = encoder(x_nhwc)
  _assert_matches(ours, ref_rep)
  # The module's own forward: DINO's output, the final-norm CLS token.
  cls = jax.jit(lambda v, x: models.apply_model(encoder.graphdef, v["params"], v["batch_stats"], x,
                                                train=False)[0])(encoder.params, x_nhwc)
  _assert_matches(cls, ref_cls)


def test_dino_student_and_weights_file(dino):
  full, weights, teacher, student, root = dino
  _run_cli("--kind", "dino", "--checkpoint", full, "--output", root / "student", "--dino-weights",
           "student")
  student_params = models.load_encoder(str(root / "student")).params["params"]
  np.testing.assert_array_equal(np.asarray(student_params["pos_embed"][...]),
                                student.pos_embed.detach().numpy())
  _run_cli("--kind", "dino", "--checkpoint", weights, "--output", root / "weights")
  from_weights = json.load(open(root / "weights" / "manifest.json"))
  if not (root / "teacher").exists():  # when run alone: convert the teacher here
    _run_cli("--kind", "dino", "--checkpoint", full, "--output", root / "teacher")
  from_full = json.load(open(root / "teacher" / "manifest.json"))
  from_student = json.load(open(root / "student" / "manifest.json"))
  # Same teacher weights whichever file they came from; different from the student's.
  assert from_weights["params_sha256"] == from_full["params_sha256"]
  assert from_weights["source"]["format"] == "backbone_weights"
  assert from_student["params_sha256"] != from_full["params_sha256"]
  # A ResNet state dict is not a DINO checkpoint.
  with pytest.raises(ValueError, match="DINO"):
    convert.converters.extract_dino({"conv1.weight": np.zeros((64, 3, 7, 7), np.float32)})
