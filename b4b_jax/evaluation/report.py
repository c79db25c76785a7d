"""Reports: results.json, config, PNG plots and a markdown report per experiment; the Table-1 builder.

Reusable by every job (and the end-to-end demo):
  * `line_plot(path, series, ...)`: one PNG (matplotlib Agg) from a list of {"label", "x", "y"[, "yerr"]}.
  * `markdown_table(headers, rows)`: a GitHub-markdown table.
  * `table1(rows, paper_table=...)`: the paper's Table-1 layout (LEGIT/ATTACK/SYBIL x NONE/B4B rows,
    CIFAR10/STL10/SVHN/F-MNIST columns) with the paper's number beside ours where the setting matches.
  * `write_experiment(workdir, name, results, config, report_sections)`: results.json + config.json +
    report.md, written atomically so a crash never leaves half a file.
"""
import io
import json
import math
import os
from typing import Iterable, Mapping, Optional, Sequence

import jax
import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position
import numpy as np  # noqa: E402  pylint: disable=g-import-not-at-top,wrong-import-position

from b4b_jax.evaluation import paper_numbers  # noqa: E402
from b4b_jax.utils import files  # noqa: E402
from b4b_jax.utils.versions import library_versions  # noqa: E402

RESULTS_FILE = "results.json"
REPORT_FILE = "report.md"
CONFIG_FILE = "config.json"


# ---------------------------------------------------------------- formatting


def fmt_acc(mean, std=None, digits: int = 2) -> str:
  """'90.24 ± 0.11' (percent numbers as the paper prints them); '—' for a missing value."""
  if mean is None or (isinstance(mean, float) and math.isnan(mean)):
    return "—"
  text = f"{float(mean):.{digits}f}"
  if std is not None:
    text += f" ± {float(std):.{digits}f}"
  return text


def fmt_num(value, digits: int = 4) -> str:
  if value is None:
    return "—"
  if isinstance(value, (int, np.integer)):
    return str(int(value))
  value = float(value)
  if value != 0 and (abs(value) < 1e-3 or abs(value) >= 1e5):
    return f"{value:.{digits - 1}e}"
  return f"{value:.{digits}g}"


def markdown_table(headers: Sequence[str], rows: Iterable[Sequence]) -> str:
  def cell(v):
    return str(v).replace("|", "\\|").replace("\n", " ")
  lines = ["| " + " | ".join(cell(h) for h in headers) + " |",
           "|" + "|".join("---" for _ in headers) + "|"]
  for row in rows:
    row = list(row)
    if len(row) != len(headers):
      raise ValueError(f"table row has {len(row)} cells but there are {len(headers)} headers: {row}")
    lines.append("| " + " | ".join(cell(v) for v in row) + " |")
  return "\n".join(lines) + "\n"


# ---------------------------------------------------------------- plots


def line_plot(path: str, series: Sequence[Mapping], *, xlabel: str, ylabel: str, title: str = "",
              logx: bool = False, logy: bool = False, hline: Optional[float] = None,
              ylim: Optional[tuple] = None) -> str:
  """Writes one PNG with a line per series ({"label", "x", "y", optional "yerr", "style"})."""
  if not series:
    raise ValueError(f"line_plot({path!r}) needs at least one series")
  if jax.process_index() != 0:  # multi-host runs: only process 0 writes
    return path
  fig, ax = plt.subplots(figsize=(6.0, 4.0), dpi=110)
  try:
    for s in series:
      x = np.asarray(s["x"], np.float64)
      y = np.asarray(s["y"], np.float64)
      if x.shape != y.shape:
        raise ValueError(f"series {s.get('label')!r}: x has shape {x.shape}, y has shape {y.shape}")
      style = s.get("style", "-o" if len(x) <= 30 else "-")
      if s.get("yerr") is not None:
        ax.errorbar(x, y, yerr=np.asarray(s["yerr"], np.float64), fmt=style, label=s.get("label"),
                    markersize=3, capsize=2)
      else:
        ax.plot(x, y, style, label=s.get("label"), markersize=3)
    if hline is not None:
      ax.axhline(hline, color="gray", linestyle=":", linewidth=1)
    if logx:
      ax.set_xscale("log")
    if logy:
      ax.set_yscale("log")
    if ylim is not None:
      ax.set_ylim(*ylim)
    ax.set_xlabel(xlabel)
    ax.set_ylabel(ylabel)
    if title:
      ax.set_title(title, fontsize=10)
    ax.grid(True, alpha=0.3)
    if any(s.get("label") for s in series):
      ax.legend(fontsize=8)
    fig.tight_layout()
    buf = io.BytesIO()
    fig.savefig(buf, format="png")
  finally:
    plt.close(fig)
  files.atomic_write_bytes(path, buf.getvalue())
  return path


# ---------------------------------------------------------------- the paper's Table 1 layout


def table1_row(user: str, defense: str, queries: str, data: str, values: Mapping) -> dict:
  """One of our rows: values maps dataset name (any alias) -> (mean, std) or a probe summary dict."""
  canon = {}
  for name, v in values.items():
    key = paper_numbers.canonical_dataset(name) or str(name)
    if isinstance(v, Mapping):
      v = (v["test_top1_mean"], v.get("test_top1_std"))
    canon[key] = (float(v[0]), None if v[1] is None else float(v[1]))
  return {"user": user.upper(), "defense": defense, "queries": str(queries), "data": data,
          "values": canon}


