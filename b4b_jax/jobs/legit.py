"""Job `legit`: legitimate users through the defended API (paper Table 1 LEGIT rows, Tables 6 and 8).

  python -m b4b_jax.main --config=configs/legit.py --workdir=DIR --config.source.encoder=VICTIM_DIR

For each downstream dataset, one legit user per row (NONE, B4B, transforms only, static noise) sends its
train and then test queries to a fresh API and probes what it received. The API serves the encoder's
representations x config.rep_scale (the original's x1000 for SimSiam), so static sigma, the transforms
and the probe act on scaled features; the probe block's `paper_hparams` takes the original's Adam lr and
epochs per task, on unstandardised features. Writes results.json (with rep_scale and the served
features' scale), report.md (Table-1 layout + Table 6/8 comparisons), coverage/sigma traces (PNG),
metrics.jsonl / TensorBoard.
"""
import os

import numpy as np
from absl import logging

from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import report
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib


def _probe_cfg(config, dataset):
  return paper_numbers.embedding_probe_for(config.probe, config.encoder_kind, dataset)


def _b4b_through_images(source, emb, dataset, cfg, config, workdir):
  """The B4B row with the images themselves sent through DefendedEncoder.query."""
  encoder = source.encoder
  transform = embeddings_lib.eval_transform(encoder, config.source.transform)

  def batches(key):
    return embeddings_lib.image_batches(
        dataset, config.source[f"{key}_split"], transform=transform, batch_size=config.query_batch_size,
        data_dir=config.source.data_dir, limit=config.source[f"{key}_limit"], seed=config.seed)

  res = legit_lib.legit_user_images(encoder, cfg, batches("train"), batches("test"),
                                    probe_cfg=_probe_cfg(config, dataset),
                                    query_batch_size=config.query_batch_size, return_responses=True,
                                    rep_scale=config.rep_scale)
  for key, labels in zip(("train", "test"), res.pop("labels")):
    if not np.array_equal(labels, emb[f"{key}_y"]):
      raise ValueError(f"{dataset} {key}: the image stream's labels differ from the cached "
                       "embeddings' (embeddings of another config in this workdir?)")
  received = res.pop("responses")
  if config.save_responses:
    embeddings_lib.save_npz(os.path.join(workdir, "responses", f"{dataset}_B4B.npz"),
                            meta={"row": "B4B", "through_images": True}, train_x=received[0],
                            train_y=emb["train_y"], test_x=received[1], test_y=emb["test_y"])
  return res


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  linear_probe.check_probe_config(config.probe)
  legit_lib.check_rep_scale(config.rep_scale)
  if config.query_batch_size < 1:
    raise ValueError(f"query_batch_size must be >= 1, got {config.query_batch_size}")
  if not config.datasets:
    raise ValueError("config.datasets is empty")
  # Builds (and so validates) the defense config of every row.
  legit_lib.row_specs(config.defense, b4b_transform=config.b4b_transform, transforms=config.transforms,
                      static_sigmas=config.static_sigmas)


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  base = config.defense
  rows = legit_lib.row_specs(base, b4b_transform=config.b4b_transform, transforms=config.transforms,
                             static_sigmas=config.static_sigmas)
  results = {}
  step = 0
  prog = progress_lib.Progress("legit", len(config.datasets) * len(rows), unit="row")
  for dataset in config.datasets:
    emb = source.get(dataset)
    per_row = {}
    for name, cfg in rows:
      if name == "B4B" and config.through_images:
        res = _b4b_through_images(source, emb, dataset, cfg, config, workdir)
      else:
        res = legit_lib.legit_user(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                                   defense_config=cfg, probe_cfg=_probe_cfg(config, dataset),
                                   query_batch_size=config.query_batch_size,
                                   rep_scale=config.rep_scale)
      per_row[name] = res
      step += 1
      prog.update(step, dataset=dataset, row=name, top1=res["test_top1_mean"])
      writer.write_scalars(step, {"test_top1": res["test_top1_mean"],
                                  "coverage": res["account"]["coverage"] or 0.0,
                                  "sigma": res["account"]["sigma"]}, stage=f"legit/{dataset}/{name}")
      logging.info("[legit] %s %s: %.2f ± %.2f", dataset, name, res["test_top1_mean"],
                   res["test_top1_std"])
    for res in per_row.values():
      res["drop_vs_none"] = per_row["NONE"]["test_top1_mean"] - res["test_top1_mean"]
    probe_cfg = _probe_cfg(config, dataset)
    results[dataset] = {"rows": per_row, "rep_scale": float(config.rep_scale),
                        "probe": {"learning_rate": probe_cfg.learning_rate, "epochs": probe_cfg.epochs,
                                  "normalization": probe_cfg.normalization,
                                  "method": probe_cfg.method},
                        "representation_scale": legit_lib.representation_scale(
                            emb["train_x"] * np.float32(config.rep_scale)),
                        "encoder_representation_scale": legit_lib.representation_scale(emb["train_x"]),
                        "num_train": int(len(emb["train_y"])), "num_test": int(len(emb["test_y"]))}
  writer.close()
  return _write_report(config, workdir, base, results)


