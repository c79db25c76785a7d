r"""Defense speed: our jitted step vs the original coverage algorithm, the matmul floor, the encoder.

  python -m benchmarks.defense                    # D=2048, P=20, K=12, 20480 reps in batches of 256
  python -m benchmarks.defense --tiny             # seconds, a smoke check
  python -m benchmarks.defense --workdir=DIR      # also DIR/results.json, DIR/report.md, metrics
  python -m benchmarks.defense --encoders=resnet50,vit_small --encoder-batch=256   # section (e)
  python -m benchmarks.defense --profile          # also (f): where each step's time goes, per XLA op

As a script it sets b4b_jax.xla_flags.SERVING_FLAGS first (on CPU-only hosts), as the served API's
process does, and says so in its first line.

Measures, on the same random representations:
  (a) coverage-update throughput of our jitted step (defense disabled: hash + occupancy update +
      coverage, nothing else) vs a faithful numpy / Python-set port of the original `get_buckets`
      coverage loop, and checks both reach the same coverage;
  (b) the matmul floor: only x @ R_p for all projections (exact hashing cannot be cheaper);
  (c) serving throughput of the full defense (coverage + cost + noise + transform), of the coverage
      update alone, and of the served API's default (configs/serve.py: the hardened preset, its noise
      all image-keyed, on image queries whose descriptors are computed beforehand; a diag_affine
      transform per account, tables cached as DefendedEncoder does) drawing every W, and the same with
      its W cache (noise_cache.py, the default noise_cache_mib) after the accounts have returned, with
      1, 64, ... users mixed in every batch, each against the floor at that batch, and the full defense's
      minor page faults per call (in its best trial: a row that faults is slower by their cost);
  (d) bytes of defense state per user;
  (e) optionally, the defense's overhead on an encoder's forward (random weights, 64 users mixed per
      batch): the full defense step timed alone on that encoder's representations of the batch, as a
      share of the forward's time; and, as a check, the encoder alone vs encoder + defense jitted
      together (as DefendedEncoder serves). The check's difference is two long timings subtracted:
      on a shared CPU the forward's run-to-run spread (a few %) is larger than the defense itself;
      and the served default's step alone (as in (c), on the batch's images' descriptors);
  (f) optionally, per XLA op (fusion, sort, scatter, loop), the least time of each serving step of (c)
      over traced runs, as a share of the floor's time traced alternately (benchmarks/op_profile.py).
Timings are best-of interleaved trials (load from other processes hits all alike). Nothing here
asserts a time; the figures are printed, returned, and with --workdir written (metrics: one stage per
section). The full run takes one to two minutes on a 2-core CPU (mostly the original algorithm).
"""
import argparse
import collections
import os
import time
from typing import Callable, Dict, Optional, Sequence

import jax
import jax.numpy as jnp
import numpy as np

from b4b_jax import host_memory
from b4b_jax import xla_flags
from b4b_jax.defense import config as config_lib
from b4b_jax.defense import hardened
from b4b_jax.defense import keys as keys_lib
from b4b_jax.defense import noise as noise_lib
from b4b_jax.defense import noise_cache
from b4b_jax.defense import state as state_lib
from b4b_jax.defense import step as step_lib
from b4b_jax.defense import transforms
from b4b_jax.utils import files
from b4b_jax.utils.metrics import MetricsWriter
from b4b_jax.utils.versions import library_versions

# The paper-scale settings and a seconds-long smoke variant (tests/test_defense_benchmark.py).
FULL = dict(rep_dim=2048, num_projections=20, num_hyperplanes=12, batch_size=256, num_reps=20480,
            serving_batch_size=1024, users_mixed=(1, 64, 1024), repeats=5, trials=5, seed=0)
TINY = dict(rep_dim=64, num_projections=4, num_hyperplanes=6, batch_size=32, num_reps=256,
            serving_batch_size=32, users_mixed=(1, 4, 16), repeats=2, trials=1, seed=0)
