"""Job "attack_suite": adaptive attacks (b4b_jax.attacks.strategies) against paper-B4B and the hardened
defense (b4b_jax.defense.hardened), and the legit user's accuracy under each. See configs/attack_suite.py.

Defenses: paper (the published B4B, per-query noise), hardened (config.hardened: the full hardened
preset, b4b_jax.defense.HARDENED, repeat charge included) and, when config.no_charge_ablation, the
ablation hardened_no_charge (the same fields with repeat_charge 0). Two parts per seed:
  the error of the thief's targets (repeat-and-average curves, the canary's sigma read-out) against
    each defense;
  theft (config.theft): every attack of config.theft.attacks (strategies/received.py) sends the same
    stealing images from fresh accounts to none (no noise) and each defense; a small copy is trained on what it received (attacks/stolen_copy.py: the steal job's
    train step) and measured on held-out photo crops no attacker sent (evaluation/fidelity.py: the
    linear R^2, cosine and relative MSE to the victim's clean representation) and by a linear probe on digits embedded by the copy; beside it
    the attack's queries, its accounts' coverage and sigma, and the legit digits user's accuracy under
    the same defense.

Outputs in the workdir: results.json (everything, per seed), report.md (tables per attack x defense,
mean and range over seeds), error_ratio_vs_n.png, utility_theft_frontier.png (legit accuracy vs the
copies' linear R^2 to the victim, one point per attack, per defense), metrics.jsonl (stage "attack_suite").
"""
import contextlib
import os
import time

import ml_collections
from absl import logging
import numpy as np

from b4b_jax import data as data_lib
from b4b_jax import defense as defense_lib
from b4b_jax.attacks import stolen_copy
from b4b_jax.attacks import strategies
from b4b_jax.attacks.strategies import received as received_lib
from b4b_jax.defense import hardened
from b4b_jax.evaluation import embeddings
from b4b_jax.evaluation import fidelity as fidelity_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import similarity
from b4b_jax.evaluation import report as report_lib
from b4b_jax.utils import distributed
from b4b_jax.utils import files
from b4b_jax.utils import metrics as metrics_lib

DEFENSES = ("paper", "hardened")  # always run; "hardened_no_charge" (the ablation) when configured
NO_CHARGE = "hardened_no_charge"
FRONTIER_PNG = "utility_theft_frontier.png"
FIDELITY_KEYS = ("r2", "cosine", "rel_mse", "probe_top1")  # a copy's scores (evaluation/fidelity.py)


class Timings:
  """Wall and process CPU seconds per named phase, summed over repeats (results["seeds"][s]["timings"]):
  where the suite's time goes. CPU time counts every thread, so on a loaded machine it estimates the
  quiet cost better than wall time does."""

  def __init__(self):
    self.phases = {}

  @contextlib.contextmanager
  def __call__(self, phase: str):
    wall, cpu = time.perf_counter(), time.process_time()
    try:
      yield
    finally:
      row = self.phases.setdefault(phase, {"wall_s": 0.0, "cpu_s": 0.0})
      row["wall_s"] += time.perf_counter() - wall
      row["cpu_s"] += time.process_time() - cpu
      logging.info("attack_suite time: %s %.1f s wall, %.1f s CPU (phase total %.1f / %.1f)", phase,
                   time.perf_counter() - wall, time.process_time() - cpu, row["wall_s"], row["cpu_s"])


def theft_seeds(config) -> tuple:
  """The seeds whose theft rows run: config.theft.seeds (the copies' training is the suite's dearest
  part), or every seed when it is absent or empty."""
  chosen = tuple(int(s) for s in (config.theft.get("seeds") or ()))
  return chosen or tuple(int(s) for s in config.seeds)


def defenses(config) -> tuple:
  charges = float(config.hardened.get("repeat_charge", 0.0) or 0.0) > 0
  return DEFENSES + ((NO_CHARGE,) if charges and config.get("no_charge_ablation", False) else ())


