r"""Defense speed benchmark (issue 2, item 6).

  python -m b4b_jax.main --config=configs/defense_benchmark.py --workdir=/tmp/b4b/defense_benchmark
  python -m b4b_jax.main --config=configs/defense_benchmark.py:tiny --workdir=/tmp/b4b/bench_tiny

Writes results.json, report.md and metrics (TensorBoard + metrics.jsonl) into the workdir. The full
variant (D=2048, P=20, K=12, 20480 representations in batches of 256; serving batches of 1024 with
1/64/1024 users) takes one to two minutes on a 2-core CPU (mostly the original algorithm); "tiny" takes seconds.
"""
import ml_collections


def get_config(arg=None):
  config = ml_collections.ConfigDict()
  config.job = "defense_benchmark"
  b = config.benchmark = ml_collections.ConfigDict()
  b.rep_dim = 2048
  b.num_projections = 20
  b.num_hyperplanes = 12
  b.batch_size = 256
  b.num_reps = 20480
  b.serving_batch_size = 1024
  b.users_mixed = (1, 64, 1024)
  b.repeats = 5
  b.trials = 5
  b.seed = 0
  if arg == "tiny":
    b.rep_dim = 64
    b.num_projections = 4
    b.num_hyperplanes = 6
    b.batch_size = 32
    b.num_reps = 256
    b.serving_batch_size = 32
    b.users_mixed = (1, 4, 16)
    b.repeats = 2
    b.trials = 1
  elif arg is not None:
    raise ValueError(f"unknown variant {arg!r}; expected none or 'tiny'")
  return config
