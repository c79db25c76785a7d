r"""Host memory of the steal job vs the size of its pool: peak RSS with a 1k- and an 8k-image pool.

  python benchmarks/steal_memory.py [--sizes=1000,8000] [--image_size=224] [--steps=8] [--dir=/tmp/x]

Generates an ImageNet-style class-folder tree of JPEGs (image_size px, 10 classes, plus a val/ split).
For each pool size N, in a fresh subprocess: the steal job's set-up (pool listed and every file
decoded once by the corrupt-file check), its charged query pass over all N images (the config's
default protocol, `paper`: one account, the stealing crops; a random ResNet-18/8-width victim at
image_size; the paper config's pool transform, shorter side 256 + centre crop 256, before every view)
and `--steps` training steps; then that process's peak RSS (VmHWM).
Target (issue 17): the difference between the two sizes stays under 300 MB, because the pool and its
views stream from disk (b4b_jax.data.stream). For scale: the old in-memory path held every pool image
at 256x256 plus a 224x224 view cache, N x 343 KB (2.7 GB at 8k), and more while concatenating.

Also printed, per size: the input pipeline's rate alone (training views, decoded from JPEG and cropped,
in batches of the train batch size) beside the train step's consumption (the same jitted step on one
fixed batch, after its compiling call). Not a timed test; `--sizes=24,48 --image_size=64 --steps=2
--batch_size=8` is a smoke run.
"""
import json
import math
import os
import subprocess
import sys
import tempfile
import time

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)  # run as a script

from absl import app  # noqa: E402
from absl import flags  # noqa: E402

flags.DEFINE_list("sizes", ["1000", "8000"], "pool sizes (images)")
flags.DEFINE_integer("image_size", 224, "side of the generated JPEGs and the victim's input")
flags.DEFINE_integer("steps", 8, "training steps per run (after the charged query pass)")
flags.DEFINE_integer("batch_size", 64, "train batch size (global)")
flags.DEFINE_string("dir", None, "where to generate the tree and workdirs (default: a temp dir)")
flags.DEFINE_string("child", None, "internal: run one measurement from this JSON spec")
FLAGS = flags.FLAGS

CLASSES = 10
VAL_PER_CLASS = 4
TARGET_MB = 300


def make_tree(root: str, n: int, size: int) -> None:
  """root/{train,val}/cXX/*.jpg: smooth random images (gradients + a disc) that JPEG-compress well."""
  import numpy as np  # pylint: disable=g-import-not-at-top
  from PIL import Image  # pylint: disable=g-import-not-at-top
  marker = os.path.join(root, f".complete_{n}_{size}")
  if os.path.exists(marker):
    return
  rng = np.random.default_rng(0)
  yy, xx = np.mgrid[0:size, 0:size].astype(np.float32) / size
  for split, count in (("train", n), ("val", VAL_PER_CLASS * CLASSES)):
    for i in range(count):
      a, b, c = rng.uniform(0, 255, 3), rng.uniform(-128, 128, 3), rng.uniform(-128, 128, 3)
      im = a + b * yy[..., None] + c * xx[..., None]
      cy, cx, r = rng.uniform(0.2, 0.8, 2).tolist() + [rng.uniform(0.1, 0.3)]
      im[(yy - cy) ** 2 + (xx - cx) ** 2 < r * r] = rng.uniform(0, 255, 3)
      path = os.path.join(root, split, f"c{i % CLASSES:02d}", f"{i:06d}.jpg")
      os.makedirs(os.path.dirname(path), exist_ok=True)
      Image.fromarray(np.clip(im, 0, 255).astype(np.uint8)).save(path, "JPEG", quality=90)
  open(marker, "w").close()


def query_batch_size(sizes) -> int:
  """The largest batch <= 256 dividing every pool size (all N images are queried in whole batches)."""
  g = math.gcd(*sizes)
  return max(d for d in range(1, min(g, 256) + 1) if g % d == 0)