def validate_config(config) -> None:
  ns = [int(n) for n in config.ns]
  if not ns or min(ns) < 1 or 1 not in ns:
    raise ValueError(f"ns must be positive and include 1 (the baseline), got {list(config.ns)}")
  for p in config.perturbations:
    if p not in strategies.PERTURBATIONS:
      raise ValueError(f"unknown perturbation {p!r}; expected one of {strategies.PERTURBATIONS}")
  if int(config.targets) < 1 or int(config.coverage_queries) < 0 or int(config.query_batch_size) < 2:
    raise ValueError("targets must be >= 1, coverage_queries >= 0 and query_batch_size >= 2")
  if not config.seeds:
    raise ValueError("seeds must name at least one seed")
  defense_lib.defense_config("simsiam", **config.hardened.to_dict())  # ValueError naming a bad field
  tc = config.get("theft")
  if tc is not None and tc.enabled:
    if not tc.attacks:
      raise ValueError("theft.attacks names no attack (set theft.enabled=False to skip theft)")
    stray = sorted(set(int(s) for s in (tc.get("seeds") or ())) - set(int(s) for s in config.seeds))
    if stray:
      raise ValueError(f"theft.seeds {stray} are not in seeds {tuple(config.seeds)}")
    for a in tc.attacks:
      received_lib.check_attack(a)
    if tc.selection not in strategies.SELECTIONS:
      raise ValueError(f"theft.selection {tc.selection!r}: expected one of {strategies.SELECTIONS}")
    if tc.alignment not in strategies.ALIGNMENTS:
      raise ValueError(f"theft.alignment {tc.alignment!r}: expected one of {strategies.ALIGNMENTS}")
    ints = {k: int(tc[k]) for k in ("images", "eval_images", "copies", "steps", "batch_size",
                                    "under_knee_budget", "noise_count", "overlap", "per_account",
                                    "proxy_images")}
    # eval_images: the linear R^2 fits on one half and scores the other, >= 2 rows each.
    small = [k for k, v in ints.items() if v < {"eval_images": 4, "images": 2, "overlap": 2,
                                                 "batch_size": 2}.get(k, 1)]
    if small:
      raise ValueError(f"theft fields {small} are too small ({ {k: ints[k] for k in small} })")
    if ints["per_account"] <= ints["overlap"]:
      raise ValueError(f"theft.per_account ({ints['per_account']}) must exceed theft.overlap "
                       f"({ints['overlap']})")
    if not float(tc.base_lr) > 0 or float(tc.canary_switch_sigma) < 0:
      raise ValueError("theft.base_lr must be > 0 and theft.canary_switch_sigma >= 0")
    strategies.robust_loss(tc.loss, np.zeros((2, 2), np.float32), np.ones((2, 2), np.float32))


def resolve_victim(config, workdir: str) -> str:
  """The encoder spec the suite attacks: config.encoder, or ("") the demo's trained victim, trained
  into config.demo_workdir (default <workdir>/demo) or reused from an earlier run there (the same
  helper as the serve job's)."""
  if config.encoder:
    return str(config.encoder)
  from b4b_jax.demo import pipeline  # pylint: disable=g-import-not-at-top
  encoder_dir, _ = pipeline.trained_victim(config.demo, str(config.demo_workdir), workdir)
  return encoder_dir


def run(config, workdir: str) -> dict:
  spec = resolve_victim(config, workdir)
  encoder = embeddings.resolve_encoder(spec, workdir=workdir, seed=0)
  size = int(encoder.manifest["preprocessing"]["input_size"])
  mean, std = data_lib.normalization(encoder)

  def to_input(images01):
    return data_lib.normalize(np.asarray(images01) * np.float32(255.0), mean, std)

  writer = metrics_lib.MetricsWriter(workdir)
  per_seed = {}
  for i, seed in enumerate(config.seeds):
    per_seed[str(seed)] = run_seed(config, encoder, to_input, size, int(seed))
    flat = {f"{d}/{a}/ratio_n{n}": v for d, attacks in per_seed[str(seed)]["attacks"].items()
            for a, r in attacks.items() for n, v in r.get("error_ratio", {}).items()}
    writer.write_scalars(i, flat, stage="attack_suite")
  writer.close()
  results = {"config": config.to_dict(), "encoder": spec, "input_size": size,
             "seeds": per_seed, "summary": summarise(per_seed)}
  if distributed.is_writer():  # multi-host: every process computed the same results; one writes
    files.atomic_write_json(os.path.join(workdir, "results.json"), results)
    files.atomic_write_text(os.path.join(workdir, "report.md"), render_report(results))
  plot(results, os.path.join(workdir, "error_ratio_vs_n.png"))
  if results["summary"].get("theft"):
    plot_frontier(results, os.path.join(workdir, FRONTIER_PNG))
  return results


# ------------------------------------------------------------------------------------------ one seed
def run_seed(config, encoder, to_input, size: int, seed: int) -> dict:
  timer = Timings()
  with timer("seed"):
    out = _run_seed(config, encoder, to_input, size, seed, timer)
  out["timings"] = timer.phases
  return out


