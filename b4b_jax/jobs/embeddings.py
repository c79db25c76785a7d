"""Job `embeddings`: export train/test representations and labels of datasets through an encoder.

  python -m b4b_jax.main --config=configs/embeddings.py --workdir=DIR --config.source.encoder=ENC_DIR

Writes DIR/embeddings/<dataset>.npz (train_x, train_y, test_x, test_y, meta), results.json (shapes and
representation scale per dataset) and report.md. Other evaluation jobs read these files through
`config.source.npz_dir=DIR/embeddings`, so one embedding pass serves many probes.
"""
import os

from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import legit as legit_lib
from b4b_jax.evaluation import report


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed: every value, so a refused config leaves no trace."""
  embeddings_lib.check_source(config.source)
  if not config.datasets:
    raise ValueError("config.datasets is empty")


def run(config, workdir: str):
  source = embeddings_lib.EmbeddingSource(config.source, workdir, seed=config.seed)
  results = {}
  for dataset in config.datasets:
    emb = source.get(dataset)
    results[dataset] = {
        "path": source.cache_path(dataset),
        "train_shape": list(emb["train_x"].shape), "test_shape": list(emb["test_x"].shape),
        "num_classes": int(max(emb["train_y"].max(), emb["test_y"].max()) + 1),
        "scale": legit_lib.representation_scale(emb["train_x"]),
    }
  rows = [[d, r["train_shape"], r["test_shape"], r["num_classes"],
           report.fmt_num(r["scale"]["per_dim_std_mean"]), report.fmt_num(r["scale"]["mean_norm"]),
           os.path.relpath(r["path"], workdir)] for d, r in results.items()]
  sections = [("Embeddings", f"Encoder `{config.source.encoder}`.\n\n" + report.markdown_table(
      ["dataset", "train [N, D]", "test [N, D]", "classes", "per-dim std", "mean L2 norm", "file"],
      rows))]
  report.write_experiment(workdir, "Embeddings export", {"datasets": results}, config=config,
                          sections=sections)
  return results