# Calls a W-cached served default makes before it is timed: enough for the levels to settle (the
# preset's repeat charge raises them as the same batch comes back) and every account's W to be written.
_RETURNING_CALLS = 24
SECTIONS = ("coverage_update", "matmul_floor", "serving", "state", "encoders", "profile")


def original_coverage_curve(reps: np.ndarray, hyperplanes: np.ndarray, batch_size: int):
  """Port of the original buckets.py loop: per batch and projection, the set of bucket strings.

  hyperplanes: (P, D, K). Returns the mean coverage (percent) after every batch, like the original.
  """
  num_proj, _, k = hyperplanes.shape
  projections = [np.asarray(hyperplanes[p], np.float64) for p in range(num_proj)]
  seen = [set() for _ in range(num_proj)]
  curve = []
  for start in range(0, len(reps) - batch_size + 1, batch_size):
    features = reps[start:start + batch_size]
    for p, proj in enumerate(projections):
      seen[p].update(_get_buckets(features, proj))
    curve.append(float(np.mean([100 * len(s) / 2**k for s in seen])))
  return curve


def _get_buckets(data, proj):
  # As the original: sign pattern of data @ proj per row, grouped in a dict, returned as strings.
  hashed = list(map(tuple, (data @ proj > 0).astype(int)))
  rows_of_bucket = collections.defaultdict(list)
  for i, row in enumerate(hashed):
    rows_of_bucket[row].append(i)
  return {str(code) for code in rows_of_bucket}


def _minor_faults() -> int:
  """Minor page faults of this process so far, every thread (0 where getrusage is missing)."""
  try:
    import resource  # pylint: disable=g-import-not-at-top  # POSIX only
  except ImportError:
    return 0
  return resource.getrusage(resource.RUSAGE_SELF).ru_minflt


def _best_seconds(fns: Dict[str, Callable[[], object]], repeats: int, trials: int,
                  setup: Optional[Dict[str, Callable[[], None]]] = None,
                  faults: Optional[Dict[str, float]] = None) -> Dict[str, float]:
  """Best-of-`trials` seconds per call of each fn; trials interleave the fns so that load from other
  processes on a shared machine hits all of them alike. Every fn is warmed up (compiled) first;
  setup[name], if given, runs untimed before each trial of fn `name`. `faults`, if given, receives the
  minor page faults per call in each fn's best trial: pages its buffers found unmapped and the kernel
  zero-filled again. glibc hands buffers of a few MiB back to the kernel or keeps them depending on what
  the process allocated before (its dynamic mmap and trim thresholds, its per-thread heaps of 64 MiB), so
  the same step in the same process can run fault-free in one row and fault in the next."""
  setup = setup or {}
  for name, fn in fns.items():
    setup.get(name, lambda: None)()
    jax.block_until_ready(fn())
  best = {name: float("inf") for name in fns}
  for _ in range(trials):
    for name, fn in fns.items():
      setup.get(name, lambda: None)()
      faults_before = _minor_faults()
      start = time.perf_counter()
      for _ in range(repeats):
        out = fn()
      jax.block_until_ready(out)
      seconds = (time.perf_counter() - start) / repeats
      if seconds < best[name]:
        best[name] = seconds
        if faults is not None:
          faults[name] = (_minor_faults() - faults_before) / repeats
  return best


def _registered_state(params, capacity: int):
  state = state_lib.init_state(params, capacity)
  uids = np.stack([keys_lib.uid_from_name(f"user{i}") for i in range(capacity)])
  return state.replace(uids=jax.device_put(uids))


def _floor_fn(params) -> Callable:
  """x -> x @ R_p for all p: the hashing matmul alone, in our layout (the fastest on CPU)."""
  hi = jax.lax.Precision.HIGHEST

  def hashing_floor(x, r):  # XLA module "jit_hashing_floor" (section (f) finds its ops by that name)
    return jax.lax.dot_general(x, r, (((1,), (1,)), ((), ())), precision=hi)
  return jax.jit(hashing_floor)


