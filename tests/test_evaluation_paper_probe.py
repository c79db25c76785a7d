"""Probe protocol `paper` (the original's image-level stolen-model probe, reference §7.4): its head
optimisation equals a PyTorch loop of the same SGD on the same data, order and init; the epoch is chosen
on validation only; the image pipeline is RandomCrop(pad) + flip + Resize; the backbone sees
un-normalised images."""
import ml_collections
import numpy as np
import pytest
import torch

from b4b_jax import data as data_lib
from b4b_jax.evaluation import embeddings
from b4b_jax.evaluation import paper_probe

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _data(n=40, d=6, c=3, seed=0):
  centers = np.random.default_rng(0).normal(0, 1.0, (c, d))   # the same classes for every sample
  rng = np.random.default_rng(seed + 1)
  y = rng.integers(0, c, n).astype(np.int32)
  x = (centers[y] + rng.normal(0, 0.8, (n, d))).astype(np.float32)
  return x, y


def _torch_reference(feats_per_epoch, y, w0, rows_per_epoch, *, lrs, momentum, weight_decay):
  """nn.Linear + CrossEntropyLoss + torch.optim.SGD over the given batches; per-step losses, final head."""
  fc = torch.nn.Linear(w0.shape[0], w0.shape[1])
  with torch.no_grad():
    fc.weight.copy_(torch.tensor(w0.T))
    fc.bias.zero_()
  opt = torch.optim.SGD(fc.parameters(), lr=lrs[0], momentum=momentum, weight_decay=weight_decay)
  losses = []
  for feats, batches, lr in zip(feats_per_epoch, rows_per_epoch, lrs):
    for group in opt.param_groups:
      group["lr"] = lr
    for rows in batches:
      out = fc(torch.tensor(feats[rows]))
      loss = torch.nn.functional.cross_entropy(out, torch.tensor(y[rows]).long())
      opt.zero_grad()
      loss.backward()
      opt.step()
      losses.append(loss.item())
  return np.array(losses), fc.weight.detach().numpy().T, fc.bias.detach().numpy()


@pytest.mark.parametrize("weight_decay", [0.0, 0.01])
def test_sgd_epochs_equal_a_pytorch_loop(weight_decay):
  x, y = _data()
  epochs, bs, base_lr, momentum = 3, 16, 1.6, 0.9   # lr 0.1 at batch 16; 36 rows -> a partial batch
  rows = np.arange(36)
  feats = [x + 0.05 * e for e in range(epochs)]      # a different "view" every epoch
  params = {k: v[None] for k, v in paper_probe.init_head(7, x.shape[1], 3).items()}
  w0 = np.asarray(params["w"][0])
  # The init is N(0, std 0.01) (torch's normal_(std=0.01)), bias 0.
  big = np.asarray(paper_probe.init_head(1, 512, 64)["w"])
  assert abs(big.std() - 0.01) < 5e-4 and abs(big.mean()) < 5e-4
  buf = {k: np.zeros_like(v) for k, v in params.items()}
  lrs = [paper_probe.cosine_lr(base_lr, bs, e, epochs) for e in range(epochs)]
  assert lrs[0] == pytest.approx(0.1) and lrs[1] == pytest.approx(0.075)
  jax_losses, batches = [], []
  for e in range(epochs):
    order, mask = paper_probe.epoch_order(7, e, rows, bs)
    batches.append([o[m > 0] for o, m in zip(order, mask)])
    params, buf, losses = paper_probe.sgd_epoch(params, buf, feats[e], y, order[None], mask, lrs[e],
                                                momentum, weight_decay)
    jax_losses.append(np.asarray(losses)[0])
  assert [len(b) for b in batches[0]] == [16, 16, 4]
  assert sorted(np.concatenate(batches[1]).tolist()) == rows.tolist()
  ref_losses, ref_w, ref_b = _torch_reference(feats, y, w0, batches, lrs=lrs, momentum=momentum,
                                              weight_decay=weight_decay)
  np.testing.assert_allclose(np.concatenate(jax_losses), ref_losses, rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params["w"][0]), ref_w, rtol=1e-4, atol=1e-6)
  np.testing.assert_allclose(np.asarray(params["b"][0]), ref_b, rtol=1e-4, atol=1e-6)
  assert np.abs(ref_w - w0).max() > 1e-2   # the head did move


def _train(x, y, test_x, test_y, *, epochs=6, seeds=(0, 1)):
  from b4b_jax.evaluation import linear_probe  # pylint: disable=g-import-not-at-top
  splits = [linear_probe.split_train_val(len(y), 0.25, s) for s in seeds]
  return paper_probe.train_head(
      lambda e: x, y, x, test_x, test_y, train_rows=[a for a, _ in splits],
      val_rows=[b for _, b in splits], seeds=seeds, epochs=epochs, batch_size=8, base_lr=3.2,
      momentum=0.9, weight_decay=0.0, num_classes=3)


