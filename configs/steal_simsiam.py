r"""Stealing the SimSiam ResNet-50 victim through the (B4B-defended) API: paper Table 1.

  # undefended / B4B-defended single account, 50k ImageNet queries (Table 1 "ATTACK" rows):
  python -m b4b_jax.main --config=configs/steal_simsiam.py --workdir=workdirs/steal_simsiam_none_50k
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1 \
      --workdir=workdirs/steal_simsiam_b4b_50k
  # 100k queries, and the sybil rows (100k split over 2..6 accounts, 10k mapping queries each extra):
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,queries=100000 --workdir=...
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2,queries=100000 \
      --workdir=...
  # the small CPU variant used by the tests (random tiny victim, 16x16 photo crops, ~1 min):
  python -m b4b_jax.main --config=configs/steal_simsiam.py:tiny --workdir=/tmp/steal_tiny

Inputs: --config.victim.encoder_dir (a converted SimSiam checkpoint:
`python -m weight_conversion.convert`),
--config.data.name=folder:<ImageNet root> (class folders <root>/train/<class>/*, 100 per class).
Settings as the paper: ResNet-50 from scratch, InfoNCE (tau 0.25), SGD momentum 0.9, lr 0.1 * 256/256,
cosine, 100 epochs, batch 256; B4B lam 1e-6, alpha 1, beta 80 %, 2^12 buckets, dense random affine per
account. Expected (Table 1, CIFAR10 linear probe of workdir/stolen_encoder): 65.2 undefended / 35.72
B4B at 50k; 68.1 / 12.01 at 100k; sybils 2x50k 39.56. Runtime (estimate): ~1.5 h for 100 epochs x 50k
on one A100-class GPU, ~40 min on a TPU v3-8; double for 100k.
Arguments: see configs/common.py (STEAL_ARGS).
"""
from configs import common


def get_config(arg=None):
  return common.steal_config("simsiam", arg)
