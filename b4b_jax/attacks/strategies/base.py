"""The strategy seam: accounts, the only channel to the API, and the naive query-once thief."""
from typing import Callable, Optional, Sequence

import numpy as np


def reps_of(result) -> np.ndarray:
  """The representations of a query's result: `result.reps` when the API returns a result object
  (issue 10 point 4), else the array itself (the API before that change)."""
  return np.asarray(getattr(result, "reps", result), np.float32)


class Strategy:
  """Base of all strategies.

  Args:
    api: anything with `query(account, images) -> representations or a result with .reps`.
    accounts: the account names this strategy owns (the first one is its main account).
    to_input: images in [0, 1] -> what the API takes (the victim's normalisation); identity if None.
    batch_size: images per query call.
  """
  name = "base"

  def __init__(self, api, accounts: Sequence[str], *, to_input: Optional[Callable] = None,
               batch_size: int = 256):
    accounts = list(accounts) if not isinstance(accounts, str) else [accounts]
    if not accounts or not all(isinstance(a, str) and a for a in accounts):
      raise ValueError(f"a strategy needs at least one non-empty account name, got {accounts!r}")
    if isinstance(batch_size, bool) or not isinstance(batch_size, int) or batch_size < 1:
      raise ValueError(f"batch_size must be a positive integer, got {batch_size!r}")
    self.api = api
    self.accounts = accounts
    self.to_input = to_input or (lambda x: x)
    self.batch_size = batch_size
    self.queries_sent = {a: 0 for a in accounts}

  def send(self, images01: np.ndarray, account: Optional[str] = None) -> np.ndarray:
    """Sends images (in [0, 1]) as `account` (default: the main one) in batches; returns float32 reps."""
    images01 = _check_images(images01)
    account = self.accounts[0] if account is None else account
    if account not in self.queries_sent:
      raise ValueError(f"account {account!r} is not one of this strategy's {self.accounts}")
    out = []
    for start in range(0, len(images01), self.batch_size):
      chunk = images01[start:start + self.batch_size]
      out.append(reps_of(self.api.query(account, np.asarray(self.to_input(chunk), np.float32))))
      self.queries_sent[account] += len(chunk)
    return np.concatenate(out) if out else np.zeros((0, 0), np.float32)

  def steal(self, images01: np.ndarray) -> np.ndarray:
    """The strategy's estimate of the victim's representation of each image (one row each)."""
    raise NotImplementedError


class QueryOnce(Strategy):
  """The naive thief: each image sent once; the answer is the target."""
  name = "query_once"

  def steal(self, images01):
    return self.send(images01)


def _check_images(images01) -> np.ndarray:
  a = np.asarray(images01)
  if a.ndim != 4 or a.shape[-1] not in (1, 3):
    raise ValueError(f"images must be NHWC with 1 or 3 channels, got shape {a.shape}")
  if not np.issubdtype(a.dtype, np.floating):
    raise ValueError(f"images must be float in [0, 1], got dtype {a.dtype}")
  return a.astype(np.float32, copy=False)
