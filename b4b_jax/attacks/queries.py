"""The attacker's query plan: which stealing-set images each account sends, and in which order.

Two planners, one `QueryPlan`:

`plan_paper` (the `paper` protocol, the original code's regime, reference section 5.2-5.3): the pool in
its own order (unshuffled), cut into batches of `batch_size` (drop_last). One account sends
min(ceil(num_queries / bs), floor(pool / bs)) batches (the original stops once it has passed
num_queries, or when the pool ends: 50k -> 196 batches = 50,176 queries; 100k on the 100-per-class
ImageNet pool -> 390). k accounts each own a window of bpa = floor(num_queries / bs) // k batches
(account j, 0-based: batches [j bpa, (j+1) bpa)); accounts j >= 1 spend their first M =
ceil(num_queries_mapping / bs) batches on the mapping queries: pool batches 0..M-1, the images account 1
sent first, so the overlap is paired. The images at window positions 0..M-1 of account j >= 1 are never
queried (the original skipped them) and nothing past the k windows is queried (the original's free
untransformed window after them is not reproduced). Every batch is charged to the account that sends it,
mapping batches included.
Examples (bs 256, M = 40): 50k, k=2 -> bpa 97; 100k, k=2 -> 195; 100k, k=3 -> 130; 100k, k=6 -> 65.

`plan_queries` (the `query_once` and `requery_each_epoch` protocols): one seeded permutation of the
stealing pool fixes everything. The attacker's total budget `num_queries` is split evenly over its
accounts (the paper's 2x50k, 3x33.3k, ... of 100k; the first `num_queries % n` accounts get one query
more). Account 1 spends its whole share on new images. Every extra account first spends
`num_queries_mapping` queries on images account 1 already queried (the overlap: account 1's first
images), to fit a mapper into account 1's space, then the rest of its share on images nobody queried
yet. So every query is charged to exactly one account and the budget is exact (the original code skipped
the mapping batches without charging them and let a free, untransformed window of queries leak after the
account windows; reference section 5.3).

Images held out for evaluation come from the end of the same permutation and are never queried.
"""
import dataclasses
from typing import List, Optional

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
  # plan_paper only (0 for plan_queries): the charged pass's batch size, each account's window of
  # batches (bpa) and the mapping batches of accounts >= 2 (M).
  batch_size: int = 0
  batches_per_account: int = 0
  mapping_batches: int = 0

  @property
  def train_indices(self) -> np.ndarray:
    """Training images in training-set row order: account 1's, then account 2's new ones, ..."""
    return np.concatenate([a.new_indices for a in self.accounts])

  @property
  def num_queries(self) -> int:
    return sum(a.num_queries for a in self.accounts)

  def summary(self) -> dict:
    out = {"num_queries": self.num_queries, "num_train_images": int(len(self.train_indices)),
           "num_eval_images": int(len(self.eval_indices)),
           "accounts": [{"account": a.index + 1, "num_queries": a.num_queries,
                         "num_mapping_queries": int(len(a.mapping_indices)),
                         "num_new_images": int(len(a.new_indices))} for a in self.accounts]}
    if self.batch_size:
      out.update(batch_size=self.batch_size, batches_per_account=self.batches_per_account,
                 mapping_batches=self.mapping_batches)
    return out


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


def paper_windows(num_queries: int, num_accounts: int, num_queries_mapping: int, batch_size: int,
                  pool_size: Optional[int] = None):
  """(batches per account, mapping batches) of the paper protocol (module docstring); ValueError
  naming the problem when the windows cannot hold the mapping batches or the pool is too small."""
  if not 1 <= num_accounts <= MAX_ACCOUNTS:
    raise ValueError(f"num_accounts must be in 1..{MAX_ACCOUNTS}, got {num_accounts}")
  if num_queries < 1 or batch_size < 1 or num_queries_mapping < 0:
    raise ValueError(f"invalid paper-protocol counts: num_queries={num_queries}, "
                     f"batch_size={batch_size}, num_queries_mapping={num_queries_mapping}")
  if num_accounts == 1:
    bpa = -(-num_queries // batch_size)
    if pool_size is not None:
      bpa = min(bpa, pool_size // batch_size)   # the original: the pool ends first (100k -> 390)
    mapping = 0
  else:
    bpa = (num_queries // batch_size) // num_accounts
    mapping = -(-num_queries_mapping // batch_size)
    if mapping < 1 or bpa <= mapping:
      raise ValueError(f"paper protocol: each of the {num_accounts} accounts owns {bpa} batches of "
                       f"{batch_size}, which must exceed its {mapping} mapping batches "
                       f"(num_queries_mapping={num_queries_mapping}); raise num_queries or lower "
                       f"num_queries_mapping")
    if pool_size is not None and num_accounts * bpa * batch_size > pool_size:
      raise ValueError(f"paper protocol: {num_accounts} windows of {bpa} batches of {batch_size} need "
                       f"{num_accounts * bpa * batch_size} pool images, the pool has {pool_size}")
  if bpa < 1:
    raise ValueError(f"paper protocol: the pool of {pool_size} images holds no batch of {batch_size}")
  return bpa, mapping


def plan_paper(pool_size: int, num_queries: int, *, num_accounts: int = 1,
               num_queries_mapping: int = 10_000, batch_size: int = 256) -> QueryPlan:
  """The paper protocol's charged pass over the pool in pool order (see the module docstring)."""
  bpa, m = paper_windows(num_queries, num_accounts, num_queries_mapping, batch_size, pool_size)
  bs = batch_size
  accounts = [AccountPlan(0, np.zeros((0,), np.int64), np.arange(0, bpa * bs, dtype=np.int64))]
  for j in range(1, num_accounts):
    accounts.append(AccountPlan(j, np.arange(0, m * bs, dtype=np.int64),
                                np.arange((j * bpa + m) * bs, (j + 1) * bpa * bs, dtype=np.int64)))
  return QueryPlan(accounts, np.zeros((0,), np.int64), batch_size=bs, batches_per_account=bpa,
                   mapping_batches=m)
