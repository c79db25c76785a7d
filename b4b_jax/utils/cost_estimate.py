"""Expected cost up front: device time and host memory of a run, logged before it starts; a run the host
cannot hold is refused before anything is written.

`check(config)` (called by `run_job` for the jobs in `JOBS`, after the config check and before the
workdir is claimed) estimates, for the hardware this process sees:

* device time = FLOPs / (peak FLOP/s per device x devices x UTILISATION). FLOPs are XLA's count of
  the encoder forward for one image (`Lowered.cost_analysis()`, abstract weights: nothing is
  allocated or compiled) times the images each phase pushes through it; a training step counts as
  3 forwards (forward + backward: measured 23.7 / 7.94 GFLOP for ResNet-50 at 224 px). Peaks: the
  data-sheet table `PEAK_TFLOPS` (the benchmarks print their achieved share of it too); on CPUs and
  unknown devices an assumed `CPU_FLOPS_PER_CORE` x cores. UTILISATION (0.35) is an assumption: what a
  ResNet-50 training step reaches on an A100-class GPU in float32/TF32; small models reach less, so
  short tiny runs take longer than estimated.
* host memory per process = runtime (Python + JAX + TensorFlow, `RUNTIME_BYTES`) + input pipeline
  buffers (the uint8 batches in flight and their float32 copies) + the defense state (per-user state
  x accounts, the transform cache) + models and optimizer (host copies of the weights; the train state
  once more while a checkpoint is written) + resident arrays (responses, evaluation images,
  embeddings) + on CPU backends the device working set (activations of one step), which lives in host
  memory there.

The run is refused (`InsufficientMemoryError`, naming every figure) where the estimate exceeds the
memory available to this process (`MemAvailable`, or a lower cgroup limit). The estimate is coarse:
tests/test_multihost.py holds it within `ESTIMATE_FACTOR` of a measured tiny run's peak RSS.
"""
import dataclasses
import functools
import json
import os
from typing import Dict, Optional, Tuple

import numpy as np
from absl import logging

JOBS = ("steal", "probe", "legit", "embeddings")

# (substring of jax's device_kind, bf16 TFLOP/s, f32-as-XLA-runs-it TFLOP/s); first match wins.
# Dense per-chip figures from the vendors' data sheets. "f32" is what XLA runs a float32 matmul/conv at
# by default: TF32 tensor cores on A100/H100/H200, one bf16 pass on TPUs.
PEAK_TFLOPS = (
    ("H200", 989.0, 494.0),
    ("H100", 989.0, 494.0),   # SXM; the PCIe card is ~25% lower
    ("A100", 312.0, 156.0),
    ("L4", 121.0, 60.0),
    ("TPU v6", 918.0, 918.0),
    ("TPU v5 lite", 197.0, 197.0),
    ("TPU v5e", 197.0, 197.0),
    ("TPU v5", 459.0, 459.0),  # v5p
    ("TPU v4", 275.0, 275.0),
    ("TPU v3", 123.0, 123.0),
    ("TPU v2", 45.0, 45.0),
)
UTILISATION = 0.35                 # assumed share of peak (see the module docstring)
CPU_FLOPS_PER_CORE = 2e10          # assumed sustained float32 conv FLOP/s of one CPU core under XLA
TRAIN_FLOPS_FACTOR = 3.0           # forward + backward = 3 forwards
RUNTIME_BYTES = 1.2 * 2**30        # Python + JAX + TensorFlow + XLA's compiled programs, measured ~1 GiB
PIPELINE_BATCHES = 8               # uint8 batches in flight (prefetch, map buffers, the step's own)
# Activation memory per image = XLA's bytes accessed per image / divisor: training keeps every layer's
# output (ResNet-50 at 224 px: 845 MB accessed -> ~140 MB, the usual float32 figure), inference a few.
TRAIN_ACTIVATION_DIVISOR = 6.0
INFERENCE_ACTIVATION_DIVISOR = 50.0
ESTIMATE_FACTOR = 2.5              # the test's bound on estimate / measured (either way)
# Train / test sizes of the paper's downstream sets (TFDS), for configs without limits.
DATASET_SIZES = {"cifar10": (50_000, 10_000), "stl10": (5_000, 8_000),
                 "svhn_cropped": (73_257, 26_032), "fashion_mnist": (60_000, 10_000),
                 "digits": (1_437, 360)}