def _write_report(config, workdir, base, results):
  paper_table = paper_numbers.find_table(config.encoder_kind, base.lam, base.alpha, base.beta,
                                         base.num_hyperplanes)
  table_rows = [report.table1_row(
      "LEGIT", defense_name, "all", "task",
      {d: (r["rows"][row]["test_top1_mean"], r["rows"][row]["test_top1_std"])
       for d, r in results.items()})
      for row, defense_name in (("NONE", "NONE"), ("B4B", "B4B"))]
  # Static-noise rows belong to Table 6 (same defense setting as Table 1).
  static_rows = [report.table1_row(
      "LEGIT", f"NOISE sigma={float(s):g}", "all", "task",
      {d: (r["rows"][f"noise sigma={float(s):g}"]["test_top1_mean"],
           r["rows"][f"noise sigma={float(s):g}"]["test_top1_std"]) for d, r in results.items()})
      for s in config.static_sigmas]
  table1 = report.table1(table_rows, paper_table=paper_table, all_paper_rows=False)
  table6 = report.table1(table_rows + static_rows, all_paper_rows=False,
                         paper_table="table6" if paper_table == "table1" else None)

  # Table 8: transforms only.
  paper8 = paper_numbers.TRANSFORMS_ONLY.get(config.encoder_kind, {})
  t8_rows = []
  for t in ("identity",) + tuple(config.transforms):
    row = "NONE" if t == "identity" else f"transform:{t}"
    cells = [t]
    for d, r in results.items():
      ours = r["rows"][row]
      cell = report.fmt_acc(ours["test_top1_mean"], ours["test_top1_std"])
      paper = paper8.get(t, {}).get(paper_numbers.canonical_dataset(d) or "")
      cells.append(cell + (f" (paper {report.fmt_acc(*paper)})" if paper else ""))
    t8_rows.append(cells)
  table8 = report.markdown_table(["transform"] + list(results), t8_rows)

  detail = []
  for d, r in results.items():
    for name, res in r["rows"].items():
      acc = res["account"]
      detail.append([d, name, res["out_dim"], report.fmt_acc(res["test_top1_mean"], res["test_top1_std"]),
                     report.fmt_num(res["drop_vs_none"]), report.fmt_num(acc["coverage"]),
                     report.fmt_num(acc["sigma"])])
  plots = []
  for d, r in results.items():
    b4b = r["rows"]["B4B"]["traces"]
    if b4b:
      q = b4b["train"]["num_queries"] + b4b["test"]["num_queries"]
      cov = b4b["train"]["coverage"] + b4b["test"]["coverage"]
      sig = b4b["train"]["sigma"] + b4b["test"]["sigma"]
      plots.append(report.line_plot(
          os.path.join(workdir, f"legit_{d}_coverage.png"),
          [{"label": "coverage (%)", "x": q, "y": cov}], xlabel="queries", ylabel="coverage (%)",
          title=f"Legit user ({d}): coverage of its B4B account"))
      plots.append(report.line_plot(
          os.path.join(workdir, f"legit_{d}_sigma.png"),
          [{"label": "sigma", "x": q, "y": np.maximum(sig, 1e-12)}], xlabel="queries",
          ylabel="noise std sigma", logy=True, title=f"Legit user ({d}): B4B noise it received"))
  scale_rows = [[d, report.fmt_num(r["rep_scale"]),
                 report.fmt_num(r["representation_scale"]["per_dim_std_mean"]),
                 report.fmt_num(r["representation_scale"]["mean_norm"])] for d, r in results.items()]
  paper_caption = (paper_numbers.TABLES[paper_table]["caption"] if paper_table
                   else "none (setting differs)")
  sections = [
      ("Setup", f"Encoder `{config.source.encoder}` ({config.encoder_kind}), served x"
                f"{config.rep_scale:g} (rep_scale; the original: SimSiam x1000, DINO x1); defense "
                f"(lambda={base.lam:g}, alpha={base.alpha:g}, "
                f"beta={base.beta:g}%, 2^{base.num_hyperplanes} buckets, P={base.num_projections}); "
                f"B4B rows use the `{config.b4b_transform}` transform. Every train and test query of "
                f"each row is charged to that row's account (batches of {config.query_batch_size}); "
                f"the probe is trained on received train and tested on received test "
                f"representations. Probe: {config.probe.method}, normalisation "
                f"{config.probe.normalization}, "
                + ("the original's Adam lr/epochs per task (§7.5)" if config.probe.get("paper_hparams")
                   else f"lr {config.probe.learning_rate:g}, {config.probe.epochs} epochs")
                + f", epoch chosen on validation. Paper comparison: {paper_caption}."),
      ("Table-1 layout (LEGIT rows)", table1["markdown"]),
      ("Static noise (Table 6)", table6["markdown"] +
       f"\nStatic sigma is in the units of the representations served: the encoder's x"
       f"{config.rep_scale:g} (see the scale table); the paper's SimSiam numbers were probably on "
       "features x1000 (reference §3.4)."),
      ("Transforms only (Table 8)", table8),
      ("All rows", report.markdown_table(
          ["dataset", "row", "out dim", "test top-1 %", "drop vs NONE (points)", "final coverage %",
           "final sigma"], detail)),
      ("Representation scale (served)", report.markdown_table(
          ["dataset", "rep_scale", "per-dim std", "mean L2 norm"], scale_rows)),
  ]
  summary = {"datasets": results, "rep_scale": float(config.rep_scale), "paper_table": paper_table,
             "table1_rows": table_rows,
             "static_rows": static_rows}
  report.write_experiment(workdir, "Legitimate users through the API", summary, config=config,
                          sections=sections, plots=plots)
  return summary
