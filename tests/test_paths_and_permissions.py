"""Path problems are one clear error naming the path, before any work; outputs honour the umask;
`convert --overwrite` only replaces what the converter wrote, atomically (issue 14 items 8, 10, 11)."""
import json
import os
import shutil
import stat
import subprocess
import sys
import tempfile

import ml_collections
import numpy as np
import pytest
import torch
import torchvision

from b4b_jax import models
from b4b_jax.jobs import runner
from b4b_jax.utils import checkpoint
from b4b_jax.utils import files
from b4b_jax.utils import metrics
from b4b_jax.utils import workdir as workdir_lib
from weight_conversion import convert
from weight_conversion import converters
from weight_conversion import pth_reader

REPO = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


@pytest.fixture(scope="module")
def resnet18_pth(tmp_path_factory):
  torch.manual_seed(0)
  path = tmp_path_factory.mktemp("pth") / "resnet18.pth"
  torch.save(torchvision.models.resnet18().state_dict(), path)
  return str(path)


@pytest.fixture
def no_reading(monkeypatch):
  """Fails the test if the converter starts reading the checkpoint."""
  def refuse(path):
    raise AssertionError(f"the conversion started (read {path}) before the path problem was found")
  monkeypatch.setattr(pth_reader, "load_pth", refuse)
  monkeypatch.setattr(converters, "file_sha256", refuse)


def _convert(capsys, *args):
  rc = convert.main(list(args))
  return rc, capsys.readouterr().err


# ---------------------------------------------------------------------------------- item 8: paths
def test_convert_output_under_a_regular_file_is_refused_before_converting(tmp_path, capsys,
                                                                           resnet18_pth, no_reading):
  blocker = tmp_path / "notes.txt"
  blocker.write_text("keep me")
  rc, err = _convert(capsys, "--kind", "torchvision_resnet", "--checkpoint", resnet18_pth,
                     "--output", str(blocker / "enc"))
  assert rc == 2
  assert str(blocker) in err and "regular file" in err and "Traceback" not in err
  assert blocker.read_text() == "keep me"


def test_convert_checkpoint_that_is_a_directory_says_so(tmp_path, capsys):
  rc, err = _convert(capsys, "--kind", "simsiam", "--checkpoint", str(tmp_path),
                     "--output", str(tmp_path / "out"))
  assert rc == 2
  assert "is a directory" in err and str(tmp_path) in err and "does not exist" not in err
  assert not (tmp_path / "out").exists()
  rc, err = _convert(capsys, "--kind", "simsiam", "--checkpoint", "/dev/zero",
                     "--output", str(tmp_path / "out"))  # would otherwise be read forever
  assert rc == 2 and "/dev/zero is not a regular file" in err


def test_convert_output_in_a_read_only_parent_is_refused_before_converting(tmp_path, capsys, monkeypatch,
                                                                         resnet18_pth, no_reading):
  _deny_writes_under(monkeypatch, tmp_path / "ro")
  (tmp_path / "ro").mkdir()
  rc, err = _convert(capsys, "--kind", "torchvision_resnet", "--checkpoint", resnet18_pth,
                     "--output", str(tmp_path / "ro" / "enc"))
  assert rc == 2 and "not writable" in err and str(tmp_path / "ro") in err


def _config(job="embeddings", **fields):
  return ml_collections.ConfigDict(dict(job=job, seed=0, **fields))


def _job_config():
  """A config the embeddings job validates (run_job validates before it looks at the workdir)."""
  from configs import embeddings  # pylint: disable=g-import-not-at-top
  return embeddings.get_config("tiny")


def test_workdir_that_is_a_regular_file_is_one_clear_error(tmp_path):
  blocker = tmp_path / "wd"
  blocker.write_text("x")
  with pytest.raises(files.PathError, match=r"workdir .*wd is a regular file, not a directory"):
    workdir_lib.prepare_workdir(str(blocker), _config(), "embeddings")
  with pytest.raises(files.PathError, match="regular file"):
    workdir_lib.prepare_workdir(str(blocker / "sub"), _config(), "embeddings")
  assert blocker.read_text() == "x"


