"""Job `probe`: linear-probe accuracy of a frozen encoder (a stolen copy or the victim) on downstream sets.

  python -m b4b_jax.main --config=configs/probe.py --workdir=DIR --config.source.encoder=ENC_DIR

Two protocols (config.protocol):
  paper      the original's image-level probe (evaluation/paper_probe.py): the stolen-copy rows
  embedding  Adam on (standardised) embeddings (evaluation/linear_probe.py)
Writes results.json, report.md (Table-1 layout where a paper row is named), val_curves.png,
metrics.jsonl / TensorBoard, and embeddings/<dataset>.npz (paper protocol: paper_<dataset>.npz, the
un-augmented features; reused on resume).
"""
import os

import numpy as np
from absl import logging

from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import paper_probe
from b4b_jax.evaluation import report
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib

PROTOCOLS = ("paper", "embedding")


def _protocol(config) -> str:
  return config.get("protocol", "embedding")


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  protocol = _protocol(config)
  if protocol not in PROTOCOLS:
    raise ValueError(f"config.protocol must be one of {PROTOCOLS}, got {protocol!r}")
  embeddings_lib.check_source(config.source)
  if protocol == "paper":
    paper_probe.check_config(config.probe)
    if not config.source.encoder:
      raise ValueError("the paper probe protocol feeds images through config.source.encoder (a stealing "
                       "workdir or an encoder directory); precomputed embeddings are not enough")
  else:
    linear_probe.check_probe_config(config.probe)
  if not config.datasets:
    raise ValueError("config.datasets is empty")


def _on_epoch(writer, stage, prog):
  def on_epoch(epoch, stats):
    val = float(np.mean(stats["val_top1"]))
    loss = float(np.mean(stats["train_loss"]))
    prog.update(epoch, val_top1=val, loss=loss)
    scalars = {"val_top1": val, "train_loss": loss}
    if "lr" in stats:
      scalars["lr"] = float(stats["lr"])
    writer.write_scalars(epoch, scalars, stage=stage, check_finite=True)
  return on_epoch


def _paper_dataset(config, workdir, source, dataset, on_epoch) -> dict:
  """The paper protocol on one dataset; the un-augmented features are cached for a resumed job."""
  encoder = source.encoder
  path = os.path.join(workdir, "embeddings", f"paper_{embeddings_lib.safe_name(dataset)}.npz")
  if os.path.exists(path):
    clean = embeddings_lib.load_npz(path)
  else:
    clean = paper_probe.clean_features(
        encoder, dataset, cfg=config.probe, data_dir=config.source.data_dir,
        train_split=config.source.train_split, test_split=config.source.test_split,
        train_limit=config.source.train_limit, test_limit=config.source.test_limit, seed=config.seed,
        batch_size=config.probe.embed_batch_size)
    embeddings_lib.save_npz(path, meta=dict(clean["meta"], encoder_spec=config.source.encoder),
                            **{k: clean[k] for k in embeddings_lib.NPZ_KEYS})
  probe = paper_probe.paper_probe(
      encoder, dataset, cfg=config.probe, data_dir=config.source.data_dir,
      train_split=config.source.train_split, test_split=config.source.test_split,
      train_limit=config.source.train_limit, test_limit=config.source.test_limit, seed=config.seed,
      clean=clean, on_epoch=on_epoch)
  logging.info("[probe/paper] %s: test top-1 %.2f (chosen on validation), %.2f (last epoch)", dataset,
               probe.test_top1_mean, probe.test_top1_last_mean)
  return dict(probe.to_dict(), num_train=probe.settings["num_train"],
              num_test=probe.settings["num_test"], rep_dim=probe.settings["rep_dim"])


def probe_datasets(config, workdir, *, writer, stage="probe"):
  """Embeds (or reads) each dataset and probes it; {dataset: probe result dict}."""
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  results = {}
  for dataset in config.datasets:
    prog = progress_lib.Progress(f"{stage}/{dataset}", config.probe.epochs, unit="epoch")
    on_epoch = _on_epoch(writer, f"{stage}/{dataset}", prog)
    if _protocol(config) == "paper":
      results[dataset] = _paper_dataset(config, workdir, source, dataset, on_epoch)
      continue
    emb = source.get(dataset)
    probe = linear_probe.run_probe(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                                   config.probe, on_epoch=on_epoch)
    logging.info("[%s] %s: test top-1 %.2f ± %.2f", stage, dataset, probe.test_top1_mean,
                 probe.test_top1_std)
    results[dataset] = dict(probe.to_dict(), protocol="embedding", num_train=int(len(emb["train_y"])),
                            num_test=int(len(emb["test_y"])), rep_dim=int(emb["train_x"].shape[1]))
  return results


