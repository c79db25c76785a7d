"""The torch-free .pth reader and the converters' refusals (no model forward passes here)."""
import argparse
import collections
import os
import zipfile

import ml_dtypes
import numpy as np
import pytest
import torch
import torchvision

from weight_conversion import converters
from weight_conversion import pth_reader


def test_reads_dtypes_strides_and_containers(tmp_path):
  base = torch.arange(24, dtype=torch.float32).reshape(4, 6) - 7.5
  obj = {
      "transposed": base.t(),                       # non-contiguous strides
      "offset_view": base[1:, 2:],                  # storage offset + strides
      "shared": [base, base[2]],                    # two tensors on one storage
      "half": base.half(), "bf16": base.bfloat16()[::2], "double": base.double(),
      "float8": base.to(torch.float8_e4m3fn),       # _rebuild_tensor_v3 path (untyped storage + dtype)
      "int64": torch.arange(5), "int8": torch.tensor([-3, 4], dtype=torch.int8),
      "bool": torch.tensor([True, False]), "scalar": torch.tensor(3.5), "empty": torch.zeros(0, 3),
      "param": torch.nn.Parameter(torch.ones(3)),
      "nested": collections.OrderedDict(inner={"deep": torch.full((2,), 2.0)}),
      "args": argparse.Namespace(arch="vit_small", lr=0.1, dims=[1, 2], flag=None),
      "bytes": b"\x00\xff", "number": np.float64(2.5), "tuple": (1, "a"),
  }
  path = tmp_path / "mixed.pth"
  torch.save(obj, path)
  out = pth_reader.load_pth(str(path))
  np.testing.assert_array_equal(out["transposed"], base.t().numpy())
  np.testing.assert_array_equal(out["offset_view"], base[1:, 2:].numpy())
  assert out["transposed"].flags.c_contiguous
  np.testing.assert_array_equal(out["shared"][1], base[2].numpy())
  assert out["half"].dtype == np.float16
  assert out["bf16"].dtype == ml_dtypes.bfloat16
  np.testing.assert_array_equal(out["bf16"].astype(np.float32), base.bfloat16()[::2].float().numpy())
  np.testing.assert_array_equal(out["float8"].astype(np.float32),
                                base.to(torch.float8_e4m3fn).float().numpy())
  assert out["double"].dtype == np.float64 and out["int64"].dtype == np.int64
  np.testing.assert_array_equal(out["int8"], [-3, 4])
  np.testing.assert_array_equal(out["bool"], [True, False])
  assert out["scalar"].shape == () and float(out["scalar"]) == 3.5
  assert out["empty"].shape == (0, 3)
  np.testing.assert_array_equal(out["param"], np.ones(3, np.float32))
  assert isinstance(out["nested"], collections.OrderedDict)
  np.testing.assert_array_equal(out["nested"]["inner"]["deep"], [2.0, 2.0])
  assert out["args"] == argparse.Namespace(arch="vit_small", lr=0.1, dims=[1, 2], flag=None)
  assert out["bytes"] == b"\x00\xff" and out["number"] == 2.5 and out["tuple"] == (1, "a")


class _Hostile:

  def __init__(self, marker):
    self.marker = marker

  def __reduce__(self):
    return (os.system, (f"touch {self.marker}",))


def test_refuses_globals_outside_the_allow_list(tmp_path):
  marker = tmp_path / "pwned"
  path = tmp_path / "hostile.pth"
  torch.save({"state_dict": {"w": torch.zeros(2)}, "x": _Hostile(marker)}, path)
  with pytest.raises(pth_reader.UnsafeCheckpointError, match="system"):
    pth_reader.load_pth(str(path))
  assert not marker.exists()
  # A pickled nn.Module (whole-model torch.save) is refused too: its classes are not allowed.
  module_path = tmp_path / "module.pth"
  torch.save(torch.nn.Linear(2, 2), module_path)
  with pytest.raises(pth_reader.UnsafeCheckpointError, match="torch.nn"):
    pth_reader.load_pth(str(module_path))
  # The converter surfaces it as a ValueError (the CLI prints it and exits 2) and writes nothing.
  with pytest.raises(ValueError, match="allow-list"):
    converters.convert_checkpoint("simsiam", str(path), str(tmp_path / "out"))
  assert not (tmp_path / "out").exists()


