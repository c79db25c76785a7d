r"""Defense speed benchmark: our jitted step vs the original coverage algorithm and the matmul floor.

  python benchmarks/defense.py            # D=2048, P=20, K=12, 20480 reps in batches of 256
  python benchmarks/defense.py --tiny     # seconds, for a smoke check

Prints (a) coverage-update throughput (ours vs a numpy/Python-set port of the original get_buckets,
with the ratio), (b) the matmul floor, (c) serving throughput with 1, 64 and 1024 users mixed per
batch (and the ratio to the floor), (d) bytes of state per user. Never asserts a time. The same code
runs as a job: python -m b4b_jax.main --config=configs/defense_benchmark.py --workdir=DIR
"""
import importlib.util
import os
import sys

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, _ROOT)

from b4b_jax.defense import benchmark  # noqa: E402  pylint: disable=wrong-import-position


def _load_config(variant):
  spec = importlib.util.spec_from_file_location(
      "defense_benchmark_config", os.path.join(_ROOT, "configs", "defense_benchmark.py"))
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module.get_config(variant)


if __name__ == "__main__":
  config = _load_config("tiny" if "--tiny" in sys.argv[1:] else None)
  benchmark.run(**config.benchmark.to_dict())
