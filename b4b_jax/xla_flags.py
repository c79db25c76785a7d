"""The one XLA flag b4b_jax sets for itself, before JAX starts its backend.

`apply()` runs when `b4b_jax` is imported. It appends
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to `XLA_FLAGS`, so XLA's CPU runtime
computes convolutions with its multi-threaded Eigen kernels instead of handing each one to YNNPACK.
Measured on the 2-core CPU with jax 0.10.2 (benchmarks/conv_repro.py): YNNPACK's convolutions run on
one thread (process CPU / wall = 1.00) and Eigen's on all cores (1.98), so the 3x3 64-channel ResNet
convolution's forward takes 39 ms instead of 91 ms and its input gradient 82 ms instead of 179 ms;
YNNPACK keeps the elementwise, reduce and dot fusions. The flag touches only the CPU backend; GPU and
TPU compile as before.

Why only convolutions (YNNPACK's default fusion types are individual_convolution, individual_dot, dot,
eltwise and reduce; measured on the same CPU, nothing else running): taking YNNPACK's dots away too
(`-individual_dot,-dot`) makes lone matmuls faster (the ViT's MLP matmul 6304x384x1536 at 119-125
instead of 85-112 GFLOP/s, the defense's hashing matmul at 141-150 instead of 79-120) but costs the
ResNet-50 stealing step 15 % (0.116 instead of 0.137 step/s; `-dot` alone 0.120, `-individual_dot`
alone 0.136): its 1x1 kernel gradients are matmuls that YNNPACK fuses with the BatchNorm/ReLU backward
around them. The ViT-S/16 forward (batch 32) does not measurably care: its median over 5 forwards was
2.41-2.72 s with this flag, 2.73-2.76 s with `-dot`, 2.80-3.50 s with `-individual_dot` and 2.68-2.91 s
with both (two runs each), a spread that run-to-run noise covers; against PyTorch the same forward
measured 0.90-1.06x in three runs of benchmarks/encoders.py (PyTorch's own rate moved 10.1-12.3 img/s).

The user's own setting wins: nothing is appended when `XLA_FLAGS` already names the flag (pass
`--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` to get XLA's default back; a list without
a sign replaces the default list: `=individual_convolution` leaves YNNPACK the convolutions only).
XLA reads `XLA_FLAGS` once, when the first backend starts; a program that ran JAX computations before
importing b4b_jax keeps the default, and `apply()` warns that its CPU convolutions run single-threaded.
"""
import os
import warnings

FLAG = "--xla_cpu_experimental_ynn_fusion_type=-individual_convolution"
_NAME = FLAG.split("=", 1)[0]


def apply() -> bool:
  """Appends FLAG to XLA_FLAGS unless the user named it; True when it was appended."""
  current = os.environ.get("XLA_FLAGS", "")
  if _NAME in current:
    return False
  os.environ["XLA_FLAGS"] = f"{current} {FLAG}".strip()
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX version: nothing to check against
    started = False
  if started:
    warnings.warn(f"JAX started its backend before b4b_jax was imported, so {FLAG} (multi-threaded CPU "
                  "convolutions) does not apply; import b4b_jax first or export it in XLA_FLAGS",
                  RuntimeWarning, stacklevel=3)
  return True
