"""Settings that keep XLA's CPU buffers mapped between steps (B4B_HOST_MEMORY=keep), and a server's heaps.

`apply()` (Linux with glibc only; "Who applies it" below) does two things. JAX's CPU client runs
single-device computations inline on the calling thread instead of dispatching them to a worker
(`jax_cpu_enable_async_dispatch=False`), so XLA mallocs an execution's temporaries and outputs from
the calling thread's arena, glibc's main one. And mallopt makes the main arena grow with brk for
every size (M_MMAP_MAX = 0) and never hand its top back to the kernel (M_TRIM_THRESHOLD = -1). A
freed step buffer then stays mapped and the next step reuses its pages. The dispatch setting must be
made before JAX's CPU client starts, which is why this is an environment variable read at import (or
the command line's choice, made before its job runs) rather than a config field; when the client
already exists, `apply()` warns and changes nothing.

Why: XLA's CPU runtime mallocs each execution's temporary buffer afresh (the ResNet-18 stealing step's
is 356 MB, ResNet-50's 946 MB; before the memory-optimised op order, xla_flags.training_options,
516 MB and 2.2 GB). With async dispatch it does so on a worker thread, which allocates from its own
glibc arena, and an arena other than the main one cannot hold a chunk over 64 MiB: glibc maps each
with mmap whatever M_MMAP_MAX says and unmaps it on free, so every step faults every page in again,
zero-filled by the kernel (548,000 minor faults and 1.7 s of system time per ResNet-50 step at 2.2 GB;
97,000 faults per ResNet-18 step and 245,000 per ResNet-50 step now). In the main arena the mmap
threshold is a setting, and M_MMAP_MAX = 0 turns it off.
Session 20, one process per setting, quiet (median step; faults per step; resident MB after the step):
ResNet-18 b64 32 px default 1.662 s, 97,084, 1,639; inline dispatch alone 1.679 s, 97,101 (the main
arena still maps chunks over 32 MiB); both 1.439 s, 304, 2,047. ResNet-50 b16 224 px default
3.703 s, 245,542, 2,793; both 3.498 s, 243-391, 2,864.

Until session 20 `keep` put the whole process on the main arena instead (M_ARENA_MAX = 1, async
dispatch on). That removed the faults as well (ResNet-50 3.413 s, 0 faults) but served every thread's
malloc from one arena and fragmented it: small allocations from other threads landed between the big
buffers, so the heap grew (ResNet-50 3,495 MB; a jitted call with three 128 MiB buffers settled at
1.9-2.0 GB after up to 134 calls; now 0.47-0.85 GB, grown for the last time by call 14 in 70 runs,
since only the calling thread allocates there; with 8 virtual devices now and then later, by one
buffer at call 18 or 32: docs/models.md).

Who applies it: `python -m b4b_jax.main` for every job but the server (b4b_jax/main.py; a server's
request threads keep async dispatch), unless B4B_HOST_MEMORY=default; a plain `import b4b_jax` only
with B4B_HOST_MEMORY=keep. Both settings are the whole process's, not a library's to change in
someone else's process: the main arena never shrinks, so memory the calling thread frees (numpy's and
XLA's alike) stays resident up to its peak, and JAX no longer overlaps the caller's Python with the
computation. Computations over several devices are dispatched asynchronously whatever the setting
(JAX's documented behaviour), so they keep faulting. On GPU and TPU hosts only the host-side
allocations change.

A server (`apply_serving()`, which `python -m b4b_jax.main` applies for the serve job, and the serving
benchmarks for their process, unless B4B_HOST_MEMORY is set) keeps async dispatch and glibc's per-thread
arenas, and keeps each arena's heaps mapped once grown: a fixed mmap threshold of 32 MiB (the ceiling
glibc's dynamic threshold grows to anyway) and a top pad of 32 MiB. Why: an arena other than the main
one grows in heaps of 64 MiB at most. When a buffer under the mmap threshold does not fit in what its
heap has left, glibc maps a new heap for it, and when the buffer is freed it unmaps that heap again
whenever the previous one has more room than the top pad, which a glibc default of 128 KiB makes
almost always; the next call maps it afresh and faults its pages in again. That happened call after
call to the defense step's 8-9 MiB buffers on XLA's worker thread (session 34: 860-2,600 faults a
call, the step at 1.56-1.80x the matmul floor instead of 1.37-1.42x, in whichever row the process's
history set it up). A top pad of at least the mmap threshold means a heap is never unmapped because a
buffer that must live under that threshold did not fit beside it (glibc's heap_trim keeps it while the
previous heap's room is under the pad). The price: an emptied heap stays mapped, and each arena's
top (the main arena's too) keeps up to 32 MiB mapped beyond what it uses instead of trimming it. Session
35, alternate processes, quiet: `benchmarks.defense` full defense 1.35-1.41x the floor with 0 faults
in all 18 rows, against 1.37-1.55x by default with 467-468 faults a call in two of 18; the served API
(`benchmarks.serve_load`) kept its throughput, 4,405-4,816 images/s against 4,404-4,909 in six runs
each, and its memory (docs/defense.md, Performance). Putting every thread on one arena instead
(M_ARENA_MAX = 1, session 34) also ended the faults, but every thread's malloc then took one lock and
the served API lost ~10 %.

The user's own settings win: nothing is changed when the environment already sets
MALLOC_ARENA_MAX, MALLOC_MMAP_MAX_, MALLOC_TRIM_THRESHOLD_, MALLOC_MMAP_THRESHOLD_, MALLOC_TOP_PAD_,
a glibc.malloc tunable in GLIBC_TUNABLES, or JAX_CPU_ENABLE_ASYNC_DISPATCH.
"""
import ctypes
import os
import platform
import sys
import warnings

