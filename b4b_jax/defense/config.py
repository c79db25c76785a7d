"""Defense configuration: `defense_config(preset, **overrides)` and its validation.

Every number of the defense lives here (the cost hyperparameters are config, not constants), so an
experiment records exactly which defense it ran through `config.to_json()`.
"""
from typing import NamedTuple, Optional

import ml_collections
import numpy as np
from ml_collections import config_dict

from b4b_jax.defense import cost

TRANSFORMS = ("identity", "diag_affine", "dense_affine", "pad_shuffle", "affine_pad_shuffle", "binary")
# Transforms whose per-user parameters are a rep_dim x out_dim matrix (the others are O(rep_dim)).
MATRIX_TRANSFORMS = ("dense_affine", "binary")
INVERTIBLE_TRANSFORMS = ("identity", "diag_affine", "dense_affine", "pad_shuffle", "affine_pad_shuffle")
SIGMA_FROM = ("after", "before")
MAX_HYPERPLANES = 24  # 2^24 buckets x P projections: 2 MiB of occupancy bits per projection per user.
PRESET_NAMES = ("simsiam", "dino", "none")
NOISE_KEYINGS = ("per_query", "per_input")
# Hardening fields (hardened.py), optional in a config so configs and checkpoints written before they
# existed still load; absent = these defaults = the paper's B4B.
HARDENING_DEFAULTS = {"noise_keying": "per_query", "fine_code_bits": 16, "fine_codes": 4,
                      "sigma_level_ratio": 2.0, "image_weight": 0.0, "image_grid": 4,
                      "image_lengthscale": 0.5, "image_features": 256,
                      "repeat_charge": 0.0}
# The full hardened defense (`defense_config(preset, hardened=True)`): the strongest the project has
# (docs/defense.md "The hardened preset"). Noise keyed per (account, input, sigma level), all of its
# variance image-keyed (w = 1, RBF lengthscale 0.3 over a flip-invariant 4x4 thumbnail, 256 features:
# tuned so 1-pixel shifts, JPEG and crop+flip averaged 100x gain <= 1.15x on the demo's victim), and
# repeats charged as one new bucket each (without the charge a canary reads its sigma level within 2x
# for free; with it the read-out costs coverage).
HARDENED = {"noise_keying": "per_input", "fine_code_bits": 16, "fine_codes": 4,
            "sigma_level_ratio": 2.0, "image_weight": 1.0, "image_grid": 4, "image_lengthscale": 0.3,
            "image_features": 256, "repeat_charge": 0.25}
MAX_FINE_CODE_BITS = 24  # the per-account set of seen codes is 2^bits bits (16 bits: 8 KiB)
# Resource bounds that configs written before them may lack (absent = this default; see noise_cache_mib).
RESOURCE_DEFAULTS = {"noise_cache_mib": 512.0}


