"""Job `fuzzing`: the noise-sensitivity sweep (original `src/fuzzying.py`, reference §7.6, paper §4.2).

  python -m b4b_jax.main --config=configs/fuzzing.py --workdir=DIR --config.source.encoder=VICTIM_DIR

Embeds one downstream dataset (cached in workdir/embeddings, reused on resume), then for every sigma adds
fresh static N(0, sigma^2) noise per sample to the train and test embeddings (x rep_scale, optionally
L2-normalised first), probes, and measures the mean cosine distance between clean and noised test
embeddings. Writes results.json, report.md (ours beside the paper's "accuracy falls to ~10 % near sigma
0.5"), fuzzing_top1.png, fuzzing_cosine.png, metrics.jsonl / TensorBoard.
"""
import os

from absl import logging

from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import fuzzing as fuzzing_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import linear_probe
from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import report
from b4b_jax.utils import metrics as metrics_lib
from b4b_jax.utils import progress as progress_lib


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  linear_probe.check_probe_config(config.probe)
  legit_lib.check_rep_scale(config.rep_scale)
  fuzzing_lib.check_sigmas(config.sigmas)
  if not isinstance(config.normalize, bool):
    raise ValueError(f"config.normalize must be True or False, got {config.normalize!r}")
  if not config.dataset:
    raise ValueError("config.dataset is empty")


def run(config, workdir: str):
  writer = metrics_lib.MetricsWriter(workdir)
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  emb = source.get(config.dataset)
  probe_cfg = paper_numbers.embedding_probe_for(config.probe, config.encoder_kind, config.dataset)
  prog = progress_lib.Progress("fuzzing", len(config.sigmas), unit="sigma")

  def on_sigma(i, n, point):
    prog.update(i, sigma=point["sigma"], top1=point["test_top1_mean"], cos_dist=point["cos_dist"])
    writer.write_scalars(i, {"sigma": point["sigma"], "test_top1": point["test_top1_mean"],
                             "cos_dist": point["cos_dist"]}, stage="fuzzing", check_finite=True)
    logging.info("[fuzzing] sigma %g: test top-1 %.2f, mean cosine distance %.4f", point["sigma"],
                 point["test_top1_mean"], point["cos_dist"])

  sweep = fuzzing_lib.noise_sweep(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                                  probe_cfg=probe_cfg, sigmas=config.sigmas,
                                  rep_scale=config.rep_scale, normalize=config.normalize,
                                  seed=config.seed, on_sigma=on_sigma)
  writer.close()
  claim = fuzzing_lib.PAPER_CLAIM
  ours = fuzzing_lib.at_sigma(sweep, claim["sigma"])
  sweep.update(dataset=config.dataset, encoder_kind=config.encoder_kind,
               num_train=int(len(emb["train_y"])), num_test=int(len(emb["test_y"])),
               probe={"method": probe_cfg.method, "learning_rate": probe_cfg.learning_rate,
                      "epochs": probe_cfg.epochs, "normalization": probe_cfg.normalization},
               paper_claim=dict(claim, ours_top1=None if ours is None else ours["test_top1_mean"]))
  return _write_report(config, workdir, sweep)


def _probe_text(probe) -> str:
  if probe["method"] == "ridge":
    return (f"`ridge` (closed form, strength chosen on validation; normalisation "
            f"{probe['normalization']})")
  return (f"`{probe['method']}` (lr {probe['learning_rate']:g}, {probe['epochs']} epochs, batch 64, "
          f"normalisation {probe['normalization']}), epoch chosen on validation")


def _write_report(config, workdir, sweep):
  points = sweep["points"]
  sigmas = [p["sigma"] for p in points]
  plots = [
      report.line_plot(
          os.path.join(workdir, "fuzzing_top1.png"),
          [{"label": "ours (epoch on validation)", "x": sigmas, "y": [p["test_top1_mean"] for p in points],
            "yerr": [p["test_top1_std"] for p in points]},
           {"label": "paper: ~10 % near sigma 0.5", "x": [fuzzing_lib.PAPER_CLAIM["sigma"]],
            "y": [fuzzing_lib.PAPER_CLAIM["top1"]], "style": "r*"}],
          xlabel="noise std sigma", ylabel="test top-1 (%)", hline=sweep["chance_top1"],
          title=f"Noise sensitivity ({config.dataset}, x{config.rep_scale:g}"
                f"{', L2-normalised' if config.normalize else ''}); dotted: chance"),
      report.line_plot(
          os.path.join(workdir, "fuzzing_cosine.png"),
          [{"label": "clean vs noised test", "x": sigmas, "y": [p["cos_dist"] for p in points]}],
          xlabel="noise std sigma", ylabel="mean cosine distance",
          title=f"Noise sensitivity ({config.dataset}): how far the noise moves embeddings"),
  ]
  rows = [[report.fmt_num(p["sigma"]), report.fmt_acc(p["test_top1_mean"], p["test_top1_std"]),
           report.fmt_acc(p["test_top1_last_mean"]) if p["test_top1_last_mean"] is not None else "—",
           report.fmt_num(p["cos_dist"])] for p in points]
  claim = sweep["paper_claim"]
  ours = claim["ours_top1"]
  scale = sweep["feature_scale"]
  sections = [
      ("Setup", f"Dataset `{config.dataset}` ({sweep['num_train']} train / {sweep['num_test']} test), "
                f"encoder `{config.source.encoder}` ({config.encoder_kind}); features x"
                f"{config.rep_scale:g} (rep_scale){', then L2-normalised' if config.normalize else ''} "
                f"(per-dimension std {report.fmt_num(scale['per_dim_std_mean'])}, mean L2 norm "
                f"{report.fmt_num(scale['mean_norm'])}); fresh static N(0, sigma^2) noise per sample "
                f"on train and test; probe {_probe_text(sweep['probe'])}; chance "
                f"{sweep['chance_top1']:.1f} %."),
      ("Paper vs ours", report.markdown_table(
          ["claim", "paper", "ours"],
          [[claim["text"], f"~{claim['top1']:g} % at sigma {claim['sigma']:g}",
            "not run (sigma 0.5 not in the sweep)" if ours is None else
            f"{ours:.2f} % at sigma {claim['sigma']:g}"]]) +
       "\nThe paper does not say which encoder, scale or normalisation its sweep used; sigma is in "
       "the units of the features above."),
      ("Sweep", report.markdown_table(
          ["sigma", "test top-1 % (epoch on validation)", "test top-1 % (last epoch, the original's)",
           "mean cosine distance"], rows)),
  ]
  report.write_experiment(workdir, "Noise-sensitivity sweep", sweep, config=config, sections=sections,
                          plots=plots)
  return sweep
