"""Legit users through the API: every query charged, transforms cost ~nothing, static noise of the
paper's large sigma hurts, and what the probe sees is what the API returned."""
import ml_collections
import numpy as np
import pytest

from b4b_jax import defense
from b4b_jax.evaluation import api_client
from b4b_jax.evaluation import legit

DIM, CLASSES, N_TRAIN, N_TEST, BATCH = 16, 5, 512, 256, 128
PROBE = ml_collections.ConfigDict({"method": "ridge", "seeds": (0,), "val_fraction": 0.1})


# Tiny shapes: compile time dominates, so XLA's optimisation passes are off in this module.
pytestmark = pytest.mark.usefixtures("fast_compiles")


@pytest.fixture(scope="module")
def data():
  rng = np.random.default_rng(0)
  centers = 1.5 * rng.normal(size=(CLASSES, DIM))

  def draw(n):
    y = rng.integers(0, CLASSES, n)
    return (centers[y] + rng.normal(size=(n, DIM))).astype(np.float32), y
  return draw(N_TRAIN) + draw(N_TEST)


@pytest.fixture(scope="module")
def rows(data):
  base = defense.defense_config("simsiam", num_projections=2, pad_dim=4)
  specs = legit.row_specs(base, b4b_transform="diag_affine", transforms=("diag_affine",),
                          static_sigmas=(0.1, 10.0))
  return legit.legit_rows(*data, rows=specs, probe_cfg=PROBE, query_batch_size=BATCH)


def test_rows_and_their_accounts(rows):
  assert list(rows) == ["NONE", "B4B", "transform:diag_affine", "noise sigma=0.1", "noise sigma=10"]
  none = rows["NONE"]["test_top1_mean"]
  assert none > 85.0
  # Transforms are (near) free for a legit user; the B4B noise at a narrow task's coverage too.
  assert abs(rows["transform:diag_affine"]["test_top1_mean"] - none) < 2.0
  assert rows["B4B"]["drop_vs_none"] < 2.0
  # Static noise of the paper's large sigma hurts everyone (Table 6); small sigma does not.
  assert rows["noise sigma=10"]["test_top1_mean"] < none - 30.0
  assert rows["noise sigma=0.1"]["drop_vs_none"] < 2.0
  for name, res in rows.items():
    assert res["drop_vs_none"] == pytest.approx(none - res["test_top1_mean"])
    if name == "NONE":
      continue
    acc = res["account"]
    assert acc["num_queries"] == N_TRAIN + N_TEST         # train and test queries were all charged
    assert 0 < acc["coverage_after_train"] <= acc["coverage"] <= 100.0
  assert rows["noise sigma=10"]["account"]["sigma"] == 10.0


def test_probe_sees_exactly_what_the_api_returned(data):
  train_x, train_y, test_x, test_y = data
  # The noise sigma=0.1 row's config (its step is compiled already by the fixture).
  cfg = defense.defense_config("simsiam", num_projections=2, pad_dim=4, static_sigma=0.1)
  res = legit.legit_user(train_x, train_y, test_x, test_y, defense_config=cfg, probe_cfg=PROBE,
                         query_batch_size=BATCH, return_responses=True)
  # The same user on a fresh API with the same master seed gets the very same answers (noise is keyed
  # by user and query counter), so the responses the probe used are the API's, train then test.
  api = api_client.representation_api(cfg, DIM)
  ref_train = np.concatenate([api.query_representations("legit", train_x[i:i + BATCH]).reps
                              for i in range(0, N_TRAIN, BATCH)])
  ref_test = np.concatenate([api.query_representations("legit", test_x[i:i + BATCH]).reps
                             for i in range(0, N_TEST, BATCH)])
  np.testing.assert_array_equal(res["responses"][0], ref_train)
  np.testing.assert_array_equal(res["responses"][1], ref_test)
  assert not np.allclose(ref_train, train_x)
  assert res["traces"]["train"]["num_queries"] == list(range(BATCH, N_TRAIN + 1, BATCH))


def test_representation_scale_and_bad_rows(data):
  scale = legit.representation_scale(data[0] * 1000.0)
  assert scale["per_dim_std_mean"] > 500.0
  base = defense.defense_config("simsiam")
  with pytest.raises(ValueError, match="transform"):
    legit.row_specs(base, transforms=("rotate",))
  with pytest.raises(ValueError, match="static_sigma"):
    legit.row_specs(base, static_sigmas=(-1.0,))
  with pytest.raises(ValueError, match="encoder_fn"):
    legit.legit_user(*data, defense_config=base, probe_cfg=PROBE, through_images=True)


