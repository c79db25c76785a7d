"""The XLA flags b4b_jax sets for itself, before JAX starts its backend.

`apply()` runs when `b4b_jax` is imported and appends FLAGS to `XLA_FLAGS`; the served API's process
(and benchmarks/defense.py, which measures it) calls `apply(serving=True)`, which also appends
SERVING_FLAGS. All are for the CPU backend; GPU and TPU compile as before. `training_options()` gives the
compiler options that the training steps (attacks/train_state.py, demo/victim.py) pass to their jit.

1. `--xla_cpu_experimental_ynn_fusion_type=-individual_convolution`, so XLA's CPU runtime
computes convolutions with its multi-threaded Eigen kernels instead of handing each one to YNNPACK.
Measured on the 2-core CPU with jax 0.10.2 (benchmarks/conv_repro.py): YNNPACK's convolutions run on
one thread (process CPU / wall = 1.00) and Eigen's on all cores (1.98), so the 3x3 64-channel ResNet
convolution's forward takes 39 ms instead of 91 ms and its input gradient 82 ms instead of 179 ms;
YNNPACK keeps the elementwise, reduce and dot fusions.

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

2. Training steps only, as a per-jit compiler option (`training_options()`):
   `xla_cpu_scheduler_type=CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED`: XLA orders the step's ops to keep the
   fewest bytes live, instead of exposing the most independent ops at once (its CPU default). Every
   execution mallocs a temporary buffer of the program's peak live bytes, and one over glibc's largest
   mmap threshold (32 MiB) is mapped afresh and faulted in page by page on every call
   (b4b_jax/host_memory.py). The stealing step's buffer (benchmarks/steal_step.py settings, jax 0.10.2):
   ResNet-18 b64 32 px 516 -> 217 MB, ResNet-50 b16 224 px 2,186 -> 820 MB. Measured on the 2-core CPU,
   nothing else running, default malloc, XLA's order / this one alternately, two runs each: the
   ResNet-50 step 0.062, 0.070 -> 0.177, 0.188 step/s (0.27-0.29x -> 0.70-0.75x PyTorch); the ResNet-18
   step 0.413, 0.523 -> 0.454, 0.550 step/s (that setting's run-to-run spread covers it); as committed,
   two more runs: ResNet-50 0.179, 0.166 step/s (0.79x, 0.76x), ResNet-18 0.78x, 0.90x. No value
   changes: the same ops on the same data in another order (checked bit for bit: three ResNet-18 and
   three ResNet-50 steps, every parameter, statistic and momentum). Not a process-wide flag: forwards
   have small temporaries and gain nothing (ResNet-50 / ViT-S/16 batch 32, benchmarks/encoders.py, two
   runs each: 16.2, 16.3 / 13.4, 13.2 img/s in XLA's order, 16.0, 15.8 / 13.0, 12.6 in this one).
   The user's own `--xla_cpu_scheduler_type` (or XLA's older
   `--xla_cpu_enable_concurrency_optimized_scheduler`) in XLA_FLAGS wins: `training_options()` is {}.

3. Serving only: `--xla_backend_extra_options=-force-vector-interleave=4`: LLVM's loop vectorizer interleaves every
   vectorised loop it emits 4 times (four independent 8-lane iterations per trip). Its cost model left the
   defense noise's inverse-CDF loop (defense/noise.py: ~100 instructions per 8 values, a chain of two
   polynomials and a square root) at one iteration per trip, so the loop ran at the latency of that chain
   (the reorder buffer holds about two iterations); the hash loop beside it is the same kind. Measured on
   the 2-core CPU, nothing else running, flag off / on alternately, two runs each: the [1024, 2048] noise
   draw 0.37-0.39x -> 0.29-0.34x the hashing matmul, full defense serving (1 / 64 / 1024 users per batch)
   1.50-1.52 / 1.62 / 1.65-1.69x -> 1.38-1.41 / 1.53-1.55 / 1.57-1.59x the matmul floor, the served
   (hardened) default 2.88-3.26x -> 2.55-3.00x; ResNet-50 and ViT-S/16 forwards (benchmarks/encoders.py)
   and the stealing steps unchanged within their noise. It changes no value: interleaving repeats the
   same per-lane instructions, and XLA's floating-point reductions are not reassociated by LLVM (checked
   bit for bit: the noise, a ViT forward, three ResNet-18 stealing steps, float sums). LLVM options are
   process-wide, which is why this is a flag and not an option of one jitted function.
   Why only where the API is served: it costs compile time where LLVM unrolls short loops, e.g.
   jax.random.normal of shape (2048, 10) compiled in 3.67 s instead of 0.73 s ((20, 7): 0.89 s vs 0.35 s;
   (1024, 2048): no change), and the linear probe's first epoch (compiles included) took 18.0-20.6 s
   instead of 13.6-14.3 s; a server compiles once and then serves. Research jobs that defend in
   process (the demo, the stealing runs) spend a negligible share of their time in the defense. A
   provider embedding DefendedEncoder in its own server calls `apply(serving=True)` before JAX starts.
   XLA's GPU backend hands the same options to its LLVM (unmeasured there), so this flag is appended
   only where JAX can use nothing but the CPU: JAX_PLATFORMS names only cpu, or it is unset and no
   accelerator plugin (jax_plugins, libtpu) is installed.

4. Serving only, as 3.: `--xla_cpu_prefer_vector_width=512`: XLA's CPU compiler tells LLVM to prefer
   256-bit vectors (its default, because early AVX-512 CPUs slowed their clocks for 512-bit code), so
   on a CPU with AVX-512 the defense's elementwise loops (the noise's hash and inverse CDF) ran at half the
   width that the hashing matmul beside them uses (YNNPACK chooses its kernels at run time).
   On a CPU without AVX-512 the flag changes nothing: LLVM never emits vectors wider than the target's
   registers (checked in tests/test_xla_flags.py, which reads the lanes from the compiled IR). Measured
   on a 2-core AMD EPYC with AVX-512 (Zen 5, family 26; session 21, nothing else running; the earlier
   figures in this file are from a 2-core Zen 3 without it), benchmarks/defense.py, flag off / on
   alternately, three runs each: the [1024, 2048] noise draw 0.52-0.61x -> 0.29-0.33x the hashing
   matmul; full defense serving (1 / 64 / 1024 users per batch) 1.59-1.68 / 1.71-1.88 / 1.74-1.88x ->
   1.42-1.52 / 1.47-1.64 / 1.42-1.64x the matmul floor; the served (hardened) default 3.49-3.57 /
   3.68-4.06 / 3.88-4.03x -> 2.58-3.12 / 2.76-3.16 / 2.73-3.29x. Interleaving 2 or 1 instead of 4 at
   this width measured the same within the runs' spread, so 3. stays as it is. It changes no served
   value: every served output was checked bit for bit with and without the serving flags (the noise,
   the plain and the hardened defense over three calls of 5 users; tests/test_xla_flags.py checks a
   digest of the noise and of a hardened DefendedEncoder's answers), and a ResNet-50 forward too.
   Why only where the API is served: a ViT forward's and a training step's reductions (LayerNorm,
   BatchNorm statistics) are vectorised differently, so their values move by float32 rounding (ViT-S/16
   forward: max 3.6e-6 absolute), and research runs keep their printed figures; the speed they would
   gain is small or none (same runs, benchmarks/encoders.py: ViT-S/16 31.2-32.3 -> 36.0-36.3 img/s,
   ResNet-50 unchanged; benchmarks/steal_step.py: ResNet-18 1.31-1.45 vs 1.34 step/s, ResNet-50
   0.53-0.56 vs 0.55-0.57). A served ViT encoder (the encoder is jitted with the defense) therefore
   answers with forwards that differ from a research process's by that rounding, far below any noise
   the defense adds. Not measured on Intel CPUs, where 512-bit code may lower the clock on older
   generations; `--xla_cpu_prefer_vector_width=256` in XLA_FLAGS keeps XLA's default.

The user's own setting wins: nothing is appended for a flag that `XLA_FLAGS` already names (pass
`--xla_cpu_experimental_ynn_fusion_type=+individual_convolution` to get XLA's default back; a list without
a sign replaces the default list: `=individual_convolution` leaves YNNPACK the convolutions only;
`--xla_backend_extra_options=-force-vector-interleave=1` or any other backend options of your own drop
the interleaving). XLA reads `XLA_FLAGS` once, when the first backend starts; a program that ran JAX
computations before importing b4b_jax keeps the defaults, and `apply()` warns that its CPU convolutions
run single-threaded.
"""
import importlib.metadata
import importlib.util
import os
import warnings