def _stepper(params, capacity, users, batches, cached_table: bool = False, descriptors=None,
             noise_cache_mib: float = 0.0):
  """A callable running the jitted step over `batches` (state carried and donated, as in serving).
  cached_table: pass the users' transform table built once, as DefendedEncoder serves (without it the
  step derives every slot's transform on each call). descriptors: the queried images'
  hardened.image_descriptor [N, G*G] (image queries), or None (representation queries).
  noise_cache_mib: keep the image-keyed noise's W's as DefendedEncoder does (noise_cache.py, its host
  bookkeeping and writes timed with the step); 0: every call draws them."""
  holder = [_registered_state(params, capacity)]
  table = (jax.block_until_ready(transforms.make_table(params.settings, params.transform_key,
                                                       holder[0].uids)) if cached_table else None)
  cache = noise_cache.NoiseWeightCache(params, noise_cache_mib, capacity)
  accounts = (noise_cache.distinct_accounts(np.asarray(holder[0].uids)[np.asarray(users)])
              if cache.bound else None)

  def run_batches():
    for batch in batches:
      weights, index = cache.lookup(*accounts) if cache.bound else (None, None)
      holder[0], out, info = step_lib.defense_step(params, holder[0], users, batch, table, None,
                                                   descriptors, weights, index)
      if cache.bound:
        cache.record(*accounts, np.asarray(info["noise_level"]))
    return out

  return run_batches, holder


def _step_hlo(params, holder, users, batch, cached_table: bool = False, descriptors=None) -> str:
  """The compiled text of the step _stepper runs (op names for section (f)); compiles, runs nothing."""
  table = (transforms.make_table(params.settings, params.transform_key, holder[0].uids)
           if cached_table else None)
  return step_lib.defense_step.lower(params, holder[0], users, batch, table, None,
                                     descriptors).compile().as_text()


def _served_default_params(common: Dict, rep_dim: int):
  """The served API's default (configs/serve.py): the hardened preset (noise keyed per account, input
  and sigma level, all of its variance image-keyed: a [256, D] Gaussian matrix per account and level
  applied to each image's features) and a per-account diag_affine transform."""
  return state_lib.make_params(config_lib.defense_config(
      "simsiam", hardened=True, transform="diag_affine", **common), rep_dim)


def _image_descriptors(rng, n: int, grid: int) -> jax.Array:
  """The hardened mode's descriptors [n, grid*grid] of n random 32x32 photos-like images (smooth
  random content: each image its own descriptor, as distinct photos)."""
  coarse = rng.uniform(0, 255, size=(n, 4, 4, 3)).astype(np.float32)
  images = jax.image.resize(coarse, (n, 32, 32, 3), "linear")
  return jax.block_until_ready(hardened.image_descriptor(images, grid))


