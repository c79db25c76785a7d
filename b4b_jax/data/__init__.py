"""Datasets (TFDS, class folders, bundled offline data), preprocessing and sharded batching.

  images, labels = load_arrays("digits", "train", image_size=32)        # small sets, in memory
  ds = get_dataset("cifar10", "train", data_dir=DIR)                   # large sets, tf.data
  for batch in train_batches((images, labels), global_batch_size=256, seed=0,
                             transform="steal_crop", mesh=mesh): ...
  x = normalize(batch["image"], spec="imagenet")                       # uint8 -> encoder input
"""
from b4b_jax.data import preprocess
from b4b_jax.data.folders import check_images, class_names, list_folder
from b4b_jax.data.preprocess import (NORMALIZATION, TRANSFORM_PRESETS, Transform, apply_transform,
                                     center_crop, example_seed, make_transform, normalization,
                                     normalize, random_flip, random_resized_crop,
                                     random_resized_crop_params, resize, resize_shorter)
from b4b_jax.data.sharding import shard_bounds
from b4b_jax.data.sources import get_dataset, load_arrays
from b4b_jax.data.batching import eval_batches, local_batch_size, to_global, train_batches
