"""Shared helpers: checkpoints round-trip, metrics reach TensorBoard + JSONL, workdir reuse is guarded."""
import json
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
import pytest

from b4b_jax.utils import checkpoint, distributed, files, metrics, progress, workdir


def test_checkpointer_round_trip_and_latest_step(tmp_path):
  tree = {"w": jnp.arange(6.0).reshape(2, 3), "step": jnp.asarray(3, jnp.int32)}
  ckpt = checkpoint.Checkpointer(str(tmp_path / "ckpt"), max_to_keep=2)
  assert ckpt.latest_step() is None
  ckpt.save(1, tree, {"note": "one"})
  ckpt.save(2, jax.tree.map(lambda x: x + 1, tree), {"note": "two"})
  ckpt.wait_until_finished()
  assert ckpt.latest_step() == 2
  restored, meta = ckpt.restore(checkpoint.abstract_like(tree))
  np.testing.assert_array_equal(restored["w"], np.arange(6.0).reshape(2, 3) + 1)
  assert meta == {"note": "two"}
  restored1, meta1 = ckpt.restore(checkpoint.abstract_like(tree), step=1)
  np.testing.assert_array_equal(restored1["w"], np.arange(6.0).reshape(2, 3))
  assert meta1["note"] == "one"
  ckpt.close()


def test_restore_without_checkpoint_raises(tmp_path):
  ckpt = checkpoint.Checkpointer(str(tmp_path / "empty"))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    ckpt.restore({"w": jax.ShapeDtypeStruct((2,), jnp.float32)})


def test_save_and_load_pytree(tmp_path):
  tree = {"a": {"kernel": np.ones((3, 2), np.float32)}}
  checkpoint.save_pytree(str(tmp_path / "p"), tree, {"arch": "x"})
  loaded, meta = checkpoint.load_pytree(str(tmp_path / "p"))
  np.testing.assert_array_equal(np.asarray(loaded["a"]["kernel"]), tree["a"]["kernel"])
  assert meta == {"arch": "x"}


def test_metrics_writer_jsonl_and_tensorboard(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 2.5}, stage="steal")
  writer.write_scalars(2, {"loss": np.float32(1.5)}, stage="steal")
  writer.write_scalars(1, {"acc": 0.5}, stage="probe")
  writer.flush()
  assert [r["loss"] for r in metrics.read_metrics(str(tmp_path), stage="steal")] == [2.5, 1.5]
  assert any(name.startswith("events.out.tfevents") for name in os.listdir(tmp_path))
  with pytest.raises(FloatingPointError, match="loss.*step 3"):
    writer.write_scalars(3, {"loss": float("nan")}, stage="steal", check_finite=True)
  writer.close()


def test_progress_reports_rate_and_eta():
  lines = []
  p = progress.Progress("steal", 10, print_fn=lines.append, every_seconds=0)
  for step in range(1, 11):
    p.update(step, loss=0.5)
  assert "[steal] step 10/10 (100.0%)" in lines[-1] and "ETA" in lines[-1] and "loss=0.5" in lines[-1]


def test_workdir_refuses_incompatible_run(tmp_path):
  cfg = ml_collections.ConfigDict({"job": "x", "lr": 0.1})
  assert workdir.prepare_workdir(str(tmp_path), cfg, "x") is False
  assert workdir.prepare_workdir(str(tmp_path), cfg, "x") is True  # same config: resume
  assert json.load(open(tmp_path / "config.json"))["lr"] == 0.1
  other = ml_collections.ConfigDict({"job": "x", "lr": 0.2})
  with pytest.raises(ValueError, match="incompatible earlier run"):
    workdir.prepare_workdir(str(tmp_path), other, "x")


def test_atomic_write_json_never_leaves_partial_file(tmp_path):
  path = str(tmp_path / "r.json")
  files.atomic_write_json(path, {"a": np.float32(1.5), "b": np.arange(2)})
  with pytest.raises(TypeError):
    files.atomic_write_json(path, {"bad": object()})
  assert files.read_json(path) == {"a": 1.5, "b": [0, 1]}
  assert os.listdir(tmp_path) == ["r.json"]


def test_data_mesh_and_global_batch_checks():
  mesh = distributed.data_mesh()
  assert mesh.devices.size == jax.device_count() == 8
  distributed.check_global_batch(16, mesh)
  with pytest.raises(ValueError, match="does not divide by the 8 devices"):
    distributed.check_global_batch(12, mesh)
  x = distributed.global_batch({"x": np.arange(16.0).reshape(16, 1)}, mesh)["x"]
  assert x.shape == (16, 1) and len(x.sharding.device_set) == 8
  with pytest.raises(ValueError, match="num_devices=9"):
    distributed.data_mesh(9)
