"""What each attack of the suite received: the (input, answer) pairs a thief trains its copy on.

The steal job's strategy seam (protocol.StrategySpec) takes strategies that return one answer per
planned image from one account. Several attacks do not have that shape, and are run here instead,
honestly, with every row a real answer of the API to a real input:
  under_knee          answers only a chosen subset (fewer rows than images): the pairs are that subset;
  augmentation_flood  answers views, not the images: the pairs are the views sent;
  random_noise        answers noise images too: noise pairs + image pairs;
  sybil_mapper / account_rotation   own 2+ accounts: pairs are every image with its answer mapped
                      into the main account's space;
  denoised            needs a proxy and a sigma: the sigma is read online by a canary riding in every
                      batch (CanaryProbe's naive estimate), the proxy is given (the suite passes the
                      victim's clean answers on other public images: an upper bound on any real proxy),
                      and LinearDenoiser (DenoisedQueryOnce's) cleans each batch at its read sigma;
  query_once, repeat_<perturbation>, canary   one answer per image, as in the steal job.

`receive(name, api, account, images01, settings)` -> Received; `settings` is a mapping with the fields
SETTINGS names (the suite config's `theft` block).
"""
import dataclasses
from typing import List, Optional

import numpy as np

from b4b_jax.attacks.strategies import base
from b4b_jax.attacks.strategies import budget
from b4b_jax.attacks.strategies import canary as canary_lib
from b4b_jax.attacks.strategies import denoise
from b4b_jax.attacks.strategies import flood
from b4b_jax.attacks.strategies import perturb
from b4b_jax.attacks.strategies import repeat
from b4b_jax.attacks.strategies import sybil

ATTACKS = ("query_once", "canary", "under_knee", "augmentation_flood", "random_noise",
           "sybil_mapper", "account_rotation", "denoised") + tuple(
               f"repeat_{p}" for p in perturb.PERTURBATIONS)
SETTINGS = ("copies", "canary_switch_sigma", "under_knee_budget", "selection", "flood_weak",
            "flood_strong", "noise_count", "overlap", "per_account", "alignment")


# Strategies of the registry (strategies.STRATEGIES) that the steal job's seam cannot run as they are,
# and why; the steal job refuses them with this reason, and this module runs them for the suite.
STEAL_JOB_MISFITS = {
    "under_knee": "it answers only a chosen subset (fewer rows than images), and the steal job needs "
                  "one answer per planned image",
    "sybil_mapper": "it owns 2+ accounts of its own, and the steal job gives a strategy one account "
                    "(its sybils are attack.num_accounts with attack.mapper)",
    "account_rotation": "it creates its own accounts, and the steal job gives a strategy one account "
                        "(its sybils are attack.num_accounts with attack.mapper)",
    "denoised": "it needs a proxy encoder's clean answers and a sigma, which the steal job does not "
                "give it",
}


@dataclasses.dataclass
class Received:
  inputs01: np.ndarray          # [M, H, W, C] float32 in [0, 1]: what the copy trains on
  targets: np.ndarray           # [M, D] the answers (mapped / averaged / denoised as the attack does)
  accounts: List[str]           # every account the attack used
  note: str = ""


def check_attack(name: str) -> None:
  if name not in ATTACKS:
    raise ValueError(f"unknown theft attack {name!r}; choose from {ATTACKS}")


