"""One way the tests compare two result trees (JSON-like dicts and lists) that two runs wrote.

Integers, strings, booleans and None compare exactly: they are what was counted, charged or chosen, and
a real defect (a wrong row, a double charge) changes them. Floats compare exactly too unless
`float_tolerance(path)` returns (rtol, atol) for their path: XLA:CPU may round the same arithmetic a
few ulps apart across device counts or processes (docs/serving.md), and training amplifies that.
"""
from typing import Callable, Optional, Tuple

import numpy as np

Tolerance = Callable[[str], Optional[Tuple[float, float]]]


def exact(path: str) -> None:
  return None


def assert_trees_match(got, want, path: str = "results", float_tolerance: Tolerance = exact) -> None:
  """Fails naming the first path where `got` and `want` differ (keys, lengths or values)."""
  if isinstance(want, dict):
    assert isinstance(got, dict) and set(got) == set(want), (path, sorted(set(got) ^ set(want)))
    for k in want:
      assert_trees_match(got[k], want[k], f"{path}.{k}", float_tolerance)
  elif isinstance(want, list):
    assert isinstance(got, list) and len(got) == len(want), (path, got, want)
    for i, (g, w) in enumerate(zip(got, want)):
      assert_trees_match(g, w, f"{path}[{i}]", float_tolerance)
  else:
    tolerance = float_tolerance(path) if isinstance(want, float) else None
    if tolerance is None:
      assert got == want, (path, got, want)
    else:
      np.testing.assert_allclose(got, want, rtol=tolerance[0], atol=tolerance[1], err_msg=path)