_M_TRIM_THRESHOLD = -1
_M_TOP_PAD = -2
_M_MMAP_THRESHOLD = -3
_M_MMAP_MAX = -4
# M_TRIM_THRESHOLD -1: never trim (mallopt(3)); a finite one would hand back the top of the heap
# whenever a freed buffer larger than it sits there, which is where a step's buffer sits, and the
# largest finite value mallopt takes (2 GiB - 1) is below a paper-scale step's buffer.
SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, -1))
# Setting either turns glibc's dynamic mmap threshold off (so both are set): left at its 128 KiB start,
# every buffer over it would be mapped and faulted in afresh on each call. 32 MiB is the most mallopt
# takes (half a heap) and where the dynamic threshold stops growing.
HEAP_PAD = 32 * 1024 * 1024
SERVING_SETTINGS = ((_M_MMAP_THRESHOLD, HEAP_PAD), (_M_TOP_PAD, HEAP_PAD))
DISPATCH_VARIABLE = "JAX_CPU_ENABLE_ASYNC_DISPATCH"
USER_VARIABLES = ("MALLOC_ARENA_MAX", "MALLOC_MMAP_MAX_", "MALLOC_TRIM_THRESHOLD_",
                  "MALLOC_MMAP_THRESHOLD_", "MALLOC_TOP_PAD_", DISPATCH_VARIABLE)
ENV = "B4B_HOST_MEMORY"
_applied = False  # set by apply(); the settings cannot be undone within a process
_serving_applied = False  # set by apply_serving()


def requested() -> bool:
  """True when the environment asks for the settings (B4B_HOST_MEMORY=keep); other values are errors."""
  value = os.environ.get(ENV, "")
  if value not in ("", "keep", "default"):
    raise ValueError(f"{ENV}={value!r}: expected 'keep' (step buffers kept mapped) or 'default'")
  return value == "keep"


def users_own_settings() -> bool:
  """True when the environment already tunes glibc's malloc or JAX's CPU dispatch."""
  return (any(v in os.environ for v in USER_VARIABLES)
          or "glibc.malloc" in os.environ.get("GLIBC_TUNABLES", ""))


def apply() -> bool:
  """Turns async CPU dispatch off and sets SETTINGS (Linux/glibc); True when both were set.

  Changes nothing when the user tuned either, or when JAX's backends already exist (with a warning).
  """
  if not _glibc() or users_own_settings():
    return False
  from jax._src import xla_bridge  # pylint: disable=g-import-not-at-top  # no public query exists
  if xla_bridge.backends_are_initialized():
    warnings.warn(f"{ENV}=keep: JAX's backends started before b4b_jax was imported, so its CPU client "
                  "keeps async dispatch; nothing was changed (import b4b_jax first)", stacklevel=2)
    return False
  if not _mallopt_all(SETTINGS):
    return False
  import jax  # pylint: disable=g-import-not-at-top
  jax.config.update("jax_cpu_enable_async_dispatch", False)
  global _applied
  _applied = True
  return True


def apply_serving() -> bool:
  """Keeps each thread's glibc heaps mapped once grown (SERVING_SETTINGS, Linux/glibc); True when set.

  For a process whose threads share the work (a server): async dispatch and per-thread arenas stay.
  Changes nothing when B4B_HOST_MEMORY names a choice (`keep`, whose settings put the steps on the
  main arena, which has no 64 MiB heaps; `default`, glibc's own), when `apply()` already ran, or when
  the user tuned malloc or dispatch. Takes effect whenever it is called, for heaps grown before too."""
  global _serving_applied
  if (os.environ.get(ENV) or _applied or not _glibc() or users_own_settings()
      or not _mallopt_all(SERVING_SETTINGS)):
    return False
  _serving_applied = True
  return True


def setting() -> str:
  """This process's settings in a word, for benchmarks' output: "keep", "serving" or "default"."""
  return "keep" if _applied else "serving" if _serving_applied else "default"


def describe() -> str:
  """One line for a run's log: whether this process keeps XLA's CPU step buffers mapped."""
  if _applied:
    return ("kept mapped (inline CPU dispatch, main arena without mmap or trimming; "
            f"{ENV}=default leaves both as they are)")
  if _serving_applied:
    return ("heaps kept (each thread's arena keeps its heaps once grown: mmap threshold and top pad "
            f"32 MiB; {ENV}=default leaves glibc's settings)")
  return "unchanged (glibc's and JAX's own settings: each CPU step's buffers are mapped afresh)"


def _glibc() -> bool:
  return sys.platform.startswith("linux") and platform.libc_ver()[0] == "glibc"


def _mallopt_all(settings) -> bool:
  """mallopt(param, value) for each of settings, in order; False at the first it refuses."""
  try:
    mallopt = ctypes.CDLL(None).mallopt
  except (OSError, AttributeError):
    return False
  mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
  return all(mallopt(param, value) == 1 for param, value in settings)
