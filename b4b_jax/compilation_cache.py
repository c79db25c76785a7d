"""Where compiled XLA programs persist between runs, so that a job run again skips XLA's compiler.

`apply()` points JAX's persistent compilation cache at `default_directory()`:
$XDG_CACHE_HOME/b4b_jax/xla/<host key> (XDG_CACHE_HOME defaults to ~/.cache). JAX then stores every
program it compiles there, keyed by the program, the XLA flags, the compile options, the jaxlib and
the device kind, and a later process that compiles the same program loads it instead. A loaded program
is the compiled executable itself, so no value changes.

Why: short runs spend much of their time compiling. The demo (`configs/demo.py`, Zen 4, session 38)
spent about 67 s of its ~240 s wall in XLA's compiler and 6 s tracing (JAX_LOG_COMPILES: the victim's
SimSiam step with its augmentations ~9 s, seven defense steps ~10 s, the random-init baseline ~5 s,
each random kernel shape's initialiser ~0.5 s, ...). Five runs one after another, quiet: 236.8 and
245.5 s with the cache off, 243.4 s with it empty, 189.8 and 187.8 s with it warm (new workdirs), the
same printout to the last digit every time; the cache then held 183 programs, 5.5 MB. A first run
gains nothing (it compiles each program once either way); a rerun, a second config variant and
resuming a killed run do.

The host key: JAX's key names the device kind ("cpu") but not the CPU's instruction set, and a
program compiled on one CPU must not run on another that shares the directory (a home directory on
several machines, a workdir copied elsewhere): XLA compiles for the host's vector width, and another
width rounds some sums differently (README, "What varies from machine to machine"). So every cache
directory b4b-jax names (the default, B4B_COMPILATION_CACHE's, the serve job's) holds one subdirectory
per CPU model and feature set and machine architecture (`for_this_host`). JAX_COMPILATION_CACHE_DIR is
JAX's own setting and is used as it is.

The cache holds at most MAX_BYTES (the serve job's too); beyond that JAX evicts the least recently used
programs, under a file lock (the pinned `filelock` package), so concurrent jobs can share it. The
bookkeeping costs about 1 ms a hit (session 39, 60 small programs loaded from a warm cache, alternate
processes, quiet: 0.98-1.03 s bounded, 0.92-0.97 s unbounded), a few hundredths of a second on a
server's restart. A damaged entry (a process killed while writing it) is not fatal: JAX warns and compiles the program again (on every run, as JAX
never overwrites an entry, until the entry is evicted or the directory deleted). JAX runs what the
cache holds, so it is created for its owner only (mode 0700), and it must not be pointed at a
directory others can write to.

Who applies it: `python -m b4b_jax.main` for every job but `serve`, which keeps its own cache in its
workdir (`config.persistence.compilation_cache_dir`, through `use()` as well).
JAX_COMPILATION_CACHE_DIR, when set, wins (JAX reads it itself; the tests set it to a per-session
directory); B4B_COMPILATION_CACHE=<dir> puts the cache elsewhere, B4B_COMPILATION_CACHE=none turns it
off.
"""
import hashlib
import os
import platform
from typing import Optional

ENV = "B4B_COMPILATION_CACHE"
JAX_ENV = "JAX_COMPILATION_CACHE_DIR"
MAX_BYTES = 1 << 30
_CPUINFO = "/proc/cpuinfo"


def host_key(cpuinfo: Optional[str] = None) -> str:
  """`<machine>-<12 hex digits>`: the machine architecture and a digest of the CPU's model name and
  feature flags (Linux's /proc/cpuinfo; elsewhere platform.processor()). Same CPU kind, same key."""
  if cpuinfo is None:
    try:
      with open(_CPUINFO, encoding="utf-8", errors="replace") as f:
        cpuinfo = f.read()
    except OSError:
      cpuinfo = ""
  fields = {}
  for line in cpuinfo.splitlines():
    name, sep, value = line.partition(":")
    name = name.strip()
    if sep and name in ("model name", "flags", "Features", "CPU part", "CPU implementer"):
      fields.setdefault(name, " ".join(sorted(value.split())) if name in ("flags", "Features")
                        else value.strip())
  described = sorted(fields.items()) or [("processor", platform.processor())]
  digest = hashlib.sha256(repr(described).encode()).hexdigest()[:12]
  return f"{platform.machine() or 'unknown'}-{digest}"


def for_this_host(directory: str) -> str:
  """The subdirectory of `directory` that holds this CPU kind's programs."""
  return os.path.join(os.path.abspath(directory), host_key())


def default_directory() -> str:
  base = os.environ.get("XDG_CACHE_HOME") or os.path.join(os.path.expanduser("~"), ".cache")
  return for_this_host(os.path.join(base, "b4b_jax", "xla"))


def requested_directory() -> Optional[str]:
  """The directory apply() would use: the user's JAX_COMPILATION_CACHE_DIR, else this host's subdirectory
  of B4B_COMPILATION_CACHE, else default_directory(); None when B4B_COMPILATION_CACHE is "none" (or
  empty)."""
  if os.environ.get(JAX_ENV):
    return os.environ[JAX_ENV]
  chosen = os.environ.get(ENV)
  if chosen is None:
    return default_directory()
  return None if chosen.strip().lower() in ("", "none", "off") else for_this_host(chosen)


def use(directory: str, off_switch: str = f"{ENV}=none") -> str:
  """Points this process's JAX at `directory` (created for its owner only) for every program it compiles
  from now on, at most MAX_BYTES of them; returns a line for the log, which names `off_switch`. The one
  place both `apply()` and the serve job (with its workdir's cache) turn the cache on."""
  import jax  # pylint: disable=g-import-not-at-top
  try:
    os.makedirs(directory, mode=0o700, exist_ok=True)
  except OSError as e:  # a cache is never worth failing a job for
    return f"off ({directory} cannot be created: {e.strerror})"
  jax.config.update("jax_compilation_cache_dir", directory)
  # Every program: the demo's ~0.5 s initialisers and 1-2 s defense steps are most of its compile time.
  jax.config.update("jax_persistent_cache_min_compile_time_secs", 0.0)
  try:  # JAX needs filelock to bound the cache; without it (an unpinned install) it grows unbounded
    import filelock  # pylint: disable=g-import-not-at-top,unused-import
  except ImportError:
    return f"{directory} (unbounded: install filelock to cap it at {MAX_BYTES >> 20} MiB)"
  jax.config.update("jax_compilation_cache_max_size", MAX_BYTES)
  return f"{directory} (at most {MAX_BYTES >> 20} MiB; {off_switch} turns it off)"


def apply() -> str:
  """Turns the cache on for this process (before its first compile); returns a line for the log."""
  if os.environ.get(JAX_ENV):
    return f"{os.environ[JAX_ENV]} (JAX_COMPILATION_CACHE_DIR)"
  directory = requested_directory()
  if directory is None:
    return f"off ({ENV}={os.environ.get(ENV)})"
  return use(directory)