def _setup_text(config) -> str:
  p = config.probe
  if _protocol(config) == "paper":
    return (f"Encoder `{config.source.encoder}`; probe protocol `paper` (the original's image-level "
            f"probe, reference §7.4): linear head on the frozen backbone in eval mode, fc N(0, std "
            f"0.01), SGD lr {p.base_lr:g} x {p.batch_size}/256, momentum {p.momentum:g}, wd "
            f"{p.weight_decay:g}, per-epoch cosine, {p.epochs} epochs; train augmentation `{p.augment}` "
            f"(auto: CIFAR10 RandomCrop(32, pad {p.pad}) + flip), Resize to the encoder's input; input "
            f"normalisation `{p.input_normalization}`. The epoch of each seed is chosen on a "
            f"{p.val_fraction:.0%} validation split of train; test is only scored. Best-on-test (the "
            f"original's `best_acc1`, model selection on test) is shown for comparison only.")
  return (f"Encoder `{config.source.encoder}`; probe protocol `embedding`: `{p.method}` on embeddings "
          f"({p.epochs} epochs, batch {p.batch_size}, lr {p.learning_rate}, normalisation "
          f"{p.normalization}); the model of each seed is chosen on a {p.val_fraction:.0%} validation "
          f"split of train, test is evaluated once.")


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  results = probe_datasets(config, workdir, writer=writer)
  writer.close()
  paper = _protocol(config) == "paper"

  plots = []
  series = []
  for dataset, r in results.items():
    curves = np.array([s["val_curve"] for s in r["seeds"]])
    if curves.size and r.get("method") != "ridge":
      series.append({"label": dataset, "x": np.arange(1, curves.shape[1] + 1), "y": curves.mean(0)})
  if series:
    plots.append(report.line_plot(os.path.join(workdir, "val_curves.png"), series, xlabel="epoch",
                                  ylabel="validation top-1 (%)",
                                  title="Linear probe: validation accuracy (mean over seeds)"))

  row = report.table1_row(config.table_row.user, config.table_row.defense, config.table_row.queries,
                          config.table_row.data,
                          {d: (r["test_top1_mean"], r["test_top1_std"]) for d, r in results.items()})
  table = report.table1([row], paper_table=config.paper_table or None)
  if paper:
    headers = ["dataset", "#train", "#test", "dim", "test top-1 % (epoch chosen on val)",
               "test top-1 % (last epoch)", "chosen epoch", "best on test % (comparison only)"]
    rows = [[d, r["num_train"], r["num_test"], r["rep_dim"],
             report.fmt_acc(r["test_top1_mean"], r["test_top1_std"]),
             report.fmt_acc(r["test_top1_last_mean"], r["test_top1_last_std"]),
             ", ".join(str(s["chosen_epoch"]) for s in r["seeds"]),
             report.fmt_acc(r["best_on_test_top1_mean"])] for d, r in results.items()]
  else:
    headers = ["dataset", "#train", "#test", "dim", "test top-1 %", "selected"]
    rows = [[d, r["num_train"], r["num_test"], r["rep_dim"],
             report.fmt_acc(r["test_top1_mean"], r["test_top1_std"]),
             ", ".join(report.fmt_num(s["selected"]) for s in r["seeds"])] for d, r in results.items()]
  sections = [
      ("Setup", _setup_text(config)),
      ("Test top-1 (mean ± std over seeds)", report.markdown_table(headers, rows)),
      ("Table-1 layout (epoch chosen on validation)", table["markdown"]),
  ]
  summary = {"protocol": _protocol(config), "datasets": results,
             "table1": {"row": row, "paper_table": table["paper_table"],
                        "matched_cells": table["matched"]}}
  report.write_experiment(workdir, f"Linear probe ({_protocol(config)} protocol)", summary,
                          config=config, sections=sections, plots=plots)
  return summary