def test_refuses_truncated_corrupt_legacy_and_missing_files(tmp_path):
  path = tmp_path / "ok.pth"
  torch.save({"w": torch.arange(1000, dtype=torch.float32)}, path)
  data = path.read_bytes()
  truncated = tmp_path / "truncated.pth"
  truncated.write_bytes(data[: len(data) // 2])
  with pytest.raises(pth_reader.CheckpointError, match="truncated"):
    pth_reader.load_pth(str(truncated))
  # Flip bytes inside the tensor data: the zip CRC catches it.
  with zipfile.ZipFile(path) as z:
    info = next(i for i in z.infolist() if i.filename.endswith("data/0"))
  corrupt = bytearray(data)
  # Data starts after the local header (30 bytes + name + the local extra field, torch's alignment pad).
  name_len, extra_len = np.frombuffer(data[info.header_offset + 26:info.header_offset + 30], "<u2")
  start = info.header_offset + 30 + int(name_len) + int(extra_len) + 8
  corrupt[start:start + 4] = b"\xde\xad\xbe\xef"
  (tmp_path / "corrupt.pth").write_bytes(bytes(corrupt))
  with pytest.raises(pth_reader.CheckpointError, match="corrupt"):
    pth_reader.load_pth(str(tmp_path / "corrupt.pth"))
  legacy = tmp_path / "legacy.pth"
  torch.save({"w": torch.zeros(2)}, legacy, _use_new_zipfile_serialization=False)
  with pytest.raises(pth_reader.CheckpointError, match="legacy"):
    pth_reader.load_pth(str(legacy))
  (tmp_path / "text.pth").write_text("not a checkpoint")
  with pytest.raises(pth_reader.CheckpointError, match="not a torch zip"):
    pth_reader.load_pth(str(tmp_path / "text.pth"))
  with pytest.raises(FileNotFoundError):
    pth_reader.load_pth(str(tmp_path / "missing.pth"))


@pytest.fixture(scope="module")
def resnet18_sd():
  torch.manual_seed(0)
  return {k: v for k, v in torchvision.models.resnet18().state_dict().items()}


def test_converters_name_missing_extra_and_misshapen_keys(resnet18_sd, tmp_path):
  def convert(sd, name, **kw):
    path = tmp_path / f"{name}.pth"
    torch.save(sd, path)
    return converters.convert_checkpoint("torchvision_resnet", str(path), str(tmp_path / name), **kw)

  missing = dict(resnet18_sd)
  del missing["layer3.1.bn2.running_var"]
  with pytest.raises(ValueError, match=r"missing key 'layer3.1.bn2.running_var'"):
    convert(missing, "missing")
  extra = dict(resnet18_sd, **{"layer2.0.surprise.weight": torch.zeros(3)})
  with pytest.raises(ValueError, match="layer2.0.surprise.weight"):
    convert(extra, "extra")
  misshapen = dict(resnet18_sd, **{"layer1.0.conv2.weight": torch.zeros(64, 64, 1, 1)})
  with pytest.raises(ValueError, match=r"layer1.0.conv2.weight.*shape"):
    convert(misshapen, "misshapen")
  with pytest.raises(ValueError, match="does not match the checkpoint"):
    convert(resnet18_sd, "arch", arch="resnet50")
  nan = dict(resnet18_sd, **{"layer2.1.bn1.running_var": torch.full((128,), float("nan"))})
  with pytest.raises(ValueError, match=r"layer2.1.bn1.running_var.*NaN"):
    convert(nan, "nan")
  integer = dict(resnet18_sd, **{"fc.bias": torch.zeros(1000), "bn1.weight": torch.ones(64).long()})
  with pytest.raises(ValueError, match="bn1.weight.*dtype"):
    convert(integer, "integer")
  # Wrong kinds: a plain state dict is neither a SimSiam nor a DINO checkpoint.
  with pytest.raises(ValueError, match="not a SimSiam checkpoint"):
    converters.extract_simsiam({k: v.numpy() for k, v in resnet18_sd.items()})
  with pytest.raises(ValueError, match="--kind simsiam"):
    converters.extract_torchvision({"state_dict": {}, "epoch": 1})
  assert sorted(os.listdir(tmp_path)) == sorted(
      f"{n}.pth" for n in ("missing", "extra", "misshapen", "arch", "nan", "integer"))


def test_conversion_is_deterministic_and_keeps_half_precision_values(resnet18_sd, tmp_path):
  """Converting twice gives identical manifests and parameters; --overwrite replaces."""
  half = {k: (v.half() if v.is_floating_point() else v) for k, v in resnet18_sd.items()}
  path = tmp_path / "resnet18_half.pth"
  torch.save(half, path)
  a = converters.convert_checkpoint("torchvision_resnet", str(path), str(tmp_path / "a"))
  b = converters.convert_checkpoint("torchvision_resnet", str(path), str(tmp_path / "b"))
  assert a == b
  manifest_bytes = [(tmp_path / d / "manifest.json").read_bytes() for d in ("a", "b")]
  assert manifest_bytes[0] == manifest_bytes[1]
  assert a["architecture"] == {"name": "resnet18", "kwargs": {"out_dim": None, "small_input": False}}
  ignored = a["source"]["ignored_keys"]
  assert {"fc.weight", "fc.bias", "layer4.1.bn2.num_batches_tracked"} <= set(ignored)
  assert all(k.startswith("fc.") or k.endswith(".num_batches_tracked") for k in ignored)
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  enc = models.load_encoder(str(tmp_path / "a"))
  kernel = np.asarray(enc.params["params"]["layer1"][0]["conv1"]["kernel"][...])
  np.testing.assert_array_equal(
      kernel, half["layer1.0.conv1.weight"].float().numpy().transpose(2, 3, 1, 0))
  with pytest.raises(ValueError, match="already exists"):
    converters.convert_checkpoint("torchvision_resnet", str(path), str(tmp_path / "a"))
  c = converters.convert_checkpoint("torchvision_resnet", str(path), str(tmp_path / "a"), overwrite=True)
  assert c == a


# ---------------------------------------------------------------------------------------------------
# Resource limits (issue 14 item 9): small hostile files must not make the reader allocate much.
# ---------------------------------------------------------------------------------------------------
class _StorageRef:
  """Stands for storage "0" in a hand-built pickle (persistent id like torch's)."""


class _TensorRef:

  def __init__(self, size, stride, offset=0):
    self.size, self.stride, self.offset = size, stride, offset

  def __reduce__(self):
    return (torch._utils._rebuild_tensor_v2,
            (_StorageRef(), self.offset, self.size, self.stride, False, collections.OrderedDict()))


def _write_pth(path, obj, *, numel, record_chunks, compress=False):
  """A torch-format zip whose pickle declares storage "0" as `numel` float32s and whose data/0 record
  holds the concatenation of `record_chunks` (written chunk by chunk: a 1 GiB record never sits in
  this process's memory)."""
  import io
  import pickle

  class Pickler(pickle.Pickler):

    def persistent_id(self, o):
      if isinstance(o, _StorageRef):
        return ("storage", torch.FloatStorage, "0", "cpu", numel)
      return None
  buf = io.BytesIO()
  Pickler(buf, protocol=2).dump(obj)
  mode = zipfile.ZIP_DEFLATED if compress else zipfile.ZIP_STORED
  with zipfile.ZipFile(path, "w", compression=mode, compresslevel=1 if compress else None) as z:
    z.writestr("archive/data.pkl", buf.getvalue())
    z.writestr("archive/byteorder", "little")
    with z.open("archive/data/0", "w", force_zip64=True) as f:
      for chunk in record_chunks:
        f.write(chunk)


def _peak_allocation(fn):
  """(exception raised by fn, peak bytes traced while it ran): numpy reports its buffers to
  tracemalloc, so a 2 GB copy shows even if an error follows it."""
  import tracemalloc
  tracemalloc.start()
  try:
    fn()
  except Exception as e:  # pylint: disable=broad-except
    return e, tracemalloc.get_traced_memory()[1]
  finally:
    peak = tracemalloc.get_traced_memory()[1]
    tracemalloc.stop()
  return None, peak


def test_stride_zero_tensor_cannot_make_the_reader_allocate_gigabytes(tmp_path):
  path = tmp_path / "expand.pth"
  torch.save({"w": torch.ones(1).expand(2 ** 29)}, path)  # 4 bytes of storage, 2 GiB as a copy
  assert os.path.getsize(path) < 2000
  err, peak = _peak_allocation(lambda: pth_reader.load_pth(str(path)))
  assert isinstance(err, pth_reader.CheckpointError), err
  assert "stride (0,)" in str(err) and "on storage expand/data/0" in str(err) and "limit" in str(err)
  assert peak < 80 * 2 ** 20
  # A legitimate small expanded tensor still loads (and is materialised).
  torch.save({"w": torch.arange(3.0).expand(4, 3)}, tmp_path / "small.pth")
  np.testing.assert_array_equal(pth_reader.load_pth(str(tmp_path / "small.pth"))["w"],
                                np.tile(np.arange(3.0, dtype=np.float32), (4, 1)))


def test_compressed_gigabyte_storage_record_is_refused_before_reading(tmp_path):
  path = tmp_path / "bomb.pth"
  zeros = bytes(1 << 20)
  _write_pth(path, {"w": _TensorRef((2 ** 28,), (1,))}, numel=2 ** 28,
             record_chunks=(zeros for _ in range(1024)), compress=True)
  assert os.path.getsize(path) < 8 * 2 ** 20
  err, peak = _peak_allocation(lambda: pth_reader.load_pth(str(path)))
  assert isinstance(err, pth_reader.CheckpointError), err
  assert "archive/data/0" in str(err) and "limit" in str(err)
  assert peak < 80 * 2 ** 20
  # Declaring a small storage does not let the huge record through either.
  _write_pth(path, {"w": _TensorRef((1,), (1,))}, numel=1,
             record_chunks=(zeros for _ in range(1024)), compress=True)
  err, peak = _peak_allocation(lambda: pth_reader.load_pth(str(path)))
  assert isinstance(err, pth_reader.CheckpointError) and "archive/data/0" in str(err), err
  assert peak < 80 * 2 ** 20


def test_declared_storage_size_and_geometry_are_checked_against_the_record(tmp_path):
  path = tmp_path / "short.pth"
  _write_pth(path, {"w": _TensorRef((1000,), (1,))}, numel=1000, record_chunks=[bytes(40)])
  with pytest.raises(pth_reader.CheckpointError, match=r"archive/data/0 holds 40 bytes, expected 4000"):
    pth_reader.load_pth(str(path))
  _write_pth(path, {"w": _TensorRef((5, 4), (4, 1), offset=2)}, numel=20, record_chunks=[bytes(80)])
  with pytest.raises(pth_reader.CheckpointError, match="reaches element 21"):
    pth_reader.load_pth(str(path))
  _write_pth(path, {"w": _TensorRef((5, 4), (4, 1))}, numel=20,
             record_chunks=[np.arange(20, dtype="<f4").tobytes()])
  np.testing.assert_array_equal(pth_reader.load_pth(str(path))["w"], np.arange(20.0).reshape(5, 4))
  # The cap can be set explicitly; a real checkpoint over it names the record.
  with pytest.raises(pth_reader.CheckpointError, match="archive/data/0.*limit"):
    pth_reader.load_pth(str(path), max_bytes=200)
