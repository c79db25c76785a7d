"""Config blocks shared by the evaluation configs (configs/{probe,legit,remap,coverage,embeddings}.py).

Every evaluation job reads its representations the same way: an encoder spec (see
evaluation.embeddings.resolve_encoder) or precomputed .npz files, datasets by name (b4b_jax.data), and
one probe block. Keeping the blocks here means the five configs cannot drift apart.
"""
import ml_collections

# The paper's four downstream tasks, as TFDS names.
PAPER_DATASETS = ("cifar10", "stl10", "svhn_cropped", "fashion_mnist")
# The small CPU variants: a random tiny ResNet on scikit-learn's bundled digits (offline, seconds).
TINY_ENCODER = "random:resnet18_w0.125@16"
TINY_DATASET = "digits"


def source_block(*, tiny: bool) -> ml_collections.ConfigDict:
  """Where representations come from: `encoder` + datasets, or precomputed .npz files (npz_dir)."""
  c = ml_collections.ConfigDict()
  # An encoder directory (converted checkpoint / trained victim), a stealing workdir (its
  # stolen_encoder/ is used) or random:<arch>@<size>. Required unless npz_dir has every dataset.
  c.encoder = TINY_ENCODER if tiny else ml_collections.config_dict.placeholder(str)
  c.data_dir = ml_collections.config_dict.placeholder(str)   # TFDS data_dir / folder root
  # A directory of <dataset>.npz files (what the embeddings job writes to WORKDIR/embeddings); a dataset
  # found there is read instead of embedded.
  c.npz_dir = ml_collections.config_dict.placeholder(str)
  c.train_split = "train"
  c.test_split = "test"
  c.train_limit = 384 if tiny else ml_collections.config_dict.placeholder(int)
  c.test_limit = 192 if tiny else ml_collections.config_dict.placeholder(int)
  c.batch_size = 64 if tiny else 256       # embedding batch (images per device call)
  # Image transform before normalisation: None = the encoder manifest's eval transform; or a preset
  # name of b4b_jax.data (e.g. "resize": the paper's SimSiam embeddings use Resize(224), no crop).
  c.transform = ml_collections.config_dict.placeholder(str)
  return c


def probe_block(*, tiny: bool) -> ml_collections.ConfigDict:
  """The linear probe: the paper's embedding probes use Adam, batch 64, 3 runs."""
  c = ml_collections.ConfigDict()
  c.method = "adam"              # "adam" | "sgd" | "ridge" (closed form, ridge strength on validation)
  c.epochs = 5 if tiny else 50
  c.batch_size = 64
  c.learning_rate = 1e-3         # on standardised features (the paper tuned 1e-5..1 on raw x1000 ones)
  c.momentum = 0.9               # sgd only
  c.weight_decay = 0.0
  c.val_fraction = 0.1           # carved from train (per seed) to choose the epoch; never test
  c.normalization = "standardize"  # "standardize" | "l2" | "none"; statistics from train only
  c.seeds = (0, 1) if tiny else (0, 1, 2)
  c.ridge_alphas = tuple(10.0 ** e for e in range(-4, 6))
  return c


def defense_block(*, preset: str = "simsiam", tiny: bool) -> ml_collections.ConfigDict:
  """The defense preset and overrides (fields of b4b_jax.defense.defense_config)."""
  c = ml_collections.ConfigDict()
  c.preset = preset
  c.overrides = ml_collections.ConfigDict()
  if tiny:
    # A few hundred queries of a tiny encoder: fewer projections/buckets and a lower beta, so coverage
    # and the B4B cost are visible at this scale (the paper's setting is P=20, K=12, beta=80%).
    c.overrides.num_projections = 4
    c.overrides.num_hyperplanes = 8
    c.overrides.beta = 20.0
    c.overrides.pad_dim = 16
  return c


def build_defense_config(block):
  """defense_config(preset, **overrides) from a defense block."""
  from b4b_jax import defense  # pylint: disable=g-import-not-at-top
  return defense.defense_config(block.preset, **block.overrides.to_dict())
