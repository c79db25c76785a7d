"""Job `coverage`: coverage and cost curves (paper Fig. 3a, 3b, 4, 7, 10).

  python -m b4b_jax.main --config=configs/coverage.py --workdir=DIR --config.source.encoder=VICTIM_DIR

Query sets are embedded once (the first `num_queries` images of each, or random-noise images), then
sent by one account each to a counting DefendedEncoder per bucket count 2^K. Writes results.json,
report.md, coverage_K<k>.png (Fig. 3a / 10), queries_per_bucket.png (Fig. 3b), sigma_vs_coverage_*.png
(Fig. 4 / 7), sigma_vs_queries.png, metrics.jsonl / TensorBoard.
"""
import os

import numpy as np

from b4b_jax import defense
from b4b_jax.evaluation import coverage_curves
from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import report
from b4b_jax.utils import distributed
from b4b_jax.utils import files
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib

RANDOM_NOISE = "random_noise"


def query_set_reps(config, workdir, source):
  """{set name: clean representations [N, D]} of every query set (cached in workdir/embeddings)."""
  encoder = source.encoder
  transform = embeddings_lib.eval_transform(encoder, config.source.transform)
  sets = {}
  for qs in config.query_sets:
    name = qs.name
    path = os.path.join(workdir, "embeddings", f"queries_{embeddings_lib.safe_name(name)}.npz")
    if distributed.agree(os.path.exists(path)):  # process 0's view: embedding below is collective
      sets[name] = embeddings_lib.load_array(path)
      continue
    if qs.dataset == RANDOM_NOISE:
      images = coverage_curves.random_noise_images(qs.num_queries, encoder.input_size, config.seed)
      reps = embeddings_lib.embed_images(encoder, images, batch_size=config.source.batch_size)
    else:
      reps, _ = embeddings_lib.embed_split(
          encoder, qs.dataset, qs.split, transform=transform, batch_size=config.source.batch_size,
          data_dir=config.source.data_dir, limit=qs.num_queries, seed=config.seed,
          shuffle_files=qs.shuffle, progress=name)
    embeddings_lib.save_array(path, reps, meta={"dataset": qs.dataset, "split": qs.split})
    sets[name] = reps
  return sets


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  if config.query_batch_size < 1:
    raise ValueError(f"query_batch_size must be >= 1, got {config.query_batch_size}")
  for k in config.bucket_bits:
    defense.validate_config(coverage_curves.counting_config(config.defense, k))
  defense.validate_config(config.defense)
  for qs in config.query_sets:
    if qs.num_queries < 1:
      raise ValueError(f"query set {qs.name!r}: num_queries must be >= 1, got {qs.num_queries}")


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  sets = query_set_reps(config, workdir, source)
  base = config.defense

  # The defense's own bucket count is always included: the sigma-vs-queries curves need it.
  bucket_bits = sorted(set(config.bucket_bits) | {base.num_hyperplanes})
  prog = progress_lib.Progress("coverage", len(bucket_bits) * len(sets), unit="curve")
  done = [0]

  def on_curve(k, name):
    done[0] += 1
    prog.update(done[0], K=k, set=name)

  curves = coverage_curves.coverage_vs_queries(sets, base_config=base, bucket_bits=bucket_bits,
                                               batch_size=config.query_batch_size, on_batch=on_curve)
  for k, per_set in curves.items():
    for name, c in per_set.items():
      for q, cov in zip(c["num_queries"], c["coverage"]):
        writer.write_scalars(q, {"coverage": cov}, stage=f"coverage/K{k}/{name}")
  writer.close()
  k_main = str(base.num_hyperplanes)
  sigma_q = (coverage_curves.sigma_vs_queries(curves[k_main], lam=base.lam, alpha=base.alpha,
                                              beta=base.beta) if k_main in curves else {})
  sigma_c = {name: coverage_curves.sigma_vs_coverage([s.to_dict() for s in settings])
             for name, settings in config.sigma_settings.items()}
  per_bucket = {name: coverage_curves.queries_per_bucket(reps, base_config=base,
                                                         num_hyperplanes=base.num_hyperplanes)
                for name, reps in sets.items()}
  results = {"curves": curves, "sigma_vs_queries": sigma_q, "sigma_vs_coverage": sigma_c,
             "queries_per_bucket": per_bucket,
             "defense": {"lam": base.lam, "alpha": base.alpha, "beta": base.beta,
                         "num_hyperplanes": base.num_hyperplanes,
                         "num_projections": base.num_projections}}
  # The raw curves are large: keep them next to results.json, and only summaries inside it.
  if distributed.is_writer():  # multi-host: every process computed the same curves; one writes
    files.atomic_write_json(os.path.join(workdir, "curves.json"), results)
  summary = _summary(config, curves)
  plots = _plots(workdir, curves, sigma_q, sigma_c, per_bucket, k_main)
  sections = _sections(config, base, summary, per_bucket)
  report.write_experiment(workdir, "Coverage and cost curves",
                          {"summary": summary, "queries_per_bucket_occupied_pct":
                           {n: b["occupied_pct"] for n, b in per_bucket.items()},
                           "defense": results["defense"], "curves_file": "curves.json"},
                          config=config, sections=sections, plots=plots)
  return results


