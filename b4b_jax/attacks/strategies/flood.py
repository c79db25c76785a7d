"""Inputs that are cheap for the thief: augmentation floods and random noise.

  AugmentationFlood  each image sent as `views` weak (flip + small crop) and `strong` (SimCLR: crop,
                     colour jitter, grey, blur; attacks.augment) views; the (view, answer) pairs are
                     the stealing set. Under per-query noise the weak views of one image average like
                     near-duplicates; under B4B the strong views spread over many buckets (coverage).
  RandomNoise        uniform-noise images: no data needed, but (as the paper observes) they occupy
                     buckets natural images never reach.
Both return (inputs sent, answers); steal(images) returns the per-image mean over its views.
"""
import jax
import numpy as np

from b4b_jax.attacks import augment
from b4b_jax.attacks.strategies import base
from b4b_jax.attacks.strategies import perturb as perturb_lib


class AugmentationFlood(base.Strategy):
  """Args (besides Strategy's): weak views, strong views per image, seed."""
  name = "augmentation_flood"

  def __init__(self, api, accounts, *, weak: int = 4, strong: int = 4, seed: int = 0, **kwargs):
    super().__init__(api, accounts, **kwargs)
    if weak < 0 or strong < 0 or weak + strong < 1:
      raise ValueError(f"need at least one view per image, got weak={weak}, strong={strong}")
    self.weak, self.strong, self.seed = weak, strong, seed

  def views(self, images01) -> np.ndarray:
    """[weak + strong, M, H, W, C] views of each image."""
    images01 = base._check_images(images01)  # pylint: disable=protected-access
    rng = np.random.default_rng(self.seed)
    out = [perturb_lib.perturb_images("crop_flip", images01, rng) for _ in range(self.weak)]
    key = jax.random.key(self.seed)
    for i in range(self.strong):
      out.append(np.asarray(augment.simclr_augment(jax.random.fold_in(key, i), images01,
                                                   images01.shape[1]), np.float32))
    return np.stack(out)

  def flood(self, images01):
    """(views [V*M, H, W, C], answers [V*M, D])."""
    v = self.views(images01)
    flat = v.reshape((-1,) + v.shape[2:])
    return flat, self.send(flat)

  def steal(self, images01):
    n = len(images01)
    _, answers = self.flood(images01)
    return answers.reshape(self.weak + self.strong, n, -1).mean(0)


class RandomNoise(base.Strategy):
  """Sends `count` uniform-noise images shaped like the given ones (seeded)."""
  name = "random_noise"

  def __init__(self, api, accounts, *, count: int = 256, seed: int = 0, **kwargs):
    super().__init__(api, accounts, **kwargs)
    if count < 1:
      raise ValueError(f"count must be >= 1, got {count}")
    self.count, self.seed = count, seed

  def flood(self, like_images01):
    shape = (self.count,) + tuple(np.asarray(like_images01).shape[1:])
    noise = np.random.default_rng(self.seed).uniform(0, 1, size=shape).astype(np.float32)
    return noise, self.send(noise)

  def steal(self, images01):
    """The answers to the images themselves (the noise phase only spends budget and coverage)."""
    self.flood(images01)
    return self.send(images01)
