"""ResNet: torchvision equivalence (eval and train-mode BatchNorm), sharded training, encoder dirs."""
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
import torch
import torchvision
from flax import nnx

from b4b_jax import models
from b4b_jax.models import functional
from b4b_jax.utils import distributed
from tests.torch_reference import assert_no_default_values
from tests.torch_reference import randomise_batchnorm
from weight_conversion import keymaps


@pytest.fixture
def fast_compile():
  """Tiny models only: XLA's optimisation passes cost more compile time than they save at run time."""
  jax.config.update("jax_disable_most_optimizations", True)
  yield
  jax.config.update("jax_disable_most_optimizations", False)


def _torch_resnet18(small_input: bool):
  torch.manual_seed(0)
  net = torchvision.models.resnet18()
  if small_input:
    net.conv1 = torch.nn.Conv2d(3, 64, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  net.fc = torch.nn.Identity()
  randomise_batchnorm(net, 1)
  assert_no_default_values(net)  # convs random at init (no biases), every BatchNorm randomised
  return net


def _to_flax(net, small_input=False):
  source = {k: v.detach().numpy() for k, v in net.state_dict().items()}
  model = models.create_resnet("resnet18", rngs=nnx.Rngs(0), small_input=small_input)
  return keymaps.load_into_model(model, source, family="resnet")


def _apply(graphdef, params, stats, x, *, train):
  # Jitted: op-by-op (eager) execution compiles every conv separately, which is slower on CPU.
  return jax.jit(lambda p, s, x: models.apply_model(graphdef, p, s, x, train=train))(params, stats, x)


def _nchw_to_nhwc(x):
  return jnp.asarray(x.transpose(0, 2, 3, 1))


@pytest.mark.parametrize("small_input", [False, True])
def test_resnet18_matches_torchvision_eval(small_input):
  net = _torch_resnet18(small_input).eval()
  graphdef, params, stats = _to_flax(net, small_input)
  x = np.random.RandomState(0).randn(2, 3, 48, 48).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()
  out, new_stats = _apply(graphdef, params, stats, _nchw_to_nhwc(x), train=False)
  assert out.shape == (2, 512)
  assert np.abs(np.asarray(out) - ref).max() <= 1e-5 * np.abs(ref).max()
  # Eval mode leaves the running statistics alone.
  jax.tree.map(np.testing.assert_array_equal, new_stats, stats)


def test_resnet18_train_mode_matches_torch_batchnorm_update():
  net = _torch_resnet18(False).train()
  graphdef, params, stats = _to_flax(net)
  x = np.random.RandomState(1).randn(4, 3, 32, 32).astype(np.float32)
  with torch.no_grad():
    ref = net(torch.from_numpy(x)).numpy()  # also updates running stats (momentum 0.1, unbiased var)
  out, new_stats = _apply(graphdef, params, stats, _nchw_to_nhwc(x), train=True)
  # Batch statistics over 4 values per channel in layer4 amplify float rounding: 1e-4, not 1e-5.
  assert np.abs(np.asarray(out) - ref).max() <= 1e-4 * np.abs(ref).max()
  flat = functional.flatten_state(new_stats)
  torch_sd = net.state_dict()
  for key, value in flat.items():
    torch_name = key.replace("/", ".").replace(".mean", ".running_mean").replace(".var", ".running_var")
    np.testing.assert_allclose(np.asarray(value), torch_sd[torch_name].numpy(), rtol=2e-5, atol=1e-6,
                               err_msg=key)


def test_width_variants_and_projection_head(fast_compile):
  model = nnx.eval_shape(
      lambda: models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True))
  assert model.rep_dim == 128 and model.conv1.kernel.shape == (3, 3, 3, 16)
  assert model.layer4[0].downsample[0].kernel.shape == (1, 1, 64, 128)
  wide = nnx.eval_shape(lambda: models.create_resnet("resnet50_w0.125", rngs=nnx.Rngs(0)))
  assert wide.rep_dim == 256
  head = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(1), out_dim=24, small_input=True)
  x = jax.random.normal(jax.random.key(0), (2, 16, 16, 3))
  out, manual = nnx.jit(lambda m, x: (m(x), jnp.mean(
      jnp.einsum("nhwc,cd->nhwd", m.feature_map(x), m.proj.kernel[0, 0]), axis=(1, 2))))(head, x)
  assert out.shape == (2, 24)
  np.testing.assert_allclose(np.asarray(out), np.asarray(manual), rtol=1e-5, atol=1e-6)
  for bad in ("resnet19", "resnet18_w0.001", "vit_small"):
    with pytest.raises(ValueError, match="ResNet|width"):
      models.create_resnet(bad, rngs=nnx.Rngs(0))


