r"""Export frozen-encoder embeddings (train/test representations + labels) as .npz files.

  python -m b4b_jax.main --config=configs/embeddings.py --workdir=workdirs/emb_simsiam \
      --config.source.encoder=workdirs/victims/simsiam --config.source.data_dir=$TFDS_DATA_DIR \
      --config.source.transform=resize
  python -m b4b_jax.main --config=configs/embeddings.py:tiny --workdir=/tmp/emb_tiny   # CPU, ~20 s

Then `--config.source.npz_dir=workdirs/emb_simsiam/embeddings` in the probe, legit, remap or coverage
configs reuses them. Runtime: ~5 min per 60k images for ResNet-50 at 224 px on one A100
(data-parallel over all local devices).
"""
import ml_collections

from b4b_jax.evaluation import config_blocks


def get_config(arg=None):
  if arg not in (None, "", "tiny"):
    raise ValueError(f"configs/embeddings.py takes no argument or 'tiny', got {arg!r}")
  tiny = arg == "tiny"
  config = ml_collections.ConfigDict()
  config.job = "embeddings"
  config.seed = 0
  config.source = config_blocks.source_block(tiny=tiny)
  config.datasets = (config_blocks.TINY_DATASET,) if tiny else config_blocks.PAPER_DATASETS
  return config
