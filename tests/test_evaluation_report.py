"""Reports: the Table-1 layout puts the paper's number beside ours only where the row matches, files
are written atomically with finite numbers, plots are real PNGs, paper numbers are transcribed right."""
import json
import os

import numpy as np
import pytest

from b4b_jax.evaluation import paper_numbers
from b4b_jax.evaluation import report


def test_table1_layout_matches_paper_rows():
  ours = [
      report.table1_row("LEGIT", "B4B", "all", "task",
                        {"cifar10": (90.1, 0.2), "svhn_cropped": {"test_top1_mean": 74.0,
                                                                  "test_top1_std": 0.3}}),
      report.table1_row("ATTACK", "B4B", "50K", "ImageNet", {"fashion_mnist": (70.0, 0.1)}),
      report.table1_row("ATTACK", "B4B", "7K", "digits-photos", {"digits": (55.5, 1.0)}),
  ]
  table = report.table1(ours, paper_table="table1")
  assert table["headers"][:4] == ["user", "defense", "#queries", "data"]
  assert table["headers"][4:] == ["CIFAR10", "STL10", "SVHN", "F-MNIST", "digits"]
  rows = {tuple(r[:4]): r[4:] for r in table["rows"]}
  legit = rows[("LEGIT", "B4B", "all", "task")]
  assert legit[0] == "90.10 ± 0.20 (paper 90.24 ± 0.11)"
  assert legit[1] == "— (paper 95.05 ± 0.10)"          # paper row listed, not run by us
  assert legit[2] == "74.00 ± 0.30 (paper 74.96 ± 0.13)"   # svhn_cropped is the paper's SVHN
  assert rows[("ATTACK", "B4B", "50K", "ImageNet")][3] == "70.00 ± 0.10 (paper 70.01 ± 0.01)"
  # Our row without a paper counterpart comes after the paper's rows, with no paper number.
  assert table["rows"][-1][:4] == ["ATTACK", "B4B", "7K", "digits-photos"]
  assert table["rows"][-1][-1] == "55.50 ± 1.00"
  assert len(table["rows"]) == len(paper_numbers.TABLES["table1"]["rows"]) + 1
  assert table["matched"] == 3
  assert "Table 1" in table["markdown"] and table["markdown"].count("\n|") >= 14
  only_ours = report.table1(ours, paper_table="table1", all_paper_rows=False)
  assert [r[:2] for r in only_ours["rows"]] == [["LEGIT", "B4B"], ["ATTACK", "B4B"], ["ATTACK", "B4B"]]
  assert only_ours["matched"] == 3
  alone = report.table1(ours, paper_table=None)
  assert "paper" not in alone["markdown"] and len(alone["rows"]) == 3


def test_paper_numbers_spot_checks_and_setting_lookup():
  t1 = {(r["user"], r["defense"], r["queries"], r["data"]): r["values"]
        for r in paper_numbers.TABLES["table1"]["rows"]}
  assert t1[("LEGIT", "NONE", "all", "task")]["cifar10"] == (90.41, 0.02)
  assert t1[("ATTACK", "B4B", "100K", "ImageNet")]["cifar10"] == (12.01, 0.07)
  assert t1[("SYBIL", "B4B", "6x16.7K", "ImageNet")]["fashion_mnist"] == (70.51, 0.04)
  assert paper_numbers.TABLES["table7"]["rows"][1]["values"]["svhn"] == (69.66, 0.14)
  assert paper_numbers.TRANSFORMS_ONLY["simsiam"]["binary"]["svhn"] == (68.42, 0.16)
  for table in paper_numbers.TABLES.values():
    for row in table["rows"]:
      assert set(row["values"]) == set(paper_numbers.DATASETS)
  assert paper_numbers.find_table("simsiam", 1e-6, 1.0, 80.0) == "table1"
  assert paper_numbers.find_table("dino", 1e-6, 1000.0, 60.0) == "table7"
  assert paper_numbers.find_table("simsiam", 1e-6, 1.0, 80.0, num_hyperplanes=10) is None
  assert paper_numbers.find_table("simsiam", 1e-5, 1.0, 80.0) is None


def test_write_experiment_and_plots(tmp_path):
  workdir = str(tmp_path)
  png = report.line_plot(os.path.join(workdir, "curve.png"),
                         [{"label": "a", "x": [0, 1, 2], "y": [1.0, 2.0, 4.0]},
                          {"label": "b", "x": [0, 1, 2], "y": [1.0, 1.5, 2.0], "yerr": [0.1, 0.1, 0.1]}],
                         xlabel="x", ylabel="y", logy=True)
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  paths = report.write_experiment(workdir, "Demo", {"acc": np.float32(91.5), "curve": [1.0, 2.0]},
                                  config={"job": "x"}, sections=[("Numbers", "| a |\n|---|\n| 1 |\n")],
                                  plots=[png])
  payload = json.load(open(paths["results"]))
  assert payload["results"]["acc"] == pytest.approx(91.5) and "jax" in payload["versions"]
  assert payload["config"] == {"job": "x"}
  assert json.load(open(os.path.join(workdir, "config.json"))) == {"job": "x"}
  md = open(paths["report"]).read()
  assert "# Demo" in md and "## Numbers" in md and "![curve](curve.png)" in md
  # A NaN never reaches results.json, and the previous file survives the refused write.
  with pytest.raises(FloatingPointError, match=r"results.curve\[1\]"):
    report.write_experiment(workdir, "Demo", {"curve": [1.0, float("nan")]})
  assert json.load(open(paths["results"]))["results"]["acc"] == pytest.approx(91.5)
  with pytest.raises(ValueError, match="x has shape"):
    report.line_plot(os.path.join(workdir, "bad.png"), [{"x": [1, 2], "y": [1]}], xlabel="", ylabel="")
  assert not os.path.exists(os.path.join(workdir, "bad.png"))
  with pytest.raises(ValueError, match="2 cells but there are 3 headers"):
    report.markdown_table(["a", "b", "c"], [[1, 2]])
