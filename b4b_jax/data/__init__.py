"""Datasets (TFDS, class folders, bundled offline data) and preprocessing.

  images, labels = load_arrays("digits", "train", image_size=32)        # small sets, in memory
  ds = get_dataset("cifar10", "train", data_dir=DIR)                   # large sets, tf.data
  views = apply_transform(images, "steal_crop", seed=0, epoch=1)       # seeded per-example views
  x = normalize(views, spec="imagenet")                                # uint8 -> encoder input

  pool = stream.open_pool(config.data, seed)                          # the stealing pool, by index
  for batch in stream.view_batches(pool, idx, "steal_crop", seed=0, epoch=3, batch_size=256): ...

The stealing job streams its pool and views from disk (data.stream); the evaluation jobs stream
tf.data batches (evaluation.embeddings). Host memory is bounded by the pipelines' buffers.
"""
from b4b_jax.data import preprocess
from b4b_jax.data import stream
from b4b_jax.data.folders import check_images, class_names, list_folder
from b4b_jax.data import folders
from b4b_jax.data.preprocess import (NORMALIZATION, TRANSFORM_PRESETS, Transform, apply_transform,
                                     center_crop, example_seed, make_transform, normalization,
                                     normalize, random_flip, random_resized_crop,
                                     random_resized_crop_params, resize, resize_shorter)
from b4b_jax.data.sharding import shard_bounds
from b4b_jax.data.sources import get_dataset, load_arrays