def test_the_epoch_is_chosen_on_validation_never_on_test():
  x, y = _data(n=64)
  tx, ty = _data(n=48, seed=1)
  a = _train(x, y, tx, ty)
  shuffled = np.random.default_rng(0).permutation(ty)
  b = _train(x, y, tx, shuffled)
  for ra, rb in zip(a, b):
    assert ra.chosen_epoch == rb.chosen_epoch and ra.val_curve == rb.val_curve
    assert 1 <= ra.chosen_epoch <= 6
    assert ra.val_top1 == max(ra.val_curve) and ra.val_curve.index(ra.val_top1) + 1 == ra.chosen_epoch
    assert ra.test_top1_last == ra.test_curve[-1]
    assert ra.test_curve != rb.test_curve          # test was scored, with the labels it was given
  assert np.mean([r.test_top1 for r in a]) > 60.0   # well above chance (3 classes)


def test_pad_crop_flip_is_a_window_of_the_padded_image():
  rng = np.random.default_rng(0)
  image = rng.integers(1, 256, (6, 5, 3)).astype(np.uint8)
  t = paper_probe.PadCropFlipResize(size=(6), pad=2)
  t._resize = lambda im: im  # geometry only: the window, before the resize  pylint: disable=protected-access
  padded = np.pad(image, ((2, 2), (2, 2), (0, 0)))
  seen = set()
  for i in range(40):
    out = t(image, data_lib.example_seed(0, 0, i)).numpy()
    hits = [(a, b, f) for a in range(5) for b in range(5) for f in (0, 1)
            if np.array_equal(out, (lambda w: w[:, ::-1] if f else w)(padded[a:a + 6, b:b + 5]))]
    assert hits, i
    seen.update(hits)
  assert len({h[:2] for h in seen}) > 5 and {h[2] for h in seen} == {0, 1}  # offsets and flips vary
  full = paper_probe.PadCropFlipResize(size=12, pad=1)(image, data_lib.example_seed(0, 0, 0))
  assert tuple(full.shape) == (12, 12, 3)
  train_tf, eval_tf = paper_probe.probe_transforms("cifar10", 224)
  assert isinstance(train_tf, paper_probe.PadCropFlipResize) and train_tf.pad == 4
  assert paper_probe.probe_transforms("svhn_cropped", 224)[0] == eval_tf == data_lib.Transform("resize",
                                                                                              224)


def _cfg(**kw):
  c = ml_collections.ConfigDict(dict(
      epochs=2, batch_size=32, base_lr=0.8, momentum=0.9, weight_decay=0.0, val_fraction=0.2,
      seeds=(0,), augment="on", pad=1, input_normalization="none", image_size=None,
      embed_batch_size=64))
  c.update(kw)
  return c


def test_image_level_probe_on_a_tiny_encoder(tmp_path):
  encoder = embeddings.resolve_encoder("random:resnet18_w0.125@16", workdir=str(tmp_path))
  before = [np.asarray(v).copy() for v in __import__("jax").tree.leaves(encoder.params)]
  # "none": the backbone sees x / 255 (ToTensor), not the manifest's mean/std.
  view = paper_probe.probe_encoder(encoder, "none")
  images, _ = data_lib.load_arrays("digits", "train", limit=4, image_size=16)
  np.testing.assert_allclose(embeddings.embed_images(view, images),
                             np.asarray(encoder(images.astype(np.float32) / 255.0)), rtol=1e-5,
                             atol=1e-6)
  cfg = _cfg()
  res = paper_probe.paper_probe(encoder, "digits", cfg=cfg, train_limit=200, test_limit=100)
  assert res.settings["num_train"] == 200 and res.settings["lr"] == pytest.approx(0.1)
  assert "PadCropFlipResize" in res.settings["train_transform"]
  (seed,) = res.seeds
  assert 1 <= seed.chosen_epoch <= 2 and len(seed.test_curve) == 2
  assert seed.test_top1_last == seed.test_curve[-1] and res.best_on_test_top1_mean == max(seed.test_curve)
  # Fresh views every epoch, the same views on a rerun; the backbone is never updated.
  tf = paper_probe.PadCropFlipResize(16, 1)
  e0 = paper_probe.embed_view(view, "digits", "train", tf, seed=0, epoch=0, batch_size=64, limit=32)
  e1 = paper_probe.embed_view(view, "digits", "train", tf, seed=0, epoch=1, batch_size=64, limit=32)
  again = paper_probe.embed_view(view, "digits", "train", tf, seed=0, epoch=0, batch_size=64, limit=32)
  assert not np.allclose(e0[0], e1[0]) and np.array_equal(e0[0], again[0])
  after = [np.asarray(v) for v in __import__("jax").tree.leaves(encoder.params)]
  assert all(np.array_equal(a, b) for a, b in zip(before, after))


@pytest.mark.parametrize("field,value,match", [
    ("augment", "maybe", "augment"), ("input_normalization", "imagenet", "input_normalization"),
    ("epochs", 0, "epochs"), ("val_fraction", 0.0, "val_fraction"), ("base_lr", 0.0, "base_lr")])
def test_bad_paper_probe_config_raises(field, value, match):
  with pytest.raises(ValueError, match=match):
    paper_probe.check_config(_cfg(**{field: value}))