def peak_rss_mb() -> float:
  with open("/proc/self/status") as f:
    for line in f:
      if line.startswith("VmHWM:"):
        return int(line.split()[1]) / 1024
  import resource  # pylint: disable=g-import-not-at-top
  return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def child(spec: dict) -> dict:
  """One measurement (in its own process): set-up, charged queries, a few train steps."""
  import jax  # pylint: disable=g-import-not-at-top
  import numpy as np  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  from b4b_jax.jobs import steal  # pylint: disable=g-import-not-at-top
  from configs import steal_simsiam  # pylint: disable=g-import-not-at-top

  n, size, root, workdir = spec["n"], spec["image_size"], spec["root"], spec["workdir"]
  victim_dir = os.path.join(os.path.dirname(workdir), f"victim_{size}")
  if not os.path.exists(victim_dir):
    victim = models.create_resnet("resnet18_w0.125", rngs=nnx.Rngs(0))
    models.save_encoder(victim_dir, victim, {"preprocessing": models.default_preprocessing(
        size, resize=round(size * 256 / 224))})
  c = steal_simsiam.get_config(f"queries={n},epochs=1")
  c.victim.encoder_dir = victim_dir
  c.data.name, c.data.limit, c.data.per_class = f"folder:{root}", n, None
  big = round(size * 256 / 224)
  c.data.transform = {"mode": "center_crop", "size": big, "resize_size": big}
  c.eval.name, c.eval.limit = f"folder:{root}", VAL_PER_CLASS * CLASSES
  c.eval.transform = {"mode": "center_crop", "size": big, "resize_size": big}
  c.eval.batch_size = 64
  c.attack.query_batch_size = spec["query_batch_size"]  # divides N: the paper pass charges whole batches
  c.stolen.arch = "resnet18_w0.125"
  c.train.batch_size = spec["batch_size"]
  c.max_steps_this_run = spec["steps"]
  c.checkpoint_every_steps = 10 ** 6
  c.log_every_steps = 10 ** 6
  os.makedirs(workdir, exist_ok=True)
  steal.validate_config(c)

  t0 = time.time()
  s = steal.set_up(c, workdir)
  q = steal.query_phase(c, workdir, s)
  t_queries = time.time() - t0

  # The input pipeline alone: the training views of one epoch's first batches.
  rows = s.plan.train_indices[:min(len(s.plan.train_indices), 16 * spec["batch_size"])]
  t = time.time()
  view_epoch = 0 if s.protocol == "query_once" else 1  # the views training reads
  seen = sum(len(b) for b in s.views.stream(rows, view_epoch, spec["batch_size"]))
  pipeline_rate = seen / (time.time() - t)

  trained = steal.train_phase(c, workdir, s, q)  # the job's loop: views streamed into the step

  # The train step's consumption alone: the same jitted step on one fixed batch, after a warm-up.
  from b4b_jax.attacks import train_state as ts  # pylint: disable=g-import-not-at-top
  from b4b_jax.utils import distributed  # pylint: disable=g-import-not-at-top
  step_fn = ts.make_train_step(trained.graphdef, steal._step_config(  # pylint: disable=protected-access
      c, s.victim.manifest["preprocessing"], 100), s.mesh)
  images, targets = next(steal._epoch_batches(c, s, q, 0, 0))  # pylint: disable=protected-access
  batch = distributed.global_batch(images, s.mesh)
  targets = distributed.global_batch(targets, s.mesh)
  state, key = trained.state, jax.random.key(0)
  state, m = step_fn(state, batch, targets, key)
  jax.block_until_ready(m)
  t = time.time()
  for _ in range(spec["steps"]):
    state, m = step_fn(state, batch, targets, key)
  jax.block_until_ready(m)
  step_rate = spec["steps"] * spec["batch_size"] / (time.time() - t)
  return {"n": n, "peak_rss_mb": peak_rss_mb(), "setup_and_queries_s": t_queries,
          "pipeline_images_per_s": pipeline_rate, "train_step_images_per_s": step_rate,
          "train_steps_run": trained.step, "pool": s.views.pool.summary(), "protocol": s.protocol,
          "devices": jax.device_count(), "platform": jax.devices()[0].platform}


def run_child(spec: dict) -> dict:
  env = dict(os.environ, TF_CPP_MIN_LOG_LEVEL="2", PYTHONPATH=_ROOT)
  out = subprocess.run([sys.executable, os.path.abspath(__file__), f"--child={json.dumps(spec)}"],
                       env=env, cwd=_ROOT, capture_output=True, text=True, check=False)
  lines = [l for l in out.stdout.splitlines() if l.startswith("RESULT ")]
  if out.returncode or not lines:
    raise RuntimeError(f"measurement for N={spec['n']} failed:\n{out.stdout[-2000:]}\n"
                       f"{out.stderr[-4000:]}")
  return json.loads(lines[-1][len("RESULT "):])


def main(_):
  if FLAGS.child:
    print("RESULT " + json.dumps(child(json.loads(FLAGS.child))), flush=True)
    return
  sizes = [int(s) for s in FLAGS.sizes]
  base = FLAGS.dir or tempfile.mkdtemp(prefix="steal_memory_")
  root = os.path.join(base, f"tree_{FLAGS.image_size}")
  t = time.time()
  make_tree(root, max(sizes), FLAGS.image_size)
  print(f"generated pool tree ({max(sizes)} + {VAL_PER_CLASS * CLASSES} JPEGs, {FLAGS.image_size}px) "
        f"in {time.time() - t:.0f}s: {root}")
  results = []
  for n in sizes:
    spec = {"n": n, "image_size": FLAGS.image_size, "root": root, "steps": FLAGS.steps,
            "batch_size": FLAGS.batch_size, "query_batch_size": query_batch_size(sizes), "workdir": os.path.join(base, f"work_{n}_{time.time():.0f}")}
    r = run_child(spec)
    results.append(r)
    print(f"pool {n:6d} images: peak RSS {r['peak_rss_mb']:8.1f} MB; set-up + charged queries "
          f"{r['setup_and_queries_s']:.0f}s; input pipeline {r['pipeline_images_per_s']:,.0f} images/s; "
          f"train step consumes {r['train_step_images_per_s']:,.0f} images/s ({r['devices']} "
          f"{r['platform']} device(s), {r['protocol']} protocol)",
          flush=True)
  if len(results) >= 2:
    diff = results[-1]["peak_rss_mb"] - results[0]["peak_rss_mb"]
    print(f"difference {results[-1]['n']} - {results[0]['n']} images: {diff:+.1f} MB "
          f"(target < {TARGET_MB} MB: {'PASS' if diff < TARGET_MB else 'FAIL'})")


if __name__ == "__main__":
  app.run(main)
