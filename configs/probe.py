r"""Linear probe of a frozen encoder (victim or stolen) on the paper's four downstream tasks.

  # a stolen model (the stealing job's workdir holds stolen_encoder/), compared with Table 1's row:
  python -m b4b_jax.main --config=configs/probe.py --workdir=workdirs/probe_stolen \
      --config.source.encoder=workdirs/steal_simsiam_b4b --config.source.data_dir=$TFDS_DATA_DIR \
      --config.table_row.user=ATTACK --config.table_row.defense=B4B --config.table_row.queries=50K
  # the small CPU variant (random tiny ResNet on scikit-learn's digits, ~30 s):
  python -m b4b_jax.main --config=configs/probe.py:tiny --workdir=/tmp/probe_tiny

Paper protocol (reference §7.4/7.5): linear classifier on frozen features, Adam, batch 64, 3 runs; here
the epoch is chosen on a validation split of train (the original chose it on test). Expected (Table 1,
SimSiam victim): CIFAR10 90.41, STL10 95.08, SVHN 75.47, F-MNIST 91.22; stolen with 50k ImageNet
queries: 65.2 / 64.9 / 63.1 / 88.5 undefended, 35.72 / 31.54 / 19.74 / 70.01 with B4B.
Runtime: embedding dominates (ResNet-50 at 224 px: ~5 min per 60k images on one A100); the probe itself
~1 min per dataset on a CPU for 50 epochs of 50k x 2048.
"""
import ml_collections

from configs import common


def get_config(arg=None):
  tiny = common.tiny_arg(arg, "probe")
  config = ml_collections.ConfigDict()
  config.job = "probe"
  config.seed = 0
  config.source = common.source_block(tiny=tiny)
  config.datasets = (common.TINY_DATASET,) if tiny else common.PAPER_DATASETS
  config.probe = common.probe_block(tiny=tiny)
  # How the result appears in the paper's Table-1 layout, and the paper table to put beside it (only
  # when the setting matches: e.g. "table1" for the SimSiam preset; "" for none).
  config.table_row = ml_collections.ConfigDict(
      {"user": "LEGIT", "defense": "NONE", "queries": "all", "data": "task"})
  config.paper_table = "" if tiny else "table1"
  return config
