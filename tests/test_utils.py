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


def test_progress_without_a_known_total_shows_no_percentage_or_negative_eta():
  """A per-host filtered stream has no cheap cardinality (total 0); an overrun step must not print a
  negative ETA either."""
  lines = []
  p = progress.Progress("embed/x", 0, unit="image", print_fn=lines.append, every_seconds=0)
  p.update(64)
  assert "image 64 (total unknown)" in lines[-1] and "ETA ?" in lines[-1], lines[-1]
  q = progress.Progress("embed/y", 10, unit="image", print_fn=lines.append, every_seconds=0)
  q.update(12)
  assert "image 12/10" in lines[-1] and "ETA ?" in lines[-1] and "-" not in lines[-1].split("ETA")[1]


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


# ------------------------------------------------------------- resume and crash leftovers (item 12)
def test_metrics_replayed_steps_after_resume_are_not_duplicated(tmp_path):
  first = metrics.MetricsWriter(str(tmp_path))
  for step in range(1, 5):
    first.write_scalars(step, {"loss": float(step)}, stage="steal")
  first.write_scalars(4, {"epoch_loss": 9.0}, stage="steal")  # a second record of the same step
  first.write_scalars(1, {"acc": 0.5}, stage="probe")
  first.close()
  # Killed after step 4, resumed from the checkpoint of step 2: steps 3 and 4 are replayed.
  resumed = metrics.MetricsWriter(str(tmp_path))
  for step in range(3, 6):
    resumed.write_scalars(step, {"loss": step + 0.5}, stage="steal")
  got = metrics.read_metrics(str(tmp_path), stage="steal")
  assert [(r["step"], r["loss"]) for r in got] == [(1, 1.0), (2, 2.0), (3, 3.5), (4, 4.5), (5, 5.5)]
  assert got[3]["epoch_loss"] == 9.0  # other values of a replayed step are kept, newer ones win
  assert len(metrics.read_metrics(str(tmp_path), stage="probe")) == 1
  resumed.close()  # closing compacts the file itself: one line per (stage, step)
  lines = [json.loads(x) for x in open(tmp_path / metrics.METRICS_FILE)]
  assert len(lines) == 6 and len({(r.get("stage"), r["step"]) for r in lines}) == 6


def test_read_metrics_tolerates_only_a_torn_last_line(tmp_path):
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write_scalars(1, {"loss": 1.0}, stage="s")
  writer.write_scalars(2, {"loss": 2.0}, stage="s")
  writer.close()
  path = tmp_path / metrics.METRICS_FILE
  with open(path, "a") as f:
    f.write('{"step": 3, "stage": "s", "lo')  # killed mid-write
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2]
  # A writer opened on it drops the torn tail, so the next record does not glue onto it.
  writer = metrics.MetricsWriter(str(tmp_path))
  writer.write_scalars(3, {"loss": 3.0}, stage="s")
  writer.close()
  assert [r["step"] for r in metrics.read_metrics(str(tmp_path))] == [1, 2, 3]
  text = path.read_text().splitlines()
  path.write_text("\n".join([text[0], '{"step": 2, "sta', text[2]]) + "\n")
  with pytest.raises(ValueError, match=r"metrics.jsonl line 2 is corrupt"):
    metrics.read_metrics(str(tmp_path))


def _step_dirs(directory):
  return sorted(int(n) for n in os.listdir(directory) if n.isdigit())


def test_half_deleted_old_step_is_removed_and_logged(tmp_path, caplog):
  directory = tmp_path / "ckpt"
  tree = {"w": np.arange(4.0)}
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  for step in (1, 2, 3):
    ckpt.save(step, {"w": tree["w"] + step}, {"step": step})
  ckpt.close()
  # A kill while orbax deleted step 1 (rmtree) leaves part of it; orbax still lists it as a step.
  import shutil
  shutil.rmtree(directory / "1" / "state")
  os.remove(directory / "1" / "_CHECKPOINT_METADATA")
  with caplog.at_level("WARNING"):
    ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  assert ckpt.all_steps() == [2, 3] and _step_dirs(directory) == [2, 3]
  assert any("step 1" in r.getMessage() and "incomplete" in r.getMessage() for r in caplog.records)
  restored, meta = ckpt.restore(checkpoint.abstract_like(tree))
  assert meta["step"] == 3
  ckpt.close()


def test_old_step_deletion_is_a_rename_so_a_kill_leaves_no_listed_half_step(tmp_path, monkeypatch):
  directory = tmp_path / "ckpt"
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=2)
  removed = []
  import shutil
  real_rmtree = shutil.rmtree

  def killed_rmtree(path, *args, **kwargs):  # the process "dies" before removing anything
    removed.append(str(path))
    raise KeyboardInterrupt
  for step in (1, 2):
    ckpt.save(step, {"w": np.full(3, float(step))}, {"step": step})
  monkeypatch.setattr(shutil, "rmtree", killed_rmtree)
  try:
    ckpt.save(3, {"w": np.full(3, 3.0)}, {"step": 3})
    ckpt.wait_until_finished()
  except KeyboardInterrupt:
    pass
  monkeypatch.setattr(shutil, "rmtree", real_rmtree)
  # Step 1 left the step listing in one rename, whatever happened to its files afterwards.
  assert _step_dirs(directory) == [2, 3]
  reopened = checkpoint.Checkpointer(str(directory), max_to_keep=2)
  assert reopened.all_steps() == [2, 3]
  assert sorted(os.listdir(directory)) == ["2", "3"]  # the next open empties what was set aside
  reopened.close()


def test_damaged_latest_step_is_not_silently_dropped(tmp_path):
  directory = tmp_path / "ckpt"
  tree = {"w": np.arange(3.0)}
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  for step in (1, 2):
    ckpt.save(step, tree, {"step": step})
  ckpt.close()
  os.remove(directory / "2" / "_CHECKPOINT_METADATA")
  ckpt = checkpoint.Checkpointer(str(directory), max_to_keep=3)
  assert ckpt.latest_step() == 2  # saves are atomic: a damaged latest step is damage, not a leftover
  ckpt.close()


def test_read_json_names_the_torn_file(tmp_path):
  path = tmp_path / "stage.json"
  path.write_text('{"result": {"acc": 0.')
  with pytest.raises(ValueError, match=r"stage.json is not valid JSON \(torn or corrupt"):
    files.read_json(str(path))
  path.write_bytes(b"\xff\xfe{}")
  with pytest.raises(ValueError, match="stage.json is not valid JSON"):
    files.read_json(str(path))


def test_checkpointer_path_errors_and_reading_creates_nothing(tmp_path):
  blocker = tmp_path / "file"
  blocker.write_text("x")
  with pytest.raises(files.PathError, match="checkpoint directory .*file is a regular file"):
    checkpoint.Checkpointer(str(blocker))
  with pytest.raises(FileNotFoundError, match="no checkpoint"):
    checkpoint.load_pytree(str(tmp_path / "missing"))
  assert not (tmp_path / "missing").exists()
