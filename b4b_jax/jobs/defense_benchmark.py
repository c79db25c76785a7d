"""Job `defense_benchmark`: the defense speed benchmark, with results in the workdir.

  python -m b4b_jax.main --config=configs/defense_benchmark.py --workdir=DIR

Writes DIR/results.json (figures, config, library versions), DIR/report.md and metrics (TensorBoard +
metrics.jsonl, one stage per benchmark section). Same code as benchmarks/defense.py.
"""
import os

from absl import logging

from b4b_jax.defense import benchmark
from b4b_jax.utils import files
from b4b_jax.utils.metrics import MetricsWriter
from b4b_jax.utils.progress import Progress
from b4b_jax.utils.versions import library_versions

_SECTIONS = ("coverage_update", "matmul_floor", "serving", "state")


def _scalars(figures, prefix=""):
  """Flattens nested figures to {"a/b": float} (numbers only)."""
  out = {}
  for key, value in figures.items():
    name = f"{prefix}{key}"
    if isinstance(value, dict):
      out.update(_scalars(value, name + "/"))
    elif isinstance(value, (int, float)) and not isinstance(value, bool):
      out[name] = float(value)
  return out


def run(config, workdir: str) -> dict:
  settings = config.benchmark.to_dict()
  writer = MetricsWriter(workdir)
  progress = Progress("defense_benchmark", len(_SECTIONS), unit="section", every_seconds=0.0)

  def on_section(name, figures):
    writer.write_scalars(0, _scalars(figures), stage=name)
    progress.update(_SECTIONS.index(name) + 1, section=name)

  results = benchmark.run(**settings, log=logging.info, on_section=on_section)
  writer.flush()
  writer.close()
  results = {**results, "config": config.to_dict(), "versions": library_versions()}
  files.atomic_write_json(os.path.join(workdir, "results.json"), results)
  files.atomic_write_text(os.path.join(workdir, "report.md"), _report(results))
  return results


def _report(results: dict) -> str:
  c = results["coverage_update"]
  serving = results["serving"]
  rows = "\n".join(
      f"| {users} | {r['coverage_only']['reps_per_s']:,.0f} | {r['coverage_only']['over_floor']:.2f}x "
      f"| {r['full_defense']['reps_per_s']:,.0f} | {r['full_defense']['over_floor']:.2f}x |"
      for users, r in serving["by_users"].items())
  lines = "\n".join(results["lines"])
  return f"""# Defense benchmark

Platform: {results['platform']}; D={results['rep_dim']}, P={results['num_projections']},
K={results['num_hyperplanes']}.

## Coverage update ({results['num_reps']} representations, batches of {results['batch_size']}, 1 user)

| | reps/s |
|---|---|
| ours (jitted step) | {c['ours_reps_per_s']:,.0f} |
| original algorithm (numpy + Python sets) | {c['original_reps_per_s']:,.0f} |
| speedup | {c['speedup']:.1f}x |
| matmul floor | {results['matmul_floor']['reps_per_s']:,.0f} |
| ours / floor (time) | {results['matmul_floor']['coverage_update_over_floor']:.2f}x |

Final coverage: ours {c['ours_final_coverage']:.4f}%, original {c['original_final_coverage']:.4f}%.

## Serving (batches of {serving['batch_size']}; floor {serving['floor_reps_per_s']:,.0f} reps/s, \
N(0,1) noise alone {serving['noise_only_reps_per_s']:,.0f} reps/s)

| users per batch | coverage update reps/s | / floor | full defense reps/s | / floor |
|---|---|---|---|---|
{rows}

State per user: {results['state_bytes_per_user']} bytes.

## Printed output

```
{lines}
```
"""
