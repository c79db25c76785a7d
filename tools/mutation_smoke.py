"""Mutation smoke check (run by hand before a release; not part of CI).

Applies hand-written bugs to a scratch copy of the working tree, one at a time, runs the tests that
should catch each, and prints which bugs survived (the tests still passed). A survivor means a blind
spot in the suite; a "stale" mutation no longer matches the code (update its snippet).

  python tools/mutation_smoke.py                 # all mutations (about 10 min on 2 CPU cores)
  python tools/mutation_smoke.py --list
  python tools/mutation_smoke.py -k crop -k vit  # only mutations whose name contains a substring
  python tools/mutation_smoke.py --baseline      # first check the selected tests pass unmutated

Each mutation: (name, file, old snippet, new snippet, pytest node ids or files [+ "-k expr"]). The old
snippet must occur exactly once in the file. Add one entry for every bug fixed from now on.
"""
import argparse
import dataclasses
import os
import shutil
import subprocess
import sys
import tempfile
import time
from typing import List, Sequence

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@dataclasses.dataclass(frozen=True)
class Mutation:
  name: str
  path: str
  old: str
  new: str
  tests: Sequence[str]  # pytest arguments (node ids, files, "-k", expressions)


_CONV = "tests/test_conversion_equivalence.py::test_dino_vit_small_matches_torch"
_VIT = "tests/test_models_vit.py::test_vit_other_resolution_matches_dino_torch"
_CROP = ["tests/test_data_preprocess.py", "-k", "random_resized_crop"]
_AUG = ["tests/test_attacks_augment.py"]
_SYBIL = ["tests/test_attacks_protocol.py"]
_CLAIMS = ["tests/test_demo_claims.py"]
_SIMSIAM = ["tests/test_victim_simsiam_loss.py"]
_TRANSFORMS = ["tests/test_defense_transforms.py", "-k", "binary_slopes or binary_transform_follows"]
_RESTORE = ["tests/test_defense_restore_integrity.py"]
_WRITERS = ["tests/test_process_zero_writes.py"]