def _coverage_at(curve, q):
  """Coverage after the first batch that reaches q queries (None if the set is shorter)."""
  for n, c in zip(curve["num_queries"], curve["coverage"]):
    if n >= q:
      return c
  return None


def _summary(config, curves):
  out = {}
  for k, per_set in curves.items():
    out[k] = {name: {"final_queries": c["num_queries"][-1], "final_coverage": c["coverage"][-1],
                     **{f"coverage_at_{q}": _coverage_at(c, q) for q in config.report_at}}
              for name, c in per_set.items()}
  return out


def _plots(workdir, curves, sigma_q, sigma_c, per_bucket, k_main):
  plots = []
  for k, per_set in curves.items():
    plots.append(report.line_plot(
        os.path.join(workdir, f"coverage_K{k}.png"),
        [{"label": n, "x": c["num_queries"], "y": c["coverage"], "style": "-"}
         for n, c in per_set.items()],
        xlabel="queries", ylabel="buckets covered (%)", ylim=(0, 100),
        title=f"Coverage vs queries, 2^{k} buckets (paper Fig. 3a / 10)"))
  plots.append(report.line_plot(
      os.path.join(workdir, "queries_per_bucket.png"),
      [{"label": n, "x": b["buckets_pct"], "y": b["queries"], "style": "-"}
       for n, b in per_bucket.items()],
      xlabel="buckets (%), busiest first", ylabel="queries per bucket", logy=True,
      title=f"Queries per bucket, 2^{k_main} buckets (paper Fig. 3b)"))
  for name, settings in sigma_c.items():
    plots.append(report.line_plot(
        os.path.join(workdir, f"sigma_vs_coverage_{name}.png"),
        [{"label": f"λ={s['lam']:g} α={s['alpha']:g} β={s['beta']:g}%", "x": s["coverage"],
          "y": s["sigma"], "style": "-"} for s in settings],
        xlabel="coverage (%)", ylabel="noise std sigma",
        ylim=(0, max(s["alpha"] for s in settings) * 1.5),
        title=f"Cost function ({name})"))
  if sigma_q:
    plots.append(report.line_plot(
        os.path.join(workdir, "sigma_vs_queries.png"),
        [{"label": n, "x": c["num_queries"], "y": np.maximum(c["sigma"], 1e-12), "style": "-"}
         for n, c in sigma_q.items()],
        xlabel="queries", ylabel="sigma (B4B cost of the coverage)", logy=True,
        title=f"Noise each query set's account would get (2^{k_main} buckets)"))
  return plots


def _sections(config, base, summary, per_bucket):
  k_main = str(base.num_hyperplanes)
  rows = []
  for k, per_set in summary.items():
    for name, s in per_set.items():
      rows.append([f"2^{k}", name, s["final_queries"], report.fmt_num(s["final_coverage"])] +
                  [report.fmt_num(s[f"coverage_at_{q}"]) for q in config.report_at])
  anchors = paper_numbers.TEXT_ANCHORS
  return [
      ("Setup", f"Encoder `{config.source.encoder}`; LSH with P={base.num_projections} projections; "
                f"query batches of {config.query_batch_size}; coverage is the account's after each "
                f"batch (the defense's own occupancy tables). Cost curves: defense.noise_std."),
      ("Coverage (%)", report.markdown_table(
          ["buckets", "query set", "queries", "final coverage"] +
          [f"at {q} queries" for q in config.report_at], rows)),
      ("Queries per bucket", report.markdown_table(
          ["query set", "occupied buckets (%)"],
          [[n, report.fmt_num(b["occupied_pct"])] for n, b in per_bucket.items()])),
      ("Paper (text anchors; curves are figures only)",
       f"With 2^12 buckets, downstream tasks occupy < {anchors['coverage_downstream_50k_max_pct']:g}% "
       f"of the buckets after 50k queries; ImageNet reaches ~{anchors['coverage_imagenet_100k_pct']:g}% "
       f"after ~100k; with 2^14 buckets coverage stays below "
       f"~{anchors['coverage_2pow14_imagenet_max_pct']:g}%; 2^8 saturates after ~50k ImageNet "
       f"queries. Our main setting: 2^{k_main}."),
  ]