FLAGS = ("--xla_cpu_experimental_ynn_fusion_type=-individual_convolution",)
SERVING_FLAGS = ("--xla_backend_extra_options=-force-vector-interleave=4",  # only when cpu_only()
                 "--xla_cpu_prefer_vector_width=512")


def cpu_only() -> bool:
  """True when JAX in this process can run on the CPU only (JAX_PLATFORMS, installed plugins)."""
  platforms = os.environ.get("JAX_PLATFORMS", "").strip()
  if platforms:
    return {p.strip() for p in platforms.split(",")} <= {"cpu"}
  if importlib.util.find_spec("libtpu") is not None or importlib.util.find_spec("jax_plugins"):
    return False
  return not list(importlib.metadata.entry_points(group="jax_plugins"))


def _name(flag: str) -> str:
  return flag.split("=", 1)[0]


# What training_options() gives (2. above), and the user's flags that choose the same thing.
TRAINING_OPTIONS = {"xla_cpu_scheduler_type": "CPU_SCHEDULER_TYPE_MEMORY_OPTIMIZED"}
_SCHEDULER_FLAGS = ("--xla_cpu_scheduler_type", "--xla_cpu_enable_concurrency_optimized_scheduler")


def training_options(platform: str) -> dict:
  """`compiler_options` for the jit of a training step whose arrays live on `platform`: TRAINING_OPTIONS
  on "cpu" unless the user's XLA_FLAGS choose the op order themselves; {} otherwise."""
  current = os.environ.get("XLA_FLAGS", "")
  if platform != "cpu" or any(flag in current for flag in _SCHEDULER_FLAGS):
    return {}
  return dict(TRAINING_OPTIONS)


def apply(serving: bool = False) -> bool:
  """Appends each of FLAGS, and with `serving` each of SERVING_FLAGS where cpu_only(), to XLA_FLAGS
  unless the user named that flag; True when any was appended."""
  current = os.environ.get("XLA_FLAGS", "")
  wanted = FLAGS + (SERVING_FLAGS if serving and cpu_only() else ())
  missing = [flag for flag in wanted if _name(flag) not in current]
  if not missing:
    return False
  os.environ["XLA_FLAGS"] = " ".join([current] + missing).strip()
  try:
    from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top
    started = xla_bridge.backends_are_initialized()
  except (ImportError, AttributeError):  # another JAX version: nothing to check against
    started = False
  if started:
    warnings.warn(f"JAX started its backend before b4b_jax set {' '.join(missing)} (multi-threaded CPU "
                  "convolutions, interleaved and 512-bit vector loops), so it does not apply; import "
                  "b4b_jax first (a server: also call xla_flags.apply(serving=True) first) or export it "
                  "in XLA_FLAGS",
                  RuntimeWarning, stacklevel=3)
  return True
