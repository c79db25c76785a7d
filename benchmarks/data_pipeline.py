r"""Input-pipeline throughput: our tf.data stealing-query pipeline vs torchvision's transforms.

  python benchmarks/data_pipeline.py [--n=2048] [--size=224] [--src=64]

Both apply RandomResizedCrop(size) + horizontal flip to the same uint8 images (src x src). Ours, two
ways: data.apply_transform over in-memory arrays (stateless TF ops, parallel tf.data map, batches of
256), and data.stream.views of an in-memory pool, as the stealing job cuts its query views (the same
per-image function, mapped over each batch of 256 in one traced call).
Reference: torchvision.transforms on PIL images in one Python process, the per-worker work of the
original code's DataLoader (it scales with workers the same way tf.data scales with cores).
Prints images/s of each and their ratios to the reference.
"""
import os
import sys
import time

sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))  # run as a script
sys.modules.setdefault("triton", None)  # torchvision after TensorFlow: triton's library must not load

from absl import app  # noqa: E402
from absl import flags  # noqa: E402
import numpy as np  # noqa: E402

flags.DEFINE_integer("n", 2048, "images per measurement")
flags.DEFINE_integer("size", 224, "output size")
flags.DEFINE_integer("src", 64, "source image size")
FLAGS = flags.FLAGS


def ours(images, size):
  from b4b_jax.data import Transform, apply_transform  # pylint: disable=g-import-not-at-top
  transform = Transform("random_resized_crop", size, flip=True)
  apply_transform(images[:256], transform, seed=0, epoch=1)  # tracing and warm-up
  start = time.perf_counter()
  out = apply_transform(images, transform, seed=0, epoch=2)
  return len(out) / (time.perf_counter() - start)


def steal_views(images, size, batch=256):
  """The stealing job's path (jobs/steal.py): data.stream.views of an in-memory pool, query batch by
  query batch (one traced tf.map_fn call per batch, no tf.data iterator)."""
  from b4b_jax.data import Transform, stream  # pylint: disable=g-import-not-at-top
  pool = stream.Pool(name="benchmark", split="train", labels=np.zeros(len(images), np.int32),
                     images=images)
  transform = Transform("random_resized_crop", size, flip=True)
  stream.views(pool, np.arange(batch), transform, seed=0, epoch=1)  # tracing and warm-up
  start = time.perf_counter()
  for lo in range(0, len(images), batch):
    out = stream.views(pool, np.arange(lo, min(lo + batch, len(images))), transform, seed=0, epoch=2)
  assert out.shape[1:] == (size, size, 3)
  return len(images) / (time.perf_counter() - start)


def reference(images, size):
  import torchvision.transforms as T  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  t = T.Compose([T.RandomResizedCrop(size), T.RandomHorizontalFlip()])
  pils = [Image.fromarray(im) for im in images]
  t(pils[0])
  start = time.perf_counter()
  out = [np.asarray(t(p)) for p in pils]
  assert out[0].shape == (size, size, 3)
  return len(pils) / (time.perf_counter() - start)


def main(_):
  rng = np.random.default_rng(0)
  images = rng.integers(0, 256, (FLAGS.n, FLAGS.src, FLAGS.src, 3), dtype=np.uint8)
  ref = reference(images, FLAGS.size)
  our = ours(images, FLAGS.size)
  job = steal_views(images, FLAGS.size)
  print(f"RandomResizedCrop({FLAGS.size})+flip on {FLAGS.src}x{FLAGS.src} uint8, {FLAGS.n} images")
  print(f"ours (tf.data apply_transform): {our:,.0f} images/s")
  print(f"ours (stream.views, the steal job's path, batches of 256): {job:,.0f} images/s")
  print(f"torchvision (PIL, 1 process): {ref:,.0f} images/s")
  print(f"ratio ours/reference: {our / ref:.2f} (apply_transform), {job / ref:.2f} (stream.views)")


if __name__ == "__main__":
  app.run(main)
