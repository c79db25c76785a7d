"""Shared by the benchmarks: the device's peak FLOP/s, a compiled function's FLOP count, result rows.

Peaks are dense per-chip figures from the vendors' data sheets (TFLOP/s). "f32" is what XLA runs a
float32 matmul/conv at by default: TF32 tensor cores on A100/H100/H200, one bf16 pass on TPUs
(jax_default_matmul_precision="highest" would be slower than this peak suggests). A device kind not in
the table, and every CPU, prints "n/a".
"""
import dataclasses
import math
import os
import time
from typing import Callable, Dict, List, Optional

# The peak table lives in the package (the runs' expected-cost estimate uses it too).
from b4b_jax.utils.cost_estimate import PEAK_TFLOPS  # noqa: E402,F401  pylint: disable=unused-import


def device_kind() -> str:
  import jax  # pylint: disable=g-import-not-at-top
  d = jax.devices()[0]
  return f"{d.platform}:{d.device_kind}"


def peak_flops(dtype: str = "f32") -> Optional[float]:
  """Peak FLOP/s of device 0 for "f32" or "bf16" compute; None on CPU or an unknown device."""
  from b4b_jax.utils import cost_estimate  # pylint: disable=g-import-not-at-top
  return cost_estimate.peak_flops(dtype=dtype)


def compiled_flops(compiled) -> Optional[float]:
  """FLOPs of one call of a jax `Compiled` (XLA's cost analysis), or None if XLA gives none."""
  try:
    analysis = compiled.cost_analysis()
  except Exception:  # pylint: disable=broad-except
    return None
  if isinstance(analysis, (list, tuple)):
    analysis = analysis[0] if analysis else {}
  flops = (analysis or {}).get("flops")
  return float(flops) if flops and flops > 0 else None


def flops_share(flops: Optional[float], seconds: float, dtype: str = "f32") -> str:
  """'12.3 TFLOP/s = 4.5% of peak' (or '... ; peak n/a' on CPU / unknown devices)."""
  if not flops or not seconds or not math.isfinite(seconds):
    return "FLOP/s n/a"
  achieved = flops / seconds
  peak = peak_flops(dtype)
  share = f"{100 * achieved / peak:.1f}% of {dtype} peak" if peak else "peak n/a"
  return f"{achieved / 1e12:.3f} TFLOP/s, {share}"


def load_average() -> str:
  """The 1-minute load average ("?" where /proc/loadavg is missing): printed beside every figure, since
  on a shared machine a figure means little without the load it was taken under."""
  try:
    with open("/proc/loadavg") as f:
      return f.read().split()[0]
  except OSError:
    return "?"


# Long enough for PyTorch's OpenMP workers to stop spinning after a parallel region (~4 ms measured on
# the 2-core Zen 5; see timed_in_turns), where a benchmark cannot run an untimed call instead.
SETTLE_PAUSE_S = 0.02


def timed_in_turns(fns: Dict[str, Callable[[], object]], turns: int,
                   calls_per_turn: int = 1) -> Dict[str, List[float]]:
  """Seconds of each timed call of each fn (a blocking callable): `turns` rounds, each running every fn
  in order, first one untimed call, then `calls_per_turn` timed calls.

  Why turns, and why the untimed call: taking turns lets both sides of a comparison see the same load
  on a shared machine, but a call timed right after the *other* framework's call pays for that
  framework's idle threads. PyTorch's OpenMP workers spin for a few milliseconds after each parallel
  region before they sleep, on the cores the next call needs: on the 2-core AMD EPYC Zen 5 (session 23,
  quiet, medians of 20) a 3x3 convolution (128 channels, 16 px, batch 64) under jit took 9.6 ms after
  our own call and 13.5 ms right after a PyTorch convolution, while PyTorch's took 9.2-9.3 ms after
  either. One call per turn, as every benchmark here took them until then, charged that to ours. The
  untimed call absorbs it, so each timed call follows a call of its own kind, as in a loop that calls
  one function over and over; a pause instead of the call leaves 0.3-0.4 ms of the threads' wake-up on
  either side.
  """
  times = {name: [] for name in fns}
  for _ in range(turns):
    for name, fn in fns.items():
      fn()
      for _ in range(calls_per_turn):
        start = time.perf_counter()
        fn()
        times[name].append(time.perf_counter() - start)
  return times


def host_memory_setting() -> str:
  """B4B_HOST_MEMORY as the benchmarks print it ("default" when unset; b4b_jax/host_memory.py): it moves
  both sides' figures on CPU, since the malloc settings are the whole process's."""
  return os.environ.get("B4B_HOST_MEMORY", "") or "default"


@dataclasses.dataclass
class Row:
  """One printed figure: ours beside the reference, their ratio (>1 = ours faster), FLOP/s, and the
  load average when the row was made."""
  benchmark: str
  ours: str
  reference: str
  ratio: float
  flops: str = "FLOP/s n/a"
  load: str = dataclasses.field(default_factory=load_average)


def print_table(rows: List[Row], title: str) -> None:
  print(f"\n== {title} ({device_kind()})")
  print(f"{'benchmark':<44} {'ours':>22} {'reference':>28} {'ratio':>7} {'load':>6}  achieved")
  for r in rows:
    print(f"{r.benchmark:<44} {r.ours:>22} {r.reference:>28} {r.ratio:>6.2f}x {r.load:>6}  {r.flops}")
