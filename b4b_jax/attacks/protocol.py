"""Talking to the defended API: charged queries, per-account bookkeeping and the sybil mapping phase.

Every representation the attacker obtains comes from `DefendedEncoder.query(user, images)` (or
`query_mixed` for a batch spanning several accounts), so every query is charged to the account that
sent it: its coverage grows and its noise level follows. Accounts are named "attacker-1",
"attacker-2", ...; responses of account k >= 2 are carried into account 1's space by that account's
mapper before they join the training set.

Three protocols use it (b4b_jax/jobs/steal.py): `query_once` (`collect_training_targets`: every planned
image once, through the configured strategy of b4b_jax/attacks/strategies), `requery_each_epoch`
(`mapping_phase_only`, then `query_rows` every step) and `paper` (`charge_paper_pass`: the one charged
pass whose per-row sigma the offline per-epoch answers reuse, b4b_jax/attacks/offline.py).

rep_scale: mappers are fitted and applied on responses multiplied by `rep_scale`, and their outputs are
divided back (the original multiplied SimSiam features by 1000 around its mapper, reference section 3.4
and 5.3; here the transform's bias is scaled with the rest, so the original's B x 1000 mismatch cannot
occur). fit_mapper standardises its inputs and targets, so for "linear" and "mlp" the factor changes the
fit only by float rounding. It is kept so that the pipeline is the original's and is recorded.
"""
import dataclasses
import inspect
from typing import Any, Callable, Dict, List, Optional

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
               batch_size: int, on_batch: Optional[Callable[[QueryLogEntry], None]] = None,
               rep_scale: float = 1.0, strategy: Optional["StrategySpec"] = None):
    if batch_size < 1:
      raise ValueError(f"query batch size must be >= 1, got {batch_size}")
    if not (np.isfinite(rep_scale) and rep_scale > 0):
      raise ValueError(f"rep_scale must be a finite number > 0, got {rep_scale}")
    self.rep_scale = float(rep_scale)
    self.strategy = strategy
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
  def query(self, account: int, indices: np.ndarray, *, phase: str, epoch: int = 0,
            with_sigma: bool = False):
    """Sends `indices` through account `account` (0-based) in batches; returns the raw responses
    (and, with_sigma, the noise std each row's batch was answered with)."""
    chunks = list(api_client.chunks(indices, self.batch_size))
    batches = getattr(self.views, "batches", None)  # a streaming source reads ahead (jobs/steal.py)
    images = (batches(indices, epoch, self.batch_size) if batches is not None else
              (self.views(chunk, epoch) for chunk in chunks))
    responses, trace = api_client.send_batches(
        self.api, self.users[account], images, representations=False,
        on_batch=lambda trace: self._record(account, phase, trace.sigma[-1]))
    if not with_sigma:
      return responses
    sigma = np.repeat(np.asarray(trace.sigma, np.float64), [len(c) for c in chunks])
    return responses, sigma

  def query_with_strategy(self, account: int, indices: np.ndarray, *, phase: str,
                          epoch: int = 0) -> np.ndarray:
    """As `query`, but each batch's views are handed to the configured strategy, which decides what
    to send (e.g. N copies of each) and returns one answer per image. Without a strategy: `query`."""
    if self.strategy is None:
      return self.query(account, indices, phase=phase, epoch=epoch)
    channel = _Channel(self, account, phase, self.strategy.to_api)
    strategy = self.strategy.build(channel, self.users[account], self.batch_size)
    out = [self.strategy.check(strategy.steal(self.strategy.to_strategy(self.views(chunk, epoch))),
                               len(chunk))
           for chunk in api_client.chunks(indices, self.batch_size)]
    return np.concatenate(out) if out else np.zeros((0, self.api.out_dim), np.float32)

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
    """Carries rows of accounts >= 2 into account 1's space with their mappers (on responses x
    rep_scale, divided back)."""
    accounts_per_row = np.asarray(accounts_per_row)
    out = np.array(responses, np.float32, copy=True)
    for account in sorted(set(int(a) for a in accounts_per_row) - {0}):
      rows = np.flatnonzero(accounts_per_row == account)
      scaled = np.asarray(responses[rows], np.float32) * np.float32(self.rep_scale)
      out_rows = self.mappers[account].apply(scaled) / np.float32(self.rep_scale)
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
                  batch_size: int, val_fraction: float, seed: int, accounts=None,
                  num_pairs: Optional[int] = None) -> None:
    """Mapping phase of accounts 2..n (or of `accounts`, 0-based): query the overlap, fit a mapper
    into account 1's space on the first `num_pairs` pairs (all by default), at rep_scale."""
    for plan in self.plan.accounts[1:]:
      k = plan.index
      if accounts is not None and k not in accounts:
        continue
      responses_k = self.query(k, plan.mapping_indices, phase="mapping")
      n = len(responses_k) if num_pairs is None else int(num_pairs)
      logging.info("fitting the %s mapper of account %d on %d overlap pairs", kind, k + 1, n)
      scale = np.float32(self.rep_scale)
      self.mappers[k] = mapper_lib.fit_mapper(
          responses_k[:n] * scale, np.asarray(account1_overlap[:n], np.float32) * scale, kind=kind,
          epochs=epochs, learning_rate=learning_rate, batch_size=batch_size,
          val_fraction=val_fraction, seed=seed + k)
      logging.info("account %d mapper: %s", k + 1, self.mappers[k].metrics)

  def collect_training_targets(self, **mapper_kwargs) -> np.ndarray:
    """Query-once protocol: every account sends its images once; returns [num_train, D] targets in
    account 1's space (rows in plan.train_indices order)."""
    first = self.plan.accounts[0]
    responses_1 = self.query_with_strategy(0, first.new_indices, phase="train")
    overlap = len(self.plan.accounts[1].mapping_indices) if len(self.plan.accounts) > 1 else 0
    # The overlap is account 1's first images (see queries.plan_queries).
    if overlap:
      self.fit_mappers(responses_1[:overlap], **mapper_kwargs)
    targets = [responses_1]
    for plan in self.plan.accounts[1:]:
      raw = self.query_with_strategy(plan.index, plan.new_indices, phase="train")
      targets.append(self.map_rows(np.full(len(raw), plan.index), raw))
    return np.concatenate(targets)

  def charge_paper_pass(self, *, num_pairs: int, **mapper_kwargs) -> np.ndarray:
    """Paper protocol: the one charged pass (queries.plan_paper), in the original's order per account.

    Account 1 sends its window; each account j >= 2 sends its mapping batches (the images of account
    1's first batches, so the pairs share their views), fits its mapper on the first `num_pairs`
    pairs, then sends the rest of its window. Every batch is charged to its account. Returns the
    noise std each training row's batch was answered with, rows in plan.train_indices order: the sigma
    of that batch position that the per-epoch offline answers reuse (attacks/offline.py). The
    responses to the training rows themselves are not kept (the original discarded them too).
    """
    first = self.plan.accounts[0]
    responses_1, sigma_1 = self.query(0, first.new_indices, phase="train", with_sigma=True)
    sigmas = [sigma_1]
    for plan in self.plan.accounts[1:]:
      overlap = len(plan.mapping_indices)
      if not np.array_equal(plan.mapping_indices, first.new_indices[:overlap]):
        raise ValueError("paper protocol: the mapping queries must be account 1's first images")
      self.fit_mappers(responses_1[:overlap], accounts=(plan.index,), num_pairs=num_pairs,
                       **mapper_kwargs)
      _, sigma = self.query(plan.index, plan.new_indices, phase="train", with_sigma=True)
      sigmas.append(sigma)
    return np.concatenate(sigmas)

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