_UNKNOWN_DATASET = (100_000, 50_000)  # an ImageNet-style folder or unknown set: a generous guess


class InsufficientMemoryError(MemoryError):
  """The run needs more host memory than this host has available (raised before anything is written)."""


def peak_flops(device=None, dtype: str = "f32") -> Optional[float]:
  """Data-sheet peak FLOP/s of `device` (default: device 0) for "f32" or "bf16"; None on CPU or an
  unknown device."""
  if device is None:
    import jax  # pylint: disable=g-import-not-at-top
    device = jax.devices()[0]
  if device.platform == "cpu":
    return None
  for name, bf16, f32 in PEAK_TFLOPS:
    if name.lower() in device.device_kind.lower():
      return 1e12 * (bf16 if dtype == "bf16" else f32)
  return None


def _gib(n: float) -> str:
  return f"{n / 2**30:.2f} GiB"


def _duration(seconds: float) -> str:
  if seconds < 120:
    return f"{seconds:.0f} s"
  if seconds < 7200:
    return f"{seconds / 60:.0f} min"
  return f"{seconds / 3600:.1f} h"


@dataclasses.dataclass
class Estimate:
  job: str
  flops: Dict[str, float]          # per phase
  memory: Dict[str, float]         # host bytes per process, per part
  device: str
  num_devices: int
  flops_per_second: float          # assumed achieved, all devices together
  assumption: str
  available_bytes: Optional[float]
  available_source: str

  @property
  def total_flops(self) -> float:
    return float(sum(self.flops.values()))

  @property
  def device_seconds(self) -> float:
    return self.total_flops / self.flops_per_second

  @property
  def host_bytes(self) -> float:
    return float(sum(self.memory.values()))

  def summary(self) -> str:
    phases = ", ".join(f"{k} {v / 1e12:.3g} TFLOP" for k, v in self.flops.items())
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in self.memory.items())
    avail = ("unknown" if self.available_bytes is None else
             f"{_gib(self.available_bytes)} available ({self.available_source})")
    return (f"expected cost of job {self.job!r} on {self.num_devices} x {self.device}: device time "
            f"~{_duration(self.device_seconds)} ({self.total_flops / 1e12:.3g} TFLOP: {phases}; "
            f"{self.assumption}); host memory per process ~{_gib(self.host_bytes)} ({parts}); {avail}")

  def to_dict(self) -> dict:
    return {"job": self.job, "device": self.device, "num_devices": self.num_devices,
            "flops": self.flops, "total_flops": self.total_flops,
            "device_seconds": self.device_seconds, "assumption": self.assumption,
            "host_memory_bytes": self.memory, "host_bytes": self.host_bytes,
            "available_bytes": self.available_bytes, "available_source": self.available_source}


# ---------------------------------------------------------------------------------- the host's memory
def available_memory() -> Tuple[Optional[float], str]:
  """(bytes this process may still allocate, where the figure comes from); (None, why) if unknown."""
  best, source = None, "unknown"
  try:
    with open("/proc/meminfo") as f:
      for line in f:
        if line.startswith("MemAvailable:"):
          best, source = float(line.split()[1]) * 1024, "MemAvailable"
          break
  except OSError:
    pass
  try:  # cgroup v2 limit of this container, if lower
    with open("/sys/fs/cgroup/memory.max") as f:
      limit = f.read().strip()
    with open("/sys/fs/cgroup/memory.current") as f:
      used = float(f.read().strip())
    if limit != "max" and (best is None or float(limit) - used < best):
      best, source = max(0.0, float(limit) - used), "cgroup memory.max - memory.current"
  except (OSError, ValueError):
    pass
  return best, source


# ---------------------------------------------------------------------------------- FLOPs of encoders
@functools.lru_cache(maxsize=64)
def _forward_cost(architecture_json: str, representation_json: str, input_size: int) -> Tuple[float,
                                                                                             float]:
  """(FLOPs, bytes accessed) per image of the encoder's forward, from XLA's cost analysis of the
  lowered forward with abstract weights (nothing allocated, nothing compiled). Bytes: the difference
  between batches of 2 and 1, so the weights' reads do not count."""
  import jax  # pylint: disable=g-import-not-at-top
  import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
  encoder = _abstract_encoder(architecture_json, representation_json, input_size)
  costs = []
  for n in (1, 2):
    analysis = jax.jit(encoder.apply_fn).lower(encoder.params, jax.ShapeDtypeStruct(
        (n, input_size, input_size, 3), jnp.float32)).cost_analysis() or {}
    if isinstance(analysis, (list, tuple)):
      analysis = analysis[0] if analysis else {}
    costs.append((float(analysis.get("flops", 0.0)), float(analysis.get("bytes accessed", 0.0))))
  return costs[1][0] - costs[0][0], costs[1][1] - costs[0][1]