def defense_config(preset: str = "simsiam", *, hardened: bool = False,
                   **overrides) -> ml_collections.ConfigDict:
  """The B4B defense settings.

  Args:
    preset: "simsiam" (lam 1e-6, alpha 1, beta 80 %), "dino" (lam 1e-6, alpha 1000, beta 60 %) or "none"
      (defense disabled: clean representations, no transform; coverage is still counted so experiments
      can plot it; the cost fields keep the SimSiam values).
    hardened: False (default) = the paper's B4B, bit for bit; True = the full hardened defense, the
      HARDENED fields (per_input keying, image-keyed noise, repeat_charge 0.25) on the preset's cost.
      Overrides apply on top (e.g. `hardened=True, repeat_charge=0.0` is the no-charge ablation).
    **overrides: any field below, e.g. `transform="diag_affine"`, `static_sigma=0.1`.

  Fields:
    enabled: False = plain undefended API (returns clean representations, identity transform), but
      coverage and query counts are still tracked.
    num_projections (P), num_hyperplanes (K): LSH with P independent projections of K hyperplanes, 2^K
      buckets each; coverage is the mean over projections of the occupied fraction, in percent.
    lam, alpha, beta: cost function (see `cost.noise_std`); beta in percent.
    sigma_from: "after" (default; the noise of a batch uses the user's coverage once that batch has been
      counted, as the original code) or "before" (coverage before the batch, so a fresh user's first
      batch is returned without noise).
    static_sigma: None = B4B cost; a float = constant noise of that std for everyone (paper Table 6).
    transform: per-user transform, one of TRANSFORMS, applied after the noise.
    pad_dim: constants appended by the pad_shuffle transforms (the original used 1536).
    binary_ratio: the binary transform returns floor(binary_ratio * rep_dim) bits.
    debinarize: binary outputs 0 -> U(0, 0.5], 1 -> U(0.5, 1] (fresh noise on every query).
    seed: the server's master seed: LSH hyperplanes, per-user transforms and noise all derive from it.
    hash_center: None (the paper: hyperplanes through the origin) or a list of rep_dim floats c that is
      subtracted before hashing, bucket bits `(x - c) @ R_p > 0`. Post-ReLU features (SimSiam, any
      ResNet) live in one orthant, where origin hyperplanes cut few cells and every query set looks
      alike; centring on the mean of the server's own representations (never on a user's queries)
      restores the contrast between narrow and diverse query sets. Server-side and secret like R_p.
    noise_keying: "per_query" (the paper: a fresh draw for every query, so repeats average away) or
      "per_input" (hardened.py: the draw is keyed by the account, a fine LSH code of the clean
      representation and the account's quantised sigma level, so repeats and near-duplicates get the
      same noise while the level holds; sigma is rounded up to a power of sigma_level_ratio).
    fine_code_bits, fine_codes: per_input only: the noise is the normalised sum of `fine_codes`
      independent draws, each keyed by a `fine_code_bits`-bit sign code (hyperplanes through
      hash_center when set), so one flipped code changes only 1/fine_codes of the noise variance.
    sigma_level_ratio: per_input only: ratio r > 1 between sigma levels (see docs/defense.md for the
      bound it gives on what differencing answers across levels reveals).
    image_weight, image_grid, image_lengthscale, image_features: per_input only, image queries only
      (hardened.image_noise): a share image_weight in [0, 1] of the noise variance is a smooth secret
      function of the image itself (a Gaussian-process draw per account and sigma level over a
      flip-invariant image_grid x image_grid grayscale descriptor, random features of an RBF kernel of
      lengthscale image_lengthscale), so 1-pixel shifts, JPEG re-encodings and small crops/flips get
      nearly the same noise; 0 (default) = the fine codes alone.
    repeat_charge: per_input only: every answer whose seen code (all fine codes, hashed) the account
      had already been answered for (a repeat, or a near-duplicate that got the same noise: no new
      coverage) is charged as `repeat_charge` newly occupied buckets per projection; sigma comes from min(100, coverage + 100 repeat_charge repeats / 2^K).
      0 (default) = only flagged (hardened.provider_stats), never charged.
    transform_cache_mib: device memory (MiB) for the per-user matrices of dense_affine and binary (an
      LRU of whole users; 16 MiB per user at D=2048, so the default 512 keeps 31): also the most
      distinct users one call may hold. A resource bound, not a defense setting (results never depend
      on it); the O(D) transforms ignore it.
    noise_cache_mib: per_input with image_weight > 0 only: device memory (MiB) for the image-keyed
      noise's Gaussian matrices W, one per (account, sigma level), kept so that a returning account
      at the same level reads its W instead of drawing it again (noise_cache.py; 2 MiB each at
      image_features 256, D=2048, so the default 512 keeps 256). 0 = none. A resource bound, not a
      defense setting (results never depend on it).
  """
  if preset not in PRESET_NAMES:
    raise ValueError(f"unknown defense preset {preset!r}; expected one of {PRESET_NAMES}")
  costs = cost.PRESETS["dino" if preset == "dino" else "simsiam"]
  config = ml_collections.ConfigDict()
  config.enabled = preset != "none"
  config.num_projections = 20
  config.num_hyperplanes = 12
  config.lam = costs["lam"]
  config.alpha = costs["alpha"]
  config.beta = costs["beta"]
  config.sigma_from = "after"
  config.static_sigma = config_dict.placeholder(float)
  config.transform = "identity"
  config.pad_dim = 1536
  config.binary_ratio = 2.0
  config.debinarize = False
  config.seed = 0
  config.hash_center = None
  config.transform_cache_mib = 512.0
  config.update(RESOURCE_DEFAULTS)
  config.update(HARDENING_DEFAULTS)
  if hardened:
    config.update(HARDENED)
  unknown = sorted(set(overrides) - set(config.keys()))
  if unknown:
    raise ValueError(f"unknown defense config field(s) {unknown}; known: {sorted(config.keys())}")
  for key, value in overrides.items():
    if key == "static_sigma" and value is not None:
      value = float(value)
    try:
      config[key] = value
    except TypeError as e:  # ConfigDict's type safety, e.g. a float for the integer K
      raise ValueError(f"defense config: {key}: {e}") from None
  validate_config(config)
  return config


