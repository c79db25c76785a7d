"""The one XLA flag b4b_jax sets for itself, before JAX starts its backend.

`apply()` runs when `b4b_jax` is imported. It appends
`--xla_cpu_experimental_ynn_fusion_type=-individual_convolution` to `XLA_FLAGS`, so XLA's CPU runtime
computes convolutions with its multi-threaded Eigen kernels instead of handing each one to YNNPACK.
Measured on the 2-core CPU with jax 0.10.2 (benchmarks/conv_repro.py): YNNPACK's convolutions run on one thread (process CPU / wall = 1.00) and Eigen's on
all cores (1.98), so the 3x3 64-channel ResNet convolution's forward takes 39 ms instead of 91 ms and
its input gradient 82 ms instead of 179 ms; YNNPACK keeps the elementwise and dot fusions it does well.
The flag touches only the CPU backend; GPU and TPU compile as before. Open: the ViT-S/16 forward
measured 0.88-0.98x PyTorch with this flag and 1.09-1.10x with YNNPACK's fusions off entirely
(`--xla_cpu_experimental_ynn_fusion_type=`), which in turn cost the ResNet-50 stealing step a third;
which other default fusion type the ViT pays for is not yet isolated (benchmarks/encoders.py).

The user's own setting wins: nothing is appended when `XLA_FLAGS` already names the flag (pass
`--xla_cpu_experimental_ynn_fusion_type=individual_convolution` to get YNNPACK's convolutions back).
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