def run(*, rep_dim: int = 2048, num_projections: int = 20, num_hyperplanes: int = 12,
        batch_size: int = 256, num_reps: int = 20480, serving_batch_size: int = 1024,
        users_mixed=(1, 64, 1024), repeats: int = 5, trials: int = 3, seed: int = 0,
        encoders: Sequence[str] = (), encoder_batch: int = 256, encoder_size: int = 224,
        profile: bool = False, log: Optional[Callable[[str], None]] = None,
        on_section: Optional[Callable[[str, Dict], None]] = None) -> Dict:
  """Runs (a)-(d); returns a JSON-friendly dict of figures.

  `log` receives the printed lines (default print); `on_section(name, figures)` is called after each
  section of SECTIONS that ran (metrics with --workdir). `encoders` (names for models.create_*,
  e.g. "resnet50", "vit_small") adds section (e) at encoder_batch images of encoder_size pixels;
  `profile` adds section (f).
  """
  log = log or print
  on_section = on_section or (lambda name, figures: None)
  lines = []

  def say(line):
    lines.append(line)
    log(line)

  rng = np.random.default_rng(seed)
  serving_flags = all(f in os.environ.get("XLA_FLAGS", "") for f in xla_flags.SERVING_FLAGS)
  say(f"defense benchmark on {jax.devices()[0].platform} ({jax.device_count()} device(s)): D={rep_dim}"
      f" P={num_projections} K={num_hyperplanes}, serving XLA flags {'on' if serving_flags else 'off'},"
      f" host memory {host_memory.setting()}, load {os.getloadavg()[0]:.2f}")
  results: Dict = {"rep_dim": rep_dim, "num_projections": num_projections,
                   "host_memory": host_memory.setting(),
                   "num_hyperplanes": num_hyperplanes, "batch_size": batch_size,
                   "num_reps": num_reps, "platform": jax.devices()[0].platform}
  common = dict(num_projections=num_projections, num_hyperplanes=num_hyperplanes, seed=seed)
  count_params = state_lib.make_params(config_lib.defense_config("none", **common), rep_dim)
  serve_params = state_lib.make_params(config_lib.defense_config("simsiam", **common), rep_dim)
  hardened_params = _served_default_params(common, rep_dim)

  # (a) coverage update: ours vs the original algorithm, one user, num_reps in batches.
  num_batches = max(1, num_reps // batch_size)
  reps = rng.standard_normal((num_batches * batch_size, rep_dim)).astype(np.float32)
  device_batches = [jax.device_put(reps[i * batch_size:(i + 1) * batch_size]) for i in range(num_batches)]
  one_user = jnp.zeros((batch_size,), jnp.int32)
  coverage_pass, holder = _stepper(count_params, 1, one_user, device_batches)
  floor = _floor_fn(count_params)

  def floor_pass():
    for batch in device_batches:
      out = floor(batch, count_params.projection)
    return out

  def empty_state():  # each pass starts empty, so the final coverage is that of exactly num_reps
    holder[0] = jax.block_until_ready(_registered_state(count_params, 1))

  seconds = _best_seconds({"ours": coverage_pass, "floor": floor_pass}, 1, max(trials, 5),
                          setup={"ours": empty_state})
  ours_coverage = float(jnp.sum(holder[0].counts[0]) * 100.0 / (num_projections * 2**num_hyperplanes))
  start = time.perf_counter()
  curve = original_coverage_curve(reps, np.asarray(count_params.hyperplanes), batch_size)
  original_s = time.perf_counter() - start
  ours_rate, original_rate = len(reps) / seconds["ours"], len(reps) / original_s
  floor_rate = len(reps) / seconds["floor"]
  results["coverage_update"] = {
      "ours_reps_per_s": ours_rate, "original_reps_per_s": original_rate,
      "speedup": ours_rate / original_rate, "ours_final_coverage": ours_coverage,
      "original_final_coverage": curve[-1]}
  say(f"(a) coverage update, {len(reps)} reps in batches of {batch_size}, 1 user:")
  say(f"    ours (jitted step)      {ours_rate:12,.0f} reps/s")
  say(f"    original (numpy + sets) {original_rate:12,.0f} reps/s")
  say(f"    speedup                 {ours_rate / original_rate:12.1f}x   final coverage: ours "
      f"{ours_coverage:.4f}% original {curve[-1]:.4f}%")

  # (b) the matmul floor on the same batches.
  results["matmul_floor"] = {"batch_size": batch_size, "reps_per_s": floor_rate,
                             "coverage_update_over_floor": seconds["ours"] / seconds["floor"]}
  on_section("coverage_update", results["coverage_update"])
  say(f"(b) matmul floor (x @ R_p for all p), batches of {batch_size}: {floor_rate:12,.0f} reps/s; "
      f"our coverage update takes {seconds['ours'] / seconds['floor']:.2f}x the floor")

  on_section("matmul_floor", results["matmul_floor"])

  # (c) serving with users mixed in each batch.
  n = serving_batch_size
  capacity = max(users_mixed)
  serve_batch = [jax.device_put(rng.standard_normal((n, rep_dim)).astype(np.float32))]
  # Its own generator, so that the other sections' inputs stay what they were before this was added.
  descriptors = _image_descriptors(np.random.default_rng(seed + 1), n,
                                   hardened_params.settings.image_grid)
  row_keys = jax.random.split(jax.random.key(seed), n)
  # Our generator (defense/noise.py) and, for reference, jax.random.normal (threefry) as drawn before.
  noise = jax.jit(lambda k: noise_lib.standard_normal(k, rep_dim))
  threefry = jax.jit(lambda k: jax.vmap(lambda r: jax.random.normal(r, (rep_dim,), jnp.float32))(k))
  def floor_call():
    return floor(serve_batch[0], count_params.projection)
  base = _best_seconds({"floor": floor_call, "noise": lambda: noise(row_keys),
                        "threefry": lambda: threefry(row_keys)},
                       repeats, trials)
  floor_n = n / base["floor"]
  results["serving"] = {"batch_size": n, "floor_reps_per_s": floor_n,
                        "noise_only_reps_per_s": n / base["noise"],
                        "threefry_noise_reps_per_s": n / base["threefry"], "by_users": {}}
  say(f"(c) serving, batches of {n}, {capacity} registered users; floor {floor_n:,.0f} reps/s; "
      f"the N(0, 1) noise alone: ours {n / base['noise']:,.0f} reps/s ({base['noise'] / base['floor']:.2f}x"
      f" floor), jax.random.normal {n / base['threefry']:,.0f} reps/s "
      f"({base['threefry'] / base['floor']:.2f}x floor)")
  cache_mib = config_lib.RESOURCE_DEFAULTS["noise_cache_mib"]  # the served default's W cache
  cache_entries = noise_cache.NoiseWeightCache(hardened_params, cache_mib, capacity).bound
  for num_users in users_mixed:
    users = jax.device_put(rng.permutation(np.arange(n) % num_users).astype(np.int32))
    coverage_only, _ = _stepper(count_params, capacity, users, serve_batch)
    full, _ = _stepper(serve_params, capacity, users, serve_batch)
    hardened_fn, _ = _stepper(hardened_params, capacity, users, serve_batch, cached_table=True,
                              descriptors=descriptors)
    hardened_cached, _ = _stepper(hardened_params, capacity, users, serve_batch, cached_table=True,
                                  descriptors=descriptors, noise_cache_mib=cache_mib)
    for _ in range(_RETURNING_CALLS):  # returning accounts: levels settled, their W's cached
      jax.block_until_ready(hardened_cached())
    # The floor is timed again inside these trials, interleaved with the steps: a ratio of two figures
    # taken seconds apart moved by ~0.1x on a quiet machine (the floor itself varies by ~5 %). The
    # steps within a few times the floor (a few ms a call) get three times the trials, in a group of
    # their own with the floor: best of 5 left the full defense's ratio 0.1-0.15x above its best of
    # 15 in some runs (1.51x vs 1.39x at 64 users on a Zen 4 EPYC), and their trials cost a tenth of
    # a served default's.
    faults = {}
    t = _best_seconds({"floor": floor_call, "coverage_only": coverage_only, "full_defense": full},
                      repeats, 3 * trials, faults=faults)
    t_served = _best_seconds({"floor": floor_call, "hardened_service": hardened_fn,
                              "hardened_cached": hardened_cached}, repeats, trials)
    floor_s, served_floor_s = t.pop("floor"), t_served.pop("floor")
    row = {name: {"reps_per_s": n / sec, "over_floor": sec / floor_s,
                  "page_faults_per_call": faults[name]} for name, sec in t.items()}
    row.update({name: {"reps_per_s": n / sec, "over_floor": sec / served_floor_s}
                for name, sec in t_served.items()})
    row["floor_reps_per_s"] = n / floor_s
    row["full_defense"]["over_floor_plus_noise"] = t["full_defense"] / (floor_s + base["noise"])
    results["serving"]["by_users"][str(num_users)] = row
    say(f"    {num_users:5d} users/batch: coverage update {row['coverage_only']['reps_per_s']:10,.0f}"
        f" reps/s ({row['coverage_only']['over_floor']:.2f}x floor); full defense "
        f"{row['full_defense']['reps_per_s']:10,.0f} reps/s ({row['full_defense']['over_floor']:.2f}x"
        f" floor, {row['full_defense']['over_floor_plus_noise']:.2f}x floor + noise, "
        f"{row['full_defense']['page_faults_per_call']:,.0f} page faults a call); served default "
        f"(hardened, image queries) {row['hardened_service']['reps_per_s']:10,.0f} reps/s "
        f"({row['hardened_service']['over_floor']:.2f}x floor), its W's cached (returning accounts, "
        f"{min(num_users, cache_entries)} of {num_users}) {row['hardened_cached']['reps_per_s']:10,.0f} "
        f"reps/s ({row['hardened_cached']['over_floor']:.2f}x floor); load {os.getloadavg()[0]:.2f}")

  on_section("serving", results["serving"])
  if profile:
    _profile_section(say, results, rng, n, capacity, users_mixed, floor, serve_batch, descriptors,
                     count_params, serve_params, hardened_params, repeats, on_section)

  # (d) state per user.
  per_user = state_lib.state_bytes_per_user(count_params)
  results["state_bytes_per_user"] = per_user
  say(f"(d) defense state per user: {per_user} bytes ({per_user / 1024:.2f} KiB)")
  on_section("state", {"state_bytes_per_user": per_user})

  # (e) overhead on the encoder's forward.
  if encoders:
    results["encoders"] = {}
    say(f"(e) defense overhead on the encoder forward, batch {encoder_batch}, {encoder_size}px, "
        f"64 users mixed, random weights:")
    for name in encoders:
      row = _encoder_overhead(name, encoder_batch, encoder_size, seed, repeats, trials, common)
      results["encoders"][name] = row
      say(f"    {name:10s} forward {row['forward_ms']:8.1f} ms, defense step alone "
          f"{row['defense_ms']:7.2f} ms: the defense adds {100 * row['overhead_share']:.2g}% "
          f"(D={row['rep_dim']}); check, jitted together: {row['defended_ms']:8.1f} ms "
          f"({100 * row['fused_difference']:+.1f}%); the served default (hardened, image queries) "
          f"{row['served_default_ms']:7.2f} ms: {100 * row['served_default_share']:.2g}%")
    on_section("encoders", results["encoders"])
  results["lines"] = lines
  return results


def _profile_section(say, results, rng, n, capacity, users_mixed, floor, serve_batch, descriptors,
                     count_params, serve_params, hardened_params, repeats, on_section):
  """(f): per-op least times of each serving step of (c) vs the floor, at the fewest and the most
  users mixed per batch."""
  from benchmarks import op_profile  # pylint: disable=g-import-not-at-top
  results["profile"] = {}
  say(f"(f) where the time goes: per XLA op, least time over traced runs as a share of the floor's "
      f"(x @ R_p, batch {n}) traced alternately; load {os.getloadavg()[0]:.2f}")
  for num_users in sorted({min(users_mixed), max(users_mixed)}):
    users = jax.device_put(rng.permutation(np.arange(n) % num_users).astype(np.int32))
    for name, params, cached, images in (("coverage_only", count_params, False, None),
                                         ("full_defense", serve_params, False, None),
                                         ("hardened_service", hardened_params, True, descriptors)):
      step, holder = _stepper(params, capacity, users, serve_batch, cached_table=cached,
                              descriptors=images)
      hlo = _step_hlo(params, holder, users, serve_batch[0], cached, images)
      p = op_profile.profile(step, "jit_defense_step",
                             lambda: floor(serve_batch[0], count_params.projection),
                             "jit_hashing_floor", runs=2 * repeats, hlo_text=hlo)
      results["profile"][f"{name}/{num_users}"] = {
          "wall_over_floor": p.wall / p.reference_wall,
          "ops_over_floor": {op: sec / p.reference_wall for op, sec, _ in p.ops}}
      say(f"    {name}, {num_users} users/batch (load {os.getloadavg()[0]:.2f}):")
      for line in op_profile.lines(p):
        say(line)
  on_section("profile", {k: v["wall_over_floor"] for k, v in results["profile"].items()})


def _encoder_overhead(name, batch, size, seed, repeats, trials, common) -> Dict:
  """The defense step alone on an encoder's representations, against the encoder's forward; and the
  forward alone vs encoder + defense in one jitted call (DefendedEncoder's fusion) as a check."""
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  if name.startswith("vit"):
    model = models.create_vit(name, rngs=nnx.Rngs(seed), img_size=size)
  else:
    model = models.create_resnet(name, rngs=nnx.Rngs(seed))
  rep_dim = model.rep_dim
  graphdef, params, stats = models.split_model(model)
  apply = lambda p, s, x: models.apply_model(graphdef, p, s, x, train=False)[0]  # noqa: E731
  defense_params = state_lib.make_params(config_lib.defense_config("simsiam", **common), rep_dim)
  served_params = _served_default_params(common, rep_dim)
  holder = [_registered_state(defense_params, 64)]
  served_holder = [_registered_state(served_params, 64)]
  table = transforms.make_table(served_params.settings, served_params.transform_key,
                                served_holder[0].uids)
  users = jnp.asarray(np.arange(batch) % 64, jnp.int32)
  images = jax.device_put(np.random.default_rng(seed).standard_normal(
      (batch, size, size, 3)).astype(np.float32))
  forward = jax.jit(apply)
  defended = jax.jit(lambda dp, st, u, p, s, x: step_lib.defense_step_impl(dp, st, u, apply(p, s, x)),
                     donate_argnums=(1,))
  defense_only = jax.jit(step_lib.defense_step_impl, donate_argnums=(1,))
  reps = jax.block_until_ready(forward(params, stats, images))
  descriptors = jax.block_until_ready(hardened.image_descriptor(images,
                                                                served_params.settings.image_grid))

  def run_defended():
    holder[0], out, _ = defended(defense_params, holder[0], users, params, stats, images)
    return out

  def run_defense_only():
    holder[0], out, _ = defense_only(defense_params, holder[0], users, reps)
    return out

  def run_served_only():  # the served default on the same rows, as image queries
    served_holder[0], out, _ = defense_only(served_params, served_holder[0], users, reps, table, None,
                                            descriptors)
    return out

  # Forwards take seconds at batch 256 on a CPU: the check gets three interleaved trials of one call.
  t = _best_seconds({"forward": lambda: forward(params, stats, images), "defended": run_defended},
                    1, min(trials, 3))
  # The step alone is milliseconds: enough calls that its figure is not the timer's.
  t.update(_best_seconds({"defense": run_defense_only, "served": run_served_only}, 20 * repeats,
                         trials))
  return {"rep_dim": rep_dim, "batch": batch, "forward_ms": 1e3 * t["forward"],
          "defense_ms": 1e3 * t["defense"], "defended_ms": 1e3 * t["defended"],
          "overhead_share": t["defense"] / t["forward"],
          "served_default_ms": 1e3 * t["served"], "served_default_share": t["served"] / t["forward"],
          "fused_difference": (t["defended"] - t["forward"]) / t["forward"]}


def _scalars(figures, prefix=""):
  """Flattens nested figures to {"a/b": float} (numbers only)."""
  out = {}
  for key, value in figures.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_scalars(value, name + "/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def run_into(workdir: str, settings: Dict) -> Dict:
  """`run(**settings)` writing DIR/results.json (figures, settings, library versions), DIR/report.md
  and metrics (TensorBoard + metrics.jsonl, one stage per section) as each section ends."""
  os.makedirs(workdir, exist_ok=True)
  writer = MetricsWriter(workdir)
  results = run(**settings, on_section=lambda name, figures: writer.write_scalars(
      0, _scalars(figures), stage=name))
  writer.flush()
  writer.close()
  results = {**results, "settings": settings, "versions": library_versions()}
  files.atomic_write_json(os.path.join(workdir, "results.json"), results)
  files.atomic_write_text(os.path.join(workdir, "report.md"), _report(results))
  return results


def _report(results: dict) -> str:
  c = results["coverage_update"]
  serving = results["serving"]
  rows = "\n".join(
      f"| {users} | {r['coverage_only']['reps_per_s']:,.0f} | {r['coverage_only']['over_floor']:.2f}x "
      f"| {r['full_defense']['reps_per_s']:,.0f} | {r['full_defense']['over_floor']:.2f}x |"
      for users, r in serving["by_users"].items())
  lines = "\n".join(results["lines"])
  return f"""# Defense benchmark

Platform: {results['platform']}; D={results['rep_dim']}, P={results['num_projections']},
K={results['num_hyperplanes']}; host memory: {results['host_memory']} (b4b_jax/host_memory.py).

## Coverage update ({results['num_reps']} representations, batches of {results['batch_size']}, 1 user)

| | reps/s |
|---|---|
| ours (jitted step) | {c['ours_reps_per_s']:,.0f} |
| original algorithm (numpy + Python sets) | {c['original_reps_per_s']:,.0f} |
| speedup | {c['speedup']:.1f}x |
| matmul floor | {results['matmul_floor']['reps_per_s']:,.0f} |
| ours / floor (time) | {results['matmul_floor']['coverage_update_over_floor']:.2f}x |

Final coverage: ours {c['ours_final_coverage']:.4f}%, original {c['original_final_coverage']:.4f}%.

## Serving (batches of {serving['batch_size']}; floor {serving['floor_reps_per_s']:,.0f} reps/s, \
N(0,1) noise alone {serving['noise_only_reps_per_s']:,.0f} reps/s)

| users per batch | coverage update reps/s | / floor | full defense reps/s | / floor |
|---|---|---|---|---|
{rows}

State per user: {results['state_bytes_per_user']} bytes.

## Printed output

```
{lines}
```
"""


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--tiny", action="store_true", help="seconds-long smoke variant")
  parser.add_argument("--workdir", default=None, help="also write results.json, report.md, metrics")
  parser.add_argument("--encoders", default="", help="comma-separated, e.g. resnet50,vit_small")
  parser.add_argument("--encoder-batch", type=int, default=256)
  parser.add_argument("--encoder-size", type=int, default=224)
  parser.add_argument("--profile", action="store_true", help="also (f): per-XLA-op times of each step")
  parser.add_argument("--users", default=None, help="users mixed per serving batch, e.g. 1,64,1024")
  args = parser.parse_args(argv)
  settings = dict(TINY if args.tiny else FULL)
  if args.users:
    settings["users_mixed"] = tuple(int(u) for u in args.users.split(","))
  settings.update(encoders=tuple(e for e in args.encoders.split(",") if e),
                  encoder_batch=args.encoder_batch, encoder_size=args.encoder_size,
                  profile=args.profile)
  results = run_into(args.workdir, settings) if args.workdir else run(**settings)
  return results


def rows(results: Dict) -> list:
  """The headline figures as benchmarks.common rows (for benchmarks/device.sh's table)."""
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  c = results["coverage_update"]
  serving = results["serving"]
  out = [common.Row("defense: coverage update vs original", f"{c['ours_reps_per_s']:,.0f} reps/s",
                    f"original {c['original_reps_per_s']:,.0f} reps/s", c["speedup"])]
  for users, r in serving["by_users"].items():
    full = r["full_defense"]
    out.append(common.Row(f"defense: full, {users} users/batch of {serving['batch_size']}",
                          f"{full['reps_per_s']:,.0f} reps/s",
                          f"matmul floor {r['floor_reps_per_s']:,.0f}", 1.0 / full["over_floor"]))
  for name, r in results.get("encoders", {}).items():
    out.append(common.Row(f"defense: overhead on {name} b{r['batch']}", f"{r['defense_ms']:.2f} ms",
                          f"forward {r['forward_ms']:.1f} ms", 1.0 / (1.0 + r["overhead_share"]),
                          f"+{100 * r['overhead_share']:.2g}% time"))
  return out


if __name__ == "__main__":
  # Timed as the served API's process runs the step: compiled with xla_flags.SERVING_FLAGS (CPU-only
  # hosts), its threads' malloc heaps kept once grown (host_memory.apply_serving; without, a row's
  # calls may each fault a new heap in, as B4B_HOST_MEMORY=default shows).
  xla_flags.apply(serving=True)
  host_memory.apply_serving()
  main()
