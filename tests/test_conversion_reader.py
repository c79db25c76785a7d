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
