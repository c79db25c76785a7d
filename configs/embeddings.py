r"""Export frozen-encoder embeddings (train/test representations + labels) as .npz files.

  python -m b4b_jax.main --config=configs/embeddings.py --workdir=workdirs/emb_simsiam \
      --config.source.encoder=encoders/simsiam_resnet50 --config.source.data_dir=$TFDS_DATA_DIR \
      --config.source.transform=resize
  python -m b4b_jax.main --config=configs/embeddings.py:tiny --workdir=/tmp/emb_tiny   # CPU, ~20 s

Then `--config.source.npz_dir=workdirs/emb_simsiam/embeddings` in the probe, legit, remap or coverage
configs reuses them. Runtime: ~5 min per 60k images for ResNet-50 at 224 px on one A100
(data-parallel over all local devices).
"""
import ml_collections

from configs import common


def get_config(arg=None):
  tiny = common.tiny_arg(arg, "embeddings")
  config = ml_collections.ConfigDict()
  config.job = "embeddings"
  config.seed = 0
  config.source = common.source_block(tiny=tiny)
  config.datasets = (common.TINY_DATASET,) if tiny else common.PAPER_DATASETS
  return config