def _run_seed(config, encoder, to_input, size: int, seed: int, timer: Timings) -> dict:
  bs = int(config.query_batch_size)
  n_cov, n_targets = int(config.coverage_queries), int(config.targets)
  photos, _ = data_lib.load_arrays("sklearn_photos", "query", image_size=size, limit=max(n_cov, 1),
                                   seed=seed)
  held_out, _ = data_lib.load_arrays("sklearn_photos", "test", image_size=size, limit=n_targets + 1,
                                     seed=seed)
  server, _ = data_lib.load_arrays("sklearn_photos", "train", image_size=size,
                                   limit=int(config.calibration.queries), seed=seed)
  coverage_images = photos[:n_cov].astype(np.float32) / 255
  targets = held_out[:n_targets].astype(np.float32) / 255
  canary_image = held_out[n_targets].astype(np.float32) / 255

  fn = encoder  # the Encoder itself: the API fuses its forward, weights as jit arguments
  clean_api = defense_lib.DefendedEncoder(fn, defense_lib.defense_config("none"), encoder.rep_dim)
  clean = strategies.QueryOnce(clean_api, ["reference"], to_input=to_input, batch_size=256)
  with timer("calibration+geometry"):
    clean_targets = clean.steal(targets).astype(np.float64)
    calib = calibrate(config, clean.steal(server.astype(np.float32) / 255), seed)
    out = {"calibration": {k: v for k, v in calib.items() if k != "center"}, "attacks": {},
           "canary": {}, "provider": {}, "legit": {},
           "geometry": geometry(config, clean, targets, clean_targets, calib["center"], seed)}

  if config.legit:
    train_x, train_y = data_lib.load_arrays("digits", "train", image_size=size)
    test_x, test_y = data_lib.load_arrays("digits", "test", image_size=size)
    if int(config.legit_limit):
      train_x, train_y = train_x[:int(config.legit_limit)], train_y[:int(config.legit_limit)]
    legit_reps = (clean.steal(train_x.astype(np.float32) / 255),
                  clean.steal(test_x.astype(np.float32) / 255))
    none = legit_lib.legit_user(legit_reps[0], train_y, legit_reps[1], test_y, defense_config=None,
                                probe_cfg=config.probe)
    out["legit"]["none"] = _legit_row(none)
  else:
    train_x = train_y = test_x = test_y = None

  apis = {}
  for name in defenses(config):
    cfg = defense_config(config, calib, seed, mode=name)
    api = defense_lib.DefendedEncoder(fn, cfg, encoder.rep_dim, capacity=16)
    ratio = float(cfg.sigma_level_ratio)
    attacks = {}
    with timer("error: query_once"):
      baseline = strategies.QueryOnce(api, ["query_once"], to_input=to_input, batch_size=bs)
      baseline.send(coverage_images)
      attacks["query_once"] = _errors({1: baseline.steal(targets)}, clean_targets, api, "query_once",
                                      ratio, name)
    for p in config.perturbations:
      account = f"repeat_{p}"
      logging.info("attack_suite: seed %d, %s defense, attack %s", seed, name, account)
      strat = strategies.RepeatAverage(api, [account], copies=max(int(n) for n in config.ns),
                                       perturbation=p, seed=seed, to_input=to_input, batch_size=bs)
      with timer("error: coverage phase"):
        strat.send(coverage_images)
      with timer("error: repeats"):
        attacks[account] = _errors(strat.steal_curve(targets, [int(n) for n in config.ns]),
                                   clean_targets, api, account, ratio, name)
    out["attacks"][name] = attacks
    if config.canary:
      with timer("error: canary"):
        out["canary"][name] = run_canary(api, coverage_images, canary_image, to_input, bs, ratio,
                                         name, seed)
    out["provider"][name] = hardened.provider_stats(api)
    apis[name] = api
    if config.legit:
      # Through images (api.query), so the hardened mode's image-keyed noise applies as it does for
      # the thieves (the representation path would key by the fine codes alone).
      with timer("legit"):
        row = legit_lib.legit_user_images(encoder, cfg, [(train_x, train_y)], [(test_x, test_y)],
                                          probe_cfg=config.probe, query_batch_size=bs)
      out["legit"][name] = _legit_row(row)
      # The cost leaves this narrow user almost noise free; these rows ask what the hardened keying
      # costs a legit user when there is noise: a constant sigma near m x per-dim std, snapped to a
      # power of sigma_level_ratio so both defenses apply exactly the same sigma and only the keying
      # differs (the rounding up costs at most a factor r more, on top; see docs/defense.md).
      # (Not for the no-charge ablation: under a static sigma the charge changes nothing.)
      for m in (config.legit_static_sigmas if name != NO_CHARGE else ()):
        static = defense_config(config, calib, seed, mode=name)
        r = float(config.hardened.sigma_level_ratio)
        with static.unlocked():
          static.static_sigma = float(r ** np.round(np.log(float(m) * calib["per_dim_std"]) / np.log(r)))
        defense_lib.validate_config(static)
        with timer("legit: static sigma"):
          row = legit_lib.legit_user_images(encoder, static, [(train_x, train_y)], [(test_x, test_y)],
                                            probe_cfg=config.probe, query_batch_size=bs)
        out["legit"][f"{name} sigma={float(m):g}std"] = _legit_row(row)
  if config.get("theft") is not None and config.theft.enabled and seed in theft_seeds(config):
    digits = (train_x, train_y, test_x, test_y) if config.legit else None
    out["theft"] = run_theft(config, encoder, to_input, size, seed, calib, clean, server, digits,
                             apis, timer)
  return out


