r"""One conv layer's forward + backward on CPU, XLA vs PyTorch: where the stealing step's time goes.

  python -m benchmarks.conv_repro                 # the ResNets' shapes: ResNet-18's 3x3 layers, ResNet-50's ...
  python -m benchmarks.conv_repro --profile=DIR   # also a jax.profiler trace of ours in DIR
  XLA_FLAGS=--xla_cpu_experimental_ynn_fusion_type=+individual_convolution python -m benchmarks.conv_repro
                                                  # XLA's default YNNPACK convolutions, single-threaded

Each case times, taking turns (common.timed_in_turns: each function runs one untimed call, then a
timed one, in turn with the others; median), the forward alone and forward+backward (grad w.r.t.
input and kernel of sum(conv(x, w)^2)) of a bias-free stride-1 convolution in NHWC (ours,
jax.lax.conv_general_dilated under jit, on the Eigen kernels b4b_jax/xla_flags.py selects) and NCHW
(torch.nn.functional.conv2d, oneDNN). The backward's ratio is what benchmarks/steal_step.py's ResNets
inherit on CPU. The last column is the same gradient through `b4b_jax.models.layers.conv`, which the
ResNets use: lax's own for 3x3 kernels, the kernel gradient as a matmul for 1x1 ones (in a whole step
that also saves XLA's transposed copy of the input, which a single layer does not show). A second line
per case times the backward's two convolutions apart, given the output's gradient: the input
gradient (ours: jax.vjp of layers.conv w.r.t. x; PyTorch: torch.nn.grad.conv2d_input) and the kernel
gradient (w.r.t. w; torch.nn.grad.conv2d_weight), which shows which of the three kernels falls behind.
"""
import argparse
import os

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax.models import layers
from benchmarks import common

CASES = {  # name: (batch, size, channels in, channels out, kernel size)
    # ResNet-18's 3x3 layers in benchmarks/steal_step.py (32 px, batch 64), stage by stage
    "3x3_64_32px_b64": (64, 32, 64, 64, 3),
    "3x3_128_16px_b64": (64, 16, 128, 128, 3),
    "3x3_256_8px_b64": (64, 8, 256, 256, 3),
    "3x3_512_4px_b64": (64, 4, 512, 512, 3),
    # ResNet-50's (224 px, batch 16): a 3x3 of layer1 and of layer3, layer1's 1x1 reduction
    "3x3_64_56px_b16": (16, 56, 64, 64, 3),
    "3x3_256_14px_b16": (16, 14, 256, 256, 3),
    "1x1_256_56px_b16": (16, 56, 256, 64, 1),
}


def _ours(batch, size, cin, cout, k):
  rng = np.random.default_rng(0)
  x = jnp.asarray(rng.normal(size=(batch, size, size, cin)).astype(np.float32))
  w = jnp.asarray(rng.normal(size=(k, k, cin, cout)).astype(np.float32) * 0.05)
  pad = ((k // 2, k // 2), (k // 2, k // 2))

  def conv(x, w):
    return jax.lax.conv_general_dilated(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  def model_conv(x, w):  # what the ResNets run
    return layers.conv(x, w, (1, 1), pad, dimension_numbers=("NHWC", "HWIO", "NHWC"))

  fwd = jax.jit(conv)
  bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(conv(x, w) ** 2), argnums=(0, 1)))
  model_bwd = jax.jit(jax.grad(lambda x, w: jnp.sum(model_conv(x, w) ** 2), argnums=(0, 1)))
  dy = jnp.asarray(rng.normal(size=(batch, size, size, cout)).astype(np.float32))
  input_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda x: model_conv(x, w), x)[1](dy)[0])
  kernel_grad = jax.jit(lambda x, w, dy: jax.vjp(lambda w: model_conv(x, w), w)[1](dy)[0])
  flops = common.compiled_flops(bwd.lower(x, w))
  return {"fwd": lambda: fwd(x, w).block_until_ready(), "bwd": lambda: jax.block_until_ready(bwd(x, w)),
          "model_bwd": lambda: jax.block_until_ready(model_bwd(x, w)),
          "input_grad": lambda: input_grad(x, w, dy).block_until_ready(),
          "kernel_grad": lambda: kernel_grad(x, w, dy).block_until_ready()}, flops


