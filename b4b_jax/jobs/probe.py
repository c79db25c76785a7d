"""Job `probe`: linear-probe accuracy of a frozen encoder (victim or stolen) on downstream datasets.

  python -m b4b_jax.main --config=configs/probe.py --workdir=DIR --config.source.encoder=ENC_DIR

Writes results.json, report.md (Table-1 layout where a paper row is named), val_curves.png,
metrics.jsonl / TensorBoard, and embeddings/<dataset>.npz (reused on resume).
"""
import os

import numpy as np
from absl import logging

from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import report
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  linear_probe.check_probe_config(config.probe)
  if not config.datasets:
    raise ValueError("config.datasets is empty")


def probe_datasets(config, workdir, *, writer, stage="probe"):
  """Embeds (or reads) each dataset and probes it; {dataset: probe result dict}."""
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  results = {}
  for dataset in config.datasets:
    emb = source.get(dataset)
    prog = progress_lib.Progress(f"{stage}/{dataset}", config.probe.epochs, unit="epoch")

    def on_epoch(epoch, stats, dataset=dataset, prog=prog):
      val = float(np.mean(stats["val_top1"]))
      loss = float(np.mean(stats["train_loss"]))
      prog.update(epoch, val_top1=val, loss=loss)
      writer.write_scalars(epoch, {"val_top1": val, "train_loss": loss}, stage=f"{stage}/{dataset}",
                           check_finite=True)

    probe = linear_probe.run_probe(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                                   config.probe, on_epoch=on_epoch)
    logging.info("[%s] %s: test top-1 %.2f ± %.2f", stage, dataset, probe.test_top1_mean,
                 probe.test_top1_std)
    results[dataset] = dict(probe.to_dict(), num_train=int(len(emb["train_y"])),
                            num_test=int(len(emb["test_y"])), rep_dim=int(emb["train_x"].shape[1]))
  return results


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  results = probe_datasets(config, workdir, writer=writer)
  writer.close()

  plots = []
  series = []
  for dataset, r in results.items():
    curves = np.array([s["val_curve"] for s in r["seeds"]])
    if curves.size and r["method"] != "ridge":
      series.append({"label": dataset, "x": np.arange(1, curves.shape[1] + 1), "y": curves.mean(0)})
  if series:
    plots.append(report.line_plot(os.path.join(workdir, "val_curves.png"), series, xlabel="epoch",
                                  ylabel="validation top-1 (%)",
                                  title="Linear probe: validation accuracy (mean over seeds)"))

  row = report.table1_row(config.table_row.user, config.table_row.defense, config.table_row.queries,
                          config.table_row.data,
                          {d: (r["test_top1_mean"], r["test_top1_std"]) for d, r in results.items()})
  table = report.table1([row], paper_table=config.paper_table or None)
  rows = [[d, r["num_train"], r["num_test"], r["rep_dim"], report.fmt_acc(r["test_top1_mean"],
                                                                          r["test_top1_std"]),
           ", ".join(report.fmt_num(s["selected"]) for s in r["seeds"])] for d, r in results.items()]
  sections = [
      ("Setup", f"Encoder `{config.source.encoder}`; probe `{config.probe.method}` "
                f"({config.probe.epochs} epochs, batch {config.probe.batch_size}, lr "
                f"{config.probe.learning_rate}, normalisation {config.probe.normalization}); the model "
                f"of each seed is chosen on a {config.probe.val_fraction:.0%} validation split of "
                f"train, test is evaluated once."),
      ("Test top-1 (mean ± std over seeds)",
       report.markdown_table(["dataset", "#train", "#test", "dim", "test top-1 %", "selected"], rows)),
      ("Table-1 layout", table["markdown"]),
  ]
  summary = {"datasets": results, "table1": {"row": row, "paper_table": table["paper_table"],
                                             "matched_cells": table["matched"]}}
  report.write_experiment(workdir, "Linear probe", summary, config=config, sections=sections,
                          plots=plots)
  return summary

