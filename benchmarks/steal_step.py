r"""Stealing training-step speed: our jitted step vs the equivalent PyTorch step, in the same run.

  python benchmarks/steal_step.py                 # ResNet-18 b64 32x32 and ResNet-50 b16 224x224
  python benchmarks/steal_step.py --steps 20 --settings resnet18
  python benchmarks/steal_step.py --tiny          # seconds: a smoke check of the script itself
  python -m benchmarks.steal_step --settings resnet50_b256   # GPU/TPU size (benchmarks/device.sh)
  python -m benchmarks.steal_step --settings demo   # the demo's stolen copy, ResNet-18 at 1/4 width
  python -m benchmarks.steal_step --compute-dtype bfloat16    # our bf16 mixed-precision step
  B4B_HOST_MEMORY=keep python -m benchmarks.steal_step      # XLA's step buffers kept mapped (host_memory.py)
  python -m benchmarks.steal_step --profile       # also where our step's time goes, per XLA op
  XLA_FLAGS=--xla_force_host_platform_device_count=2 python -m benchmarks.steal_step --devices 2
                                                  # a CPU host split into 2 XLA devices, the batch across them

One step = normalise uint8 images, forward in train mode (BatchNorm batch statistics), InfoNCE (tau 0.25)
against the API's responses, backward, SGD momentum 0.9 (cosine schedule in ours, constant lr in torch:
the schedule costs nothing measurable). Ours: b4b_jax.attacks.train_state.make_train_step on a 1-device
"data" mesh (the per-device figure; more devices split the batch), or with --devices N on N devices
(on a CPU host: N XLA devices that XLA_FLAGS=--xla_force_host_platform_device_count=N makes of it, each
running its share of the batch, BatchNorm statistics over the whole batch; docs/models.md has what that
measured). Reference: torchvision's ResNet (torch_resnet: fc = Identity; for 32x32 and smaller
inputs the same CIFAR stem as ours, 3x3 stride-1 conv and no max-pool; width variants with every
stage's channels scaled) with the original code's InfoNCE, on the same device kind when PyTorch can
use it (else CPU).
Steps of the two take turns (common.timed_in_turns: one untimed step, then two timed ones) and the
median step time is reported, so both see the same load on a shared machine and neither is timed on
the other's idle threads. Prints steps/s for both, the ratio (ours / torch; target >= 1.0) and
our compile time separately, and our achieved FLOP/s as a share of the device's peak. Never asserts a
time. --profile then traces our step alone (jax.profiler, benchmarks/op_profile.py) and prints the
least time of each XLA op over the traced steps, summed by kind and the largest ones, against the
step's wall time; on CPU, XLA hands large convolutions to Eigen's threads, and their trace events time
only the launch, so they are most of the wall the events do not add up to (the output gives the
convolutions' own events apart). A line after the kinds bounds what work outside the convolutions can
win back: about the ratio to PyTorch if every other op took no time (`convolution_bound`).
"""
import argparse
import os
import re
import time
from typing import Optional, Tuple

import jax
import numpy as np
from flax import nnx

from b4b_jax import models
from b4b_jax.attacks import train_state as ts
from b4b_jax.utils import distributed
from benchmarks import common

SETTINGS = {
    # name: (our arch, torchvision arch, batch, image size, CIFAR stem, response dim)
    "resnet18": ("resnet18", "resnet18", 64, 32, True, 512),
    "resnet50": ("resnet50", "resnet50", 16, 224, False, 2048),
    "resnet50_b256": ("resnet50", "resnet50", 256, 224, False, 2048),   # GPU/TPU size
    # The demo's stolen copies (configs/demo.py): ResNet-18 at 1/4 width, 16 px, 128-d responses.
    "demo": ("resnet18_w0.25", "resnet18_w0.25", 64, 16, True, 128),
}
TINY = {"resnet18": ("resnet18", "resnet18", 8, 16, True, 512)}


