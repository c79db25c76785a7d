r"""Linear-probe speed: our jitted probe (whole epoch in one lax.scan) vs the original PyTorch loop.

  python -m benchmarks.linear_probe           # 50k x 2048 embeddings, 10 classes (a CIFAR10 probe)
  python -m benchmarks.linear_probe --tiny    # seconds, for a smoke check

The reference is the original embedding probe (nn.Linear, Adam, cross-entropy, batch 64, shuffled
each epoch) as a plain PyTorch loop on the same data and machine. Prints seconds per epoch (compile
excluded and reported separately), the ratio, and the closed-form ridge probe's time. PyTorch runs on
CUDA when JAX runs on a GPU and torch sees one. Never asserts.
"""
import argparse
import os
import time

import numpy as np

from b4b_jax.evaluation import linear_probe
from benchmarks import common


def _data(n, d, classes, seed=0):
  """Train and test blobs around shared class centres (noisy enough that accuracy is not 100%)."""
  rng = np.random.default_rng(seed)
  centers = (2.0 / np.sqrt(d) * rng.normal(size=(classes, d))).astype(np.float32)

  def draw(m):
    y = rng.integers(0, classes, m)
    return (centers[y] + rng.normal(size=(m, d)).astype(np.float32)).astype(np.float32), y
  return draw(n) + draw(n // 5)


def _ours(x, y, xt, yt, epochs):
  t0 = time.perf_counter()
  linear_probe.train_linear_probe(x, y, xt, yt, epochs=1, seeds=(0,))  # compiles
  first = time.perf_counter() - t0
  t0 = time.perf_counter()
  res = linear_probe.train_linear_probe(x, y, xt, yt, epochs=epochs, seeds=(0,))
  per_epoch = (time.perf_counter() - t0) / epochs
  return per_epoch, max(first - per_epoch, 0.0), res.test_top1_mean


def _torch(x, y, xt, yt, epochs, device="cpu"):
  import torch  # pylint: disable=g-import-not-at-top
  torch.manual_seed(0)
  mean, std = x.mean(0), x.std(0) + 1e-6   # the same standardisation ours applies
  xs = torch.from_numpy((x - mean) / std).to(device)
  ys = torch.from_numpy(y.astype(np.int64)).to(device)
  model = torch.nn.Linear(x.shape[1], int(y.max()) + 1).to(device)
  opt = torch.optim.Adam(model.parameters(), lr=1e-3)
  loss_fn = torch.nn.CrossEntropyLoss()

  def epoch():
    perm = torch.randperm(len(xs), device=device)
    for i in range(0, len(xs), 64):
      idx = perm[i:i + 64]
      opt.zero_grad()
      loss_fn(model(xs[idx]), ys[idx]).backward()
      opt.step()

  epoch()  # warm-up (lazy initialisation), like our compile, not timed
  t0 = time.perf_counter()
  for _ in range(epochs):
    epoch()
  if device == "cuda":
    torch.cuda.synchronize()
  per_epoch = (time.perf_counter() - t0) / epochs
  with torch.no_grad():
    logits = model(torch.from_numpy((xt - mean) / std).to(device)).argmax(1).cpu().numpy()
    acc = 100.0 * float((logits == yt).mean())
  return per_epoch, acc


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true")
  args = parser.parse_args(argv)
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  device = "cuda" if jax.default_backend() == "gpu" and torch.cuda.is_available() else "cpu"
  n, d, classes, epochs = (2000, 128, 10, 2) if args.tiny else (50000, 2048, 10, 3)
  x, y, xt, yt = _data(n, d, classes)
  load = open("/proc/loadavg").read().split()[0] if os.path.exists("/proc/loadavg") else "?"
  ours, compile_s, ours_acc = _ours(x, y, xt, yt, epochs)
  ref, ref_acc = _torch(x, y, xt, yt, epochs, device)
  t0 = time.perf_counter()
  ridge = linear_probe.ridge_probe(x, y, xt, yt, seeds=(0,))
  ridge_s = time.perf_counter() - t0
  print(f"linear probe, {n} x {d} embeddings, {classes} classes, Adam batch 64 ({common.device_kind()}, "
        f"torch on {device}, load {load}):")
  print(f"  ours (jitted epoch scan): {ours:.3f} s/epoch  (compile {compile_s:.1f} s, "
        f"test top-1 {ours_acc:.2f} after {epochs} epochs)")
  print(f"  PyTorch loop (original):  {ref:.3f} s/epoch  (test top-1 {ref_acc:.2f} after "
        f"{epochs + 1} epochs)")
  print(f"  speed-up: {ref / ours:.2f}x")
  print(f"  ridge probe (closed form, 10 strengths, 1 refit): {ridge_s:.2f} s total, test top-1 "
        f"{ridge.test_top1_mean:.2f}")
  return [common.Row(f"linear_probe: {n}x{d} Adam b64", f"{ours:.3f} s/epoch",
                     f"torch({device}) {ref:.3f} s/epoch", ref / ours)]


if __name__ == "__main__":
  main()
