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

Images are float32 NHWC in [0, 1] (what perturbations act on); each strategy is given `to_input`, the
victim's preprocessing (normalisation), applied just before sending.
"""
from b4b_jax.attacks.strategies.base import QueryOnce, Strategy, reps_of
from b4b_jax.attacks.strategies.canary import CanaryProbe
from b4b_jax.attacks.strategies.perturb import PERTURBATIONS, perturb_images
from b4b_jax.attacks.strategies.repeat import RepeatAverage

STRATEGIES = {"query_once": QueryOnce, "repeat_average": RepeatAverage, "canary": CanaryProbe}