@functools.lru_cache(maxsize=64)
def _abstract_encoder(architecture_json: str, representation_json: str, input_size: int):
  from flax import nnx  # pylint: disable=g-import-not-at-top
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  architecture = json.loads(architecture_json)
  model = nnx.eval_shape(lambda: models.build_model(architecture, rngs=nnx.Rngs(0)))
  graphdef, params, batch_stats = models.split_model(model)
  manifest = {"rep_dim": 1, "preprocessing": {"input_size": input_size},
              "representation": json.loads(representation_json), "architecture": architecture}
  return models.Encoder(graphdef, params, batch_stats, manifest)


@dataclasses.dataclass(frozen=True)
class ModelSpec:
  architecture: dict
  input_size: int
  representation: dict = dataclasses.field(default_factory=lambda: {"method": "forward"})

  def _keys(self):
    return (json.dumps(self.architecture, sort_keys=True),
            json.dumps(self.representation, sort_keys=True), int(self.input_size))

  def forward_flops(self) -> float:
    return _forward_cost(*self._keys())[0]

  def activation_bytes(self, *, train: bool) -> float:
    """Per image: XLA's bytes accessed over TRAIN_ACTIVATION_DIVISOR (training keeps every layer's
    output for the backward pass) or INFERENCE_ACTIVATION_DIVISOR (only a few live at a time)."""
    per_image = _forward_cost(*self._keys())[1]
    return per_image / (TRAIN_ACTIVATION_DIVISOR if train else INFERENCE_ACTIVATION_DIVISOR)

  def param_bytes(self) -> float:
    import jax  # pylint: disable=g-import-not-at-top
    return float(sum(x.size * x.dtype.itemsize for x in jax.tree.leaves(
        _abstract_encoder(*self._keys()).params)))

  def rep_dim(self) -> int:
    import jax  # pylint: disable=g-import-not-at-top
    import jax.numpy as jnp  # pylint: disable=g-import-not-at-top
    encoder = _abstract_encoder(*self._keys())
    out = jax.eval_shape(encoder.apply_fn, encoder.params, jax.ShapeDtypeStruct(
        (1, self.input_size, self.input_size, 3), jnp.float32))
    return int(out.shape[-1])


def _random_arch(name: str, image_size: int, *, small_input: bool = True,
                 patch_size: int = 16) -> ModelSpec:
  # As models.save_random_encoder builds them.
  if name.startswith("vit"):
    return ModelSpec({"name": name, "kwargs": {"patch_size": patch_size, "img_size": image_size}},
                     image_size, {"method": "dino_representation", "n_last_blocks": 4})
  return ModelSpec({"name": name, "kwargs": {"out_dim": None, "small_input": small_input}}, image_size)


def _encoder_dir_spec(directory: str) -> ModelSpec:
  from b4b_jax import models  # pylint: disable=g-import-not-at-top
  manifest = models.read_manifest(directory)
  return ModelSpec(manifest["architecture"], int(manifest["preprocessing"]["input_size"]),
                   manifest.get("representation") or {"method": "forward"})


def source_spec(spec: Optional[str]) -> Optional[ModelSpec]:
  """The encoder a config `source.encoder` names (None where it cannot be read yet)."""
  if not spec:
    return None
  if spec.startswith("random:"):
    arch, _, size = spec[len("random:"):].partition("@")
    size = int(size) if size else 32
    return _random_arch(arch, size, small_input=size <= 64)
  path = os.path.abspath(os.path.expanduser(spec))
  for directory in (path, os.path.join(path, "stolen_encoder")):
    if os.path.isfile(os.path.join(directory, "manifest.json")):
      return _encoder_dir_spec(directory)
  return None


