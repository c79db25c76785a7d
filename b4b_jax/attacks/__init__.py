"""Stealing attacks: query protocol, losses, stolen-model training, sybil mappers.

Light modules are re-exported here; the step function of the stolen model's training is
`b4b_jax.attacks.train_state`, and the job that runs the whole attack is `b4b_jax.jobs.steal`.
See docs/attacks.md.
"""
from b4b_jax.attacks.losses import LOSSES, get_loss, info_nce, mse, soft_nearest_neighbor
from b4b_jax.attacks.mapper import MAPPER_KINDS, Mapper, MapperNet, fit_mapper
from b4b_jax.attacks.queries import AccountPlan, QueryPlan, plan_queries, split_budget

__all__ = [
    "LOSSES", "MAPPER_KINDS", "AccountPlan", "Mapper", "MapperNet", "QueryPlan", "fit_mapper",
    "get_loss", "info_nce", "mse", "plan_queries", "soft_nearest_neighbor", "split_budget",
]