MUTATIONS: List[Mutation] = [
    # --- the four of issue 16 ------------------------------------------------------------------------
    Mutation("vit: qkv and fc2 biases dropped", "b4b_jax/models/vit.py",
             "qkv = self.qkv(x).reshape(", "qkv = (x @ self.qkv.kernel[...]).reshape(", [_CONV, _VIT]),
    Mutation("vit: fc2 bias dropped", "b4b_jax/models/vit.py",
             "return self.fc2(jax.nn.gelu(self.fc1(x), approximate=False))",
             "return jax.nn.gelu(self.fc1(x), approximate=False) @ self.fc2.kernel[...]", [_CONV, _VIT]),
    Mutation("crop: offsets off by one", "b4b_jax/data/preprocess.py",
             "top = tf.floor(u_top * (h - ch + 1))", "top = tf.floor(u_top * (h - ch))", _CROP),
    Mutation("crop: aspect ratio uniform, not log-uniform", "b4b_jax/data/preprocess.py",
             "log_r = tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[1], math.log(ratio[0]), "
             "math.log(ratio[1]),",
             "log_r = tf.random.stateless_uniform([_RRC_ATTEMPTS], seeds[1], ratio[0], ratio[1],",
             _CROP),
    Mutation("sybil: mapper output discarded in map_rows", "b4b_jax/attacks/protocol.py",
             "      out[rows] = out_rows\n", "      out[rows] = responses[rows]\n", _SYBIL),
    # --- nearby bugs of the same kinds ---------------------------------------------------------------
    Mutation("vit: attention projection bias dropped", "b4b_jax/models/vit.py",
             "return self.proj(out)", "return out @ self.proj.kernel[...]", [_CONV]),
    Mutation("vit: fc1 bias dropped", "b4b_jax/models/vit.py",
             "self.fc1(x), approximate=False", "x @ self.fc1.kernel[...], approximate=False", [_CONV]),
    Mutation("vit: patch-embedding bias dropped", "b4b_jax/models/vit.py",
             "    x = self.proj(x)  # [B, H/p, W/p, D]",
             "    x = self.proj(x) - self.proj.bias[...]  # [B, H/p, W/p, D]", [_CONV]),
    Mutation("vit: LayerNorm bias ignored", "b4b_jax/models/vit.py",
             "    x = x + self.attn(self.norm1(x))",
             "    x = x + self.attn(self.norm1(x) - self.norm1.bias[...])", [_CONV]),
    Mutation("vit: tanh GELU instead of erf", "b4b_jax/models/vit.py",
             "approximate=False", "approximate=True", [_CONV]),
    Mutation("crop: left offset off by one", "b4b_jax/data/preprocess.py",
             "left = tf.floor(u_left * (w - cw + 1))", "left = tf.floor(u_left * (w - cw))", _CROP),
    Mutation("crop: last fitting attempt, not the first", "b4b_jax/data/preprocess.py",
             "first = tf.argmax(tf.cast(fits, tf.int32))",
             "first = _RRC_ATTEMPTS - 1 - tf.argmax(tf.cast(fits, tf.int32)[::-1])", _CROP),
    Mutation("crop: fallback is the whole image", "b4b_jax/data/preprocess.py",
             "tf.stack([fb_top, fb_left, fb_h, fb_w]))", "tf.stack([0.0 * h, 0.0 * w, h, w]))", _CROP),
    Mutation("crop: sides truncated, not rounded", "b4b_jax/data/preprocess.py",
             "cw = tf.round(tf.sqrt(target * aspect))", "cw = tf.floor(tf.sqrt(target * aspect))", _CROP),
    Mutation("augment: brightness adds instead of scaling", "b4b_jax/attacks/augment.py",
             "bright = x * factor[0]", "bright = x + factor[0] - 1.0", _AUG),
    Mutation("augment: contrast around 0.5, not the grey mean", "b4b_jax/attacks/augment.py",
             "contrast = (x - jnp.mean(_gray(x))) * factor[1] + jnp.mean(_gray(x))",
             "contrast = (x - 0.5) * factor[1] + 0.5", _AUG),
    Mutation("augment: saturation blends to the channel mean", "b4b_jax/attacks/augment.py",
             "sat = (x - _gray(x)) * factor[2] + _gray(x)",
             "sat = (x - jnp.mean(x, -1, keepdims=True)) * factor[2] + jnp.mean(x, -1, keepdims=True)",
             _AUG),
    Mutation("augment: hue shift sign flipped", "b4b_jax/attacks/augment.py",
             "hue = _hsv_to_rgb((h + factor[3]) % 1.0, s, v)",
             "hue = _hsv_to_rgb((h - factor[3]) % 1.0, s, v)", _AUG),
    Mutation("augment: jitter in fixed order", "b4b_jax/attacks/augment.py",
             "for which in jax.random.permutation(k_order, 4):", "for which in jnp.arange(4):", _AUG),
    Mutation("augment: grayscale weights of R and B swapped", "b4b_jax/attacks/augment.py",
             "_GRAY = jnp.asarray([0.299, 0.587, 0.114], jnp.float32)",
             "_GRAY = jnp.asarray([0.114, 0.587, 0.299], jnp.float32)", _AUG),
    Mutation("augment: blur pads with zeros", "b4b_jax/attacks/augment.py",
             'padded = jnp.pad(x, pad, mode="reflect")', 'padded = jnp.pad(x, pad, mode="constant")',
             _AUG),
    Mutation("augment: blur sigma range 0.1..1", "b4b_jax/attacks/augment.py",
             "sigma = jax.random.uniform(key, minval=0.1, maxval=2.0)",
             "sigma = jax.random.uniform(key, minval=0.1, maxval=1.0)", _AUG),
    Mutation("augment: crop offsets off by one", "b4b_jax/attacks/augment.py",
             "top = jnp.floor(jax.random.uniform(k_i) * (height - h + 1))",
             "top = jnp.floor(jax.random.uniform(k_i) * (height - h))", _AUG),
    Mutation("sybil: account 1's responses replaced by the mapper's", "b4b_jax/attacks/protocol.py",
             "for account in sorted(set(int(a) for a in accounts_per_row) - {0}):",
             "for account in sorted(set(int(a) for a in accounts_per_row)):", _SYBIL),
    Mutation("sybil: mapper of the wrong account", "b4b_jax/attacks/protocol.py",
             "out_rows = self.mappers[account].apply(responses[rows])",
             "out_rows = self.mappers[max(self.mappers)].apply(responses[rows])", _SYBIL),
    Mutation("demo claim: legit drop on the wrong side", "b4b_jax/demo/report.py",
             'add("Legitimate users lose < 1 point of accuracy under B4B", drop, legit["drop_samples"], 1.0,\n'
             '      "below",',
             'add("Legitimate users lose < 1 point of accuracy under B4B", drop, legit["drop_samples"], 1.0,\n'
             '      "above",', _CLAIMS),
    Mutation("demo claim: sybil shortfall with swapped operands", "b4b_jax/demo/report.py",
             'und["fidelity_r2_photos"] - syb["fidelity_r2_photos"], gains["attack_sybil"]',
             'syb["fidelity_r2_photos"] - und["fidelity_r2_photos"], gains["attack_sybil"]', _CLAIMS),
    Mutation("demo claim: decide ignores the margin", "b4b_jax/demo/claims.py",
             "above, below = lo >= threshold + margin, hi <= threshold - margin",
             "above, below = lo >= threshold, hi <= threshold", _CLAIMS),
    Mutation("demo claim: coverage read at the thief's last entry", "b4b_jax/demo/report.py",
             'before = [e for e in log if e["num_queries"] <= num_queries]',
             'before = list(log)', _CLAIMS),
    Mutation("simsiam: no stop-gradient on z", "b4b_jax/demo/victim.py",
             "  z = jax.lax.stop_gradient(z)\n", "", _SIMSIAM),
    Mutation("simsiam: loss not symmetric", "b4b_jax/demo/victim.py",
             "0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))",
             "negative_cosine(p1, z2)", _SIMSIAM),
    Mutation("simsiam: predictor matched to its own view", "b4b_jax/demo/victim.py",
             "0.5 * (negative_cosine(p1, z2) + negative_cosine(p2, z1))",
             "0.5 * (negative_cosine(p1, z1) + negative_cosine(p2, z2))", _SIMSIAM),
    Mutation("binary: intercepts zero", "b4b_jax/defense/transforms.py",
             'out["bias"] = jnp.sum(slopes * points, axis=0)',
             'out["bias"] = jnp.zeros_like(jnp.sum(slopes * points, axis=0))', _TRANSFORMS),
    Mutation("binary: point grid 0..1 in 1000ths, not linspace", "b4b_jax/defense/transforms.py",
             ".astype(jnp.float32) / 999.0", ".astype(jnp.float32) / 1000.0", _TRANSFORMS),
    Mutation("binary: slopes tan(pi U)", "b4b_jax/defense/transforms.py",
             "-jnp.tan(2.0 * jnp.pi * angles)", "-jnp.tan(jnp.pi * angles)", _TRANSFORMS),
    Mutation("restore: popcount check removed", "b4b_jax/defense/api.py",
             'if not np.array_equal(lsh.popcount(host["occupancy"]), host["counts"]):',
             "if False:", _RESTORE),
    Mutation("restore: counter check removed", "b4b_jax/defense/api.py",
             'if (host["num_queries"] < 0).any() or (host["num_batches"] < 0).any() or (',
             'if False and (', _RESTORE),
    Mutation("restore: empty-slot check removed", "b4b_jax/defense/api.py",
             'if host["occupancy"][unused].any() or host["num_queries"][unused].any() or host["uids"][',
             'if False and host["uids"][', _RESTORE),
    Mutation("restore: hyperplane checksum not compared", "b4b_jax/defense/api.py",
             'if _sha256(api._params.hyperplanes) != meta.get("hyperplanes_sha256"):',
             "if False:", _RESTORE),
    Mutation("writers: metrics written by every process", "b4b_jax/utils/metrics.py",
             "self.is_writer = jax.process_index() == 0", "self.is_writer = True", _WRITERS),
    Mutation("writers: results written by every process", "b4b_jax/evaluation/report.py",
             "  if jax.process_index() != 0:  # multi-host runs: only process 0 writes\n    return paths",
             "  if False:\n    return paths", _WRITERS),
    Mutation("writers: workdir records written by every process", "b4b_jax/utils/workdir.py",
             "if jax.process_index() == 0:", "if True:", _WRITERS),
]


