"""A micro-batch split over all local devices (configs/serve.py batching.shard_over_devices, the
DefendedEncoder's shard_rows) answers as one device: the same run in two subprocesses, one with 2
virtual CPU devices and one with 1, must give the same coverage, sigma, charge codes and state, snapshot
and restore included, exactly, and the same representations to float32 rounding.

Why the representations are not compared bit for bit: the encoder's XLA CPU kernels round differently
for another per-device batch shape on some CPUs. On a 2-core AMD EPYC (AVX2, no AVX-512; 2 Dec 2026) the
last row of an 8-row batch split 4 + 4 differed from the 1-device answer in 37 of 512 values by at most
2.5e-6 relative, already in the plain jitted encoder before the defense (traced by the serve4 work,
docs/serving.md); on the AVX-512 Xeon of earlier sessions they were identical. The default hardened
preset's image-keyed noise adds the same kind of difference (its descriptor's reductions round per
batch shape, up to 5e-7). The defense on top is
deterministic (the noise is keyed, not drawn from a device stream), so any real sharding defect (a row
on the wrong device, another user's noise or transform, a lost charge) moves a representation by the
noise's or the transform's scale, and the buckets, coverage and state by whole buckets.
"""
import os
import subprocess
import sys

import numpy as np

from b4b_jax.serve import testing

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))

_SCRIPT = r"""
import sys
import jax
import numpy as np
from configs import serve as serve_config
from b4b_jax.serve import defended, testing
encoder_dir, out, snap = sys.argv[1:4]
config = serve_config.get_config("tiny").defense
encoder = defended.load_encoder(encoder_dir)
served = defended.open_api(encoder, config, capacity=8, shard_rows=True)
rng = np.random.default_rng(0)
got = {"devices": np.asarray(len(jax.local_devices()))}
for i, n in enumerate((8, 13, 32, 5)):  # 13 -> 16 rows, 5 -> 8: padded sizes the 2 devices divide
  users = [("alice", "bob", "carol")[j] for j in rng.integers(0, 3, n)]
  r = defended.query_mixed(served, users, testing.random_images(n, 16, seed=i))
  for k in ("reps", "coverage", "sigma", "buckets"):
    got[f"{k}{i}"] = np.asarray(getattr(r, k))
defended.save(served, snap)
again = defended.open_api(encoder, config, capacity=8, snapshot=snap, shard_rows=True)
r = defended.query_mixed(again, ["alice"] * 8, testing.random_images(8, 16, seed=9))
got["reps_after_restore"] = np.asarray(r.reps)
for k, v in defended.state_arrays(again).items():
  if v is not None:
    got["state_" + k] = np.asarray(v)
np.savez(out, **got)
"""


def _run(tmp_path, encoder_dir, devices: int) -> dict:
  out = str(tmp_path / f"d{devices}.npz")
  env = dict(os.environ, JAX_PLATFORMS="cpu",
             XLA_FLAGS=f"--xla_force_host_platform_device_count={devices}")
  subprocess.run([sys.executable, "-c", _SCRIPT, encoder_dir, out, str(tmp_path / f"snap{devices}")],
                 cwd=ROOT, env=env, check=True, timeout=900)
  return dict(np.load(out))


def test_a_micro_batch_sharded_over_two_devices_answers_as_one_device(tmp_path):
  encoder_dir = testing.tiny_encoder_dir(str(tmp_path / "encoder"))
  two, one = _run(tmp_path, encoder_dir, 2), _run(tmp_path, encoder_dir, 1)
  assert int(two.pop("devices")) == 2 and int(one.pop("devices")) == 1
  assert set(two) == set(one) and "state_occupancy" in two and "state_fine_occupancy" in two
  for k in sorted(one):
    if k.startswith("reps"):
      np.testing.assert_allclose(two[k], one[k], rtol=1e-5, atol=1e-6, err_msg=k)
    else:
      np.testing.assert_array_equal(two[k], one[k], err_msg=k)
