"""Forward throughput of the Flax victim encoders next to the PyTorch models, same machine, same run.

  python -m benchmarks.encoders                       # ResNet-50 and ViT-S/16, batch 32, 224x224, f32
  python -m benchmarks.encoders --models=resnet50 --iters=5 --batch=32
  python -m benchmarks.encoders --batch=256 --iters=10  # GPU/TPU size (benchmarks/device.sh)

Both sides get the same (converted) random weights and the same images; the script prints images/s of
each, the ratio Flax/PyTorch (target >= 1.0), the XLA compile time, the max relative difference of the
outputs as a sanity check, and our achieved FLOP/s as a share of the device's peak (benchmarks/common.py).
Timed forwards of the two take turns (common.timed_in_turns: an untimed forward, then a timed one), so
both see the same load on a shared machine and neither is timed on the other's idle threads.
PyTorch runs on CUDA when JAX runs on a GPU and torch sees one, else on the CPU with every core.
On CPU the header names B4B_HOST_MEMORY, because the malloc settings are the whole process's and move
PyTorch's figure far more than ours: with `keep` (every job's setting) PyTorch's forward stops faulting
its buffers in afresh (Zen 4, session 37: ResNet-50 1.76-1.82x by default, 1.09-1.14x with `keep`).
"""
import argparse
import os
import time

from benchmarks import common


def _torch_model(name, device):
  import timm  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  if name == "resnet50":
    net = torchvision.models.resnet50()
    net.fc = torch.nn.Identity()
    return net.eval().to(device), "resnet", lambda m, x: m(x)
  net = timm.create_model("vit_small_patch16_224", pretrained=False, num_classes=0).eval()
  return net.to(device), "vit", lambda m, x: m(x)


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


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--models", default="resnet50,vit_small", help="resnet50 and/or vit_small")
  parser.add_argument("--batch", type=int, default=32, help="images per forward")
  parser.add_argument("--size", type=int, default=224, help="image side")
  parser.add_argument("--iters", type=int, default=5, help="timed forwards per model and framework")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  if device == "cpu":
    torch.set_num_threads(os.cpu_count())
  batch, size, iters = args.batch, args.size, args.iters
  print(f"CPU cores {os.cpu_count()}, jax {jax.__version__} ({common.device_kind()}, "
        f"{jax.device_count()} device(s)), torch {torch.__version__} on {device} "
        f"({torch.get_num_threads()} threads); batch {batch}, {size}x{size}, float32, {iters} timed "
        f"iterations; B4B_HOST_MEMORY={common.host_memory_setting()}, load {common.load_average()}")
  x = np.random.RandomState(0).randn(batch, 3, size, size).astype(np.float32)
  x_nhwc = np.ascontiguousarray(x.transpose(0, 2, 3, 1))
  rows = []
  for name in args.models.split(","):
    net, _, call = _torch_model(name, device)
    state_dict = {k: v.detach().cpu().numpy() for k, v in net.state_dict().items()}
    forward, params, stats = _flax_forward(name, state_dict)
    xj = jax.device_put(x_nhwc)
    start = time.perf_counter()
    compiled = forward.lower(params, stats, xj).compile()
    compile_s = time.perf_counter() - start
    xt = torch.from_numpy(x).to(device)

    def torch_call():
      with torch.inference_mode():
        out = call(net, xt)
      if device == "cuda":
        torch.cuda.synchronize()
      return out

    times = common.timed_in_turns({"flax": lambda: compiled(params, stats, xj).block_until_ready(),
                                   "torch": torch_call}, iters)
    t = {side: float(np.median(seconds)) for side, seconds in times.items()}
    ref = torch_call().cpu().numpy()
    ours = np.asarray(compiled(params, stats, xj))
    rel = np.abs(ours - ref).max() / np.abs(ref).max()
    flax_ips, torch_ips = batch / t["flax"], batch / t["torch"]
    flops = common.flops_share(common.compiled_flops(compiled), t["flax"])
    print(f"{name:9s} flax {flax_ips:7.1f} img/s | torch {torch_ips:7.1f} img/s | ratio "
          f"{flax_ips / torch_ips:5.2f}x | compile {compile_s:5.1f} s | max rel diff {rel:.1e} | {flops}")
    rows.append(common.Row(f"encoders: {name} forward b{batch} {size}px", f"{flax_ips:.1f} img/s",
                           f"torch({device}) {torch_ips:.1f} img/s", flax_ips / torch_ips, flops))
  return rows


if __name__ == "__main__":
  main()
