"""Talking to the defended API from experiments: accounts that send their queries in batches.

Every evaluation that needs "what the API returns" goes through `b4b_jax.defense.DefendedEncoder`, so
the transforms, noise and coverage are the defense's own. Embedding-level experiments (remapping,
coverage curves, many legit-user rows) send clean representations they computed once with
`query_representations`; the defense hashes, noises and transforms them exactly as it would the
encoder's output for the same images (the encoder is deterministic), without re-running the encoder.
"""
import dataclasses
from typing import Callable, Iterable, Iterator, Optional, Sequence

import numpy as np

from b4b_jax import defense


def representation_api(config, rep_dim: int, *, capacity: int = 8, batch_size: int = 0):
  """A DefendedEncoder without an encoder: clients send clean representations (in batches of
  `batch_size` rows and a shorter last one: one compiled shape for both)."""
  return defense.DefendedEncoder(None, config, rep_dim, capacity=capacity, min_batch_rows=batch_size)


@dataclasses.dataclass
class QueryTrace:
  """What one account saw while sending a sequence of batches."""
  user: str
  num_queries: list        # cumulative number of queries after each batch
  coverage: list           # the account's coverage (%) after each batch
  sigma: list              # the noise std the batch was answered with (the account's sigma after it)

  def to_dict(self):
    return dataclasses.asdict(self)


def _send_one(api, user: str, batch, trace: QueryTrace, *, representations: bool) -> np.ndarray:
  """One charged call of `user`; appends the account's state after it to `trace`."""
  query = api.query_representations if representations else api.query
  result = query(user, batch)  # a defense.QueryResult: this call's responses and per-row sigma
  trace.num_queries.append(int(api.num_queries(user)))
  trace.coverage.append(float(api.coverage(user)))
  trace.sigma.append(float(np.max(result.sigma)))
  return np.asarray(result.reps, np.float32)


def send_batches(api, user: str, batches: Iterable, *, representations: bool = True,
                 on_batch: Optional[Callable[[QueryTrace], None]] = None):
  """Sends each batch (clean representations, or normalised images with representations=False) as
  one charged call of `user`, in order: the one way an account sends a stream of queries.

  Returns (responses [N, out_dim] float32, QueryTrace); on_batch(trace) runs after every batch.
  """
  out, trace = [], QueryTrace(user, [], [], [])
  for batch in batches:
    out.append(_send_one(api, user, batch, trace, representations=representations))
    if on_batch is not None:
      on_batch(trace)
  responses = np.concatenate(out, 0) if out else np.zeros((0, api.out_dim), np.float32)
  return responses, trace


def chunks(data, batch_size: int) -> Iterator:
  """data[0:b], data[b:2b], ... (the last chunk may be shorter)."""
  if batch_size < 1:
    raise ValueError(f"query batch_size must be >= 1, got {batch_size}")
  return (data[i:i + batch_size] for i in range(0, len(data), batch_size))


def send(api, user: str, data: np.ndarray, *, batch_size: int, representations: bool = True,
         on_batch: Optional[Callable[[int, int], None]] = None):
  """send_batches over `data` cut into batches of `batch_size`; on_batch(done, total)."""
  total = -(-len(data) // batch_size) if batch_size > 0 else 0
  report = None if on_batch is None else (lambda trace: on_batch(len(trace.num_queries), total))
  return send_batches(api, user, chunks(data, batch_size), representations=representations,
                      on_batch=report)


def send_interleaved(api, users: Sequence[str], data: np.ndarray, *, batch_size: int):
  """Every user in `users` sends the same rows, batch by batch (the overlap of sybil accounts)."""
  per_user = {u: [] for u in users}
  traces = {u: QueryTrace(u, [], [], []) for u in users}
  for chunk in chunks(data, batch_size):
    for u in users:
      per_user[u].append(_send_one(api, u, chunk, traces[u], representations=True))
  return {u: np.concatenate(v, 0) for u, v in per_user.items()}, traces
