"""Files and directories the jobs write: crash-safe, with the permissions the umask asks for, and path
problems reported as one clear error.

* atomic_write_*: a reader sees the old file or the new one, never half of one. The new file gets mode
  0666 & ~umask like any file `open()` creates (mkstemp alone would leave it 0600, unreadable by the
  team sharing a results directory).
* `make_dir` and `staging_dir` create directories with 0777 & ~umask (tempfile.mkdtemp alone gives
  0700, and a staging directory keeps its mode when renamed into place).
* `replace_dir(new, target)`: puts a finished directory in place of `target` with one atomic rename
  (renameat2 RENAME_EXCHANGE on Linux), so a crash leaves the old or the new directory, never neither.
* `check_output_dir(path, what)`: before any slow work, refuses a path that cannot become a directory
  (a regular file in the way, a non-writable parent) with a PathError naming the path and the problem.
"""
import ctypes
import ctypes.util
import json
import os
import shutil
import tempfile
import threading
from typing import Any, Optional


class PathError(ValueError):
  """A path given by the user cannot be used as asked (a file where a directory must be, not
  writable, ...). The message names the path and the problem."""


_UMASK_LOCK = threading.Lock()


def current_umask() -> int:
  """The process umask (read without changing it where /proc allows; else set-and-restore)."""
  try:
    with open("/proc/self/status") as f:
      for line in f:
        if line.startswith("Umask:"):
          return int(line.split()[1], 8)
  except (OSError, ValueError, IndexError):
    pass
  with _UMASK_LOCK:
    mask = os.umask(0o022)
    os.umask(mask)
  return mask


def _file_mode() -> int:
  return 0o666 & ~current_umask()


def _dir_mode() -> int:
  return 0o777 & ~current_umask()


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  make_dir(directory)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
      os.fchmod(f.fileno(), _file_mode())  # mkstemp creates 0600; honour the umask like open() does
      f.write(data)
      f.flush()
      os.fsync(f.fileno())
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise


def atomic_write_text(path: str, text: str) -> None:
  atomic_write_bytes(path, text.encode("utf-8"))


def atomic_write_json(path: str, obj: Any) -> None:
  atomic_write_text(path, json.dumps(obj, indent=2, sort_keys=True, default=_json_default) + "\n")


def json_form(obj: Any) -> Any:
  """`obj` as atomic_write_json then read_json would give it back (without touching a file)."""
  return json.loads(json.dumps(obj, sort_keys=True, default=_json_default))


def read_json(path: str) -> Any:
  """The JSON value in `path`; a torn or corrupt file is a ValueError naming the path."""
  with open(path, "rb") as f:
    data = f.read()
  try:
    return json.loads(data.decode("utf-8"))
  except ValueError as e:  # JSONDecodeError, UnicodeDecodeError
    raise ValueError(f"{path} is not valid JSON (torn or corrupt: {e})") from e


def _json_default(obj):
  # numpy / jax scalars and arrays end up in results; store them as plain numbers and lists.
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")


# ----------------------------------------------------------------------------------------------------
# Directories.
# ----------------------------------------------------------------------------------------------------
def make_dir(path: str) -> None:
  """os.makedirs(exist_ok=True) (mode 0777 & ~umask), with a path in the way named as a PathError."""
  try:
    os.makedirs(path, exist_ok=True)
  except (FileExistsError, NotADirectoryError):
    check_output_dir(path, "directory", must_be_writable=False)
    raise


def staging_dir(parent: str, prefix: str) -> str:
  """A new empty directory under `parent` (like tempfile.mkdtemp) with mode 0777 & ~umask, to be
  filled and then renamed into place; a private 0700 staging directory would stay 0700 after the
  rename."""
  path = tempfile.mkdtemp(dir=parent, prefix=prefix)
  os.chmod(path, _dir_mode())
  return path


def check_output_dir(path: str, what: str, *, must_be_writable: bool = True) -> None:
  """Raises PathError if `path` cannot be (or be created as) a writable directory.

  Checks, without creating anything: every existing ancestor is a directory, `path` itself is a
  directory if it exists, and the deepest existing one is writable (an actual probe file, so
  read-only mounts and ACLs count, not only the mode bits).
  """
  path = os.path.abspath(path)
  existing = path
  while not os.path.lexists(existing):
    existing = os.path.dirname(existing)
  if not os.path.isdir(existing):
    if existing == path:
      raise PathError(f"{what} {path} is a {_kind(existing)}, not a directory")
    raise PathError(f"{what} {path} cannot be created: {existing} is a {_kind(existing)}, "
                    f"not a directory")
  if must_be_writable:
    check_writable(existing, what if existing == path else f"parent of {what} {path}:")


def check_writable(directory: str, what: str) -> None:
  """Raises PathError unless a file can be created in `directory` (probed, then removed)."""
  try:
    fd, probe = tempfile.mkstemp(dir=directory, prefix=".write-probe-")
  except OSError as e:
    raise PathError(f"{what} {directory} is not writable ({e.strerror or e})") from e
  os.close(fd)
  os.remove(probe)


def _kind(path: str) -> str:
  if os.path.islink(path) and not os.path.exists(path):
    return "broken symbolic link"
  if os.path.isfile(path):
    return "regular file"
  return "special file" if os.path.exists(path) else "missing path"


_RENAME_EXCHANGE = 2  # linux/fs.h
_libc: Optional[Any] = None


def _exchange(a: str, b: str) -> bool:
  """Atomically swaps the paths `a` and `b` (Linux renameat2 RENAME_EXCHANGE); False if unsupported."""
  global _libc
  if _libc is None:
    try:
      _libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
      _libc.renameat2  # pylint: disable=pointless-statement
    except (OSError, AttributeError):
      _libc = False
  if not _libc:
    return False
  at_fdcwd = -100
  rc = _libc.renameat2(at_fdcwd, os.fsencode(a), at_fdcwd, os.fsencode(b), _RENAME_EXCHANGE)
  if rc == 0:
    return True
  err = ctypes.get_errno()
  if err in (22, 38, 95):  # EINVAL / ENOSYS / EOPNOTSUPP: filesystem or kernel without exchange
    return False
  raise OSError(err, f"cannot exchange {a} and {b}: {os.strerror(err)}")


def replace_dir(new: str, target: str) -> None:
  """Moves the finished directory `new` to `target`, replacing what is there in one atomic step.

  With RENAME_EXCHANGE the two directories swap names, so at every instant `target` is the old or the
  new directory; the old one (now at `new`) is then removed. Where the kernel/filesystem lacks it, the
  old directory is renamed aside first (a crash between the two renames leaves it next to `target` as
  `.<name>.old-*`).
  """
  if not os.path.lexists(target):
    os.rename(new, target)
    return
  if _exchange(new, target):
    shutil.rmtree(new, ignore_errors=True)
    return
  backup = tempfile.mkdtemp(dir=os.path.dirname(target), prefix=f".{os.path.basename(target)}.old-")
  os.rmdir(backup)
  os.rename(target, backup)
  try:
    os.rename(new, target)
  except BaseException:
    os.rename(backup, target)
    raise
  shutil.rmtree(backup, ignore_errors=True)
