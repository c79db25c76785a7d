r"""Stealing the SimSiam ResNet-50 victim through the (B4B-defended) API: paper Table 1.

  # undefended / B4B-defended single account, 50k ImageNet queries (Table 1 "ATTACK" rows):
  python -m b4b_jax.main --config=configs/steal_simsiam.py --workdir=workdirs/steal_simsiam_none_50k
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1 \
      --workdir=workdirs/steal_simsiam_b4b_50k
  # 100k queries, and the sybil rows (100k split over 2..6 accounts, 10k mapping queries each extra):
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,queries=100000 --workdir=...
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2,queries=100000 \
      --workdir=...
  # the stricter online threat models instead of the paper's regime:
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,protocol=query_once --workdir=...
  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,protocol=requery --workdir=...
  # the small CPU variant used by the tests (random tiny victim, 16x16 photo crops, ~1 min):
  python -m b4b_jax.main --config=configs/steal_simsiam.py:tiny --workdir=/tmp/steal_tiny

Inputs: --config.victim.encoder_dir (a converted SimSiam checkpoint:
`python -m weight_conversion.convert`),
--config.data.name=folder:<ImageNet root> (class folders <root>/train/<class>/*, 100 per class).
Protocol (attack.protocol, default "paper"): the original code's regime (reference section 5). ONE charged
pass over the pool in pool order (batches of 256, drop_last; 50k -> 196 batches = 50,176 charged
queries; 100k -> 390, the pool ends first) fixes each batch position's sigma. Every epoch, fresh
RandomResizedCrop + flip views of the same images are answered at those sigmas with the account's
transform by the paper's offline simulation. Those answers are not charged, as in the original, and
results.json reports them beside the charged queries. Sybils: k windows of floor(N/256)//k batches
(2x50k: 195 each), each extra account's first 40 batches spent on the charged mapping queries.
Settings as the paper: ResNet-50 from scratch, InfoNCE (tau 0.25), SGD momentum 0.9, lr 0.1 * 256/256,
cosine, 100 epochs, batch 256, trained in pool order; B4B lam 1e-6, alpha 1, beta 80 %, 2^12 buckets,
a dense random affine per account (every account, unlike the original's identity first account);
mappers fitted on responses x1000 (attack.rep_scale, as the original's SimSiam factor).
Expected (Table 1, CIFAR10 linear probe of workdir/stolen_encoder): 65.2 undefended / 35.72
B4B at 50k; 68.1 / 12.01 at 100k; sybils 2x50k 39.56.
Runtime (estimate, not measured: no accelerator here): ~2 h for 100 epochs x 50k on one A100-class GPU
(the paper protocol adds one victim forward per training view, about a third of a training step),
~1 h on a TPU v3-8; double for 100k. query_once is ~1.5 h (no victim forward while training).
Arguments: see configs/common.py (STEAL_ARGS).
"""
from configs import common


def get_config(arg=None):
  return common.steal_config("simsiam", arg)