# ---------------------------------------------------------------------------------- the jobs
def _batch_bytes(batch: int, size: int) -> float:
  # uint8 batches in flight + one float32 normalised copy of a batch
  return batch * size * size * 3 * (PIPELINE_BATCHES + 4)


def _dataset_sizes(name: str, train_limit, test_limit) -> Tuple[int, int]:
  train, test = DATASET_SIZES.get(name, _UNKNOWN_DATASET)
  return (min(train, int(train_limit)) if train_limit else train,
          min(test, int(test_limit)) if test_limit else test)


def _steal(config, num_processes: int, on_cpu: bool):
  vc, ac, tc = config.victim, config.attack, config.train
  if vc.get("build_tiny"):
    victim = _random_arch(vc.build_tiny, int(config.image_size),
                          patch_size=int(vc.get("tiny_patch_size") or 16))
  else:
    victim = _encoder_dir_spec(vc.encoder_dir)
  size = victim.input_size
  stolen = ModelSpec({"name": config.stolen.arch,
                      "kwargs": {"out_dim": None, "small_input": bool(config.stolen.get("small_input",
                                                                                        False))}},
                     size)
  queries, epochs = int(ac.num_queries), int(tc.epochs)
  protocol = ac.get("protocol") or ("requery_each_epoch" if ac.get("requery_each_epoch") else
                                    "query_once")
  victim_passes = 1 if protocol == "query_once" else 1 + epochs  # paper / requery: a view per epoch
  eval_n = int(config.eval.get("limit") or 2000)
  fv, fs = victim.forward_flops(), stolen.forward_flops()
  flops = {"queries": victim_passes * queries * fv,
           "train": TRAIN_FLOPS_FACTOR * fs * queries * epochs,
           "evaluation": eval_n * (fv + 2 * fs)}
  rep_dim = victim.rep_dim()
  defense = _defense_bytes(config.defense, rep_dim, max(8, int(ac.num_accounts)))
  train_batch = int(tc.batch_size) // num_processes
  state_bytes = 3 * stolen.param_bytes()  # weights + momentum + gradients
  memory = {
      "runtime": RUNTIME_BYTES,
      "pipeline": _batch_bytes(train_batch + int(ac.query_batch_size), size),
      "defense_state": defense,
      "models_and_optimizer": 2 * victim.param_bytes() + 2 * state_bytes,
      "resident_arrays": (queries * rep_dim * 4 * (2 if protocol == "query_once" else 1) +
                          eval_n * (size * size * 3 + 3 * rep_dim * 4)),
  }
  if on_cpu:  # activations of one training step (and of one query batch) live in host memory
    memory["device_working_set"] = (train_batch * stolen.activation_bytes(train=True) +
                                     int(ac.query_batch_size) * victim.activation_bytes(train=False))
  return flops, memory


def _defense_bytes(defense_config, rep_dim: int, accounts: int) -> float:
  """The defense state of `accounts` users, the hyperplanes, the per-user transforms (dense affine:
  D x D floats each, capped by the transform cache) and the hardened image noise's cached W's."""
  from b4b_jax.defense import config as config_lib  # pylint: disable=g-import-not-at-top
  from b4b_jax.defense import state as state_lib  # pylint: disable=g-import-not-at-top
  settings = config_lib.settings(defense_config, rep_dim)
  state = sum(float(np.prod(shape)) * np.dtype(dtype).itemsize
              for shape, dtype in state_lib.state_shapes(settings, accounts).values())
  hyperplanes = 4.0 * settings.num_projections * rep_dim * settings.num_hyperplanes
  transforms = 0.0
  if defense_config.get("enabled") and defense_config.get("transform") not in (None, "identity"):
    transforms = min(accounts * (rep_dim + 64) ** 2 * 4.0,
                     float(defense_config.get("transform_cache_mib") or 0) * 2**20 or float("inf"))
  noise_weights = 0.0  # the hardened image-keyed noise's W per account and level (noise_cache.py)
  if settings.enabled and settings.noise_keying == "per_input" and settings.image_weight > 0:
    noise_weights = min(accounts * 4.0 * settings.image_features * rep_dim,
                        config_lib.noise_cache_mib(defense_config) * 2**20)
  return state + hyperplanes + transforms + noise_weights


