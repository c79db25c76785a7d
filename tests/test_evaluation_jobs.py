"""Every evaluation job's tiny config runs through b4b_jax.main.run_job and leaves finite results, a
report and plots; the images path of a legit user equals the representations path; embeddings export
round-trips.

The embeddings job runs first; its random tiny encoder and digits embeddings are then reused by the
other jobs (config.source.encoder / npz_dir), as a user would chain them."""
import importlib
import json
import math
import os

import numpy as np
import pytest

from b4b_jax import data as data_lib
from b4b_jax.evaluation import embeddings
from b4b_jax.evaluation import legit
from b4b_jax.main import run_job
from b4b_jax.utils import metrics as metrics_lib



# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


def tiny_config(name):
  return importlib.import_module(f"configs.{name}").get_config("tiny")


def _finite_numbers(tree, path="results"):
  if isinstance(tree, dict):
    for k, v in tree.items():
      _finite_numbers(v, f"{path}.{k}")
  elif isinstance(tree, list):
    for i, v in enumerate(tree):
      _finite_numbers(v, f"{path}[{i}]")
  elif isinstance(tree, float):
    assert math.isfinite(tree), path


def _check_outputs(workdir, *, plots=()):
  payload = json.load(open(os.path.join(workdir, "results.json")))
  _finite_numbers(payload["results"])
  assert payload["config"]["job"]
  assert os.path.exists(os.path.join(workdir, "config.json"))
  report = open(os.path.join(workdir, "report.md")).read()
  for p in plots:
    assert os.path.getsize(os.path.join(workdir, p)) > 1000, p
    assert f"({p})" in report
  return payload["results"], report


@pytest.fixture(scope="module")
def exported(tmp_path_factory):
  workdir = str(tmp_path_factory.mktemp("embeddings"))
  results = run_job(tiny_config("embeddings"), workdir)
  encoder_dirs = [d for d in os.listdir(workdir) if d.startswith("random_encoder_")]
  assert len(encoder_dirs) == 1
  return {"workdir": workdir, "results": results, "encoder": os.path.join(workdir, encoder_dirs[0]),
          "npz_dir": os.path.join(workdir, "embeddings")}


def _reuse(config, exported):
  config.source.encoder = exported["encoder"]
  config.source.npz_dir = exported["npz_dir"]
  return config


def test_embeddings_job_exports_npz(exported):
  results, report = _check_outputs(exported["workdir"])
  emb = embeddings.load_npz(os.path.join(exported["npz_dir"], "digits.npz"))
  assert emb["train_x"].shape == (384, results["datasets"]["digits"]["train_shape"][1])
  assert emb["test_x"].shape[0] == 192 and emb["test_y"].dtype == np.int32
  assert np.all(np.isfinite(emb["train_x"])) and emb["meta"]["dataset"] == "digits"
  # The export equals embedding the same images directly with the encoder.
  encoder = embeddings.resolve_encoder(exported["encoder"])
  images, labels = data_lib.load_arrays("digits", "train", limit=8)
  images = data_lib.apply_transform(images, embeddings.eval_transform(encoder))
  direct = np.asarray(encoder(data_lib.normalize(images, spec=encoder)))
  np.testing.assert_allclose(emb["train_x"][:8], direct, rtol=1e-4, atol=1e-5 * np.abs(direct).max())
  np.testing.assert_array_equal(emb["train_y"][:8], labels)
  assert "digits" in report


def _sklearn_top1(emb, model, *, standardize=True):
  """Independent reference: scikit-learn on the same exported embeddings, standardised with train
  statistics (the embedding probes' default normalisation) or as they are."""
  from sklearn.preprocessing import StandardScaler  # pylint: disable=g-import-not-at-top
  train, test = emb["train_x"].astype(np.float64), emb["test_x"].astype(np.float64)
  if standardize:
    scaler = StandardScaler().fit(train)
    train, test = scaler.transform(train), scaler.transform(test)
  model.fit(train, emb["train_y"])
  return 100.0 * float(np.mean(model.predict(test) == emb["test_y"]))


def test_probe_job(exported, tmp_path):
  from sklearn.linear_model import LogisticRegression  # pylint: disable=g-import-not-at-top
  config = _reuse(importlib.import_module("configs.probe").get_config("tiny,protocol=embedding"),
                  exported)
  config.probe.epochs, config.probe.learning_rate = 30, 1e-2  # converged, for the comparison below
  results = run_job(config, str(tmp_path))
  out, report = _check_outputs(str(tmp_path), plots=("val_curves.png",))
  digits = out["datasets"]["digits"]
  assert digits["test_top1_mean"] > 30.0         # 10 classes: a random encoder is well above chance
  # The job's Adam probe (epoch chosen on validation) lands near a converged logistic regression on
  # the same embeddings: not a probe of shuffled labels, wrong rows, or an unused part of train.
  emb = embeddings.load_npz(os.path.join(exported["npz_dir"], "digits.npz"))
  reference = _sklearn_top1(emb, LogisticRegression(C=1.0, max_iter=2000))
  print(f"probe job digits top-1 {digits['test_top1_mean']:.2f}, sklearn logistic {reference:.2f}")
  assert abs(digits["test_top1_mean"] - reference) < 4.0, (digits["test_top1_mean"], reference)
  assert len(digits["seeds"]) == 2 and results["datasets"]["digits"]["num_train"] == 384
  assert metrics_lib.read_metrics(str(tmp_path), stage="probe/digits")
  assert "| LEGIT | NONE |" in report


