r"""Stealing the DINO ViT-S/16 victim through the (B4B-defended) API: paper Table 7.

  python -m b4b_jax.main --config=configs/steal_dino.py --workdir=workdirs/steal_dino_none_50k
  python -m b4b_jax.main --config=configs/steal_dino.py:defended=1 --workdir=workdirs/steal_dino_b4b_50k
  python -m b4b_jax.main --config=configs/steal_dino.py:queries=100000 --workdir=...
  python -m b4b_jax.main --config=configs/steal_dino.py:defended=1,queries=100000 --workdir=...
  python -m b4b_jax.main --config=configs/steal_dino.py:defended=1,sybils=2,queries=100000 --workdir=...
  # small CPU variant (random tiny ViT victim with the DINO representation):
  python -m b4b_jax.main --config=configs/steal_dino.py:tiny --workdir=/tmp/steal_dino_tiny

The victim's representation is the concatenated CLS tokens of the last 4 blocks (1536-d); the stolen
ResNet-50 gets the paper's 1x1 conv 2048 -> 1536 before pooling (stolen.out_dim = auto). B4B: lam 1e-6,
alpha 1000, beta 60 % (DINO norms are ~10^3 x SimSiam's). Protocol "paper" by default (one charged pass
fixes each batch position's sigma; fresh crops every epoch answered by the paper's offline simulation,
not charged; see configs/steal_simsiam.py and docs/attacks.md); `protocol=query_once|requery` for the
online threat models. attack.rep_scale = 1 (the original scaled only SimSiam features).
Expected (Table 7, CIFAR10 probe): 67.92 undefended / 42.02 B4B at 50k; 75.07 / 19.27 at 100k;
sybils 2x50k 45.56.
Runtime (estimate, not measured): as configs/steal_simsiam.py, ~2 h for 100 epochs x 50k on one
A100-class GPU (the ViT-S/16 victim forward per view costs less than the ResNet-50 training step).
Arguments: see configs/common.py (STEAL_ARGS).
"""
from configs import common


def get_config(arg=None):
  return common.steal_config("dino", arg)
