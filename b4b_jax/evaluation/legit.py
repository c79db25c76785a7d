"""Legitimate users through the API (paper Table 1 LEGIT rows, Table 6 static noise, Table 8 transforms).

A legitimate user has one downstream task. It sends its train images and then its test images to the
defended API (every query charged to its account, so the test queries are answered at the coverage the
train queries built up), trains a linear probe on what it received for train and evaluates it on what it
received for test. Its transform is applied to both, so the probe works in the user's own space.

Rows (each a fresh API, one account):
  NONE              the undefended victim (clean representations)
  B4B               the B4B cost + the configured per-user transform
  transform:<name>  transforms only (no noise), paper Table 8
  noise sigma=<s>   static noise of std s for everyone, no transform, paper Table 6

The defense hashes the clean representation and the encoder is deterministic, so sending the clean
representations computed once (`query_representations`) is exactly what sending the images would give;
`through_images=True` sends the images themselves through `DefendedEncoder.query` instead (the tests
check both agree).

rep_scale: the API serves the encoder's representations times rep_scale, and everything downstream
acts on the scaled features: LSH coverage (scale-free), the noise (a static sigma, Table 6, is in those
units), the per-user transform (Binary's hyperplanes pass through points of [0, 1]^d, so it is not
scale-free) and the probe. The original multiplied SimSiam features by 1000 in every embedding
experiment (reference §3.4, §7.5); DINO's by 1.
"""
from typing import Callable, Optional, Sequence

import numpy as np

from b4b_jax import defense
from b4b_jax.evaluation import api_client
from b4b_jax.evaluation import embeddings as embeddings_lib
from b4b_jax.evaluation import linear_probe


def row_specs(base_config, *, b4b_transform: str = "diag_affine",
              transforms: Sequence[str] = (), static_sigmas: Sequence[float] = ()) -> list:
  """[(row name, defense config or None)] for the NONE, B4B, transforms-only and static-noise rows."""
  def with_(**fields):
    cfg = base_config.copy_and_resolve_references()
    with cfg.unlocked():
      cfg.update(fields)
    defense.validate_config(cfg)
    return cfg

  rows = [("NONE", None),
          ("B4B", with_(enabled=True, static_sigma=None, transform=b4b_transform))]
  rows += [(f"transform:{t}", with_(enabled=True, static_sigma=0.0, transform=t)) for t in transforms]
  rows += [(f"noise sigma={float(s):g}", with_(enabled=True, static_sigma=float(s), transform="identity"))
           for s in static_sigmas]
  return rows


def check_rep_scale(rep_scale) -> float:
  """rep_scale as a float, or ValueError: it must be a finite number > 0."""
  if isinstance(rep_scale, bool) or not isinstance(rep_scale, (int, float)):
    raise ValueError(f"rep_scale must be a number, got {rep_scale!r}")
  if not (np.isfinite(rep_scale) and rep_scale > 0):
    raise ValueError(f"rep_scale must be a finite number > 0, got {rep_scale}")
  return float(rep_scale)


def scaled_encoder(encoder, rep_scale: float):
  """`encoder` (a models.Encoder or any images -> reps callable) with its outputs times rep_scale."""
  rep_scale = check_rep_scale(rep_scale)
  if rep_scale == 1.0:
    return encoder
  if hasattr(encoder, "manifest"):
    return embeddings_lib.EncoderView(encoder, scale=rep_scale)
  return lambda images: encoder(images) * rep_scale


def representation_scale(reps) -> dict:
  """Scale of clean representations: sigma only means something relative to these (reference §3.4)."""
  reps = np.asarray(reps, np.float64)
  return {"per_dim_std_mean": float(reps.std(0).mean()),
          "mean_norm": float(np.linalg.norm(reps, axis=1).mean()), "mean_abs": float(np.abs(reps).mean())}


def _received(probe, train_trace, test_trace, received, return_responses: bool) -> dict:
  result = {"probe": probe.summary(), "test_top1_mean": probe.test_top1_mean,
            "test_top1_std": probe.test_top1_std, "out_dim": int(received[0].shape[1]),
            "account": {"coverage": test_trace.coverage[-1], "sigma": test_trace.sigma[-1],
                        "num_queries": test_trace.num_queries[-1],
                        "coverage_after_train": train_trace.coverage[-1],
                        "sigma_after_train": train_trace.sigma[-1]},
            "traces": {"train": train_trace.to_dict(), "test": test_trace.to_dict()}}
  if return_responses:
    result["responses"] = received
  return result


