"""Forward throughput of the Flax victim encoders next to the PyTorch models, same machine, same run.

  python -m benchmarks.encoders                       # ResNet-50 and ViT-S/16, batch 32, 224x224, f32
  python -m benchmarks.encoders --models=resnet50 --iters=5 --batch=32

Both sides get the same (converted) random weights and the same images; the script prints images/s of
each, the ratio Flax/PyTorch (target >= 1.0), the XLA compile time, and the max relative difference of
the outputs as a sanity check. Uses every CPU core for both (torch.set_num_threads(os.cpu_count())).
"""
import os
import time

from absl import app
from absl import flags

_MODELS = flags.DEFINE_list("models", ["resnet50", "vit_small"], "resnet50 and/or vit_small")
_BATCH = flags.DEFINE_integer("batch", 32, "images per forward")
_SIZE = flags.DEFINE_integer("size", 224, "image side")
_ITERS = flags.DEFINE_integer("iters", 5, "timed forwards per model and framework (after 1 warm-up)")


def _torch_model(name):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if name == "resnet50":
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    return net.eval(), "resnet", lambda m, x: m(x)
  net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
  return net, "vit", lambda m, x: m(x)


def _flax_forward(name, state_dict):
  import jax  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  from weight_conversion import keymaps  # pylint: disable=g-import-not-at-top
  if name == "resnet50":
    model = nnx.eval_shape(lambda: models.create_resnet("resnet50", rngs=nnx.Rngs(0)))
    family = "resnet"
  else:
    model = nnx.eval_shape(lambda: models.create_vit("vit_small", rngs=nnx.Rngs(0)))
    family = "vit"
  graphdef, params, stats = keymaps.load_into_model(model, state_dict, family=family)
  params, stats = jax.device_put((params, stats), jax.devices()[0])

  @jax.jit
  def forward(params, stats, x):
    return nnx.merge(graphdef, params, stats, copy=True)(x, train=False)

  return forward, params, stats


def _time(fn, iters):
  fn()  # warm-up
  start = time.perf_counter()
  for _ in range(iters):
    fn()
  return (time.perf_counter() - start) / iters


def main(argv):
  del argv
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  batch, size, iters = _BATCH.value, _SIZE.value, _ITERS.value
  print(f"CPU cores {os.cpu_count()}, jax {jax.__version__} ({jax.devices()[0].platform}, "
        f"{jax.device_count()} device(s)), torch {torch.__version__} ({torch.get_num_threads()} "
        f"threads); batch {batch}, {size}x{size}, float32, {iters} timed iterations")
  x = np.random.RandomState(0).randn(batch, 3, size, size).astype(np.float32)
  x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
  for name in _MODELS.value:
    net, _, call = _torch_model(name)
    state_dict = {k: v.detach().numpy() for k, v in net.state_dict().items()}
    forward, params, stats = _flax_forward(name, state_dict)
    xj = jax.device_put(x_nhwc)
    start = time.perf_counter()
    compiled = forward.lower(params, stats, xj).compile()
    compile_s = time.perf_counter() - start
    xt = torch.from_numpy(x)
    with torch.inference_mode():
      torch_s = _time(lambda: call(net, xt), iters)
      ref = call(net, xt).numpy()
    flax_s = _time(lambda: compiled(params, stats, xj).block_until_ready(), iters)
    ours = np.asarray(compiled(params, stats, xj))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    flax_ips, torch_ips = batch / flax_s, batch / torch_s
    print(f"{name:9s} flax {flax_ips:7.1f} img/s | torch {torch_ips:7.1f} img/s | ratio "
          f"{flax_ips / torch_ips:5.2f}x | compile {compile_s:5.1f} s | max rel diff {rel:.1e}")


if __name__ == "__main__":
  app.run(main)
