"""Parses the `:arg` string of a config file, e.g. `configs/steal_simsiam.py:defended=1,sybils=2`.

`parse_arg("tiny,defended=1,queries=50000", tiny=False, defended=False, sybils=1, queries=50000)` returns
{"tiny": True, "defended": True, "sybils": 1, "queries": 50000}: each key must be declared with a default
whose type converts the value (bools accept 1/0/true/false/yes/no; a bare key means True).
"""
from typing import Any, Dict, Optional

_TRUE = ("1", "true", "yes", "y", "on")
_FALSE = ("0", "false", "no", "n", "off")


def _convert(key: str, raw: str, default: Any) -> Any:
  if isinstance(default, bool):
    low = raw.lower()
    if low in _TRUE:
      return True
    if low in _FALSE:
      return False
    raise ValueError(f"config arg {key}={raw!r}: expected a boolean (1/0/true/false)")
  try:
    if isinstance(default, int):
      value = float(raw)
      if value != int(value):
        raise ValueError
      return int(value)
    if isinstance(default, float):
      return float(raw)
  except ValueError:
    raise ValueError(f"config arg {key}={raw!r}: expected a {type(default).__name__}") from None
  return raw


def parse_arg(arg: Optional[str], **defaults) -> Dict[str, Any]:
  out = dict(defaults)
  if not arg:
    return out
  for item in arg.split(","):
    item = item.strip()
    if not item:
      continue
    key, sep, raw = item.partition("=")
    key = key.strip()
    if key not in defaults:
      raise ValueError(f"unknown config arg {key!r}; known: {sorted(defaults)}")
    if not sep:
      if not isinstance(defaults[key], bool):
        raise ValueError(f"config arg {key!r} needs a value ({key}=...)")
      out[key] = True
    else:
      out[key] = _convert(key, raw.strip(), defaults[key])
  return out