def build_jax(arch, batch, size, small, dim, compute_dtype="float32", num_devices=1):
  """Returns (run_one_step, compile_seconds, flops per step, XLA's temporary buffer in MB, the compiled
  step, whose as_text() --profile reads); run_one_step() blocks until done."""
  model = models.create_resnet(arch, rngs=nnx.Rngs(0), small_input=small)
  graphdef, params, batch_stats = models.split_model(model)
  mesh = distributed.data_mesh(num_devices)
  distributed.check_global_batch(batch, mesh)
  cfg = ts.StepConfig(learning_rate=0.1 * batch / 256, total_steps=10_000, input_size=size,
                      compute_dtype=compute_dtype)
  state = distributed.replicate(jax.tree.map(np.asarray, ts.init_state(params, batch_stats, cfg)), mesh)
  step = ts.make_train_step(graphdef, cfg, mesh)
  rng = np.random.default_rng(0)
  images = jax.device_put(rng.integers(0, 256, (batch, size, size, 3), dtype=np.uint8),
                          distributed.batch_sharded(mesh))
  targets = jax.device_put(rng.normal(size=(batch, dim)).astype(np.float32),
                           distributed.batch_sharded(mesh))
  key = jax.random.key(0)
  box = {"state": state}

  lowered = step.lower(state, images, targets, key)
  flops = common.compiled_flops(lowered)
  t0 = time.perf_counter()
  compiled = lowered.compile()
  compile_s = time.perf_counter() - t0
  memory = compiled.memory_analysis()
  temp_mb = memory.temp_size_in_bytes / 1e6 if memory is not None else float("nan")

  def run_one():
    box["state"], metrics = compiled(box["state"], images, targets, key)
    jax.block_until_ready(metrics)

  run_one()
  run_one()  # two warm steps
  return run_one, compile_s, flops, temp_mb, compiled


def torch_resnet(arch: str, small: bool):
  """The reference network: torchvision's ResNet by our name ("resnet18"; "resnet18_w0.25" with
  every stage's channels scaled as models.create_resnet scales them: torchvision has no width
  argument for them), fc = Identity, and with small=True the CIFAR stem (3x3 stride-1 conv, no
  max-pool)."""
  import torch  # pylint: disable=g-import-not-at-top
  import torchvision  # pylint: disable=g-import-not-at-top
  name, _, width = arch.partition("_w")
  net = getattr(torchvision.models, name)()
  if width:
    base = int(64 * float(width))
    block = type(net.layer1[0])
    net.conv1, net.bn1 = torch.nn.Conv2d(3, base, 7, 2, 3, bias=False), torch.nn.BatchNorm2d(base)
    net.inplanes = base  # _make_layer's running input width
    for i in range(4):
      layer = f"layer{i + 1}"
      setattr(net, layer, net._make_layer(  # pylint: disable=protected-access
          block, base * 2**i, len(getattr(net, layer)), stride=1 if i == 0 else 2))
  net.fc = torch.nn.Identity()
  if small:
    net.conv1 = torch.nn.Conv2d(3, net.bn1.num_features, 3, 1, 1, bias=False)
    net.maxpool = torch.nn.Identity()
  return net


def build_torch(arch, batch, size, small, dim):
  """Returns (run_one_step, device); run_one_step() blocks until the step is done."""
  import torch  # pylint: disable=g-import-not-at-top
  import torch.nn.functional as F  # pylint: disable=g-import-not-at-top
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  net = torch_resnet(arch, small)
  net = net.to(device).train()
  opt = torch.optim.SGD(net.parameters(), lr=0.1 * batch / 256, momentum=0.9)
  rng = np.random.default_rng(0)
  images = torch.tensor(rng.integers(0, 256, (batch, 3, size, size), dtype=np.uint8), device=device)
  targets = torch.tensor(rng.normal(size=(batch, dim)).astype(np.float32), device=device)
  mean = torch.tensor([0.485, 0.456, 0.406], device=device).view(1, 3, 1, 1)
  std = torch.tensor([0.229, 0.224, 0.225], device=device).view(1, 3, 1, 1)

  def info_nce(stolen, victim, tau=0.25):
    b = stolen.shape[0]
    z = F.normalize(torch.cat([stolen, victim]), dim=1)
    sim = z @ z.T
    mask = torch.eye(2 * b, dtype=torch.bool, device=device)
    pair = torch.cat([torch.arange(b, 2 * b), torch.arange(b)]).to(device)
    sim = sim.masked_fill(mask, float("-inf")) / tau
    return F.cross_entropy(sim, pair)

  def step():
    x = (images.float() / 255.0 - mean) / std
    loss = info_nce(net(x), targets)
    opt.zero_grad(set_to_none=True)
    loss.backward()
    opt.step()
    return loss

  def run_one():
    step().item()
    if device == "cuda":
      torch.cuda.synchronize()

  for _ in range(2):
    run_one()
  return run_one, device


