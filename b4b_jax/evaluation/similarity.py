"""Row-wise cosine similarity: the one definition every job and attack uses (copy fidelity, mapper
validation, the steal job's eval, the suite's perturbation geometry, remap's cosine distance).

  cosine_similarity(a, b)[i] = <a_i, b_i> / (|a_i| |b_i|), and 0 where either row is all zero (no
  direction: neither similar nor opposite).

Computed in the inputs' own floating dtype (float32 rows stay float32, so callers that reported a
float32 cosine before report the same bits); callers that want float64 cast first. Rows with a
non-zero norm product get exactly num / den.
"""
import numpy as np


def cosine_similarity(a, b) -> np.ndarray:
  """[N] cosine of each row pair of two equal-shaped [N, D] arrays; 0 for a row pair with a zero row."""
  a, b = np.asarray(a), np.asarray(b)
  if a.shape != b.shape or a.ndim != 2:
    raise ValueError(f"cosine similarity needs two equal-shaped [N, D] arrays, got {a.shape} and "
                     f"{b.shape}")
  dtype = np.result_type(a.dtype, b.dtype, np.float32)
  a, b = a.astype(dtype, copy=False), b.astype(dtype, copy=False)
  num = np.sum(a * b, axis=1)
  den = np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)
  return np.divide(num, den, out=np.zeros_like(num), where=den > 0)
