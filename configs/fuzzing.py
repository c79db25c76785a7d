r"""The noise-sensitivity sweep (the original's src/fuzzying.py, reference §7.6, paper §4.2).

  # the original's default: DINO embeddings of CIFAR10, features as they are, not normalised
  python -m b4b_jax.main --config=configs/fuzzing.py --workdir=workdirs/fuzzing_dino \
      --config.source.encoder=encoders/dino_vits16 --config.source.data_dir=$TFDS_DATA_DIR
  # SimSiam features x1000 (as the original's SimSiam embedding experiments), or L2-normalised first
  python -m b4b_jax.main --config=configs/fuzzing.py:victim=simsiam --workdir=workdirs/fuzzing_simsiam \
      --config.source.encoder=encoders/simsiam_resnet50_100ep_256bs \
      --config.source.data_dir=$TFDS_DATA_DIR --config.source.transform=resize
  python -m b4b_jax.main --config=configs/fuzzing.py:normalize=1 --workdir=workdirs/fuzzing_dino_l2 \
      --config.source.encoder=encoders/dino_vits16 --config.source.data_dir=$TFDS_DATA_DIR
  # the small CPU variant (random tiny ResNet on scikit-learn's digits, ~1 min):
  python -m b4b_jax.main --config=configs/fuzzing.py:tiny --workdir=/tmp/fuzzing_tiny

Arguments (`:arg`): victim=dino|simsiam (default dino, the original's config_fuzzying.yaml), normalize=0|1
(L2-normalise before the noise; default 0, as the original), tiny.

For sigma in {0, 0.1, 0.5, 1, 2, 3, 4, 5, 10}: fresh static N(0, sigma^2) noise per sample on the train
and test embeddings (x rep_scale: SimSiam 1000, DINO 1), a linear probe (the original's Adam, batch 64,
lr/epochs for the task: DINO CIFAR10 1e-5 / 50, SimSiam 1e-4 / 50; epoch chosen on validation, the last
epoch's test top-1 recorded too), and the mean cosine distance between clean and noised test embeddings.
Paper claim (§4.2): accuracy falls to chance (~10 %) at roughly sigma 0.5 on the downstream tasks; the
encoder, scale and normalisation behind it are not stated (report.md prints ours beside it).
Runtime: one embedding pass (60k CIFAR10 images: ~3-5 min on one A100), then 9 probes of 50 Adam epochs
on 45k x 1536/2048 (about 0.5 s per epoch for 3 seeds at once): ~5 min on a GPU host, ~15 min on CPUs.
"""
import ml_collections

from b4b_jax.evaluation import fuzzing
from b4b_jax.evaluation import paper_numbers
from configs import common

VICTIMS = ("dino", "simsiam")


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, victim="dino", normalize=False)
  if a["victim"] not in VICTIMS:
    raise ValueError(f"configs/fuzzing.py: victim must be one of {VICTIMS}, got {a['victim']!r}")
  tiny = a["tiny"]
  config = ml_collections.ConfigDict()
  config.job = "fuzzing"
  config.seed = 0
  # "dino" / "simsiam" select the probe's lr/epochs and the default rep_scale; "random" (tiny): neither.
  config.encoder_kind = "random" if tiny else a["victim"]
  config.rep_scale = paper_numbers.REP_SCALE.get(config.encoder_kind, 1.0)
  config.normalize = bool(a["normalize"])
  config.source = common.source_block(tiny=tiny)
  config.dataset = common.TINY_DATASET if tiny else "cifar10"
  config.sigmas = fuzzing.SIGMAS
  config.probe = common.probe_block(tiny=tiny, paper=True)
  if tiny:
    config.probe.method = "ridge"   # closed form: no compile for the CPU variant
  return config