def _copy_tree(dest: str) -> None:
  ignore = shutil.ignore_patterns(".git", "__pycache__", ".pytest_cache", "*.pyc", "workdirs")
  shutil.copytree(ROOT, dest, ignore=ignore, dirs_exist_ok=True)


def _run_tests(tree: str, args: Sequence[str], timeout: int) -> tuple:
  cmd = [sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", *args]
  t0 = time.time()
  try:
    proc = subprocess.run(cmd, cwd=tree, capture_output=True, text=True, timeout=timeout)
    rc, tail = proc.returncode, (proc.stdout + proc.stderr).strip().splitlines()[-1:]
  except subprocess.TimeoutExpired:
    rc, tail = -1, ["timeout"]
  return rc, time.time() - t0, tail[0] if tail else ""


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("-k", action="append", default=[], help="substring of mutation names to run")
  parser.add_argument("--list", action="store_true")
  parser.add_argument("--check", action="store_true", help="only check every old snippet still matches")
  parser.add_argument("--baseline", action="store_true", help="run the selected tests unmutated first")
  parser.add_argument("--timeout", type=int, default=900, help="seconds per mutation")
  args = parser.parse_args(argv)
  selected = [m for m in MUTATIONS if not args.k or any(k in m.name for k in args.k)]
  if args.list:
    for m in selected:
      print(f"{m.name:58s} {m.path}  ->  {' '.join(m.tests)}")
    return 0
  if args.check:
    stale = []
    for m in selected:
      with open(os.path.join(ROOT, m.path)) as f:
        if f.read().count(m.old) != 1:
          stale.append(m.name)
    print(f"{len(selected) - len(stale)}/{len(selected)} snippets match" + "".join(
        f"\n  STALE {n}" for n in stale))
    return 1 if stale else 0
  scratch = tempfile.mkdtemp(prefix="b4b-mutation-")
  results = []
  try:
    _copy_tree(scratch)
    if args.baseline:
      tests = sorted({t for m in selected for t in m.tests if t.endswith(".py") or "::" in t})
      rc, secs, tail = _run_tests(scratch, tests, args.timeout * 4)
      print(f"baseline ({len(tests)} test files/ids): rc {rc} in {secs:.0f}s  {tail}", flush=True)
      if rc != 0:
        print("the unmutated tests fail: fix them first")
        return 2
    for m in selected:
      path = os.path.join(scratch, m.path)
      with open(path) as f:
        original = f.read()
      count = original.count(m.old)
      if count != 1:
        results.append((m, "STALE", 0.0, f"old snippet found {count} times"))
        print(f"STALE     {m.name}: old snippet found {count} times in {m.path}", flush=True)
        continue
      with open(path, "w") as f:
        f.write(original.replace(m.old, m.new))
      try:
        rc, secs, tail = _run_tests(scratch, m.tests, args.timeout)
      finally:
        with open(path, "w") as f:
          f.write(original)
      verdict = "caught" if rc == 1 else ("SURVIVED" if rc == 0 else f"ERROR rc={rc}")
      results.append((m, verdict, secs, tail))
      print(f"{verdict:9s} {m.name}  ({secs:.0f}s: {tail})", flush=True)
  finally:
    shutil.rmtree(scratch, ignore_errors=True)
  survived = [r for r in results if r[1] != "caught"]
  print(f"\n{len(results) - len(survived)}/{len(results)} mutations caught; "
        f"{len(survived)} survived, stale or errored" + (":" if survived else "."))
  for m, verdict, _, _ in survived:
    print(f"  {verdict:9s} {m.name}")
  return 1 if survived else 0


if __name__ == "__main__":
  sys.exit(main())