def _torch(batch, size, cin, cout, k):
  import torch  # pylint: disable=g-import-not-at-top
  torch.set_num_threads(os.cpu_count())
  rng = np.random.default_rng(0)
  x = torch.tensor(rng.normal(size=(batch, cin, size, size)).astype(np.float32), requires_grad=True)
  w = torch.tensor(rng.normal(size=(cout, cin, k, k)).astype(np.float32) * 0.05, requires_grad=True)
  dy = torch.tensor(rng.normal(size=(batch, cout, size, size)).astype(np.float32))
  conv = lambda: torch.nn.functional.conv2d(x, w, padding=k // 2)  # noqa: E731

  def fwd():
    with torch.no_grad():
      conv()

  def bwd():
    torch.autograd.grad((conv() ** 2).sum(), (x, w))

  def input_grad():
    with torch.no_grad():
      torch.nn.grad.conv2d_input(x.shape, w, dy, padding=k // 2)

  def kernel_grad():
    with torch.no_grad():
      torch.nn.grad.conv2d_weight(x, w.shape, dy, padding=k // 2)

  return {"fwd": fwd, "bwd": bwd, "input_grad": input_grad, "kernel_grad": kernel_grad}


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--iters", type=int, default=10, help="turns (timed calls of each function)")
  parser.add_argument("--cases", default=",".join(CASES))
  parser.add_argument("--profile", default=None, help="write a jax.profiler trace of ours here")
  args = parser.parse_args(argv)
  load = common.load_average()
  print(f"one conv layer, forward and forward+backward, {common.device_kind()}, "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r}, "
        f"B4B_HOST_MEMORY={common.host_memory_setting()}, load {load}")
  rows = []
  for name in args.cases.split(","):
    ours, flops = _ours(*CASES[name])
    ref = _torch(*CASES[name])
    fns = {"ours_fwd": ours["fwd"], "torch_fwd": ref["fwd"], "ours_bwd": ours["bwd"],
           "torch_bwd": ref["bwd"], "model_bwd": ours["model_bwd"],
           "ours_input_grad": ours["input_grad"], "torch_input_grad": ref["input_grad"],
           "ours_kernel_grad": ours["kernel_grad"], "torch_kernel_grad": ref["kernel_grad"]}
    t = {k: float(np.median(v)) for k, v in common.timed_in_turns(fns, args.iters).items()}
    print(f"  {name:18s} forward ours {1e3 * t['ours_fwd']:7.2f} ms torch {1e3 * t['torch_fwd']:7.2f} ms"
          f" ({t['torch_fwd'] / t['ours_fwd']:.2f}x) | fwd+bwd ours {1e3 * t['ours_bwd']:7.2f} ms torch "
          f"{1e3 * t['torch_bwd']:7.2f} ms ({t['torch_bwd'] / t['ours_bwd']:.2f}x) | fwd+bwd layers.conv "
          f"{1e3 * t['model_bwd']:7.2f} ms ({t['torch_bwd'] / t['model_bwd']:.2f}x)")
    print(f"  {'':18s} input gradient ours {1e3 * t['ours_input_grad']:7.2f} ms torch "
          f"{1e3 * t['torch_input_grad']:7.2f} ms ({t['torch_input_grad'] / t['ours_input_grad']:.2f}x) | "
          f"kernel gradient ours {1e3 * t['ours_kernel_grad']:7.2f} ms torch "
          f"{1e3 * t['torch_kernel_grad']:7.2f} ms ({t['torch_kernel_grad'] / t['ours_kernel_grad']:.2f}x)")
    rows.append(common.Row(f"conv_repro: {name} fwd+bwd", f"{1e3 * t['ours_bwd']:.2f} ms",
                           f"torch {1e3 * t['torch_bwd']:.2f} ms", t["torch_bwd"] / t["ours_bwd"],
                           common.flops_share(flops, t["ours_bwd"])))
    rows.append(common.Row(f"conv_repro: {name} fwd+bwd, layers.conv", f"{1e3 * t['model_bwd']:.2f} ms",
                           f"torch {1e3 * t['torch_bwd']:.2f} ms", t["torch_bwd"] / t["model_bwd"],
                           common.flops_share(flops, t["model_bwd"])))
    for part in ("input_grad", "kernel_grad"):
      rows.append(common.Row(f"conv_repro: {name} {part.replace('_', ' ')}",
                             f"{1e3 * t['ours_' + part]:.2f} ms", f"torch {1e3 * t['torch_' + part]:.2f} ms",
                             t["torch_" + part] / t["ours_" + part]))
    if args.profile:
      with jax.profiler.trace(args.profile):
        for _ in range(3):
          ours["bwd"]()
  return rows


if __name__ == "__main__":
  main()
