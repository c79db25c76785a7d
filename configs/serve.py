r"""The served B4B API: accounts, micro-batching, crash-safe state, on 127.0.0.1:8000.

  python -m b4b_jax.main --config=configs/serve.py --workdir=/tmp/b4b_serve
  python -m b4b_jax.main --config=configs/serve.py --workdir=DIR --config.encoder_dir=/path/to/encoder
  python -m b4b_jax.serve.admin --workdir=/tmp/b4b_serve create-key alice     # then query it:
  curl -H "Authorization: Bearer $KEY" -F image=@cat.png http://127.0.0.1:8000/v1/embeddings

With no encoder_dir the service serves the demo's victim (configs/demo.py): it trains it into
<workdir>/demo (about 3 minutes on 2 CPU cores; the demo's "victim" and "calibration" stages, reused on
restart) or reuses the one of an earlier demo run named by --config.demo_workdir=/tmp/b4b_demo, and
calibrates the cost to it as the demo does. Any converted encoder directory (weight_conversion) is
served with `--config.encoder_dir`; the defense then uses the block below as given (the paper's
SimSiam cost: lam 1e-6, alpha 1, beta 80 %, P=20, K=12).

Defense: the full hardened B4B by default (`defense_config("simsiam", hardened=True)`, the fields of
b4b_jax.defense.HARDENED, docs/defense.md "The hardened preset"): noise keyed by the account, fine codes
of the input and the sigma level (noise_keying="per_input"), all of its variance a smooth secret
function of the image (image_weight 1, lengthscale 0.3: repeats, pixel jitter, 1-pixel shifts, JPEG and
small crops/flips get the same noise, so averaging gains <= 1.2x), and repeats charged as new buckets
(repeat_charge 0.25: a canary that reads its sigma pays for it in coverage); on the paper's
coverage-priced cost, with a per-account diag_affine transform against sybils. Ablations are one field
away: `--config.defense.repeat_charge=0` (flag repeats, never charge), `--config.defense.image_weight=0`
(fine codes only); the paper's B4B needs the three: `--config.defense.noise_keying=per_query
--config.defense.image_weight=0 --config.defense.repeat_charge=0` (a fresh draw per query).
`--config.defense.transform=identity` drops the transforms, `--config.defense.enabled=False` serves
undefended (coverage still counted). With the demo victim the cost is the demo's calibration and the
hardening fields come from this block. `:tiny` is the variant the tests run (small batches and
limits; name an encoder directory to skip the demo victim). Start-up: the port is bound first (/healthz
answers 503 "starting", queries wait), then the state is restored and queries are answered while the
padded batch sizes compile on a thread (cached in <workdir>/jax_cache, so restarts are quick).
"""
import ml_collections

from b4b_jax import defense


def get_config(arg=None):
  tiny = arg == "tiny"
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/serve.py takes no argument or 'tiny', got {arg!r}")
  from configs import demo as demo_config  # pylint: disable=g-import-not-at-top
  c = ml_collections.ConfigDict()
  c.job = "serve"
  c.host = "127.0.0.1"
  c.port = 8000
  c.encoder_dir = ""                 # "" = the demo's victim (trained or reused, see above)
  c.demo_workdir = ""                # "" = <workdir>/demo
  c.demo = demo_config.get_config("tiny" if tiny else None)
  c.calibrate_defense = ml_collections.config_dict.placeholder(bool)  # None: iff serving the demo victim
  c.defense = defense.defense_config("simsiam", hardened=True, transform="diag_affine")
  c.defense_json = ""                # a JSON file of defense fields replacing the block above (e.g. the
                                     # demo's calibrated defense, hash_center included)
  c.capacity = 64 if tiny else 1024  # account slots pre-sized (growing recompiles under traffic)

  c.batching = ml_collections.ConfigDict()
  c.batching.max_rows = 32 if tiny else 512      # row budget of one micro-batch (padded to 8, 16, ...)
  c.batching.max_wait_ms = 4.0                   # how long a batch waits for more requests
  c.batching.max_queued_rows = 8192 if tiny else 65536
  c.batching.warm_up = True                      # compile every padded batch size at start-up ...
  c.batching.serve_during_warm_up = True         # ... on a thread while already serving (a call whose
                                                 # shape is not compiled yet compiles it: on a restart
                                                 # a persistent-cache hit); False: serve after warm-up
  c.batching.shard_over_devices = True           # split each micro-batch's rows over all local devices

  c.limits = ml_collections.ConfigDict()
  c.limits.max_request_bytes = (8 if tiny else 64) * 2**20
  c.limits.max_rows_per_request = 32 if tiny else 512   # <= batching.max_rows
  c.limits.max_image_pixels = 4096 * 4096        # decoded pixels per image (bomb guard)
  c.limits.max_image_bytes = (4 if tiny else 16) * 2**20
  c.limits.max_connections = 512
  c.limits.auth_cache_seconds = 1.0              # a revoked key stops within this time (CLI revocation)

  c.persistence = ml_collections.ConfigDict()
  c.persistence.snapshot_every_seconds = 300.0
  c.persistence.snapshot_every_entries = 500 if tiny else 20000
  c.persistence.min_free_bytes = 64 * 2**20       # refuse to start with less free space in the workdir
  c.persistence.compilation_cache_dir = ""       # "" = <workdir>/jax_cache (fast restarts); "none": off;
                                                 # programs go in its subdirectory for this CPU kind
                                                 # (mode 0700, at most 1 GiB: compilation_cache.use)

  c.observability = ml_collections.ConfigDict()
  c.observability.coverage_thresholds = (10.0, 50.0)   # metric: accounts at or above these coverages
  c.observability.access_log = False             # one JSON log line per request
  return c
