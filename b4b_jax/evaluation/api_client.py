"""Talking to the defended API from experiments: accounts that send their queries in batches.

Every evaluation that needs "what the API returns" goes through `b4b_jax.defense.DefendedEncoder`, so
the transforms, noise and coverage are the defense's own. Embedding-level experiments (remapping,
coverage curves, many legit-user rows) send clean representations they computed once with
`query_representations`; the defense hashes, noises and transforms them exactly as it would the
encoder's output for the same images (the encoder is deterministic), without re-running the encoder.
"""
import dataclasses
from typing import Callable, Optional, Sequence

import numpy as np

from b4b_jax import defense


def representation_api(config, rep_dim: int, *, capacity: int = 8):
  """A DefendedEncoder without an encoder: clients send clean representations."""
  return defense.DefendedEncoder(None, config, rep_dim, capacity=capacity)


@dataclasses.dataclass
class QueryTrace:
  """What one account saw while sending a sequence of batches."""
  user: str
  num_queries: list        # cumulative number of queries after each batch
  coverage: list           # the account's coverage (%) after each batch
  sigma: list              # the noise std the batch was answered with (the account's sigma after it)

  def to_dict(self):
    return dataclasses.asdict(self)


def send(api, user: str, data: np.ndarray, *, batch_size: int, representations: bool = True,
         on_batch: Optional[Callable[[int, int], None]] = None):
  """Sends `data` (clean representations, or images with representations=False) in order, in batches.

  Returns (responses [N, out_dim] float32, QueryTrace). Every row is a charged query of `user`.
  """
  if batch_size < 1:
    raise ValueError(f"query batch_size must be >= 1, got {batch_size}")
  n = len(data)
  out, trace = [], QueryTrace(user, [], [], [])
  query = api.query_representations if representations else api.query
  num_batches = -(-n // batch_size)
  for b in range(num_batches):
    chunk = data[b * batch_size:(b + 1) * batch_size]
    result = query(user, chunk)
    out.append(result.reps)
    trace.num_queries.append(int(api.num_queries(user)))
    trace.coverage.append(float(api.coverage(user)))
    trace.sigma.append(float(np.max(result.sigma)))
    if on_batch is not None:
      on_batch(b + 1, num_batches)
  responses = np.concatenate(out, 0) if out else np.zeros((0, api.out_dim), np.float32)
  return responses, trace


def send_interleaved(api, users: Sequence[str], data: np.ndarray, *, batch_size: int):
  """Every user in `users` sends the same rows, batch by batch (the overlap of sybil accounts)."""
  per_user = {u: [] for u in users}
  traces = {u: QueryTrace(u, [], [], []) for u in users}
  for start in range(0, len(data), batch_size):
    chunk = data[start:start + batch_size]
    for u in users:
      result = api.query_representations(u, chunk)
      per_user[u].append(result.reps)
      traces[u].num_queries.append(int(api.num_queries(u)))
      traces[u].coverage.append(float(api.coverage(u)))
      traces[u].sigma.append(float(np.max(result.sigma)))
  return {u: np.concatenate(v, 0) for u, v in per_user.items()}, traces