def test_probe_job_paper_protocol(exported, tmp_path):
  config = tiny_config("probe")
  assert config.protocol == "paper" and config.table_row.user == "ATTACK"
  config.source.encoder = exported["encoder"]
  results = run_job(config, str(tmp_path))
  out, report = _check_outputs(str(tmp_path), plots=("val_curves.png",))
  digits = out["datasets"]["digits"]
  assert out["protocol"] == "paper" and digits["protocol"] == "paper"
  assert digits["num_train"] == 384 and len(digits["seeds"][0]["val_curve"]) == config.probe.epochs
  assert digits["test_top1_mean"] > 40.0 and digits["test_top1_last_mean"] > 40.0   # chance is 10 %
  assert "last epoch" in report and "comparison only" in report and "| ATTACK | NONE |" in report
  assert digits["settings"]["train_transform"] == digits["settings"]["eval_transform"]  # auto: CIFAR10 only
  assert os.path.exists(os.path.join(str(tmp_path), "embeddings", "paper_digits.npz"))
  assert metrics_lib.read_metrics(str(tmp_path), stage="probe/digits")
  assert results["datasets"]["digits"]["seeds"][0]["chosen_epoch"] >= 1


def test_legit_job_and_the_images_path(exported, tmp_path):
  config = _reuse(tiny_config("legit"), exported)
  config.save_responses = True
  config.probe.ridge_alphas = (1.0,)  # one strength: the NONE row is then sklearn's Ridge, below
  results = run_job(config, str(tmp_path))
  out, report = _check_outputs(str(tmp_path), plots=("legit_digits_coverage.png",
                                                     "legit_digits_sigma.png"))
  rows = out["datasets"]["digits"]["rows"]
  assert set(rows) == {"NONE", "B4B", "transform:binary", "noise sigma=10"}
  assert rows["B4B"]["through_images"] and rows["B4B"]["account"]["num_queries"] == 384 + 192
  assert "Table 8" in report and "Table 6" in report
  assert results["datasets"]["digits"]["rows"]["NONE"]["account"]["coverage"] is None
  # NONE row (clean representations, unstandardised as the paper's embedding probe): the accuracy of
  # scikit-learn's Ridge on one-hot targets, fit on all of train (the probe refits there), strength 1.0
  # x the mean eigenvalue of the centred Gram matrix (the probe's scale-free convention,
  # b4b_jax/evaluation/linear_probe.py).
  from sklearn.linear_model import Ridge  # pylint: disable=g-import-not-at-top
  assert config.probe.normalization == "none" and results["rep_scale"] == 1.0
  emb = embeddings.load_npz(os.path.join(exported["npz_dir"], "digits.npz"))
  xs = emb["train_x"].astype(np.float64)
  xc = xs - xs.mean(0)
  scale = np.linalg.eigvalsh(xc.T @ xc).clip(0).mean()

  class _OneHotRidge(Ridge):
    def fit(self, x, y):
      return super().fit(x, np.eye(10)[y])

    def predict(self, x):
      return np.argmax(super().predict(x), axis=1)
  reference = _sklearn_top1(emb, _OneHotRidge(alpha=scale), standardize=False)
  assert rows["NONE"]["test_top1_mean"] == pytest.approx(reference, abs=0.6), reference  # <= 1 image

  # The B4B row sent the images through DefendedEncoder.query (encoder fused into the API); sending
  # the exported clean representations to an API of the same config answers the same.
  received = embeddings.load_npz(os.path.join(str(tmp_path), "responses", "digits_B4B.npz"))
  emb = embeddings.load_npz(os.path.join(exported["npz_dir"], "digits.npz"))
  cfg = legit.row_specs(config.defense, b4b_transform=config.b4b_transform)[1][1]
  via_reps = legit.legit_user(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                              defense_config=cfg, probe_cfg=config.probe,
                              query_batch_size=config.query_batch_size, return_responses=True)
  for split, ours in zip(("train", "test"), via_reps["responses"]):
    np.testing.assert_allclose(received[f"{split}_x"], ours, rtol=1e-4, atol=1e-4)
  assert rows["B4B"]["account"]["coverage"] == pytest.approx(via_reps["account"]["coverage"], abs=0.5)
  assert rows["B4B"]["traces"]["train"]["num_queries"] == via_reps["traces"]["train"]["num_queries"]


