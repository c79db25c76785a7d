r"""Linear probe of a frozen encoder (a stolen copy, or the victim) on the paper's four downstream tasks.

  # a stolen copy (the stealing job's workdir holds stolen_encoder/), compared with Table 1's row:
  python -m b4b_jax.main --config=configs/probe.py --workdir=workdirs/probe_stolen \
      --config.source.encoder=workdirs/steal_simsiam_b4b --config.source.data_dir=$TFDS_DATA_DIR \
      --config.table_row.defense=B4B --config.table_row.queries=50K
  # the embedding probe (Adam on embeddings) instead:
  python -m b4b_jax.main --config=configs/probe.py:protocol=embedding --workdir=workdirs/probe_emb \
      --config.source.encoder=ENCODER_DIR --config.source.data_dir=$TFDS_DATA_DIR
  # the small CPU variants (random tiny ResNet on scikit-learn's digits, ~1 min):
  python -m b4b_jax.main --config=configs/probe.py:tiny --workdir=/tmp/probe_tiny
  python -m b4b_jax.main --config=configs/probe.py:tiny,protocol=embedding --workdir=/tmp/probe_tiny_e

Arguments (`:arg`): protocol=paper|embedding (default paper), tiny.

protocol=paper (the default; the stolen-copy rows): the original's image-level probe
(`evaluate_stolen_model.py`, reference §7.4): a linear head on the frozen backbone in eval mode, fc
N(0, std 0.01), CE, SGD lr 0.1 x batch/256, momentum 0.9, wd 0, per-epoch cosine, 100 epochs, batch 256;
CIFAR10 train RandomCrop(32, pad 4) + flip + Resize(224) (fresh views each epoch), everything else
Resize(224); no input normalisation. The epoch is chosen on a 10 % validation split of train (the
original printed test accuracy every epoch and kept the best); the report gives the chosen epoch's and
the last epoch's test top-1 (and the best-on-test number, labelled, for comparison only). The
original's bash scripts ran `--epochs 1`: add `--config.probe.epochs=1` for that setting.
Expected (Table 1, stolen from SimSiam with 50k ImageNet queries): 65.2 / 64.9 / 63.1 / 88.5 undefended,
35.72 / 31.54 / 19.74 / 70.01 with B4B (CIFAR10 / STL10 / SVHN / F-MNIST).

protocol=embedding: Adam on standardised embeddings, batch 64, 3 seeds, epoch on validation: a fast
probe of any encoder; not the paper's protocol for either row type (the legit/victim rows come from
configs/legit.py, whose NONE row is the victim's embedding probe as the original ran it, §7.5).

Runtime (paper protocol, ResNet-50 at 224 px): the backbone embeds each test/train set once (~5 min per
60k images on one A100) and CIFAR10's augmented train views once per epoch: ~1-1.5 h for 100 epochs on
one A100; the head itself is seconds per epoch.
"""
import ml_collections

from configs import common

PROTOCOLS = ("paper", "embedding")


def get_config(arg=None):
  a = common.parse_arg(arg, tiny=False, protocol="paper")
  tiny = a["tiny"]
  if a["protocol"] not in PROTOCOLS:
    raise ValueError(f"configs/probe.py: protocol must be one of {PROTOCOLS}, got {a['protocol']!r}")
  config = ml_collections.ConfigDict()
  config.job = "probe"
  config.seed = 0
  config.protocol = a["protocol"]
  config.source = common.source_block(tiny=tiny)
  config.datasets = (common.TINY_DATASET,) if tiny else common.PAPER_DATASETS
  paper = config.protocol == "paper"
  config.probe = common.paper_probe_block(tiny=tiny) if paper else common.probe_block(tiny=tiny)
  # How the result appears in the paper's Table-1 layout, and the paper table to put beside it (only
  # when the setting matches: e.g. "table1" for the SimSiam preset; "" for none).
  config.table_row = ml_collections.ConfigDict(
      {"user": "ATTACK", "defense": "NONE", "queries": "50K", "data": "ImageNet"} if paper else
      {"user": "LEGIT", "defense": "NONE", "queries": "all", "data": "task"})
  config.paper_table = "" if tiny else "table1"
  return config