def _assert_close_relative_to_max(a, b, tol=1e-5):
  a, b = np.asarray(a), np.asarray(b)
  assert np.abs(a - b).max() <= tol * max(np.abs(b).max(), 1e-6), np.abs(a - b).max()


def test_tiny_resnet_trains_under_jit_with_sharded_batch(fast_compile):
  mesh = distributed.data_mesh()
  assert mesh.devices.size == 8
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True)
  graphdef, params, stats = models.split_model(model)
  rng = np.random.RandomState(0)
  x = rng.randn(16, 8, 8, 3).astype(np.float32)
  target = rng.randn(16, 128).astype(np.float32)
  tx = optax.sgd(0.05, momentum=0.9)
  opt_state = tx.init(params)

  def loss_fn(params, stats, x, y):
    out, new_stats = models.apply_model(graphdef, params, stats, x, train=True)
    return jnp.mean(jnp.square(out - y)), new_stats

  @jax.jit
  def step(params, stats, opt_state, x, y):
    (loss, new_stats), grads = jax.value_and_grad(loss_fn, has_aux=True)(params, stats, x, y)
    updates, opt_state = tx.update(grads, opt_state, params)
    return optax.apply_updates(params, updates), new_stats, opt_state, loss

  # Global BatchNorm statistics: the sharded batch gives what the whole batch on one device gives.
  xs, ys = distributed.global_batch((x, target), mesh)
  assert len(xs.sharding.device_set) == 8
  out_sharded, stats_sharded = jax.jit(
      lambda p, s, x: models.apply_model(graphdef, p, s, x, train=True))(params, stats, xs)
  out_single, stats_single = _apply(graphdef, params, stats, jnp.asarray(x), train=True)
  # Equal up to float summation order (cross-device reductions add in a different order).
  _assert_close_relative_to_max(out_sharded, out_single)
  jax.tree.map(_assert_close_relative_to_max, stats_sharded, stats_single)
  # The first BatchNorm's running mean moves 10% of the way to the global batch mean of conv1's output.
  conv1_out = jax.lax.conv_general_dilated(  # the stem conv, by hand (3x3, stride 1, pad 1)
      x, np.asarray(model.conv1.kernel[...]), (1, 1), ((1, 1), (1, 1)),
      dimension_numbers=("NHWC", "HWIO", "NHWC"))
  np.testing.assert_allclose(np.asarray(functional.flatten_state(stats_sharded)["bn1/mean"]),
                             0.1 * conv1_out.mean(axis=(0, 1, 2)), rtol=1e-4, atol=1e-7)

  params, stats = distributed.replicate((params, stats), mesh)
  losses = []
  for _ in range(4):
    params, stats, opt_state, loss = step(params, stats, opt_state, xs, ys)
    losses.append(float(loss))
  assert losses[-1] < losses[0], losses
  before = functional.flatten_state(models.split_model(model)[2])
  after = functional.flatten_state(stats)
  assert all(not np.allclose(before[k], after[k]) for k in before)


def _preprocessing():
  return models.default_preprocessing(16, resize=None, mean=(0.5, 0.5, 0.5), std=(0.25, 0.25, 0.25))


