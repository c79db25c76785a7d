r"""Coverage and cost curves (paper Fig. 3a/3b, 4, 7, 10).

  python -m b4b_jax.main --config=configs/coverage.py --workdir=workdirs/coverage_simsiam \
      --config.source.encoder=encoders/simsiam_resnet50 --config.source.data_dir=$TFDS_DATA_DIR \
      --config.imagenet_root=data/imagenet
  python -m b4b_jax.main --config=configs/coverage.py:tiny --workdir=/tmp/coverage_tiny   # CPU, ~1 min

Each query set is sent by its own account to a counting API (clean answers, coverage tracked) with
2^8..2^14 buckets. Expected (paper text; curves are figures only): at 2^12 buckets the downstream sets
stay below 30% coverage after 50k queries, ImageNet reaches ~80% after ~100k; 2^8 saturates after ~50k
ImageNet queries; 2^14 stays below ~40%. Sigma curves are Eq. (1) exactly (Fig. 4, 7).
Defense: the full defense_config block, e.g. --config.defense.lam=1e-5 --config.defense.beta=50.
Runtime: the embedding pass (~350k images for the default sets: ~30 min on one A100 at 224 px), then
seconds per curve.
"""
import ml_collections

from configs import common


def _query_set(name, dataset, split, num_queries, shuffle=False):
  return ml_collections.ConfigDict({"name": name, "dataset": dataset, "split": split,
                                    "num_queries": num_queries, "shuffle": shuffle})


def _sigma(lam, alpha, beta):
  return ml_collections.ConfigDict({"lam": lam, "alpha": alpha, "beta": beta})


def get_config(arg=None):
  tiny = common.tiny_arg(arg, "coverage")
  config = ml_collections.ConfigDict()
  config.job = "coverage"
  config.seed = 0
  config.source = common.source_block(tiny=tiny)
  config.defense = common.evaluation_defense("simsiam", tiny=tiny)
  config.query_batch_size = 64 if tiny else 256
  if tiny:
    config.query_sets = (
        _query_set("digits", "digits", "train", 256),
        _query_set("photo crops", "sklearn_photos", "query", 256),
        _query_set("random noise", "random_noise", "", 256))
    config.bucket_bits = (6, 8)
    config.report_at = (100, 200)
  else:
    config.imagenet_root = "data/imagenet"   # class folders <root>/train/<class>: the steal configs' pool
    config.query_sets = (
        _query_set("CIFAR10", "cifar10", "train", 50000),
        _query_set("SVHN", "svhn_cropped", "train", 50000),
        _query_set("F-MNIST", "fashion_mnist", "train", 50000),
        _query_set("STL10", "stl10", "unlabelled", 50000),
        _query_set("ImageNet", "folder:" + config.get_ref("imagenet_root"), "train", 100000,
                   shuffle=True),
        _query_set("random noise", "random_noise", "", 50000))
    config.bucket_bits = (8, 10, 12, 14)
    config.report_at = (10000, 50000, 100000)
  config.sigma_settings = ml_collections.ConfigDict({
      "fig4_beta": (_sigma(1e-6, 1.0, 30.0), _sigma(1e-6, 1.0, 50.0), _sigma(1e-6, 1.0, 80.0),
                    _sigma(1e-6, 1.0, 100.0)),
      "fig7a_lambda": (_sigma(1e-3, 1.0, 80.0), _sigma(1e-4, 1.0, 80.0), _sigma(1e-5, 1.0, 80.0),
                       _sigma(1e-6, 1.0, 80.0)),
      "fig7b_alpha": (_sigma(1e-6, 1.0, 80.0), _sigma(1e-6, 0.5, 80.0), _sigma(1e-6, 0.2, 80.0),
                      _sigma(1e-6, 0.1, 80.0)),
  })
  return config
