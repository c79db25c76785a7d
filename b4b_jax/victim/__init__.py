"""Training a self-supervised victim encoder (SimSiam) from scratch, for offline demos and small studies.

The paper's victims are pretrained checkpoints (converted with weight_conversion); this trains a small
one on bundled data so the whole B4B pipeline runs offline. The result is saved with
`b4b_jax.models.save_encoder`, so every later stage loads it exactly as it would a converted checkpoint.
"""
from b4b_jax.victim.simsiam import SimSiam, negative_cosine, simsiam_loss, train_simsiam_victim

__all__ = ["SimSiam", "negative_cosine", "simsiam_loss", "train_simsiam_victim"]
