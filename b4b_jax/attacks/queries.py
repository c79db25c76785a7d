"""The attacker's query plan: which stealing-set images each account sends, and in which order.

One seeded permutation of the stealing pool fixes everything. The attacker's total budget
`num_queries` is split evenly over its accounts (the paper's 2x50k, 3x33.3k, ... of 100k; the first
`num_queries % n` accounts get one query more). Account 1 spends its whole share on new images. Every
extra account first spends `num_queries_mapping` queries on images account 1 already queried (the
overlap: account 1's first images), to fit a mapper into account 1's space, then the rest of its share on
images nobody queried yet. So every query is charged to exactly one account and the budget is exact
(the original code skipped the mapping batches without charging them and let a free, untransformed
window of queries leak after the account windows; reference section 5.3).

Images held out for evaluation come from the end of the same permutation and are never queried.
"""
import dataclasses
from typing import List

import numpy as np

MAX_ACCOUNTS = 10  # the paper's sybil experiments use up to 6


@dataclasses.dataclass(frozen=True)
class AccountPlan:
  """Queries of one attacker account, as indices into the stealing pool."""
  index: int                 # 0 = account 1 (the space the stolen model is trained in)
  mapping_indices: np.ndarray  # overlap with account 1, sent first (empty for account 1)
  new_indices: np.ndarray      # images whose responses join the training set through this account

  @property
  def num_queries(self) -> int:
    return len(self.mapping_indices) + len(self.new_indices)


@dataclasses.dataclass(frozen=True)
class QueryPlan:
  accounts: List[AccountPlan]
  eval_indices: np.ndarray     # held out, never queried

  @property
  def train_indices(self) -> np.ndarray:
    """Training images in training-set row order: account 1's, then account 2's new ones, ..."""
    return np.concatenate([a.new_indices for a in self.accounts])

  @property
  def num_queries(self) -> int:
    return sum(a.num_queries for a in self.accounts)

  def summary(self) -> dict:
    return {"num_queries": self.num_queries, "num_train_images": int(len(self.train_indices)),
            "num_eval_images": int(len(self.eval_indices)),
            "accounts": [{"account": a.index + 1, "num_queries": a.num_queries,
                          "num_mapping_queries": int(len(a.mapping_indices)),
                          "num_new_images": int(len(a.new_indices))} for a in self.accounts]}


def split_budget(num_queries: int, num_accounts: int) -> List[int]:
  base, extra = divmod(num_queries, num_accounts)
  return [base + (1 if i < extra else 0) for i in range(num_accounts)]


def plan_queries(pool_size: int, num_queries: int, *, num_accounts: int = 1,
                 num_queries_mapping: int = 10_000, num_eval: int = 0, seed: int = 0) -> QueryPlan:
  """Draws the attacker's queries from a pool of `pool_size` images (see the module docstring)."""
  if not 1 <= num_accounts <= MAX_ACCOUNTS:
    raise ValueError(f"num_accounts must be in 1..{MAX_ACCOUNTS}, got {num_accounts}")
  if num_queries < 1 or num_eval < 0 or num_queries_mapping < 0:
    raise ValueError(f"invalid query counts: num_queries={num_queries}, num_eval={num_eval}, "
                     f"num_queries_mapping={num_queries_mapping}")
  shares = split_budget(num_queries, num_accounts)
  mapping = num_queries_mapping if num_accounts > 1 else 0
  if num_accounts > 1 and min(shares) <= mapping:
    raise ValueError(f"each of the {num_accounts} accounts gets {min(shares)} queries, not more than "
                     f"the {mapping} it must spend on the mapping overlap; raise num_queries or lower "
                     f"num_queries_mapping")
  if mapping > shares[0]:
    raise ValueError(f"the mapping overlap ({mapping}) exceeds account 1's {shares[0]} queries")
  distinct = shares[0] + sum(s - mapping for s in shares[1:])
  if distinct + num_eval > pool_size:
    raise ValueError(f"the stealing pool has {pool_size} images but the plan needs {distinct} distinct "
                     f"queried images plus {num_eval} held-out ones")

  order = np.random.default_rng(seed).permutation(pool_size)
  accounts = [AccountPlan(0, order[:0], order[:shares[0]])]
  overlap = order[:mapping]
  cursor = shares[0]
  for k, share in enumerate(shares[1:], start=1):
    fresh = order[cursor:cursor + share - mapping]
    cursor += share - mapping
    accounts.append(AccountPlan(k, overlap.copy(), fresh))
  eval_indices = order[pool_size - num_eval:] if num_eval else order[:0]
  return QueryPlan(accounts, eval_indices)