# ------------------------------------------------------------------------------------------ theft
def run_theft(config, encoder, to_input, size: int, seed: int, calib: dict, clean, server,
              digits, apis: dict, timer: Timings) -> dict:
  """{defense: {attack: row}}: each attack's received pairs -> a trained copy -> its fidelity on held-out
  crops and its digits probe accuracy (module docstring). apis: {defense: the error part's API}, reused
  with fresh accounts (theft_<attack>) so its compiled calls serve both parts."""
  tc = config.theft
  n_steal, n_eval = int(tc.images), int(tc.eval_images)
  photos, _ = data_lib.load_arrays("sklearn_photos", "query", image_size=size, limit=n_steal, seed=seed)
  steal_images = photos.astype(np.float32) / 255
  # Held-out crops no attacker sends: the test split after the rows the error part uses as targets.
  skip = int(config.targets) + 1
  held, _ = data_lib.load_arrays("sklearn_photos", "test", image_size=size, limit=skip + n_eval,
                                 seed=seed)
  eval_uint8 = held[skip:]
  victim_eval = clean.steal(eval_uint8.astype(np.float32) / 255).astype(np.float64)
  if digits is None or digits[0] is None:
    train_x, train_y = data_lib.load_arrays("digits", "train", image_size=size)
    test_x, test_y = data_lib.load_arrays("digits", "test", image_size=size)
    if int(config.legit_limit):
      train_x, train_y = train_x[:int(config.legit_limit)], train_y[:int(config.legit_limit)]
  else:
    train_x, train_y, test_x, test_y = digits
  # The denoiser's proxy: the victim's clean answers on the server's other public crops (an oracle
  # proxy, the best any real proxy could do).
  proxy = clean.steal(server[:int(tc.proxy_images)].astype(np.float32) / 255)
  mean, std = data_lib.normalization(encoder)
  pre = dict(encoder.manifest["preprocessing"])
  settings = {k: tc[k] for k in received_lib.SETTINGS}
  # The untrained copy: the reference every trained copy must beat (a random ResNet's features already
  # probe digits well above chance). One compiled embedding serves every copy: weights as arguments.
  # The copy's init seed is offset so that a random victim of the same architecture (the offline
  # default random:resnet18_w0.125, seed 0) is never the copy's own starting point.
  init_seed = seed + int(tc.init_seed_offset)
  template = stolen_copy.initial_copy(str(tc.arch), encoder.rep_dim, preprocessing=pre, seed=init_seed)

  def measure(weights, scaler=None) -> dict:
    """The copy's scores; scaler: the TargetScaler it trained its targets with, undone on its outputs."""
    def embed(images):
      out = embeddings.embed_images(template, images, batch_size=256, params=weights)
      return out if scaler is None else scaler.undo(out)
    probe = linear_probe.run_probe(embed(train_x), train_y, embed(test_x), test_y, config.probe)
    copy_eval = embed(eval_uint8)
    return {**fidelity_lib.direct(copy_eval, victim_eval),
            "r2": fidelity_lib.split_linear_r2(copy_eval, victim_eval),
            "probe_top1": float(probe.test_top1_mean)}

  with timer("theft: measure"):
    out = {"untrained_copy": measure(template.params)}
    # under_knee's public proxy encoder: the thief's own untrained copy (a random-init ResNet anyone
    # can build); its k-means picks images that spread over the proxy's feature space, not pixels.
    proxy_features = embeddings.embed_images(template, photos, batch_size=256, params=template.params)
  for defense in ("none",) + defenses(config):
    if defense == "none":
      dc = config.defense
      cfg = defense_lib.defense_config(
          "none", num_projections=int(dc.num_projections), num_hyperplanes=int(dc.num_hyperplanes),
          hash_center=calib["center"], seed=seed + int(dc.seed_offset))
      api = defense_lib.DefendedEncoder(encoder, cfg, encoder.rep_dim, capacity=16)
    else:
      api = apis[defense]
    rows = {}
    for attack in tc.attacks:
      logging.info("attack_suite theft: seed %d, %s defense, attack %s", seed, defense, attack)
      t0 = time.time()
      with timer(f"theft: receive {attack}"):
        got = received_lib.receive(attack, api, f"theft_{attack}", steal_images, settings,
                                   to_input=to_input, batch_size=int(config.query_batch_size),
                                   seed=seed, proxy_clean=proxy, proxy_features=proxy_features)
      inputs = np.clip(np.round(got.inputs01 * 255), 0, 255).astype(np.uint8)
      try:
        scaler = stolen_copy.target_scaler(got.targets) if tc.standardize_targets else None
        targets = got.targets if scaler is None else scaler.apply(got.targets)
        with timer("theft: train copy"):
          copy, losses = stolen_copy.train_copy(
              inputs, targets, arch=str(tc.arch), preprocessing=pre, mean=mean, std=std,
              steps=int(tc.steps), batch_size=int(tc.batch_size), loss=str(tc.loss),
              base_lr=float(tc.base_lr), seed=init_seed)
        with timer("theft: measure"):
          measured_copy = measure(copy.params, scaler)
        measured = {**measured_copy, "loss_first": losses[0],
                    "loss_last": float(np.mean(losses[-max(1, len(losses) // 10):])), "diverged": False}
      except FloatingPointError as e:  # e.g. targets drowned in a charged sigma: reported, not hidden
        logging.warning("attack_suite theft: %s copy under %s diverged: %s", attack, defense, e)
        measured = {"cosine": float("nan"), "rel_mse": float("nan"), "r2": float("nan"),
                    "probe_top1": float("nan"),
                    "loss_first": float("nan"), "loss_last": float("nan"), "diverged": True}
      accounts = [{"account": a, "queries": api.num_queries(a), "coverage": api.coverage(a),
                   "sigma": float(api.sigma(a))} for a in got.accounts]
      rows[attack] = {
          "queries": int(sum(a["queries"] for a in accounts)), "accounts": accounts,
          "coverage_max": max(a["coverage"] for a in accounts),
          "sigma_max": max(a["sigma"] for a in accounts),
          "pairs": int(len(got.targets)), "note": got.note,
          "copy": measured, "seconds": time.time() - t0}
    out[defense] = rows
  return out


def geometry(config, clean, targets, clean_targets, center, seed: int) -> dict:
  """How far each perturbation moves the victim's (centred) representation, as an angle / pi, next to
  the angle between distinct targets: the fine codes key noise on this angle, so a perturbation that
  moves as far as a distinct input gets an independent draw (and a different clean answer)."""
  rng = np.random.default_rng(seed)
  base = clean_targets - np.asarray(center)

  def angles(a, b):
    cos = similarity.cosine_similarity(a, b)
    return np.arccos(np.clip(cos, -1, 1)) / np.pi

  out = {}
  if len(base) > 1:
    d = angles(base, np.roll(base, 1, axis=0))
    out["distinct"] = {"median": float(np.median(d)), "min": float(d.min())}
  for p in config.perturbations:
    moved = clean.steal(strategies.perturb_images(p, targets, rng)).astype(np.float64) - center
    a = angles(base, moved)
    out[p] = {"median": float(np.median(a)), "max": float(a.max())}
  return out


def calibrate(config, server_reps: np.ndarray, seed: int) -> dict:
  """The cost from the server's own representations (never a user's): hash_center = their mean, alpha =
  alpha_scale x their per-dimension std, lam = lam_ratio x alpha, beta = beta_fraction x their coverage."""
  cc, dc = config.calibration, config.defense
  center = server_reps.mean(0)
  alpha = float(cc.alpha_scale) * float(server_reps.std(0).mean())
  counting = defense_lib.defense_config(
      "none", num_projections=int(dc.num_projections), num_hyperplanes=int(dc.num_hyperplanes),
      hash_center=[float(v) for v in center], seed=seed + int(dc.seed_offset))
  api = defense_lib.DefendedEncoder(None, counting, server_reps.shape[1], capacity=1)
  api.query_representations("server", server_reps)
  coverage = api.coverage("server")
  if coverage <= 0:
    raise ValueError("calibration: the server's own representations cover no bucket")
  return {"center": [float(v) for v in center], "alpha": alpha, "lam": float(cc.lam_ratio) * alpha,
          "beta": float(cc.beta_fraction) * coverage, "server_coverage": coverage,
          "per_dim_std": float(server_reps.std(0).mean())}


def defense_config(config, calib: dict, seed: int, *, mode: str) -> ml_collections.ConfigDict:
  """mode: "paper" (the published B4B), "hardened" (config.hardened: the full preset by default) or
  "hardened_no_charge" (config.hardened with repeat_charge 0: the ablation)."""
  dc = config.defense
  extra = config.hardened.to_dict() if mode != "paper" else {}
  if mode == NO_CHARGE:
    extra["repeat_charge"] = 0.0
  return defense_lib.defense_config(
      "simsiam", num_projections=int(dc.num_projections), num_hyperplanes=int(dc.num_hyperplanes),
      lam=calib["lam"], alpha=calib["alpha"], beta=calib["beta"], hash_center=calib["center"],
      seed=seed + int(dc.seed_offset), **extra)


def applied_sigma(sigma: float, ratio: float, defense: str) -> float:
  if defense == "paper":
    return float(sigma)
  return float(hardened.sigma_level(np.float32(sigma), ratio)[1])


def _errors(curve: dict, clean: np.ndarray, api, account: str, ratio: float, defense: str) -> dict:
  """RMS error per dimension of each averaged target vs the clean answer, and err(1)/err(N)."""
  err = {int(n): float(np.sqrt(np.mean((np.asarray(t, np.float64) - clean) ** 2)))
         for n, t in curve.items()}
  sigma = api.sigma(account)
  return {"error": err, "error_ratio": {n: err[1] / e if e > 0 else float("inf")
                                        for n, e in err.items()},
          "coverage": api.coverage(account), "sigma": sigma,
          "applied_sigma": applied_sigma(sigma, ratio, defense), "queries": api.num_queries(account)}


def run_canary(api, images, canary, to_input, bs: int, ratio: float, defense: str, seed: int) -> dict:
  """The coverage phase sent with a canary in every batch; the thief's sigma estimates vs the truth."""
  strat = strategies.CanaryProbe(api, ["canary"], canary=canary, to_input=to_input, batch_size=bs,
                                 level_ratio=ratio, seed=seed)
  true, applied = [], []
  for start in range(0, len(images), bs - 1):
    strat.query_batch(images[start:start + bs - 1])
    true.append(api.sigma("canary"))
    applied.append(applied_sigma(true[-1], ratio, defense))
  true = np.asarray(true[1:])  # estimates start at the second batch
  summary = {"batches": int(len(true)), "final_true_sigma": float(true[-1]) if len(true) else 0.0,
             "coverage": api.coverage("canary"), "queries": api.num_queries("canary")}
  for name, est in (("naive", strat.naive_estimates), ("aware", strat.aware_estimates)):
    est = np.asarray(est, np.float64)
    ok = true > 0
    with np.errstate(divide="ignore"):
      factor = np.where(est[ok] > 0, np.maximum(est[ok] / true[ok], true[ok] / est[ok]), np.inf)
    summary[name] = {"median_factor": float(np.median(factor)) if factor.size else None,
                     "share_within_1.25x": float(np.mean(factor <= 1.25)) if factor.size else None,
                     "share_within_2x": float(np.mean(factor <= 2.0)) if factor.size else None,
                     "final_estimate": float(est[-1]) if est.size else None}
  return summary


def _legit_row(result: dict) -> dict:
  return {"test_top1_mean": float(result["test_top1_mean"]),
          "test_top1_std": float(result["test_top1_std"]),
          "sigma": float(result["account"]["sigma"] or 0.0),
          "coverage": result["account"]["coverage"]}


# ------------------------------------------------------------------------------------------ summary
def summarise(per_seed: dict) -> dict:
  """Mean, min and max over seeds of every ratio, canary share and legit drop."""
  def stats(values):
    v = np.asarray(values, np.float64)
    return {"mean": float(v.mean()), "min": float(v.min()), "max": float(v.max())}

  seeds = list(per_seed.values())
  out = {"error_ratio": {}, "canary": {}, "legit_drop": {}, "repeat_share": {}}
  for d in seeds[0]["attacks"]:
    for a in seeds[0]["attacks"].get(d, {}):
      for n in seeds[0]["attacks"][d][a]["error_ratio"]:
        out["error_ratio"].setdefault(d, {}).setdefault(a, {})[str(n)] = stats(
            [s["attacks"][d][a]["error_ratio"][n] for s in seeds])
    if seeds[0]["canary"].get(d):
      for est in ("naive", "aware"):
        out["canary"].setdefault(d, {})[est] = {
            k: stats([s["canary"][d][est][k] for s in seeds])
            for k in ("median_factor", "share_within_1.25x", "share_within_2x")}
    if "none" in seeds[0]["legit"] and d in seeds[0]["legit"]:
      out["legit_drop"][d] = stats([s["legit"]["none"]["test_top1_mean"] - s["legit"][d]["test_top1_mean"]
                                    for s in seeds])
    out["repeat_share"][d] = {a: stats([s["provider"][d][a].get("repeat_share", float("nan"))
                                        for s in seeds]) for a in seeds[0]["provider"].get(d, {})}
  thefts = [s for s in seeds if s.get("theft")]  # theft runs for config.theft.seeds only
  if thefts:
    out["theft"] = {}
    out["untrained_copy"] = {k: stats([s["theft"]["untrained_copy"][k] for s in thefts])
                             for k in FIDELITY_KEYS}
    for d, attacks in thefts[0]["theft"].items():
      if d == "untrained_copy":
        continue
      for a in attacks:
        rows = [s["theft"][d][a] for s in thefts]
        out["theft"].setdefault(d, {})[a] = {
            **{k: stats([r["copy"][k] for r in rows]) for k in FIDELITY_KEYS},
            **{k: stats([r[k] for r in rows]) for k in ("queries", "coverage_max", "sigma_max")}}
    out["legit_top1"] = {d: stats([s["legit"][d]["test_top1_mean"] for s in thefts])
                         for d in thefts[0]["theft"] if d in thefts[0]["legit"]}
    out["seconds"] = {"theft": stats([sum(r["seconds"] for d, rows in s["theft"].items()
                                          if d != "untrained_copy" for r in rows.values())
                                      for s in thefts])}
  for d in ("hardened", NO_CHARGE):
    if "paper" in out["legit_drop"] and d in out["legit_drop"]:
      out["legit_drop"][f"{d}_minus_paper"] = stats(
          [s["legit"]["paper"]["test_top1_mean"] - s["legit"][d]["test_top1_mean"] for s in seeds])
  for key in seeds[0]["legit"]:
    if key.startswith("paper sigma="):
      other = "hardened" + key[len("paper"):]
      for k in (key, other):
        out["legit_drop"][k] = stats([s["legit"]["none"]["test_top1_mean"] - s["legit"][k]["test_top1_mean"]
                                      for s in seeds])
      out["legit_drop"]["hardened_minus_paper" + key[len("paper"):]] = stats(
          [s["legit"][key]["test_top1_mean"] - s["legit"][other]["test_top1_mean"] for s in seeds])
  return out


def _fmt(s) -> str:
  return f"{s['mean']:.3g} [{s['min']:.3g}, {s['max']:.3g}]"


def render_report(results: dict) -> str:
  summary, seeds = results["summary"], list(results["seeds"])
  lines = [f"# Attack suite ({results['encoder']}, {results['input_size']} px, seeds {seeds})", "",
           "err(1)/err(N): error of the thief's target (mean of N answers) vs the clean answer, "
           "relative to one answer; mean [min, max] over seeds.", ""]
  ns = [str(int(n)) for n in results["config"]["ns"]]
  rows = []
  for a in summary["error_ratio"]["paper"]:
    for d in summary["error_ratio"]:
      by_n = summary["error_ratio"][d][a]
      rows.append([a, d] + [_fmt(by_n[n]) if n in by_n else "" for n in ns])
  lines += [report_lib.markdown_table(["attack", "defense"] + [f"N={n}" for n in ns], rows), ""]
  first = results["seeds"][seeds[0]]
  rows = [[a, d, f"{r['coverage']:.1f}", f"{r['sigma']:.3g}", f"{r['applied_sigma']:.3g}",
           str(r["queries"]), f"{r['error'][1]:.3g}"]
          for d in first["attacks"] for a, r in first["attacks"][d].items()]
  lines += [f"Accounts after the attack (seed {seeds[0]}):", "",
            report_lib.markdown_table(["account", "defense", "coverage %", "cost sigma",
                                       "applied sigma", "queries", "err(1)"], rows), ""]
  if summary["canary"]:
    rows = [[d, est, _fmt(v["median_factor"]), _fmt(v["share_within_1.25x"]), _fmt(v["share_within_2x"])]
            for d, ests in summary["canary"].items() for est, v in ests.items()]
    lines += ["Canary: the thief's sigma estimate vs the account's true (cost) sigma per batch "
              "(factor = max(est/true, true/est); an estimate of 0 is an infinite factor).", "",
              report_lib.markdown_table(["defense", "estimator", "median factor", "share within 1.25x",
                                         "share within 2x"], rows), ""]
  if summary["legit_drop"]:
    rows = [[k, _fmt(v)] for k, v in summary["legit_drop"].items()]
    lines += ["Legit digits user: accuracy drop in points (none - defense; hardened_minus_paper = paper "
              "accuracy - hardened accuracy); 'sigma=m std' rows replace the cost by a constant sigma "
              "of about m per-dimension stds of the server's representations, snapped to a power of "
              "sigma_level_ratio (both defenses apply the same sigma; only the keying differs).",
              "", report_lib.markdown_table(["defense", "drop (points)"], rows), ""]
  geo = first.get("geometry", {})
  if geo:
    rows = [[k, f"{v['median']:.3f}", f"{v.get('max', v.get('min')):.3f}"] for k, v in geo.items()]
    lines += [f"How far each perturbation moves the clean representation (angle / pi, centred; seed "
              f"{seeds[0]}); 'distinct' = between different targets (median, min):", "",
              report_lib.markdown_table(["perturbation", "median", "max"], rows), ""]
  if summary.get("theft"):
    lines += theft_report(results)
  phases = sorted({p for sd in results["seeds"].values() for p in sd.get("timings", {})})
  if phases:
    rows = [[p] + [("{wall_s:.0f} / {cpu_s:.0f}".format(**results["seeds"][sd]["timings"][p])
                    if p in results["seeds"][sd].get("timings", {}) else "-") for sd in seeds]
            for p in phases]
    lines += ["Where the time went: seconds wall / process CPU (all threads) per phase and seed "
              "(the job's load is not recorded: compare CPU to wall).", "",
              report_lib.markdown_table(["phase"] + [f"seed {sd}" for sd in seeds], rows), ""]
  rows = [[d, a, _fmt(v)] for d, accts in summary["repeat_share"].items() for a, v in accts.items()]
  lines += ["Provider flags (hardened only tracks repeats): share of an account's answers whose fine "
            "code it had already been answered for.", "",
            report_lib.markdown_table(["defense", "account", "repeat share"], rows), ""]
  return "\n".join(lines)


def theft_report(results: dict) -> list:
  summary, tc = results["summary"], results["config"]["theft"]
  theft, legit = summary["theft"], summary.get("legit_top1", {})
  lines = [f"## Theft: a copy trained on what each attack received ({tc['arch']}, {tc['steps']} steps "
           f"x batch {tc['batch_size']}, loss {tc['loss']}; {tc['images']} stealing images per attack, "
           f"{tc['eval_images']} held-out crops)", "",
           "Copy vs victim on held-out crops no attacker sent: R^2, the share of the victim's "
           "representation variance a linear map of the copy's features predicts (ridge, fit on the "
           "first half of the crops, scored on the second: centred, so a copy that learned only the "
           "victim's mean scores ~0 where its cosine is high and its rel MSE ~1); mean cosine and "
           "relative MSE (sum of squared errors / the victim's total variance); probe: "
           "linear probe top-1 (%) on digits embedded by the copy; legit: the digits user's top-1 (%) "
           "through that defense. Queries: all of the attack's accounts; coverage % and sigma: the "
           "largest over its accounts. Mean [min, max] over seeds; nan: the copy's training loss went "
           "non-finite on what it received (e.g. under a charged sigma).", ""]
  rows = []
  for a in next(iter(theft.values())):
    for d in theft:
      r = theft[d][a]
      rows.append([a, d, f"{r['queries']['mean']:.0f}", f"{r['coverage_max']['mean']:.1f}",
                   f"{r['sigma_max']['mean']:.3g}", _fmt(r["r2"]), _fmt(r["cosine"]), _fmt(r["rel_mse"]),
                   _fmt(r["probe_top1"]), _fmt(legit[d]) if d in legit else "-"])
  u = summary["untrained_copy"]
  rows.append(["(untrained copy)", "-", "0", "-", "-", _fmt(u["r2"]), _fmt(u["cosine"]), _fmt(u["rel_mse"]),
               _fmt(u["probe_top1"]), "-"])
  lines += [report_lib.markdown_table(["attack", "defense", "queries", "coverage %", "sigma",
                                       "copy R^2", "copy cosine", "copy rel MSE", "copy probe top-1",
                                       "legit top-1"], rows), ""]
  first = results["seeds"][next(iter(results["seeds"]))]["theft"]
  grouped = {}
  for d, rows_ in first.items():
    for a, r in (rows_.items() if d != "untrained_copy" else ()):
      if r["note"]:
        grouped.setdefault((a, r["note"]), []).append(d)
  if grouped:
    lines += ["What the attacks received (first seed): " + "; ".join(
        f"{a}: {n} ({', '.join(ds)})" for (a, n), ds in grouped.items()) + ".", ""]
  return lines


def plot_frontier(results: dict, path: str) -> None:
  """Per defense: the legit user's accuracy (y) against each attack's theft (x: the copy's linear R^2 to
  the victim on held-out crops; cosine is flattered by the representations' shared mean, and the
  digits probe of a copy is a weak theft measure at this scale, an untrained copy already probes
  well), one point per attack; diverged copies (nan) are left out."""
  theft, legit = results["summary"]["theft"], results["summary"].get("legit_top1", {})
  series = []
  for d, attacks in theft.items():
    points = [(attacks[a]["r2"]["mean"], legit[d]["mean"]) for a in attacks
              if d in legit and np.isfinite(attacks[a]["r2"]["mean"])]
    if points:
      series.append({"label": d, "x": [p[0] for p in points], "y": [p[1] for p in points],
                     "style": {"none": "o", "paper": "s", "hardened": "^", NO_CHARGE: "v"}.get(d, "o")})
  if series:
    report_lib.line_plot(path, series, xlabel="theft: copy's linear R^2 to the victim (held-out), one "
                         "point per attack", ylabel="legit user's top-1 (%)",
                         title="Utility / theft frontier per defense")


def plot(results: dict, path: str) -> None:
  series = []
  for d, attacks in results["summary"]["error_ratio"].items():
    for a, by_n in attacks.items():
      if len(by_n) < 2:
        continue
      ns = [int(n) for n in by_n]
      series.append({"label": f"{d}: {a}", "x": ns, "y": [by_n[n]["mean"] for n in by_n],
                     "style": "-o" if d == "paper" else "--s"})
  if series:
    report_lib.line_plot(path, series, xlabel="N answers averaged", ylabel="err(1) / err(N)",
                         title="Repeat-and-average against paper-B4B and hardened", logx=True,
                         logy=True, hline=1.2)
