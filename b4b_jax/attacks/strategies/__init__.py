"""Adaptive attack strategies against the defended API (issue 12).

A strategy owns one or more accounts and chooses its next queries from what the API has returned to
it: representations only, never the server's coverage or sigma. It talks to the API through its public
query method only (`api.query(account, images)`), so the same code runs against the in-process
DefendedEncoder and, once it exists, the served API.

  QueryOnce        the naive thief: every image once (the paper's attacker)
  RepeatAverage    N copies of every image (exact, or near-duplicates: pixel jitter, 1-pixel shifts,
                   JPEG re-encoding, small crops/flips), averaged
  CanaryProbe      a fixed probe image in every batch reads the noise level online; switches to
                   RepeatAverage once the read noise exceeds a threshold
  SybilMapper      main account + sybils sharing an overlap; answers aligned (linear, MLP, orthogonal
                   Procrustes, bit-flip alignment for the binary transform); queries_needed measures
                   how many overlap queries each alignment needs per transform
  AccountRotation  many sybils, each under `per_account` queries (below the knee), remapped
  UnderKnee        few queries: random, class-balanced, or coverage-aware (k-means on a public proxy
                   encoder's features + the thief's own LSH, picking queries in few buckets)
  AugmentationFlood / RandomNoise   weak + strong views of each image / uniform-noise inputs
  DenoisedQueryOnce answers passed through a linear MMSE denoiser the thief fits on (proxy clean,
                   proxy clean + published-cost noise) pairs; robust_loss: mse, cosine, huber, infonce

The steal job (config.attack.strategy) runs the strategies that give one answer per planned image from
one account; received.py runs every attack for the suite as the (input, answer) pairs it received, and
names (STEAL_JOB_MISFITS) the strategies the steal job refuses and why.

Images are float32 NHWC in [0, 1] (what perturbations act on); each strategy is given `to_input`, the
victim's preprocessing (normalisation), applied just before sending.
"""
from b4b_jax.attacks.strategies.base import QueryOnce, Strategy, reps_of
from b4b_jax.attacks.strategies.budget import SELECTIONS, UnderKnee, select_subset
from b4b_jax.attacks.strategies.canary import CanaryProbe
from b4b_jax.attacks.strategies.denoise import (ROBUST_LOSSES, DenoisedQueryOnce, LinearDenoiser,
                                                robust_loss)
from b4b_jax.attacks.strategies.flood import AugmentationFlood, RandomNoise
from b4b_jax.attacks.strategies.perturb import PERTURBATIONS, perturb_images
from b4b_jax.attacks.strategies.repeat import RepeatAverage
from b4b_jax.attacks.strategies.sybil import (ALIGNMENTS, AccountRotation, SybilMapper, fit_alignment,
                                              queries_needed)

STRATEGIES = {"query_once": QueryOnce, "repeat_average": RepeatAverage, "canary": CanaryProbe,
              "sybil_mapper": SybilMapper, "account_rotation": AccountRotation,
              "under_knee": UnderKnee, "augmentation_flood": AugmentationFlood,
              "random_noise": RandomNoise, "denoised": DenoisedQueryOnce}
