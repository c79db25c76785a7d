"""Opt-in glibc malloc settings that keep XLA's CPU buffers mapped between steps (B4B_HOST_MEMORY=keep).

With `B4B_HOST_MEMORY=keep` in the environment, importing `b4b_jax` calls `apply()` (Linux with glibc
only): mallopt makes the whole process allocate from one arena (M_ARENA_MAX = 1) that grows with brk and
is never handed back to the kernel (M_MMAP_MAX = 0, M_TRIM_THRESHOLD = -1: no trimming). It must run
before JAX's CPU client starts its threads, which is why it is an environment variable read at import
rather than a config field; the same settings as glibc's own variables are
`MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=18446744073709551615`.

Why: XLA's CPU runtime mallocs each execution's temporary buffer afresh (the ResNet-18 stealing step's
was 516 MB, ResNet-50's about 2.2 GB; since the training steps compile in XLA's memory-optimised op
order, xla_flags.training_options, 217 MB and 820 MB, and the figures below are from before) on one of
its worker threads, and Eigen's convolutions malloc their
packing buffers (151 MB) there too. A worker thread allocates from its own glibc arena, and an arena
other than the main one cannot hold a chunk over 64 MiB, so glibc maps each of them with mmap whatever
M_MMAP_MAX says, and unmaps it on free. The next step then faults every page in again, zero-filled by
the kernel. Counted with getrusage on the 2-core CPU, ResNet-50 at 224 px batch 16, one stealing step:
548,000 minor page faults and 1.7 s of system time per step (3-6 s while PyTorch steps between ours,
as in benchmarks/steal_step.py), against PyTorch's 0-100,000 faults and 0.3 s. With these settings:
0-83 faults and 0.02-0.2 s of system time per step; median of 10 steps 3.90 s against 4.94 s.
Transparent huge pages for glibc's mmaps (GLIBC_TUNABLES=glibc.malloc.hugetlb=1) cut the faults to
3,000 but not the system time (6-12 s per step: zeroing and unmapping 2 MiB pages).

Why it is not the default: memory. Freed buffers stay in one heap and XLA's aligned allocations
fragment it (small allocations land between the big ones), so the resident size settles at about twice
the default: the same 10 ResNet-50 steps peaked at 7.96 GB against 3.96 GB; a jitted call with three
128 MiB buffers grew to 1.49 GB over its first ~10 calls (default 0.47 GB), and then, in about half
of the runs, by another 128 MiB now and then, each step of growth faulting a buffer in again during a
few consecutive calls; three runs of 400 calls settled at 1.88-2.00 GB after 12-13 such calls, the last
at call 134 (session 20; tests/test_host_memory.py therefore asserts the median call). Worth it
for a CPU training run with memory to spare, not for a library import in someone else's process.

The user's own malloc settings win: nothing is changed when the environment already sets
MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_ or a glibc.malloc
tunable in GLIBC_TUNABLES.
"""
import ctypes
import os
import platform
import sys

_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8
# M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite one would hand back the top of the heap
# whenever a freed buffer larger than it sits there: ResNet-50's 2.2 GB step buffer exceeds the
# largest finite value mallopt takes (2 GiB - 1), and its step then faulted 533,000 pages again.
SETTINGS = ((_M_ARENA_MAX, 1), (_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
USER_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_", "MALLOC_MMAP_THRESHOLD_")
ENV = "B4B_HOST_MEMORY"


def requested() -> bool:
  """True when the environment asks for the settings (B4B_HOST_MEMORY=keep); other values are errors."""
  value = os.environ.get(ENV, "")
  if value not in ("", "keep", "default"):
    raise ValueError(f"{ENV}={value!r}: expected 'keep' (one heap, buffers kept mapped) or 'default'")
  return value == "keep"


def users_own_settings() -> bool:
  """True when the environment already tunes glibc's malloc."""
  return (any(v in os.environ for v in USER_VARIABLES)
          or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def apply() -> bool:
  """Sets SETTINGS with mallopt on Linux/glibc unless the user tuned malloc; True when they were set."""
  if not sys.platform.startswith("linux") or platform.libc_ver()[0] != "glibc" or users_own_settings():
    return False
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in SETTINGS)
