"""Crash-safe file writes: a reader sees the old file or the new one, never half of one."""
import json
import os
import tempfile
from typing import Any


def atomic_write_bytes(path: str, data: bytes) -> None:
  directory = os.path.dirname(os.path.abspath(path))
  os.makedirs(directory, exist_ok=True)
  fd, tmp = tempfile.mkstemp(dir=directory, prefix=".tmp-" + os.path.basename(path))
  try:
    with os.fdopen(fd, "wb") as f:
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


def read_json(path: str) -> Any:
  with open(path) as f:
    return json.load(f)


def _json_default(obj):
  # numpy / jax scalars and arrays end up in results; store them as plain numbers and lists.
  if hasattr(obj, "tolist"):
    return obj.tolist()
  raise TypeError(f"not JSON serialisable: {type(obj).__name__}")
