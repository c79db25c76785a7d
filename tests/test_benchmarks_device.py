"""benchmarks/device.sh --smoke: every benchmark runs at tiny sizes and the summary table is printed;
steal_step.py on a data mesh of several devices."""
import os
import subprocess
import sys

import pytest

from benchmarks import common

_ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def test_device_script_smoke_mode_runs_every_benchmark():
  proc = subprocess.run(["bash", os.path.join(_ROOT, "benchmarks", "device.sh"), "--smoke"],
                        cwd=_ROOT, capture_output=True, text=True, timeout=900,
                        env={**os.environ, "PYTHON": sys.executable})
  out = proc.stdout
  assert proc.returncode == 0, out[-3000:] + proc.stderr[-3000:]
  table = out[out.index("== smoke benchmarks"):]
  for name in ("encoders: resnet50", "steal_step: resnet18", "bfloat16", "defense: full",
               "defense: overhead on resnet18_w0.25", "linear_probe"):
    assert name in table, table
  assert "FLOP/s" in table and "n/a" in table  # on CPU the peak share is n/a


def test_peak_table_and_flops_share(monkeypatch):
  class Dev:  # pylint: disable=too-few-public-methods
    platform, device_kind = "gpu", "NVIDIA H100 80GB HBM3"
  monkeypatch.setattr("jax.devices", lambda: [Dev()])
  assert common.peak_flops("bf16") == 989e12
  assert common.flops_share(494e12, 2.0) == "247.000 TFLOP/s, 50.0% of f32 peak"
  Dev.platform, Dev.device_kind = "tpu", "TPU v4"
  assert common.peak_flops() == 275e12
  Dev.platform, Dev.device_kind = "cpu", "cpu"
  assert common.peak_flops() is None and "peak n/a" in common.flops_share(1e9, 1.0)
  assert common.flops_share(None, 1.0) == "FLOP/s n/a"


def test_steal_step_benchmark_splits_its_batch_over_the_devices_asked_for(capsys):
  from benchmarks import steal_step  # pylint: disable=g-import-not-at-top
  rows = steal_step.main(["--tiny", "--devices", "2"])
  out = capsys.readouterr().out
  assert "(ours on 2 device(s), float32)" in out, out
  (row,) = rows
  assert row.benchmark.startswith("steal_step: resnet18 b8 16px") and row.ratio > 0
  with pytest.raises(ValueError, match="does not divide by the 3 devices"):
    steal_step.main(["--tiny", "--devices", "3"])  # the tiny batch is 8
  with pytest.raises(ValueError, match="num_devices=9 but 8 device"):
    steal_step.main(["--tiny", "--devices", "9"])


@pytest.mark.parametrize("arch, small", [("resnet18_w0.25", True), ("resnet50_w0.5", False)])
def test_steal_step_reference_of_a_width_variant_has_our_parameter_shapes(arch, small):
  """The "demo" setting's PyTorch step must train the network ours trains: every parameter's shape,
  in order of size, and the representation's width."""
  import jax  # pylint: disable=g-import-not-at-top
  import torch  # pylint: disable=g-import-not-at-top
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  from benchmarks import steal_step  # pylint: disable=g-import-not-at-top
  net = steal_step.torch_resnet(arch, small)
  ours = nnx.eval_shape(lambda: models.create_resnet(arch, rngs=nnx.Rngs(0), small_input=small))
  _, params, _ = models.split_model(ours)
  theirs = sorted(int(p.numel()) for p in net.parameters())
  assert theirs == sorted(int(x.size) for x in jax.tree.leaves(params))
  with torch.no_grad():
    assert tuple(net.eval()(torch.zeros(2, 3, 32, 32)).shape) == (2, ours.rep_dim)
