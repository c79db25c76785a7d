"""Job "serve": the defended encoder as an HTTP service (configs/serve.py; see b4b_jax/serve).

  run(config, workdir): resolves the encoder (config.encoder_dir, or the demo's victim trained/reused in
  config.demo_workdir and the demo's cost calibration), then serves until SIGINT/SIGTERM.
"""
import ipaddress
import json
import os

from absl import logging

from b4b_jax import compilation_cache
from b4b_jax import defense
from b4b_jax.defense import config as defense_config_lib
from b4b_jax.serve import app as app_lib
from b4b_jax.serve import errors


def validate_config(config) -> None:
  try:
    ipaddress.ip_address(str(config.host))
  except ValueError as e:
    raise ValueError(f"config.host must be an IP address (default 127.0.0.1), got {config.host!r}") from e
  if not 0 <= int(config.port) < 65536:
    raise ValueError(f"config.port must be in 0..65535, got {config.port}")
  if int(config.batching.max_rows) < 1 or int(config.limits.max_rows_per_request) < 1:
    raise ValueError("config.batching.max_rows and config.limits.max_rows_per_request must be >= 1")
  if int(config.limits.max_rows_per_request) > int(config.batching.max_rows):
    raise ValueError(f"config.limits.max_rows_per_request ({config.limits.max_rows_per_request}) must "
                     f"be <= config.batching.max_rows ({config.batching.max_rows}): only the batch "
                     "sizes up to max_rows are compiled before serving")


def demo_victim(config, workdir: str):
  """(encoder_dir, calibration dict) of the demo's victim: its stages run (or are reused) in
  config.demo_workdir (default <workdir>/demo)."""
  from b4b_jax.demo import pipeline  # pylint: disable=g-import-not-at-top
  return pipeline.trained_victim(config.demo, config.demo_workdir, workdir)


def resolved_config(config, workdir: str):
  """(config with the effective defense block, encoder_dir)."""
  config = config.copy_and_resolve_references()
  config.unlock()
  encoder_dir = str(config.encoder_dir)
  calibrate = config.calibrate_defense
  calib = None
  if not encoder_dir:
    encoder_dir, calib = demo_victim(config, workdir)
  if calibrate is None:
    calibrate = calib is not None and not config.defense_json
  if config.defense_json:
    with open(config.defense_json) as f:
      fields = json.load(f)
    config.defense = defense.defense_config("simsiam", **fields)
  if calibrate:
    if calib is None:
      raise ValueError("calibrate_defense=True needs the demo victim (leave encoder_dir empty)")
    from b4b_jax.demo import pipeline  # pylint: disable=g-import-not-at-top
    calibrated = pipeline.defended_config(config.demo, calib)  # the demo's calibrated B4B cost ...
    with calibrated.unlocked():  # ... with this config's hardening (noise keying, image share)
      calibrated.update({k: config.defense[k] for k in defense_config_lib.HARDENING_DEFAULTS
                         if k in config.defense})
    config.defense = calibrated
  return config, os.path.abspath(encoder_dir)


def run(config, workdir: str):
  from b4b_jax.serve import service as service_lib  # pylint: disable=g-import-not-at-top
  imports_s = service_lib.process_age_seconds()  # interpreter start + imports, until here
  cache = str(config.persistence.compilation_cache_dir) or os.path.join(workdir, "jax_cache")
  if cache != "none":  # one subdirectory per CPU kind: a workdir copied elsewhere compiles afresh
    logging.info("compilation cache: %s", compilation_cache.use(
        compilation_cache.for_this_host(cache), "persistence.compilation_cache_dir=none"))
  config, encoder_dir = resolved_config(config, workdir)
  try:
    app_lib.run_server(config, workdir, encoder_dir, startup={"process_imports_s": imports_s})
  except errors.StartupError as e:
    logging.error("the service did not start: %s", e)
    raise
