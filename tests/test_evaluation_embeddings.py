"""embed_images shares one compiled forward between encoders of one program, each with its own weights."""
import numpy as np
import pytest

from b4b_jax import data as data_lib
from b4b_jax import models
from b4b_jax.evaluation import embeddings

pytestmark = pytest.mark.usefixtures("fast_compiles")


def _plain_forward(encoder, images):
  """The encoder's own call on the images normalised as its manifest says (no embedder involved)."""
  mean, std = data_lib.normalization(encoder)
  return np.asarray(encoder(np.asarray(data_lib.normalize(images, mean, std))))


def test_encoders_of_one_program_share_the_compiled_forward_and_keep_their_weights(tmp_path):
  images, _ = data_lib.load_arrays("digits", "train", limit=8, image_size=16)
  first, second = (embeddings.resolve_encoder("random:resnet18_w0.125@16", workdir=str(tmp_path),
                                              seed=seed) for seed in (0, 1))
  assert first.program_key == second.program_key
  forward = embeddings._compiled_forward(first)  # pylint: disable=protected-access
  assert embeddings._compiled_forward(second) is forward  # pylint: disable=protected-access
  ours = [embeddings.embed_images(e, images) for e in (first, second)]
  assert forward._cache_size() == 1  # pylint: disable=protected-access  (one compile for both)
  for encoder, reps in zip((first, second), ours):  # each with its own weights
    np.testing.assert_allclose(reps, _plain_forward(encoder, images), rtol=1e-5, atol=1e-6)
  assert not np.allclose(ours[0], ours[1])

  # Another program gets another forward: other dtype, precision, normalisation or scale.
  directory = str(tmp_path / "random_encoder_resnet18_w0.125_16_seed0")
  unit = embeddings.EncoderView(first, normalization="unit")  # x / 255, the same program as `first`
  doubled = embeddings.EncoderView(first, scale=2.0)
  others = [models.load_encoder(directory, compute_dtype="bfloat16"),
            models.load_encoder(directory, precision="highest"), unit, doubled]
  forwards = {id(forward)} | {id(embeddings._compiled_forward(e)) for e in others}  # pylint: disable=protected-access
  assert len(forwards) == 1 + len(others)
  np.testing.assert_allclose(embeddings.embed_images(unit, images),
                             np.asarray(first(images.astype(np.float32) / 255.0)), rtol=1e-5, atol=1e-6)
  np.testing.assert_allclose(embeddings.embed_images(doubled, images), 2 * ours[0], rtol=1e-5,
                             atol=1e-6)


def test_an_encoder_without_a_program_key_compiles_its_own_forward(tmp_path):
  encoder = embeddings.resolve_encoder("random:resnet18_w0.125@16", workdir=str(tmp_path))

  class Plain:  # a duck-typed encoder naming no program

    def __init__(self):
      self.manifest, self.rep_dim = encoder.manifest, encoder.rep_dim
      self.params, self.apply_fn = encoder.params, encoder.apply_fn

  a, b = Plain(), Plain()
  assert embeddings._compiled_forward(a) is not embeddings._compiled_forward(b)  # pylint: disable=protected-access
  images, _ = data_lib.load_arrays("digits", "train", limit=4, image_size=16)
  np.testing.assert_allclose(embeddings.embed_images(a, images), embeddings.embed_images(encoder, images),
                             rtol=1e-6, atol=1e-7)