def validate_config(config) -> None:
  """Raises ValueError naming the first invalid field of a defense config."""
  required = ("enabled", "num_projections", "num_hyperplanes", "lam", "alpha", "beta", "sigma_from",
              "static_sigma", "transform", "pad_dim", "binary_ratio", "debinarize", "seed",
              "hash_center", "transform_cache_mib")
  missing = [k for k in required if k not in config]
  if missing:
    raise ValueError(f"defense config misses field(s) {missing}")
  known = set(required) | set(HARDENING_DEFAULTS) | set(RESOURCE_DEFAULTS)
  unknown = sorted(set(config.keys()) - known)
  if unknown:  # e.g. a typo set after creation: cfg.lamda = ...
    raise ValueError(f"unknown defense config field(s) {unknown}; known: {sorted(known)}")

  def number(name):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, (int, float)):
      raise ValueError(f"defense config: {name} must be a number, got {value!r}")
    if value != value or value in (float("inf"), float("-inf")):
      raise ValueError(f"defense config: {name} must be finite, got {value!r}")
    return value

  def integer(name):
    value = config[name]
    if isinstance(value, bool) or not isinstance(value, int):
      raise ValueError(f"defense config: {name} must be an integer, got {value!r}")
    return value

  lam, alpha, beta = number("lam"), number("alpha"), number("beta")
  if lam <= 0:
    raise ValueError(f"defense config: lam must be > 0, got {lam}")
  if alpha <= lam:
    raise ValueError(f"defense config: alpha must be > lam, got alpha={alpha}, lam={lam}")
  if beta <= 0:
    raise ValueError(f"defense config: beta must be > 0 (percent), got {beta}")
  k = integer("num_hyperplanes")
  if not 1 <= k <= MAX_HYPERPLANES:
    raise ValueError(f"defense config: num_hyperplanes (K) must be in [1, {MAX_HYPERPLANES}], got {k}")
  p = integer("num_projections")
  if p < 1:
    raise ValueError(f"defense config: num_projections (P) must be >= 1, got {p}")
  if config.sigma_from not in SIGMA_FROM:
    raise ValueError(f"defense config: sigma_from must be one of {SIGMA_FROM}, got "
                     f"{config.sigma_from!r}")
  if config.static_sigma is not None:
    s = number("static_sigma")
    if s < 0:
      raise ValueError(f"defense config: static_sigma must be >= 0 or None, got {s}")
  if config.transform not in TRANSFORMS:
    raise ValueError(f"defense config: unknown transform {config.transform!r}; expected one of "
                     f"{TRANSFORMS}")
  if integer("pad_dim") < 0:
    raise ValueError(f"defense config: pad_dim must be >= 0, got {config.pad_dim}")
  if number("binary_ratio") <= 0:
    raise ValueError(f"defense config: binary_ratio must be > 0, got {config.binary_ratio}")
  for name in ("enabled", "debinarize"):
    if not isinstance(config[name], bool):
      raise ValueError(f"defense config: {name} must be True or False, got {config[name]!r}")
  if number("transform_cache_mib") <= 0:
    raise ValueError(f"defense config: transform_cache_mib must be > 0, got "
                     f"{config.transform_cache_mib}")
  if "noise_cache_mib" in config and number("noise_cache_mib") < 0:
    raise ValueError(f"defense config: noise_cache_mib must be >= 0, got {config.noise_cache_mib}")
  seed = integer("seed")
  if not 0 <= seed < 2**32:  # jax.random.key keeps only 32 bits of a seed unless x64 is enabled.
    raise ValueError(f"defense config: seed must be in [0, 2^32), got {seed}")
  if config.hash_center is not None:
    center = np.asarray(config.hash_center, dtype=np.float64) if _is_number_list(
        config.hash_center) else None
    if center is None or center.ndim != 1 or not np.all(np.isfinite(center)):
      raise ValueError("defense config: hash_center must be None or a list of finite numbers")
  _validate_hardening(config)


def noise_cache_mib(config) -> float:
  """config.noise_cache_mib, or its default for configs written before it existed."""
  return float(config["noise_cache_mib"] if "noise_cache_mib" in config else
               RESOURCE_DEFAULTS["noise_cache_mib"])


def hardening(config) -> dict:
  """The hardening fields of `config`, defaults filled in for configs written before they existed."""
  return {k: config[k] if k in config else v for k, v in HARDENING_DEFAULTS.items()}