def convolution_bound(wall: float, leaf: float, conv_events: float,
                      ratio: float) -> Tuple[float, float]:
  """(share, bound): the convolution ops' share of our traced step (the wall less every other op's
  trace events: the convolutions' launch events and the work no event times, gaps included), and the
  measured ratio to PyTorch over that share, about the ratio the step would reach if every op but the
  convolution ops took no time. A share of one traced run scales our own median step, not a least
  traced wall against PyTorch's median: on a noisy machine those two come from different minutes.
  Gaps count as convolution time (the bound leans low) and the 1x1 kernel gradients, matmuls here
  (models/layers.conv), as other ops (it leans high: much for a ResNet-50, whose 1x1 layers are many)."""
  share = min(max(wall - (leaf - conv_events), 0.0) / wall, 1.0)  # overlapping events: no bound
  return share, ratio / share if share > 0 else float("inf")


def step_profile(run_one, hlo: str, runs: int, kinds: int = 8, top: int = 10,
                 ratio: Optional[float] = None):
  """Printable lines: our step traced `runs` times alone, each XLA op's least time over them, summed by
  kind and the largest ops, as shares of the step's least traced wall time; given our measured ratio
  to PyTorch, also `convolution_bound`."""
  from benchmarks import op_profile  # pylint: disable=g-import-not-at-top  (jax.profiler: only here)
  module = re.search(r"^HloModule (\S+?),", hlo, re.M).group(1)
  p = op_profile.profile(run_one, module, runs=runs, hlo_text=hlo)
  convolutions = set(re.findall(r"^\s*(?:ROOT )?%(\S+) = \S+ convolution\(", hlo, re.M))
  conv_seconds = sum(sec for op, sec, _ in p.ops if op in convolutions)
  leaf = p.leaf_seconds()
  out = [f"  wall {1e3 * p.wall:.1f} ms (least of {runs} traced steps); the ops' trace events sum to "
         f"{1e3 * leaf:.1f} ms ({100 * leaf / p.wall:.0f}%), the {len(convolutions)} convolutions' to "
         f"{1e3 * conv_seconds:.1f} ms; the rest, {1e3 * max(p.wall - leaf, 0.0):.1f} ms, is work no "
         f"event times (on CPU: a large convolution's event times its launch, and Eigen's threads do "
         f"the work after it) and gaps"]
  out.append("  by kind: " + ", ".join(f"{kind} {1e3 * sec:.1f} ms ({n})"
                                       for kind, sec, n in op_profile.by_kind(p)[:kinds]))
  if ratio is not None:
    share, bound = convolution_bound(p.wall, leaf, conv_seconds, ratio)
    out.append(f"  the convolution ops take {100 * share:.1f}% of the traced step (the wall less the "
               f"other ops' events); if every other op took no time, the step would reach about "
               f"{bound:.2f}x PyTorch (the measured {ratio:.3f}x over that share): work outside them "
               f"can win back no more than that")
  out.extend(op_profile.lines(p, top=top, indent="  ")[1:])  # shares of the step's wall
  return out


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=None, help="timed steps per setting (rounded up to even)")
  parser.add_argument("--settings", default="resnet18,resnet50", help=f"of {sorted(SETTINGS)}")
  parser.add_argument("--tiny", action="store_true")
  parser.add_argument("--compute-dtype", default="float32", choices=("float32", "bfloat16"),
                      help="our step's compute dtype (params and optimiser state stay float32)")
  parser.add_argument("--devices", type=int, default=1,
                      help="devices of our step's data mesh (on CPU: split the host with XLA_FLAGS="
                           "--xla_force_host_platform_device_count=N first)")
  parser.add_argument("--profile", action="store_true",
                      help="also trace our step and print where its time goes, per XLA op")
  args = parser.parse_args(argv)
  settings = TINY if args.tiny else {k: SETTINGS[k] for k in args.settings.split(",")}
  load = common.load_average()
  print(f"jax {jax.__version__} {common.device_kind()} devices={jax.device_count()} "
        f"(ours on {args.devices} device(s), {args.compute_dtype}) "
        f"XLA_FLAGS={os.environ.get('XLA_FLAGS', '')!r} "
        f"B4B_HOST_MEMORY={common.host_memory_setting()} load {load}")
  rows, profiles = [], []
  for name, (arch, torch_arch, batch, size, small, dim) in settings.items():
    steps = args.steps or (3 if args.tiny else (20 if size <= 32 else 5))
    ours_step, compile_s, flops, temp_mb, compiled = build_jax(arch, batch, size, small, dim,
                                                                args.compute_dtype, args.devices)
    ref_step, device = build_torch(torch_arch, batch, size, small, dim)
    # In turns, median step time: on a shared machine both see the same load.
    times = common.timed_in_turns({"ours": ours_step, "ref": ref_step}, turns=max(1, (steps + 1) // 2),
                                  calls_per_turn=2)
    ours_t, ref_t = times["ours"], times["ref"]
    ours, ref = 1.0 / float(np.median(ours_t)), 1.0 / float(np.median(ref_t))
    dtype = "bf16" if args.compute_dtype == "bfloat16" else "f32"
    rows.append((name, batch, size, ours, ref, device, compile_s, temp_mb,
                 common.flops_share(flops, 1.0 / ours, dtype)))
    if args.profile:  # after the timing, so tracing never overlaps it
      profiles.append((name, step_profile(ours_step, compiled.as_text(), runs=max(2, steps // 2),
                                          ratio=ours / ref)))
  print(f"{'setting':<14} {'batch':>5} {'size':>4} {'ours step/s':>12} {'torch step/s':>13} "
        f"{'ratio':>6} {'torch dev':>9} {'our compile s':>13} {'our temp MB':>11}  achieved")
  for name, batch, size, ours, ref, device, compile_s, temp_mb, fl in rows:
    print(f"{name:<14} {batch:>5} {size:>4} {ours:>12.3f} {ref:>13.3f} {ours / ref:>6.2f} {device:>9} "
          f"{compile_s:>13.1f} {temp_mb:>11,.0f}  {fl}")
  if jax.default_backend() == "cpu" and not args.tiny:
    print("On CPU, convolutions are most of the step: XLA runs them on Eigen's multi-threaded kernels "
          "(b4b_jax/xla_flags.py; YNNPACK's default ones are single-threaded), the 1x1 kernels' weight "
          "gradient as a matmul and larger kernels' input stored for theirs (models/layers.conv), "
          "BatchNorm with its closed-form backward, a bottleneck's output stored once "
          "(models/layers.stored_once), in "
          "XLA's memory-optimised op order (xla_flags.training_options: 'our temp MB' is the buffer "
          "each step mallocs and, unless B4B_HOST_MEMORY=keep, faults in afresh); "
          "python -m benchmarks.conv_repro times single conv layers, XLA's, ours and PyTorch's. "
          "On a Zen 3 CPU (AVX2) single 3x3 layers ran at PyTorch's speed there (0.9-1.2x "
          "forward+backward at the ResNets' shapes, timed one call each in turn) and 1x1 ones about "
          "twice as fast; what the step "
          "lost to PyTorch's was elementwise work (XLA's fusion recomputed each stage's "
          "BatchNorm/ReLU/residual chain where it is used, and transposes activations for the 3x3 "
          "kernel gradients; docs/models.md, 'Where the rest of the stealing step goes') and, by "
          "default, the faults. On a Zen 5 CPU (AVX-512) the gap is Eigen's 3x3 kernels against "
          "PyTorch's oneDNN ones: timed in turns with B4B_HOST_MEMORY=keep, the 3x3 layers ran at "
          "0.81-0.99x forward+backward, the forward at 0.76-0.91x, the input gradient at 0.60-0.95x and "
          "the 64-channel layers' kernel gradient, furthest behind, at 0.49-0.50x (docs/models.md, 'On a "
          "CPU with AVX-512'; --devices 2 with the host split in two XLA devices gave ResNet-18 "
          "0.88-0.90x).")
  for name, lines in profiles:
    print(f"where our {name} step's time goes (--profile):")
    for line in lines:
      print(line)
  return [common.Row(f"steal_step: {name} b{batch} {size}px {args.compute_dtype}", f"{ours:.3f} step/s",
                     f"torch({device}) {ref:.3f} step/s", ours / ref, fl)
          for name, batch, size, ours, ref, device, compile_s, _, fl in rows]


if __name__ == "__main__":
  main()