def test_remap_job(exported, tmp_path):
  config = _reuse(tiny_config("remap"), exported)
  results = run_job(config, str(tmp_path))
  out, _ = _check_outputs(str(tmp_path), plots=("remap_cosine_none.png", "remap_cosine_b4b.png"))
  cells = {(c["transform"], c["noise"]): c for c in results["cells"]}
  assert len(cells) == 4
  assert out["rep_scale"] == config.rep_scale and all(c["rep_scale"] == config.rep_scale
                                                      for c in out["cells"])
  affine = {p["n"]: p["cos_dist"] for p in cells[("diag_affine", "none")]["points"]}
  assert affine[300] < 1e-3 < affine[0]


def test_fuzzing_job(exported, tmp_path):
  from b4b_jax.evaluation import linear_probe  # pylint: disable=g-import-not-at-top
  config = _reuse(tiny_config("fuzzing"), exported)
  results = run_job(config, str(tmp_path))
  out, report = _check_outputs(str(tmp_path), plots=("fuzzing_top1.png", "fuzzing_cosine.png"))
  points = {p["sigma"]: p for p in out["points"]}
  assert sorted(points) == [0.0, 0.1, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0, 10.0]
  # sigma 0 is the clean probe, exactly; sigma 10 (features of std ~1) is near chance (10 classes).
  emb = embeddings.load_npz(os.path.join(exported["npz_dir"], "digits.npz"))
  clean = linear_probe.run_probe(emb["train_x"], emb["train_y"], emb["test_x"], emb["test_y"],
                                 config.probe)
  assert points[0.0]["test_top1_mean"] == clean.test_top1_mean > 50.0
  assert points[0.0]["cos_dist"] == pytest.approx(0.0, abs=1e-6)
  assert points[10.0]["test_top1_mean"] < 25.0
  assert points[10.0]["cos_dist"] > points[1.0]["cos_dist"] > points[0.1]["cos_dist"] > 0.0
  assert out["rep_scale"] == 1.0 and out["normalize"] is False and out["paper_claim"]["sigma"] == 0.5
  assert "~10 % at sigma 0.5" in report and f"{points[0.5]['test_top1_mean']:.2f} % at sigma 0.5" in report
  assert [m["sigma"] for m in metrics_lib.read_metrics(str(tmp_path), stage="fuzzing")] == sorted(points)
  assert results["points"][0]["sigma"] == 0.0


def test_coverage_job(exported, tmp_path):
  config = tiny_config("coverage")
  config.source.encoder = exported["encoder"]
  results = run_job(config, str(tmp_path))
  _check_outputs(str(tmp_path), plots=("coverage_K6.png", "coverage_K8.png", "queries_per_bucket.png",
                                       "sigma_vs_coverage_fig4_beta.png", "sigma_vs_queries.png"))
  for k, per_set in results["curves"].items():
    assert set(per_set) == {"digits", "photo crops", "random noise"}
    for c in per_set.values():
      cov = np.asarray(c["coverage"])
      assert np.all(np.diff(cov) >= 0) and cov[-1] <= 100.0 and c["num_queries"][-1] == 256
  assert os.path.exists(os.path.join(str(tmp_path), "curves.json"))
  # Query-set embeddings are cached in the workdir, so a re-run resumes without re-embedding.
  cached = sorted(os.listdir(os.path.join(str(tmp_path), "embeddings")))
  assert cached == ["queries_digits.npz", "queries_photo_crops.npz", "queries_random_noise.npz"]


def test_damaged_npz_files_are_one_clear_error(tmp_path):
  """Truncated, foreign and missing .npz files: a ValueError / FileNotFoundError naming the file, for
  the embeddings files and the single-array files alike (np.load's own errors vary by the damage)."""
  good = embeddings.save_npz(str(tmp_path / "good.npz"), meta={"a": 1},
                             **{k: np.zeros((2, 3) if k.endswith("_x") else (2,), np.float32)
                                for k in embeddings.NPZ_KEYS})
  array = embeddings.save_array(str(tmp_path / "reps.npz"), np.ones((4, 3)))
  assert embeddings.load_npz(good)["meta"] == {"a": 1}
  np.testing.assert_array_equal(embeddings.load_array(array), np.ones((4, 3), np.float32))
  data = open(good, "rb").read()
  for name, content in (("truncated", data[: len(data) // 2]), ("header_only", data[:4]),
                        ("text", b"not an npz at all"), ("empty", b"")):
    path = tmp_path / f"{name}.npz"
    path.write_bytes(content)
    for load in (embeddings.load_npz, embeddings.load_array):
      with pytest.raises(ValueError, match=f"{name}.npz is not a readable"):
        load(str(path))
  for load in (embeddings.load_npz, embeddings.load_array):
    with pytest.raises(FileNotFoundError, match="missing.npz"):
      load(str(tmp_path / "missing.npz"))