def _validate_hardening(config) -> None:
  h = hardening(config)
  if h["noise_keying"] not in NOISE_KEYINGS:
    raise ValueError(f"defense config: noise_keying must be one of {NOISE_KEYINGS}, got "
                     f"{h['noise_keying']!r}")
  for name, low, high in (("fine_code_bits", 1, MAX_FINE_CODE_BITS), ("fine_codes", 1, 64)):
    v = h[name]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
      raise ValueError(f"defense config: {name} must be an integer in [{low}, {high}], got {v!r}")
  r = h["sigma_level_ratio"]
  if isinstance(r, bool) or not isinstance(r, (int, float)) or not 1.0 < r < float("inf"):
    raise ValueError(f"defense config: sigma_level_ratio must be a finite number > 1, got {r!r}")
  w = h["image_weight"]
  if isinstance(w, bool) or not isinstance(w, (int, float)) or not 0.0 <= w <= 1.0:
    raise ValueError(f"defense config: image_weight must be a number in [0, 1], got {w!r}")
  for name, low, high in (("image_grid", 2, 64), ("image_features", 8, 4096)):
    v = h[name]
    if isinstance(v, bool) or not isinstance(v, int) or not low <= v <= high:
      raise ValueError(f"defense config: {name} must be an integer in [{low}, {high}], got {v!r}")
  rc = h["repeat_charge"]
  if isinstance(rc, bool) or not isinstance(rc, (int, float)) or not 0.0 <= rc < float("inf"):
    raise ValueError(f"defense config: repeat_charge must be a finite number >= 0, got {rc!r}")
  if rc > 0 and h["noise_keying"] != "per_input":
    raise ValueError("defense config: repeat_charge > 0 needs noise_keying='per_input' (only that mode "
                     "tracks repeats)")
  ell = h["image_lengthscale"]
  if isinstance(ell, bool) or not isinstance(ell, (int, float)) or not 0.0 < ell < float("inf"):
    raise ValueError(f"defense config: image_lengthscale must be a finite number > 0, got {ell!r}")


def _is_number_list(value) -> bool:
  return isinstance(value, (list, tuple)) and all(
      isinstance(v, (int, float)) and not isinstance(v, bool) for v in value)


def out_dim(config, rep_dim: int) -> int:
  """Dimension of what the API returns for representations of dimension `rep_dim`."""
  if not config.enabled:
    return rep_dim
  if config.transform in ("pad_shuffle", "affine_pad_shuffle"):
    return rep_dim + config.pad_dim
  if config.transform == "binary":
    return binary_dim(config, rep_dim)
  return rep_dim


def binary_dim(config, rep_dim: int) -> int:
  m = int(config.binary_ratio * rep_dim)
  if m < 1:
    raise ValueError(f"binary transform: binary_ratio * rep_dim = {config.binary_ratio} * {rep_dim} "
                     "gives no output bits")
  return m


class Settings(NamedTuple):
  """The static (hashable) view of a validated config for one representation dimension."""
  enabled: bool
  num_projections: int
  num_hyperplanes: int
  rep_dim: int
  out_dim: int
  lam: float
  alpha: float
  beta: float
  sigma_from: str
  static_sigma: Optional[float]
  transform: str
  pad_dim: int
  binary_dim: int
  debinarize: bool
  seed: int
  centered: bool
  noise_keying: str = "per_query"
  fine_code_bits: int = 16
  fine_codes: int = 4
  sigma_level_ratio: float = 2.0
  image_weight: float = 0.0
  image_grid: int = 4
  image_lengthscale: float = 0.5
  image_features: int = 256
  repeat_charge: float = 0.0


def settings(config, rep_dim: int) -> Settings:
  validate_config(config)
  if isinstance(rep_dim, bool) or not isinstance(rep_dim, (int, np.integer)) or rep_dim < 1:
    raise ValueError(f"rep_dim must be a positive integer, got {rep_dim!r}")
  rep_dim = int(rep_dim)
  if config.hash_center is not None and len(config.hash_center) != rep_dim:
    raise ValueError(f"defense config: hash_center has {len(config.hash_center)} values, the "
                     f"representations have dimension {rep_dim}")
  return Settings(
      enabled=bool(config.enabled), num_projections=int(config.num_projections),
      num_hyperplanes=int(config.num_hyperplanes), rep_dim=rep_dim, out_dim=out_dim(config, rep_dim),
      lam=float(config.lam), alpha=float(config.alpha), beta=float(config.beta),
      sigma_from=str(config.sigma_from),
      static_sigma=None if config.static_sigma is None else float(config.static_sigma),
      transform=str(config.transform), pad_dim=int(config.pad_dim),
      binary_dim=binary_dim(config, rep_dim) if config.transform == "binary" else 0,
      debinarize=bool(config.debinarize), seed=int(config.seed),
      centered=config.hash_center is not None, **_hardening_settings(config))


def _hardening_settings(config) -> dict:
  h = hardening(config)
  return {"noise_keying": str(h["noise_keying"]), "fine_code_bits": int(h["fine_code_bits"]),
          "fine_codes": int(h["fine_codes"]), "sigma_level_ratio": float(h["sigma_level_ratio"]),
          "image_weight": float(h["image_weight"]), "image_grid": int(h["image_grid"]),
          "image_lengthscale": float(h["image_lengthscale"]),
          "image_features": int(h["image_features"]), "repeat_charge": float(h["repeat_charge"])}