class StrategySpec:
  """How the query-once protocol asks for each account's images: a strategy class of
  b4b_jax.attacks.strategies (its current interface: `cls(api, [account], batch_size=, **kwargs)`
  with `.steal(images) -> one answer per image`), its kwargs, and the two image conversions:
  `to_strategy` (the views the attacker cut -> what strategies take: float32 in [0, 1]) and `to_api`
  (what a strategy sends -> what the API takes)."""

  def __init__(self, cls, kwargs: Dict[str, Any], *, to_strategy: Callable, to_api: Callable):
    accepted = inspect.signature(cls.__init__).parameters
    takes_any = any(p.kind == p.VAR_KEYWORD for p in accepted.values())
    unknown = [k for k in kwargs if k not in accepted and not takes_any]
    if unknown:
      raise ValueError(f"strategy {cls.name!r} takes no argument(s) {unknown}")
    self.cls, self.kwargs = cls, dict(kwargs)
    self.to_strategy, self.to_api = to_strategy, to_api

  @property
  def name(self) -> str:
    return self.cls.name

  def build(self, channel, user: str, batch_size: int):
    return self.cls(channel, [user], batch_size=int(batch_size), **self.kwargs)

  def check(self, answers, n: int) -> np.ndarray:
    answers = np.asarray(answers, np.float32)
    if answers.ndim != 2 or len(answers) != n:
      raise ValueError(f"strategy {self.name!r} returned {answers.shape} for {n} images; a stealing "
                       f"run needs one answer per image")
    return answers


class _Channel:
  """What a strategy sees of the API: `query(user, images)` -> the API's QueryResult; each call is one
  charged batch of the account, logged like every other."""

  def __init__(self, attacker: "Attacker", account: int, phase: str, to_api: Callable):
    self._attacker, self._account, self._phase, self._to_api = attacker, account, phase, to_api

  def query(self, user: str, images):
    if user != self._attacker.users[self._account]:
      raise ValueError(f"this strategy owns account {self._attacker.users[self._account]!r}, not "
                       f"{user!r}")
    result = self._attacker.api.query(user, self._to_api(images))
    # pylint: disable-next=protected-access
    self._attacker._record(self._account, self._phase, float(np.max(result.sigma)))
    return result

  @property
  def out_dim(self):
    return self._attacker.api.out_dim


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