def legit_user(train, train_y, test, test_y, *, defense_config, probe_cfg, query_batch_size: int = 256,
               through_images: bool = False, encoder_fn=None, rep_dim: Optional[int] = None,
               user: str = "legit", return_responses: bool = False, rep_scale: float = 1.0,
               on_batch: Optional[Callable[[int, int], None]] = None, api=None) -> dict:
  """One legit user of one API config; returns the probe summary and the account's coverage/sigma.

  train/test are clean representations (through_images=False) or encoder-ready images with the
  encoder (`encoder_fn`, a models.Encoder) and `rep_dim` (through_images=True). defense_config None =
  undefended victim. rep_scale: the API serves representations x rep_scale (module docstring).
  api: an API already built (through_images=True: it takes the images as given, e.g. uint8 for
  DefendedEncoder.from_encoder or the served b4b_jax.serve.client.RemoteDefendedEncoder) instead of one
  built here from encoder_fn; it serves at its own scale (rep_scale must stay 1).
  """
  rep_scale = check_rep_scale(rep_scale)
  if not through_images and rep_scale != 1.0:
    train = np.asarray(train, np.float32) * np.float32(rep_scale)
    test = np.asarray(test, np.float32) * np.float32(rep_scale)
  if defense_config is None and through_images:
    raise ValueError("the undefended row takes representations (through_images=False)")
  if defense_config is None:
    received = (np.asarray(train, np.float32), np.asarray(test, np.float32))
    probe = linear_probe.run_probe(received[0], train_y, received[1], test_y, probe_cfg)
    result = {"probe": probe.summary(), "test_top1_mean": probe.test_top1_mean,
              "test_top1_std": probe.test_top1_std, "out_dim": int(received[0].shape[1]),
              "account": {"coverage": None, "sigma": 0.0, "num_queries": int(len(train) + len(test))},
              "traces": None}
    if return_responses:
      result["responses"] = received
    return result
  if api is not None:
    if not through_images or rep_scale != 1.0:
      raise ValueError("api= sends images at the API's own scale: pass through_images=True and no "
                       "rep_scale")
  elif through_images:
    if encoder_fn is None or rep_dim is None:
      raise ValueError("through_images=True needs encoder_fn and rep_dim")
    api = defense.DefendedEncoder(scaled_encoder(encoder_fn, rep_scale), defense_config, int(rep_dim),
                                  capacity=2)
  else:
    api = api_client.representation_api(defense_config, np.asarray(train).shape[1], capacity=2,
                                        batch_size=query_batch_size)
  send = dict(batch_size=query_batch_size, representations=not through_images)
  received_train, train_trace = api_client.send(api, user, train, on_batch=on_batch, **send)
  received_test, test_trace = api_client.send(api, user, test, **send)
  probe = linear_probe.run_probe(received_train, train_y, received_test, test_y, probe_cfg)
  return _received(probe, train_trace, test_trace, (received_train, received_test), return_responses)


def _chunks(batches, batch_size: int, labels: list):
  """Query batches of at most `batch_size` uint8 images from a stream of (images, labels) batches; the
  labels are collected into `labels`."""
  for images, y in batches:
    labels.append(np.asarray(y))
    yield from api_client.chunks(images, batch_size)


def legit_user_images(encoder, defense_config, train_batches, test_batches, *, probe_cfg,
                      query_batch_size: int = 256, user: str = "legit",
                      return_responses: bool = False, rep_scale: float = 1.0) -> dict:
  """A legit user streaming its images through DefendedEncoder.query (the encoder fused into the API).

  train_batches/test_batches: iterables of (uint8 images, labels), already transformed to the
  encoder's input size; the API normalises them as the encoder's manifest says and serves the
  representations x rep_scale.
  """
  api = defense.DefendedEncoder.from_encoder(scaled_encoder(encoder, rep_scale), defense_config,
                                             capacity=2)
  received, traces, labels = [], [], []
  for batches in (train_batches, test_batches):
    split_labels = []
    responses, trace = api_client.send_batches(
        api, user, _chunks(batches, query_batch_size, split_labels), representations=False)
    if not split_labels:
      raise ValueError(f"user {user!r} has no images to send")
    received.append(responses)
    traces.append(trace)
    labels.append(np.concatenate(split_labels))
  probe = linear_probe.run_probe(received[0], labels[0], received[1], labels[1], probe_cfg)
  result = _received(probe, traces[0], traces[1], tuple(received), return_responses)
  result["through_images"] = True
  if return_responses:
    result["labels"] = tuple(labels)
  return result


def legit_rows(train_x, train_y, test_x, test_y, *, rows, probe_cfg, query_batch_size: int = 256,
               rep_scale: float = 1.0,
               on_row: Optional[Callable[[int, int, str, dict], None]] = None) -> dict:
  """Runs every (name, config) row for one dataset's clean representations; {name: row result}."""
  out = {}
  for i, (name, cfg) in enumerate(rows):
    res = legit_user(train_x, train_y, test_x, test_y, defense_config=cfg, probe_cfg=probe_cfg,
                     query_batch_size=query_batch_size, rep_scale=rep_scale)
    out[name] = res
    if on_row is not None:
      on_row(i + 1, len(rows), name, res)
  none = out.get("NONE")
  if none is not None:
    for res in out.values():
      res["drop_vs_none"] = none["test_top1_mean"] - res["test_top1_mean"]
  return out
