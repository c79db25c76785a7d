"""Job `remap`: the cost of remapping between two sybil accounts (paper §4.3, Fig. 5).

  python -m b4b_jax.main --config=configs/remap.py --workdir=DIR --config.source.encoder=VICTIM_DIR

The API serves the encoder's features x config.rep_scale (the original: SimSiam x1000), so the
transforms, the noise, the mappers and the reference classifier act on scaled features; the reference
classifier is the original's embedding probe (probe.paper_hparams: its Adam lr/epochs for the task, no
standardisation), epoch chosen on validation.
Writes results.json (with rep_scale), report.md, remap_cosine_<noise>.png (Fig. 5), remap_top1_<noise>.png
(accuracy of the reference classifier on mapped representations), metrics.jsonl / TensorBoard.
"""
import os

from absl import logging

from b4b_jax import defense
from b4b_jax.attacks import mapper as mapper_lib
from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import remap as remap_lib
from b4b_jax.evaluation import report
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  linear_probe.check_probe_config(config.probe)
  legit_lib.check_rep_scale(config.rep_scale)
  if config.query_batch_size < 1:
    raise ValueError(f"query_batch_size must be >= 1, got {config.query_batch_size}")
  for transform in config.transforms:
    for noise in config.noise_modes:
      defense.validate_config(remap_lib.account_config(config.defense, transform, noise))
  if not config.overlaps or min(config.overlaps) < 0:
    raise ValueError(f"overlaps must be non-empty counts >= 0, got {config.overlaps}")
  if config.mapper.kind not in mapper_lib.MAPPER_KINDS:
    raise ValueError(f"unknown mapper.kind {config.mapper.kind!r}; choose one of "
                     f"{mapper_lib.MAPPER_KINDS}")


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  emb = source.get(config.dataset)
  base = config.defense
  total = len(config.transforms) * len(config.noise_modes)
  prog = progress_lib.Progress("remap", total, unit="cell")

  def on_cell(i, n, cell):
    last = cell["points"][-1]
    prog.update(i, transform=cell["transform"], noise=cell["noise"], cos_dist=last["cos_dist"])
    writer.write_scalars(
        i, {"reference_top1": cell["reference_top1"], "cos_dist_max_n": last["cos_dist"],
            "top1_max_n": last["top1"]}, stage=f"remap/{cell['noise']}/{cell['transform']}")
    logging.info("[remap] %s/%s: reference %.2f, n=%d: cos %.4f top-1 %.2f", cell["noise"],
                 cell["transform"], cell["reference_top1"], last["n"], last["cos_dist"], last["top1"])

  results = remap_lib.remap_experiment(
      emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"], base_defense_config=base,
      transforms=config.transforms, noise_modes=config.noise_modes, overlaps=config.overlaps,
      classifier_cfg=paper_numbers.embedding_probe_for(config.probe, config.encoder_kind,
                                                       config.dataset),
      mapper_kind=config.mapper.kind, mapper_options=config.mapper.options.to_dict(),
      query_batch_size=config.query_batch_size, seed=config.seed, rep_scale=config.rep_scale,
      on_cell=on_cell)
  writer.close()
  results["dataset"] = config.dataset
  results["num_train"], results["num_test"] = int(len(emb["train_y"])), int(len(emb["test_y"]))
  plots = remap_plots(results, workdir)
  rows = []
  for c in results["cells"]:
    for p in c["points"]:
      rows.append([c["noise"], remap_lib.TRANSFORM_TITLES.get(c["transform"], c["transform"]), p["n"],
                   report.fmt_num(p["cos_dist"]), report.fmt_acc(p["top1"]),
                   report.fmt_acc(c["reference_top1"]), report.fmt_num(p["top1_drop"])])
  sections = [
      ("Setup", f"Dataset `{config.dataset}` ({results['num_train']} train / {results['num_test']} test "
                f"queries per account), encoder `{config.source.encoder}` served x"
                f"{config.rep_scale:g} (rep_scale), defense "
                f"lambda={config.defense.lam:g}, alpha={config.defense.alpha:g}, "
                f"beta={config.defense.beta:g}%, 2^{config.defense.num_hyperplanes} buckets. Accounts "
                f"A and B of one DefendedEncoder get independent transforms of the same type; noise "
                f"`none` = transforms only, `b4b` = the B4B cost of each account's own coverage. A "
                f"{config.mapper.kind} mapper B->A is fitted on the first n overlapping train "
                f"queries; metrics on the test queries. n = 0: unmapped."),
      ("Results", report.markdown_table(
          ["noise", "transform", "n overlap", "mean cosine distance", "top-1 on mapped B %",
           "top-1 on A %", "drop (points)"], rows)),
      ("Paper", "Fig. 5 (values only as a figure): cosine distances stay small (< 0.16) for every "
                "transform and binary is the highest; affine-type transforms are linear, so without "
                "noise a linear mapper inverts them given enough overlap (reference §4.2)."),
  ]
  report.write_experiment(workdir, "Remapping between sybil accounts", results, config=config,
                          sections=sections, plots=plots)
  return results


def remap_plots(results, workdir):
  """Fig. 5 (cosine distance vs overlap) and the accuracy on mapped representations, per noise mode."""
  plots = []
  for noise in sorted({c["noise"] for c in results["cells"]}):
    cells = [c for c in results["cells"] if c["noise"] == noise]
    for metric, ylabel, name in (("cos_dist", "mean cosine distance (mapped B vs A)", "cosine"),
                                 ("top1", "reference top-1 on mapped B (%)", "top1")):
      series = [{"label": remap_lib.TRANSFORM_TITLES.get(c["transform"], c["transform"]),
                 "x": [p["n"] for p in c["points"]], "y": [p[metric] for p in c["points"]]}
                for c in cells if c["points"]]
      if series:
        plots.append(report.line_plot(
            os.path.join(workdir, f"remap_{name}_{noise.replace(' ', '_').replace('=', '')}.png"),
            series, xlabel="overlapping queries n", ylabel=ylabel,
            title=f"Remapping B->A ({results['mapper']} mapper, noise: {noise})"))
  return plots
