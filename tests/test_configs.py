"""Configs: one style. Every job with a defense takes the full defense block from the command line
(as b4b_jax.main parses it), every `:tiny` variant passes its job's validation, and a refused value
leaves the workdir unclaimed."""
import importlib
import os

import pytest
from absl import flags
from ml_collections import config_flags

from b4b_jax.main import run_job

DEFENDED = ("steal_simsiam", "steal_dino", "legit", "remap", "coverage")
# Every experiment config in configs/ (not the shared code), so a new or removed config is covered.
_CONFIGS_DIR = os.path.join(os.path.dirname(os.path.dirname(os.path.abspath(__file__))), "configs")
TINY = tuple(sorted(f[:-3] for f in os.listdir(_CONFIGS_DIR)
                    if f.endswith(".py") and f not in ("__init__.py", "common.py")))


def _parse(argv):
  """The config as `python -m b4b_jax.main` builds it from these flags (same flag definition)."""
  values = flags.FlagValues()
  argv = ["main"] + argv
  # sys_argv: the override flags (--config.a.b=...) are registered from the command line at definition.
  config_flags.DEFINE_config_file("config", None, "config", flag_values=values, lock_config=True,
                                  sys_argv=argv)
  values(argv)
  return values.config


@pytest.mark.parametrize("name", DEFENDED)
def test_defense_fields_override_from_the_command_line(name):
  config = _parse([f"--config=configs/{name}.py:tiny", "--config.defense.lam=1e-5",
                   "--config.defense.beta=50", "--config.defense.transform=binary"])
  assert (config.defense.lam, config.defense.beta, config.defense.transform) == (1e-5, 50.0, "binary")
  importlib.import_module(f"b4b_jax.jobs.{config.job}").validate_config(config)


@pytest.mark.parametrize("name", TINY)
def test_tiny_variants_pass_their_jobs_validation(name):
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  validate = getattr(importlib.import_module(f"b4b_jax.jobs.{config.job}"), "validate_config", None)
  if validate is not None:
    validate(config)
  assert importlib.import_module(f"configs.{name}").__doc__.count("python -m b4b_jax.main") >= 1


@pytest.mark.parametrize("name,field,value,match", [
    ("legit", "defense.beta", 0.0, "beta"),
    ("remap", "defense.num_hyperplanes", 30, "num_hyperplanes"),
    ("coverage", "defense.lam", 5.0, "alpha must be > lam"),
    ("legit", "query_batch_size", 0, "query_batch_size"),
    ("probe", "probe.epochs", -1, "probe.epochs"),
    ("embeddings", "source.test_limit", 0, "test_limit"),
    ("legit", "rep_scale", -1.0, "rep_scale"),
    ("fuzzing", "rep_scale", 0.0, "rep_scale"),
    ("fuzzing", "sigmas", (0.0, -1.0), "sigmas"),
    ("probe", "probe.augment", "maybe", "probe.augment"),
])
def test_refused_evaluation_config_leaves_the_workdir_unclaimed(tmp_path, name, field, value, match):
  config = importlib.import_module(f"configs.{name}").get_config("tiny")
  config.update_from_flattened_dict({field: value})
  with pytest.raises(ValueError, match=match):
    run_job(config, str(tmp_path))
  assert not list(tmp_path.iterdir())


def test_probe_config_protocols():
  probe = importlib.import_module("configs.probe")
  assert probe.get_config().protocol == "paper" and probe.get_config().probe.batch_size == 256
  embedding = probe.get_config("protocol=embedding")
  assert embedding.protocol == "embedding" and embedding.probe.method == "adam"
  with pytest.raises(ValueError, match="protocol"):
    probe.get_config("protocol=best")
  fuzz = importlib.import_module("configs.fuzzing")
  assert fuzz.get_config().rep_scale == 1.0 and fuzz.get_config("victim=simsiam").rep_scale == 1000.0
  assert fuzz.get_config("normalize=1").normalize is True
  legit = importlib.import_module("configs.legit")
  assert legit.get_config().rep_scale == 1000.0 and legit.get_config("dino").rep_scale == 1.0
  assert legit.get_config().probe.normalization == "none" and legit.get_config().probe.paper_hparams