def _key(row):
  return (row["user"].upper(), row["defense"].upper(), str(row["queries"]).upper(),
          str(row["data"]).upper())


def table1(rows: Sequence[Mapping], *, paper_table: Optional[str] = "table1",
           datasets: Optional[Sequence[str]] = None, all_paper_rows: bool = True) -> dict:
  """Builds the Table-1 layout: {"headers", "rows" (cells), "markdown", "matched"}.

  `rows` are our results (see `table1_row`). With `paper_table` (a key of paper_numbers.TABLES, chosen
  only when our defense setting equals that table's: see paper_numbers.find_table), every row whose
  (user, defense, #queries, data) equals a paper row shows "ours (paper p)"; the paper's other rows are
  listed with "—" for ours so the reader sees what was not run (all_paper_rows=False: only the paper
  rows we have). Columns: the paper's four datasets, plus any other dataset our rows have.
  """
  paper_rows = paper_numbers.TABLES[paper_table]["rows"] if paper_table else []
  ours = {_key(r): r for r in rows}
  if datasets is None:
    extra = sorted({d for r in rows for d in r["values"]} - set(paper_numbers.DATASETS))
    datasets = list(paper_numbers.DATASETS) + extra
  ordered = []
  for p in paper_rows:
    mine = ours.pop(_key(p), None)
    if mine is not None or all_paper_rows:
      ordered.append((p, mine))
  for r in rows:
    if _key(r) in ours:
      ordered.append((None, ours.pop(_key(r))))
  headers = ["user", "defense", "#queries", "data"] + [
      paper_numbers.DATASET_TITLES.get(d, d) for d in datasets]
  cells, matched, footnotes = [], 0, []
  for paper_row, our_row in ordered:
    meta = our_row or paper_row
    line = [meta["user"], meta["defense"], meta["queries"], meta["data"]]
    for d in datasets:
      our_v = our_row["values"].get(d) if our_row else None
      paper_v = paper_row["values"].get(d) if paper_row else None
      text = fmt_acc(*our_v) if our_v else "—"
      if paper_v:
        note = paper_row.get("notes", {}).get(d)
        if note:  # a printed number the paper contradicts elsewhere: marked, explained below
          footnotes.append(note)
        text += f" (paper {fmt_acc(*paper_v)}{'†' * len(footnotes) if note else ''})"
        matched += bool(our_v)
      line.append(text)
    cells.append(line)
  caption = paper_numbers.TABLES[paper_table]["caption"] if paper_table else None
  md = markdown_table(headers, cells)
  if footnotes:
    md += "\n" + "".join(f"\n{'†' * (i + 1)} {n}." for i, n in enumerate(footnotes))
  if caption:
    md = (f"Ours (mean ± std over probe seeds, top-1 %) with the paper's number in brackets where the "
          f"setting matches ({caption}).\n\n" + md)
  return {"headers": headers, "rows": cells, "markdown": md, "matched": matched,
          "paper_table": paper_table}


# ---------------------------------------------------------------- writing an experiment's outputs


def write_experiment(workdir: str, name: str, results: Mapping, *, config=None,
                     sections: Sequence[tuple] = (), plots: Sequence[str] = ()) -> dict:
  """Writes results.json, config.json (if given) and report.md into `workdir`; returns their paths.

  sections: (heading, markdown body) pairs; plots: PNG paths (relative links are made in report.md).
  """
  _check_finite(results, name)
  paths = {"results": os.path.join(workdir, RESULTS_FILE), "report": os.path.join(workdir, REPORT_FILE)}
  if jax.process_index() != 0:  # multi-host runs: only process 0 writes
    return paths
  os.makedirs(workdir, exist_ok=True)
  payload = {"experiment": name, "results": results, "versions": library_versions()}
  if config is not None:
    # to_json_best_effort also converts ConfigDicts nested in tuples (to_dict does not).
    config_dict = (json.loads(config.to_json_best_effort()) if hasattr(config, "to_json_best_effort")
                   else dict(config))
    payload["config"] = config_dict
    if not os.path.exists(os.path.join(workdir, CONFIG_FILE)):
      files.atomic_write_json(os.path.join(workdir, CONFIG_FILE), config_dict)
  files.atomic_write_json(paths["results"], payload)
  lines = [f"# {name}", ""]
  for heading, body in sections:
    lines += [f"## {heading}", "", body.rstrip(), ""]
  if plots:
    lines += ["## Plots", ""]
    for p in plots:
      rel = os.path.relpath(p, workdir)
      lines += [f"![{os.path.splitext(os.path.basename(p))[0]}]({rel})", ""]
  lines += ["Results: `results.json`; config: `config.json`; metrics: `metrics.jsonl` / TensorBoard.", ""]
  files.atomic_write_text(paths["report"], "\n".join(lines))
  return paths


def _check_finite(tree, name, path="results"):
  """Refuses to write NaN/Inf numbers into results (they would silently poison tables)."""
  if isinstance(tree, Mapping):
    for k, v in tree.items():
      _check_finite(v, name, f"{path}.{k}")
  elif isinstance(tree, (list, tuple)):
    for i, v in enumerate(tree):
      _check_finite(v, name, f"{path}[{i}]")
  elif isinstance(tree, (float, np.floating)) and not math.isfinite(float(tree)):
    raise FloatingPointError(f"{name}: non-finite value at {path}")
