r"""Remapping between two sybil accounts (paper §4.3, Fig. 5): per-user transforms cost an attacker.

  python -m b4b_jax.main --config=configs/remap.py --workdir=workdirs/remap_cifar10 \
      --config.source.encoder=encoders/simsiam_resnet50 --config.source.data_dir=$TFDS_DATA_DIR
  python -m b4b_jax.main --config=configs/remap.py:tiny --workdir=/tmp/remap_tiny   # CPU, ~1 min

The API serves the victim's features x rep_scale (1000, as the original's SimSiam sybil experiments;
`--config.rep_scale=1` for raw features, `--config.encoder_kind=dino --config.rep_scale=1` for DINO).
Two accounts query the same CIFAR10 train images (the overlap) and the test images; a linear mapper
(closed-form least squares, mapper.kind "lstsq") from B's to A's space is fitted on the first n
overlapping queries. Expected (Fig. 5, figure only): cosine distances below ~0.16, binary the highest;
without noise the affine-type transforms are inverted almost exactly by a linear map once n exceeds
the representation dimension.
Defense: the full defense_config block, e.g. --config.defense.lam=1e-5 --config.defense.beta=50.
Runtime: one embedding pass, then per (transform, noise) cell 2 x 60k API queries and one least-squares
fit per n (a 2048 x 2048 eigendecomposition, ~1.3 s on 2 CPU cores; for n < 2048 an n x n one, 0.01 s at
n = 16, 0.09 s at 500: least_squares.py): ~10 min on a GPU host for 4 transforms x 2 noise modes.
"""
import ml_collections

from b4b_jax.evaluation import paper_numbers
from configs import common


def get_config(arg=None):
  tiny = common.tiny_arg(arg, "remap")
  config = ml_collections.ConfigDict()
  config.job = "remap"
  config.seed = 0
  # The victim ("simsiam" | "dino"): the reference classifier's lr/epochs (probe.paper_hparams).
  config.encoder_kind = "random" if tiny else "simsiam"
  config.rep_scale = paper_numbers.REP_SCALE.get(config.encoder_kind, 1.0)
  config.source = common.source_block(tiny=tiny)
  config.dataset = common.TINY_DATASET if tiny else "cifar10"
  config.defense = common.evaluation_defense("simsiam", tiny=tiny)
  config.transforms = ("diag_affine", "binary") if tiny else (
      "diag_affine", "pad_shuffle", "affine_pad_shuffle", "binary")
  config.noise_modes = ("none", "b4b")
  # The paper's subsets (config/benchmark/*.yaml) up to 10k; n = 0 is the unmapped baseline.
  config.overlaps = (0, 10, 50, 100, 300) if tiny else (
      0, 10, 50, 100, 500, 1000, 2000, 3000, 4000, 5000, 10000)
  config.mapper = ml_collections.ConfigDict()
  # "lstsq" (closed-form least squares) | "linear" (Adam-trained, as the sybil attack) | "mlp"
  config.mapper.kind = "lstsq"
  config.mapper.options = ml_collections.ConfigDict({"ridge": 1e-9})
  config.query_batch_size = 64 if tiny else 256
  # The reference classifier on A's train representations.
  config.probe = common.probe_block(tiny=tiny, paper=True)
  if tiny:
    config.probe.method = "ridge"   # closed form: no compile for the CPU variant
  config.probe.seeds = (0,)
  return config