def receive(name: str, api, account: str, images01: np.ndarray, settings, *, to_input=None,
            batch_size: int = 64, seed: int = 0, proxy_clean: Optional[np.ndarray] = None,
            proxy_features: Optional[np.ndarray] = None) -> Received:
  """What attack `name` received from `api` for images01. proxy_clean: the denoiser's (clean proxy
  answers); proxy_features: [N, F] features of images01 from a public proxy encoder, for under_knee's
  selection (None: its pixels)."""
  check_attack(name)
  images01 = base._check_images(images01)  # pylint: disable=protected-access
  s = dict(settings)
  kw = dict(to_input=to_input, batch_size=batch_size)
  if name == "query_once":
    return Received(images01, base.QueryOnce(api, [account], **kw).steal(images01), [account])
  if name.startswith("repeat_"):
    strat = repeat.RepeatAverage(api, [account], copies=int(s["copies"]),
                                 perturbation=name[len("repeat_"):], seed=seed, **kw)
    return Received(images01, strat.steal(images01), [account], f"{s['copies']} copies averaged")
  if name in ("canary", "denoised"):
    switch = float(s["canary_switch_sigma"]) if name == "canary" else None
    strat = canary_lib.CanaryProbe(api, [account], canary=images01[-1], switch_sigma=switch,
                                   copies=int(s["copies"]), seed=seed, **kw)
    parts, read = [], []
    for start in range(0, len(images01), batch_size - 1):  # one row of every batch is the canary
      parts.append(strat.steal(images01[start:start + batch_size - 1]))
      read.append(strat.sigma_estimate)
    answers = np.concatenate(parts)
    if name == "canary":
      return Received(images01, answers, [account],
                      f"switched to {s['copies']} repeats: {strat.switched}")
    if proxy_clean is None:
      raise ValueError("the denoised attack needs proxy_clean (clean proxy answers)")
    # Batch t's answers were read at the estimate after batch t (the first batch has none of its own:
    # it takes the second's).
    if len(read) > 1:
      read[0] = read[1]
    cleaned = []
    for t, start in enumerate(range(0, len(images01), batch_size - 1)):
      den = denoise.LinearDenoiser(seed=seed).fit(proxy_clean, float(read[t]))
      cleaned.append(den.apply(answers[start:start + batch_size - 1]))
    return Received(images01, np.concatenate(cleaned), [account],
                    f"canary-read sigma: median {float(np.median(read)):.3g}")
  if name == "under_knee":
    if proxy_features is not None and len(proxy_features) != len(images01):
      raise ValueError(f"proxy_features has {len(proxy_features)} rows for {len(images01)} images")
    strat = budget.UnderKnee(api, [account], budget=min(int(s["under_knee_budget"]), len(images01)),
                             selection=str(s["selection"]), proxy_features=proxy_features,
                             seed=seed, **kw)
    answers = strat.steal(images01)
    what = "pixels" if proxy_features is None else "a public proxy encoder's features"
    return Received(images01[strat.selected], answers, [account],
                    f"{len(strat.selected)} of {len(images01)} images ({s['selection']} on {what})")
  if name == "augmentation_flood":
    strat = flood.AugmentationFlood(api, [account], weak=int(s["flood_weak"]),
                                    strong=int(s["flood_strong"]), seed=seed, **kw)
    views, answers = strat.flood(images01)
    return Received(views, answers, [account], f"{s['flood_weak']} weak + {s['flood_strong']} strong "
                    "views per image")
  if name == "random_noise":
    strat = flood.RandomNoise(api, [account], count=int(s["noise_count"]), seed=seed, **kw)
    noise, noise_answers = strat.flood(images01)
    answers = strat.send(images01)
    return Received(np.concatenate([noise, images01]), np.concatenate([noise_answers, answers]),
                    [account], f"{s['noise_count']} noise images first")
  # sybil_mapper / account_rotation
  overlap = min(int(s["overlap"]), len(images01))
  if name == "sybil_mapper":
    strat = sybil.SybilMapper(api, [account, f"{account}~2"], overlap=overlap,
                              alignment=str(s["alignment"]), seed=seed, **kw)
  else:
    strat = sybil.AccountRotation(api, [account], per_account=int(s["per_account"]), overlap=overlap,
                                  alignment=str(s["alignment"]), seed=seed, **kw)
  answers = strat.steal(images01)
  return Received(images01, answers, list(strat.accounts),
                  f"{len(strat.accounts)} accounts, overlap {overlap}, {s['alignment']} alignment")
