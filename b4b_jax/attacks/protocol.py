"""Talking to the defended API: charged queries, per-account bookkeeping and the sybil mapping phase.

Every representation the attacker obtains comes from `DefendedEncoder.query(user, images)` (or
`query_mixed` for a batch spanning several accounts), so every query is charged to the account that
sent it: its coverage grows and its noise level follows. Accounts are named "attacker-1",
"attacker-2", ...; responses of account k >= 2 are carried into account 1's space by that account's
mapper before they join the training set.
"""
import dataclasses
from typing import Callable, Dict, List, Optional

import numpy as np
from absl import logging

from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.attacks import queries as queries_lib
from b4b_jax.evaluation import api_client


def account_name(index: int) -> str:
  return f"attacker-{index + 1}"


@dataclasses.dataclass
class QueryLogEntry:
  """The API's answer to one query batch, as the attacker saw it."""
  account: int          # 1-based
  phase: str            # "mapping" | "train" | "requery"
  num_queries: int      # account's charged queries after this batch
  coverage: float       # account's coverage after this batch (percent)
  sigma: float          # noise std the batch was returned with

  def to_dict(self):
    return dataclasses.asdict(self)


class Attacker:
  """The attacker's side of the protocol: its accounts, mappers and the log of what the API returned.

  `views(indices, epoch)` gives the float32 images to send for pool indices (already normalised as the
  victim expects); `on_batch(entry)` is called after every query batch (metrics, progress).
  """

  def __init__(self, api, plan: queries_lib.QueryPlan, views: Callable[[np.ndarray, int], np.ndarray], *,
               batch_size: int, on_batch: Optional[Callable[[QueryLogEntry], None]] = None):
    if batch_size < 1:
      raise ValueError(f"query batch size must be >= 1, got {batch_size}")
    self.api = api
    self.plan = plan
    self.views = views
    self.batch_size = int(batch_size)
    self.on_batch = on_batch or (lambda entry: None)
    self.mappers: Dict[int, mapper_lib.Mapper] = {}
    self.log: List[QueryLogEntry] = []
    self.users = [account_name(a.index) for a in plan.accounts]
    for user in self.users:
      api.register(user)

  # ------------------------------------------------------------------------------------------------
  def query(self, account: int, indices: np.ndarray, *, phase: str, epoch: int = 0) -> np.ndarray:
    """Sends `indices` through account `account` (0-based) in batches; returns the raw responses."""
    batches = getattr(self.views, "batches", None)  # a streaming source reads ahead (jobs/steal.py)
    images = (batches(indices, epoch, self.batch_size) if batches is not None else
              (self.views(chunk, epoch) for chunk in api_client.chunks(indices, self.batch_size)))
    responses, _ = api_client.send_batches(
        self.api, self.users[account], images, representations=False,
        on_batch=lambda trace: self._record(account, phase, trace.sigma[-1]))
    return responses

  def query_rows(self, accounts_per_row: np.ndarray, indices: np.ndarray, *, epoch: int,
                 images: Optional[np.ndarray] = None) -> np.ndarray:
    """One call for a batch whose rows belong to several accounts (re-query mode); mapped responses."""
    users = [self.users[a] for a in accounts_per_row]
    images = self.views(indices, epoch) if images is None else images
    result = self.api.query_mixed(users, images)
    for account in sorted(set(int(a) for a in accounts_per_row)):
      last_row = int(np.flatnonzero(np.asarray(accounts_per_row) == account)[-1])
      self._record(account, "requery", float(result.sigma[last_row]))
    return self.map_rows(accounts_per_row, result.reps)

  def map_rows(self, accounts_per_row: np.ndarray, responses: np.ndarray) -> np.ndarray:
    """Carries rows of accounts >= 2 into account 1's space with their mappers."""
    out = np.array(responses, np.float32, copy=True)
    for account in sorted(set(int(a) for a in accounts_per_row) - {0}):
      rows = np.flatnonzero(accounts_per_row == account)
      out_rows = self.mappers[account].apply(responses[rows])
      if out.shape[1] != out_rows.shape[1]:
        raise ValueError(f"mapper of account {account + 1} gives {out_rows.shape[1]}-d outputs, "
                         f"account 1 has {out.shape[1]}")
      out[rows] = out_rows
    return out

  def _record(self, account: int, phase: str, sigma: float) -> None:
    """Logs the account's state after a batch; `sigma`: the noise std the batch was answered with."""
    user = self.users[account]
    entry = QueryLogEntry(account + 1, phase, self.api.num_queries(user), self.api.coverage(user), sigma)
    self.log.append(entry)
    self.on_batch(entry)

  # ------------------------------------------------------------------------------------------------
  def fit_mappers(self, account1_overlap: np.ndarray, *, kind: str, epochs: int, learning_rate: float,
                  batch_size: int, val_fraction: float, seed: int) -> None:
    """Mapping phase of accounts 2..n: query the overlap, fit a mapper into account 1's space."""
    for plan in self.plan.accounts[1:]:
      k = plan.index
      responses_k = self.query(k, plan.mapping_indices, phase="mapping")
      logging.info("fitting the %s mapper of account %d on %d overlap pairs", kind, k + 1,
                   len(responses_k))
      self.mappers[k] = mapper_lib.fit_mapper(
          responses_k, account1_overlap, kind=kind, epochs=epochs, learning_rate=learning_rate,
          batch_size=batch_size, val_fraction=val_fraction, seed=seed + k)
      logging.info("account %d mapper: %s", k + 1, self.mappers[k].metrics)

  def collect_training_targets(self, **mapper_kwargs) -> np.ndarray:
    """Query-once protocol: every account sends its images once; returns [num_train, D] targets in
    account 1's space (rows in plan.train_indices order)."""
    first = self.plan.accounts[0]
    responses_1 = self.query(0, first.new_indices, phase="train")
    overlap = len(self.plan.accounts[1].mapping_indices) if len(self.plan.accounts) > 1 else 0
    # The overlap is account 1's first images (see queries.plan_queries).
    if overlap:
      self.fit_mappers(responses_1[:overlap], **mapper_kwargs)
    targets = [responses_1]
    for plan in self.plan.accounts[1:]:
      raw = self.query(plan.index, plan.new_indices, phase="train")
      targets.append(self.map_rows(np.full(len(raw), plan.index), raw))
    return np.concatenate(targets)

  def mapping_phase_only(self, **mapper_kwargs) -> None:
    """Re-query protocol: only the overlap is queried up front (account 1, then each sybil)."""
    if len(self.plan.accounts) < 2:
      return
    overlap_idx = self.plan.accounts[1].mapping_indices
    responses_1 = self.query(0, overlap_idx, phase="mapping")
    self.fit_mappers(responses_1, **mapper_kwargs)

  def account_summary(self) -> List[dict]:
    out = []
    for plan, user in zip(self.plan.accounts, self.users):
      entry = {"account": plan.index + 1, "user": user, "charged_queries": self.api.num_queries(user),
               "coverage": self.api.coverage(user), "sigma": self.api.sigma(user),
               "planned_queries": plan.num_queries, "mapping_queries": int(len(plan.mapping_indices)),
               "new_images": int(len(plan.new_indices))}
      if plan.index in self.mappers:
        entry["mapper"] = dict(self.mappers[plan.index].metrics)
      out.append(entry)
    return out


def accounts_of_rows(plan: queries_lib.QueryPlan) -> np.ndarray:
  """Account (0-based) of each training row, in plan.train_indices order."""
  return np.concatenate([np.full(len(a.new_indices), a.index, np.int32) for a in plan.accounts])


def mapper_states(attacker: Attacker) -> Dict[str, dict]:
  return {str(k): m.state() for k, m in attacker.mappers.items()}


def restore_mappers(attacker: Attacker, states: Dict[str, dict], metrics: Dict[str, dict], *,
                    kind: str, in_dim: int, out_dim: int) -> None:
  for key, state in states.items():
    state = {"params": state["params"],
             "normalization": {k: np.asarray(v) for k, v in state["normalization"].items()}}
    attacker.mappers[int(key)] = mapper_lib.Mapper.from_state(kind, in_dim, out_dim, state,
                                                              metrics.get(key, {}))