def _embedding_job(config, num_processes: int, on_cpu: bool, *, defended: bool):
  source = config.source
  spec = source_spec(source.get("encoder"))
  if spec is None:  # precomputed embeddings only
    flops_per_image, size, rep_dim, params = 0.0, 224, 2048, 0.0
  else:
    flops_per_image, size = spec.forward_flops(), spec.input_size
    rep_dim, params = spec.rep_dim(), spec.param_bytes()
  flops, resident = {}, 0.0
  for name in config.datasets:
    train, test = _dataset_sizes(name, source.get("train_limit"), source.get("test_limit"))
    flops[f"embed {name}"] = (train + test) * flops_per_image
    probe = config.get("probe")
    if probe is not None and config.get("protocol") == "paper":  # image-level probe: views per epoch
      flops[f"probe {name}"] = train * int(probe.get("epochs") or 1) * flops_per_image
    # embeddings, their standardised copies, and (legit) the API's responses
    resident = max(resident, (train + test) * rep_dim * 4 * (3 if defended else 2))
  batch = int(source.get("batch_size") or 256)
  memory = {"runtime": RUNTIME_BYTES, "pipeline": _batch_bytes(batch // num_processes, size),
            "models_and_optimizer": 2 * params, "resident_arrays": resident}
  if defended:
    memory["defense_state"] = _defense_bytes(config.defense, rep_dim, 8)
  if on_cpu and spec is not None:
    memory["device_working_set"] = batch * spec.activation_bytes(train=False)
  return flops, memory


def estimate(config, *, devices=None) -> Estimate:
  """The expected cost of running `config` (a job in JOBS) on `devices` (default: all of JAX's)."""
  import jax  # pylint: disable=g-import-not-at-top
  job = config.get("job")
  devices = list(jax.devices() if devices is None else devices)
  on_cpu = devices[0].platform == "cpu"
  num_processes = max(1, len({d.process_index for d in devices}))
  if job == "steal":
    flops, memory = _steal(config, num_processes, on_cpu)
  elif job in ("probe", "embeddings"):
    flops, memory = _embedding_job(config, num_processes, on_cpu, defended=False)
  elif job == "legit":
    flops, memory = _embedding_job(config, num_processes, on_cpu, defended=True)
  else:
    raise ValueError(f"no cost model for job {job!r} (known: {JOBS})")
  peak = peak_flops(devices[0])
  if peak is None:
    cores = os.cpu_count() or 1
    rate = CPU_FLOPS_PER_CORE * cores * UTILISATION if on_cpu else 1e13 * UTILISATION * len(devices)
    assumption = (f"{devices[0].platform} peak unknown: assumed {CPU_FLOPS_PER_CORE / 1e9:.0f} GFLOP/s "
                  f"per core x {cores} cores x {UTILISATION:.0%} utilisation" if on_cpu else
                  f"device kind not in PEAK_TFLOPS: assumed 10 TFLOP/s x {UTILISATION:.0%}")
  else:
    rate = peak * len(devices) * UTILISATION
    assumption = f"{peak / 1e12:.0f} TFLOP/s f32 peak per device x {UTILISATION:.0%} utilisation"
  available, source = available_memory()
  return Estimate(job=job, flops=flops, memory=memory, device=devices[0].device_kind,
                  num_devices=len(devices), flops_per_second=rate, assumption=assumption,
                  available_bytes=available, available_source=source)


def check(config) -> Optional[Estimate]:
  """Logs the expected cost of a run of a job in JOBS and refuses (InsufficientMemoryError) one whose
  estimated host memory exceeds what is available; other jobs: None."""
  if config.get("job") not in JOBS:
    return None
  try:
    est = estimate(config)
  except (OSError, KeyError) as e:  # e.g. the victim directory is missing: the job reports that itself
    logging.warning("expected cost of job %r not estimated: %s: %s", config.get("job"),
                    type(e).__name__, e)
    return None
  logging.info("%s", est.summary())
  if est.available_bytes is not None and est.host_bytes > est.available_bytes:
    parts = ", ".join(f"{k} {_gib(v)}" for k, v in est.memory.items())
    raise InsufficientMemoryError(
        f"job {est.job!r} needs an estimated {_gib(est.host_bytes)} of host memory per process "
        f"({parts}) but this host has {_gib(est.available_bytes)} available "
        f"({est.available_source}); nothing was written. Use a host with more memory, more "
        f"processes/hosts (the batches are split across them), or smaller sizes (batch sizes, "
        f"limits, number of queries).")
  return est

