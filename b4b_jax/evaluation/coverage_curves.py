"""Coverage and cost curves (paper Fig. 3a/3b, 4, 7, 10), computed by the defense's own code.

  * `coverage_vs_queries`: one account per query set (each downstream set, an ImageNet-style set, random
    noise images) sends its representations in batches to a `DefendedEncoder`; the account's coverage
    (%) is read after every batch. One API per bucket count 2^K, so the hyperplanes are the defense's.
  * `sigma_vs_coverage`: `defense.noise_std` over coverage 0..100 % for several (lambda, alpha, beta).
  * `sigma_vs_queries`: the noise std each query set's account would get (cost of its coverage trace).
  * `queries_per_bucket`: how many queries land in each bucket (sorted, busiest first), with the
    defense's own LSH bucket ids (`defense.lsh.bucket_ids` on `make_params(...).hyperplanes`).
"""
from typing import Callable, Mapping, Optional, Sequence

import numpy as np

from b4b_jax import defense
from b4b_jax.defense import lsh
from b4b_jax.evaluation import api_client


def counting_config(base_config, num_hyperplanes: int):
  """An API that counts coverage but returns clean representations (no noise, no transform)."""
  cfg = base_config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.enabled = False
    cfg.num_hyperplanes = int(num_hyperplanes)
  return cfg


def coverage_vs_queries(query_sets: Mapping[str, np.ndarray], *, base_config,
                        bucket_bits: Sequence[int] = (8, 10, 12, 14), batch_size: int = 256,
                        on_batch: Optional[Callable[[int, str], None]] = None) -> dict:
  """{str(K): {set name: {"num_queries": [...], "coverage": [...]}}}: coverage after every batch."""
  if not query_sets:
    raise ValueError("coverage_vs_queries needs at least one query set")
  dims = {name: np.asarray(reps).shape for name, reps in query_sets.items()}
  if len({s[1] for s in dims.values() if len(s) == 2}) != 1 or any(len(s) != 2 for s in dims.values()):
    raise ValueError(f"every query set must be representations [N, D] of one encoder, got {dims}")
  rep_dim = next(iter(dims.values()))[1]
  curves = {}
  for k in bucket_bits:
    api = api_client.representation_api(counting_config(base_config, k), rep_dim,
                                        capacity=max(2, len(query_sets)), batch_size=batch_size)
    per_set = {}
    for name, reps in query_sets.items():
      _, trace = api_client.send(api, name, np.asarray(reps, np.float32), batch_size=batch_size)
      per_set[name] = {"num_queries": trace.num_queries, "coverage": trace.coverage}
      if on_batch is not None:
        on_batch(k, name)
    curves[str(k)] = per_set
  return curves


def sigma_vs_coverage(settings: Sequence[Mapping], *, num_points: int = 101) -> list:
  """[{"lam", "alpha", "beta", "coverage": [...], "sigma": [...]}] over coverage 0..100 %."""
  coverage = np.linspace(0.0, 100.0, num_points)
  out = []
  for s in settings:
    sigma = np.asarray(defense.noise_std(coverage, s["lam"], s["alpha"], s["beta"]), np.float64)
    out.append({"lam": float(s["lam"]), "alpha": float(s["alpha"]), "beta": float(s["beta"]),
                "coverage": coverage.tolist(), "sigma": sigma.tolist()})
  return out


def sigma_vs_queries(curves_for_k: Mapping[str, Mapping], *, lam: float, alpha: float,
                     beta: float) -> dict:
  """{set name: {"num_queries", "sigma"}}: the B4B cost of each account's coverage trace."""
  return {name: {"num_queries": c["num_queries"],
                 "sigma": np.asarray(defense.noise_std(np.asarray(c["coverage"]), lam, alpha, beta),
                                     np.float64).tolist()}
          for name, c in curves_for_k.items()}


def queries_per_bucket(reps: np.ndarray, *, base_config, num_hyperplanes: int = 12) -> dict:
  """Queries per occupied bucket, busiest first, averaged over the defense's P projections.

  Returns {"buckets_pct": x, "queries": y, "occupied_pct": ...}: the i-th busiest bucket (as a
  percentage of all 2^K buckets) holds y[i] queries on average over projections (paper Fig. 3b).
  """
  reps = np.asarray(reps, np.float32)
  cfg = counting_config(base_config, num_hyperplanes)
  params = defense.make_params(cfg, reps.shape[1])
  ids = np.asarray(lsh.bucket_ids(reps, params.projection, num_hyperplanes,
                                  params.threshold if params.settings.centered else None))
  num_buckets = 1 << num_hyperplanes
  per_projection = np.stack([np.sort(np.bincount(ids[:, p], minlength=num_buckets))[::-1]
                             for p in range(ids.shape[1])])
  mean_counts = per_projection.mean(0)
  occupied = int(np.sum(mean_counts > 0))
  return {"buckets_pct": (100.0 * (np.arange(occupied) + 1) / num_buckets).tolist(),
          "queries": mean_counts[:occupied].tolist(),
          "occupied_pct": 100.0 * float(np.mean(np.sum(per_projection > 0, 1))) / num_buckets,
          "num_queries": int(len(reps))}


def random_noise_images(num: int, size: int, seed: int) -> np.ndarray:
  """uint8 [num, size, size, 3] uniform noise: the least structured query set there is."""
  return np.random.default_rng(seed).integers(0, 256, (num, size, size, 3), dtype=np.uint8)
