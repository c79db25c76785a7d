"""Expected cost up front (b4b_jax/utils/cost_estimate.py): FLOPs against published figures, device time
against the peak table, the refusal when the host's memory is too small (before anything is written).
The estimate against a measured run's peak RSS is in tests/test_multihost.py (it reuses those runs)."""
import os

import pytest

from b4b_jax.jobs.runner import run_job
from b4b_jax.utils import cost_estimate
from configs import legit, probe, steal_simsiam


def test_resnet_forward_flops_match_published_figures():
  # torchvision's ResNet-18 at 224 px: 1.81 GMACs = 3.63 GFLOPs (one multiply-add = 2 FLOPs). XLA
  # counts ~7% fewer: the published figure multiplies whole kernels by every output, XLA skips the
  # padded border taps (large at the 7x7 and 14x14 stages); 10% covers it, a factor 2 error does not.
  spec = cost_estimate.ModelSpec({"name": "resnet18", "kwargs": {"out_dim": None,
                                                                 "small_input": False}}, 224)
  assert spec.forward_flops() == pytest.approx(3.63e9, rel=0.10)
  assert spec.rep_dim() == 512
  # torchvision's 11,689,512 weights minus the fc (512 x 1000 + 1000), plus BatchNorm's 9,600 running
  # means and variances, float32.
  assert spec.param_bytes() == pytest.approx(4 * (11_689_512 - 513_000 + 9_600), rel=1e-3)


class _Device:  # pylint: disable=too-few-public-methods
  platform, device_kind, process_index = "gpu", "NVIDIA A100-SXM4-80GB", 0


def test_device_time_uses_the_peak_table_and_the_stated_utilisation():
  config = steal_simsiam.get_config("tiny")
  est = cost_estimate.estimate(config, devices=[_Device(), _Device()])
  assert est.flops["train"] == pytest.approx(
      cost_estimate.TRAIN_FLOPS_FACTOR * config.attack.num_queries * config.train.epochs *
      cost_estimate.ModelSpec({"name": config.stolen.arch, "kwargs": {"out_dim": None,
                                                                      "small_input": True}},
                              config.image_size).forward_flops())
  assert est.device_seconds == pytest.approx(est.total_flops / (2 * 156e12 * cost_estimate.UTILISATION))
  assert "156 TFLOP/s" in est.summary() and "35% utilisation" in est.summary()
  assert "host memory per process" in est.summary()
  # The benchmarks print their FLOP/s share against the same table.
  from benchmarks import common  # pylint: disable=g-import-not-at-top
  assert common.PEAK_TFLOPS is cost_estimate.PEAK_TFLOPS


def test_memory_grows_with_the_run():
  small = cost_estimate.estimate(steal_simsiam.get_config("tiny"))
  big_config = steal_simsiam.get_config("tiny,queries=200000")
  big_config.train.batch_size = 4096
  big = cost_estimate.estimate(big_config)
  assert big.memory["resident_arrays"] > 100 * small.memory["resident_arrays"]
  assert big.memory["pipeline"] > 30 * small.memory["pipeline"]  # (4096 + 64) / (32 + 64) rows
  assert big.host_bytes > small.host_bytes


@pytest.mark.parametrize("config", [steal_simsiam.get_config("tiny"), probe.get_config("tiny"),
                                    legit.get_config("tiny")], ids=["steal", "probe", "legit"])
def test_too_little_memory_is_refused_before_anything_is_written(config, tmp_path, monkeypatch):
  monkeypatch.setattr(cost_estimate, "available_memory", lambda: (0.5 * 2**30, "patched"))
  workdir = str(tmp_path / "run")
  with pytest.raises(cost_estimate.InsufficientMemoryError) as e:
    run_job(config, workdir)
  message = str(e.value)
  assert f"job '{config.job}' needs an estimated" in message
  assert "runtime 1.20 GiB" in message and "0.50 GiB available (patched)" in message
  assert not os.path.exists(workdir)


def test_enough_memory_passes_and_logs(monkeypatch):
  monkeypatch.setattr(cost_estimate, "available_memory", lambda: (64 * 2**30, "patched"))
  est = cost_estimate.check(probe.get_config("tiny"))
  assert est is not None and est.host_bytes < est.available_bytes
  import ml_collections  # pylint: disable=g-import-not-at-top
  assert cost_estimate.check(ml_collections.ConfigDict({"job": "coverage"})) is None  # no cost model


def test_available_memory_reads_the_host():
  available, source = cost_estimate.available_memory()
  assert available is None or available > 0
  assert source
