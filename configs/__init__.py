"""Experiment configs: `python -m b4b_jax.main --config=configs/<name>.py[:arg] --workdir=DIR`.

Each module's `get_config(arg=None)` returns an ml_collections.ConfigDict; `configs.common` holds what
they share (the `:arg` parser, the stealing config, the source/probe/defense blocks). Import a config as
`from configs import steal_simsiam` (repository root on the path, as `python -m` gives).
"""