def test_save_load_encoder_round_trip(tmp_path, fast_compile):
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(3), out_dim=32, small_input=True)
  graphdef, params, stats = models.split_model(model)
  # Non-trivial running statistics, so a load that dropped them would be caught.
  stats = jax.tree.map(lambda v: v + 0.3, stats)
  directory = str(tmp_path / "enc")
  written = models.save_encoder(directory, (graphdef, params, stats),
                                {"preprocessing": _preprocessing(), "source": {"kind": "test"}})
  assert written["rep_dim"] == 32
  on_disk = json.load(open(os.path.join(directory, "manifest.json")))
  assert on_disk == written
  assert on_disk["architecture"] == {"name": "resnet18_w0.25",
                                     "kwargs": {"out_dim": 32, "small_input": True}}
  encoder = models.load_encoder(directory)
  x = np.random.RandomState(0).randn(2, 16, 16, 3).astype(np.float32)
  expected, _ = models.apply_model(graphdef, params, stats, jnp.asarray(x), train=False)
  np.testing.assert_array_equal(np.asarray(encoder(x)), np.asarray(expected))
  assert encoder.rep_dim == 32 and encoder.manifest["source"] == {"kind": "test"}
  np.testing.assert_array_equal(np.asarray(jax.jit(encoder.apply_fn)(encoder.params, x)),
                                np.asarray(expected))
  precise = models.load_encoder(directory, precision="highest")
  np.testing.assert_allclose(np.asarray(precise(x)), np.asarray(expected), rtol=1e-5, atol=1e-6)

  # Never silently overwritten; overwrite=True replaces it.
  with pytest.raises(ValueError, match="already exists"):
    models.save_encoder(directory, model, {"preprocessing": _preprocessing()})
  assert models.load_encoder(directory).manifest == written
  models.save_encoder(directory, model, {"preprocessing": _preprocessing()}, overwrite=True)
  assert "source" not in models.load_encoder(directory).manifest
  assert sorted(os.listdir(tmp_path)) == ["enc"]  # no staging leftovers

  with pytest.raises(ValueError, match="NHWC"):
    encoder(x[..., :1])
  with pytest.raises(ValueError, match="NaN"):
    encoder(np.full((1, 16, 16, 3), np.nan, np.float32))
  with pytest.raises(ValueError, match="preprocessing"):
    models.save_encoder(str(tmp_path / "other"), model, {})
  with pytest.raises(FileNotFoundError):
    models.load_encoder(str(tmp_path / "missing"))


@pytest.mark.parametrize("edit, match", [
    ({"input_size": 10**6}, "input_size must be in"), ({"input_size": 0}, "input_size must be in"),
    ({"resize": 8}, "resize must be None or in"), ({"resize": 10**6}, "resize must be None or in"),
    ({"interpolation": "lanczos"}, "interpolation must be one of")])
def test_load_encoder_refuses_out_of_range_preprocessing(tmp_path, edit, match):
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True)
  directory = str(tmp_path / "enc")
  models.save_encoder(directory, model, {"preprocessing": _preprocessing()})
  path = os.path.join(directory, "manifest.json")
  manifest = json.load(open(path))
  manifest["preprocessing"].update(edit)
  json.dump(manifest, open(path, "w"))
  with pytest.raises(ValueError, match=match):
    models.load_encoder(directory)


def test_load_encoder_detects_edited_manifest(tmp_path):
  model = models.create_resnet("resnet18_w0.25", rngs=nnx.Rngs(0), small_input=True)
  directory = str(tmp_path / "enc")
  models.save_encoder(directory, model, {"preprocessing": _preprocessing()})
  path = os.path.join(directory, "manifest.json")
  manifest = json.load(open(path))
  manifest["params_sha256"] = "0" * 64
  json.dump(manifest, open(path, "w"))
  with pytest.raises(ValueError, match="digest"):
    models.load_encoder(directory)
  manifest["architecture"]["name"] = "resnet34_w0.25"
  json.dump(manifest, open(path, "w"))
  with pytest.raises(ValueError, match="missing"):
    models.load_encoder(directory)


@pytest.mark.parametrize("arch, size, patch", [("resnet18_w0.25", 16, 16), ("vit_tiny", 32, 8)])
def test_bfloat16_forward_tracks_float32(tmp_path, arch, size, patch):
  """load_encoder(compute_dtype="bfloat16"): float32 representations out, within bf16's precision of
  the float32 forward (per-representation cosine >= 0.999 and relative error <= 3 %, where bf16's
  8-bit mantissa gives ~0.4 % per operation); an unsupported dtype is refused."""
  directory = models.save_random_encoder(str(tmp_path / arch), arch, image_size=size, seed=0,
                                         patch_size=patch)
  x = np.random.default_rng(0).normal(size=(8, size, size, 3)).astype(np.float32)
  ref = np.asarray(models.load_encoder(directory)(x), np.float64)
  half = models.load_encoder(directory, compute_dtype="bfloat16")(x)
  assert half.dtype == np.float32
  half = np.asarray(half, np.float64)
  cosine = np.sum(ref * half, 1) / np.linalg.norm(ref, axis=1) / np.linalg.norm(half, axis=1)
  rel = np.linalg.norm(half - ref, axis=1) / np.linalg.norm(ref, axis=1)
  print(arch, "min cosine", cosine.min(), "max rel error", rel.max())
  assert cosine.min() >= 0.999 and rel.max() <= 0.03, (cosine.min(), rel.max())
  assert not np.array_equal(ref, half)  # it did run in bf16
  with pytest.raises(ValueError, match="compute_dtype must be float32 or bfloat16"):
    models.load_encoder(directory, compute_dtype="float16")
