"""Evaluation: linear probes, legit users through the API, remapping, coverage/cost curves, reports.

See docs/evaluation.md. Public names:
  linear_probe.train_linear_probe / ridge_probe / run_probe / LinearClassifier / Normalizer
  paper_probe.paper_probe / train_head / sgd_epoch / PadCropFlipResize   (probe protocol `paper`)
  fuzzing.noise_sweep / static_noise / SIGMAS / PAPER_CLAIM
  embeddings.resolve_encoder / EncoderView / embed_images / embed_dataset / EmbeddingSource / save_npz / load_npz
  least_squares.fit / moments / solve
  api_client.send_batches / send / send_interleaved
  legit.row_specs / legit_user / legit_user_images / legit_rows
  remap.remap_cell / remap_experiment / cosine_distance
  coverage_curves.coverage_vs_queries / sigma_vs_coverage / sigma_vs_queries / queries_per_bucket
  report.table1 / table1_row / line_plot / markdown_table / write_experiment
  paper_numbers.TABLES / TRANSFORMS_ONLY / find_table / EMBEDDING_PROBE_HPARAMS / REP_SCALE /
    embedding_probe_for
"""
from b4b_jax.evaluation.linear_probe import (LinearClassifier, Normalizer, ProbeResult, ridge_probe,
                                             run_probe, train_linear_probe)
from b4b_jax.evaluation.report import (line_plot, markdown_table, table1, table1_row,
                                       write_experiment)