def test_rep_scale_is_what_binary_and_static_sigma_act_on():
  """The original scaled SimSiam features x1000 before the noise and the transforms (reference §3.4).
  At the raw scale (~1e-3 per dimension) sigma 0.1 drowns the features and Binary's hyperplanes (through
  points of [0, 1]^d) cut none of them: both near chance; at x1000 both keep most of the accuracy. The
  probe (ridge, scale-free) gives the NONE row the same accuracy at either scale."""
  rng = np.random.default_rng(1)
  centers = rng.uniform(0.0, 2.0, size=(4, DIM))

  def draw(n):
    y = rng.integers(0, 4, n)
    # Non-negative and ~1e-3 per dimension, as raw SimSiam ResNet-50 avg-pool features.
    return (1e-3 * np.maximum(centers[y] + 0.3 * rng.normal(size=(n, DIM)), 0)).astype(np.float32), y
  data = draw(N_TRAIN) + draw(N_TEST)
  base = defense.defense_config("simsiam", num_projections=2, pad_dim=4)
  specs = legit.row_specs(base, transforms=("binary",), static_sigmas=(0.1,))
  specs = [s for s in specs if s[0] != "B4B"]
  probe = ml_collections.ConfigDict(dict(PROBE, normalization="none"))
  raw = legit.legit_rows(*data, rows=specs, probe_cfg=probe, query_batch_size=BATCH)
  scaled = legit.legit_rows(*data, rows=specs, probe_cfg=probe, query_batch_size=BATCH, rep_scale=1000.0)
  assert raw["NONE"]["test_top1_mean"] > 90.0
  assert scaled["NONE"]["test_top1_mean"] == pytest.approx(raw["NONE"]["test_top1_mean"], abs=0.5)
  for row in ("transform:binary", "noise sigma=0.1"):
    assert raw[row]["test_top1_mean"] < 45.0, row            # 4 classes: chance 25 %
    assert scaled[row]["test_top1_mean"] > 80.0, row
  # What the API served is the scaled representation (the NONE row's responses are x1000 exactly).
  none = legit.legit_user(*data, defense_config=None, probe_cfg=probe, rep_scale=1000.0,
                          return_responses=True)
  np.testing.assert_allclose(none["responses"][0], data[0] * np.float32(1000.0), rtol=1e-6)
  for bad in (0.0, -1.0, float("nan"), True):
    with pytest.raises(ValueError, match="rep_scale"):
      legit.legit_user(*data, defense_config=None, probe_cfg=probe, rep_scale=bad)


def test_paper_embedding_probe_hparams_and_no_standardisation():
  """The original's per-task Adam lr/epochs (reference §7.5) and no standardisation: standardising
  before a (sign-invariant) probe maps a diagonal-affine user's features back onto NONE's, so Table 8's
  Affine row would equal NONE by construction."""
  from b4b_jax.evaluation import paper_numbers  # pylint: disable=g-import-not-at-top
  from configs import common  # pylint: disable=g-import-not-at-top
  cfg = common.probe_block(tiny=False, paper=True)
  assert (cfg.method, cfg.batch_size, cfg.normalization) == ("adam", 64, "none")
  for kind, dataset, want in (("simsiam", "cifar10", (1e-4, 50)), ("simsiam", "stl10", (1.0, 100)),
                              ("simsiam", "svhn_cropped", (1e-4, 100)),
                              ("simsiam", "fashion_mnist", (1e-3, 50)), ("dino", "cifar10", (1e-5, 50)),
                              ("dino", "fashion_mnist", (5e-5, 100))):
    got = paper_numbers.embedding_probe_for(cfg, kind, dataset)
    assert (got.learning_rate, got.epochs) == want, (kind, dataset)
  assert paper_numbers.embedding_probe_for(cfg, "random", "digits") is cfg
  assert cfg.learning_rate == 1e-4 and cfg.epochs == 50        # the block itself is not modified

  rng = np.random.default_rng(3)
  centers = 0.6 * rng.normal(size=(CLASSES, DIM))

  def draw(n):
    y = rng.integers(0, CLASSES, n)
    return (centers[y] + rng.normal(size=(n, DIM))).astype(np.float32), y
  data = draw(N_TRAIN) + draw(N_TEST)
  base = defense.defense_config("simsiam", num_projections=2, pad_dim=4)
  specs = [s for s in legit.row_specs(base, transforms=("diag_affine",)) if s[0] != "B4B"]
  out = {}
  for norm in ("standardize", "none"):
    probe = ml_collections.ConfigDict(dict(PROBE, normalization=norm))
    rows = legit.legit_rows(*data, rows=specs, probe_cfg=probe, query_batch_size=BATCH)
    out[norm] = (rows["NONE"]["test_top1_mean"], rows["transform:diag_affine"]["test_top1_mean"])
  assert out["standardize"][0] == pytest.approx(out["standardize"][1], abs=1e-9)
  assert out["none"][0] != pytest.approx(out["none"][1], abs=1e-9)


def test_rep_scale_through_images_equals_through_representations(tmp_path):
  """The images path (encoder fused into the API) serves the same scaled, transformed features as
  sending the scaled clean representations: the transform acts on x1000 features on both paths."""
  from b4b_jax import data as data_lib  # pylint: disable=g-import-not-at-top
  from b4b_jax.evaluation import embeddings  # pylint: disable=g-import-not-at-top
  encoder = embeddings.resolve_encoder("random:resnet18_w0.125@16", workdir=str(tmp_path))
  images, labels = data_lib.load_arrays("digits", "train", limit=96, image_size=16)
  reps = embeddings.embed_images(encoder, images)
  cfg = defense.defense_config("simsiam", num_projections=2, static_sigma=0.0, transform="diag_affine")
  probe = ml_collections.ConfigDict(dict(PROBE, normalization="none"))
  split = [(images[:64], labels[:64])], [(images[64:], labels[64:])]
  via_images = legit.legit_user_images(encoder, cfg, *split, probe_cfg=probe, query_batch_size=32,
                                       return_responses=True, rep_scale=1000.0)
  via_reps = legit.legit_user(reps[:64], labels[:64], reps[64:], labels[64:], defense_config=cfg,
                              probe_cfg=probe, query_batch_size=32, return_responses=True,
                              rep_scale=1000.0)
  raw = legit.legit_user(reps[:64], labels[:64], reps[64:], labels[64:], defense_config=cfg,
                         probe_cfg=probe, query_batch_size=32, return_responses=True)
  for a, b, c in zip(via_images["responses"], via_reps["responses"], raw["responses"]):
    np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-3)
    assert np.abs(b).mean() > 100 * np.abs(c).mean()   # the served features are the scaled ones