def test_main_reports_a_path_error_without_a_traceback(tmp_path):
  blocker = tmp_path / "wd"
  blocker.write_text("x")
  proc = subprocess.run(
      [sys.executable, "-m", "b4b_jax.main", f"--config={REPO}/configs/embeddings.py:tiny",
       f"--workdir={blocker}"], cwd=REPO, capture_output=True, text=True, timeout=300,
      env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  assert proc.returncode != 0
  assert "Traceback" not in proc.stderr, proc.stderr[-3000:]
  assert f"workdir {blocker} is a regular file, not a directory" in proc.stderr


def _deny_writes_under(monkeypatch, root):
  """Simulates a read-only directory (tests run as root, where chmod does not stop writes): creating
  a temporary file under `root` fails with EACCES, as it does for a user on a read-only workdir."""
  real = tempfile.mkstemp
  root = os.path.abspath(str(root))

  def mkstemp(*args, dir=None, **kwargs):  # pylint: disable=redefined-builtin
    if dir is not None and os.path.abspath(dir).startswith(root):
      raise PermissionError(13, "Permission denied", os.path.join(dir, "tmp"))
    return real(*args, dir=dir, **kwargs)
  monkeypatch.setattr(tempfile, "mkstemp", mkstemp)


def test_reopening_a_finished_run_in_a_read_only_workdir(tmp_path, monkeypatch):
  """Nothing is rewritten when run_info.json already matches, so preparing a read-only workdir of the
  same run succeeds; a job run (which must write) is refused up front with one clear error."""
  wd = tmp_path / "wd"
  config = _job_config()
  assert workdir_lib.prepare_workdir(str(wd), config, "embeddings") is False
  before = {p: (wd / p).read_bytes() for p in os.listdir(wd)}
  _deny_writes_under(monkeypatch, wd)
  assert workdir_lib.prepare_workdir(str(wd), config, "embeddings", writable=False) is True
  assert {p: (wd / p).read_bytes() for p in os.listdir(wd)} == before
  with pytest.raises(files.PathError, match=r"workdir .*wd is not writable"):
    runner.run_job(config, str(wd))


_READ_ONLY_SCRIPT = """
import sys
import ml_collections, numpy as np
from b4b_jax.jobs import runner
from b4b_jax.utils import checkpoint, files, metrics, workdir
wd = sys.argv[1]
from configs import embeddings
config = embeddings.get_config("tiny")
assert workdir.prepare_workdir(wd, config, "embeddings", writable=False) is True
assert metrics.read_metrics(wd) == [{"step": 1, "stage": "s", "loss": 1.0}]
ckpt = checkpoint.Checkpointer(wd + "/checkpoints")
state, meta = ckpt.restore(checkpoint.abstract_like({"w": np.zeros(3)}))
assert meta == {"step": 2} and float(state["w"][0]) == 2.0
ckpt.close()
try:
  runner.run_job(config, wd)
except files.PathError as e:
  print("REFUSED", e)
"""


def _without_root_privileges():
  """argv prefix that runs a command with permission checks enforced (as a user, or as root without
  the capabilities that bypass them)."""
  if os.geteuid() != 0:
    return []
  if shutil.which("setpriv") is None:
    pytest.skip("running as root without setpriv: directory permissions cannot be enforced")
  return ["setpriv", "--bounding-set=-dac_override,-dac_read_search,-fowner", "--"]


def test_finished_run_in_a_really_read_only_workdir(tmp_path):
  """With real permissions: results, metrics and checkpoints of a finished run read fine from a
  read-only workdir; running the job there is refused up front with one clear error."""
  wd = tmp_path / "wd"
  workdir_lib.prepare_workdir(str(wd), _job_config(), "embeddings")
  writer = metrics.MetricsWriter(str(wd))
  writer.write_scalars(1, {"loss": 1.0}, stage="s")
  writer.close()
  ckpt = checkpoint.Checkpointer(str(wd / "checkpoints"))
  for step in (1, 2):
    ckpt.save(step, {"w": np.full(3, float(step))}, {"step": step})
  ckpt.close()
  subprocess.run(["chmod", "-R", "a-w", str(wd)], check=True)
  try:
    proc = subprocess.run(_without_root_privileges() + [sys.executable, "-c", _READ_ONLY_SCRIPT, str(wd)],
                          capture_output=True, text=True, timeout=300, cwd=REPO,
                          env=dict(os.environ, JAX_PLATFORMS="cpu", PYTHONPATH=REPO))
  finally:
    subprocess.run(["chmod", "-R", "u+w", str(wd)], check=True)
  assert proc.returncode == 0, proc.stderr[-3000:]
  assert f"REFUSED workdir {wd} is not writable" in proc.stdout


# ------------------------------------------------------------------------------ item 11: the umask
def _mode(path):
  return stat.S_IMODE(os.stat(path).st_mode)


@pytest.fixture
def umask_022():
  old = os.umask(0o022)
  yield
  os.umask(old)


def test_atomic_writes_and_run_info_honour_the_umask(tmp_path, umask_022):
  files.atomic_write_json(str(tmp_path / "results.json"), {"a": 1})
  assert _mode(tmp_path / "results.json") == 0o644
  workdir_lib.prepare_workdir(str(tmp_path / "wd"), _config(), "embeddings")
  assert _mode(tmp_path / "wd" / "run_info.json") == 0o644
  assert _mode(tmp_path / "wd") == 0o755
  os.umask(0o027)
  files.atomic_write_text(str(tmp_path / "team.txt"), "x")
  assert _mode(tmp_path / "team.txt") == 0o640


def test_converted_encoder_directory_honours_the_umask(tmp_path, umask_022, resnet18_pth):
  out = tmp_path / "enc"
  converters.convert_checkpoint("torchvision_resnet", resnet18_pth, str(out))
  assert _mode(out) == 0o755
  assert _mode(out / "manifest.json") == 0o644
  for root, dirs, names in os.walk(out):
    for d in dirs:
      assert _mode(os.path.join(root, d)) == 0o755, os.path.join(root, d)
    for n in names:
      assert _mode(os.path.join(root, n)) == 0o644, os.path.join(root, n)


# --------------------------------------------------------------------------- item 10: --overwrite
def test_overwrite_refuses_a_directory_the_converter_did_not_write(tmp_path, capsys, resnet18_pth,
                                                                  no_reading):
  precious = tmp_path / "photos"
  precious.mkdir()
  (precious / "holiday.jpg").write_bytes(b"\xff\xd8 not an encoder")
  rc, err = _convert(capsys, "--kind", "torchvision_resnet", "--checkpoint", resnet18_pth,
                     "--output", str(precious), "--overwrite")
  assert rc == 2 and "not an encoder directory" in err and str(precious) in err
  assert (precious / "holiday.jpg").read_bytes() == b"\xff\xd8 not an encoder"
  # A manifest of another format is not ours either; nor is a regular file.
  (precious / "manifest.json").write_text(json.dumps({"format": "someone.else/v3"}))
  rc, err = _convert(capsys, "--kind", "torchvision_resnet", "--checkpoint", resnet18_pth,
                     "--output", str(precious), "--overwrite")
  assert rc == 2 and "not an encoder directory" in err
  plain = tmp_path / "plain.txt"
  plain.write_text("x")
  rc, err = _convert(capsys, "--kind", "torchvision_resnet", "--checkpoint", resnet18_pth,
                     "--output", str(plain), "--overwrite")
  assert rc == 2 and "regular file" in err and plain.read_text() == "x"


def test_save_encoder_overwrite_refuses_foreign_directories(tmp_path):
  precious = tmp_path / "data"
  precious.mkdir()
  (precious / "labels.csv").write_text("a,b")
  with pytest.raises(ValueError, match="not an encoder directory"):
    models.save_encoder(str(precious), object(), {}, overwrite=True)
  assert (precious / "labels.csv").read_text() == "a,b"


def test_overwrite_replaces_an_encoder_directory_atomically(tmp_path, resnet18_pth, monkeypatch):
  out = tmp_path / "enc"
  converters.convert_checkpoint("torchvision_resnet", resnet18_pth, str(out))
  first = (out / "manifest.json").read_text()
  seen = []
  real_rename = os.rename

  def watching_rename(src, dst):  # at every rename, `out` must hold a complete encoder directory
    seen.append(os.path.isfile(out / "manifest.json"))
    return real_rename(src, dst)
  monkeypatch.setattr(os, "rename", watching_rename)
  converters.convert_checkpoint("torchvision_resnet", resnet18_pth, str(out), overwrite=True)
  assert (out / "manifest.json").read_text() == first
  assert all(seen)
  assert os.path.isfile(out / "manifest.json")
  assert sorted(os.listdir(tmp_path)) == ["enc"]  # no staging or backup directory left behind


def test_replace_dir_exchanges_in_one_step(tmp_path):
  old, new = tmp_path / "target", tmp_path / "new"
  old.mkdir()
  (old / "v").write_text("old")
  new.mkdir()
  (new / "v").write_text("new")
  files.replace_dir(str(new), str(old))
  assert (old / "v").read_text() == "new" and not new.exists()
