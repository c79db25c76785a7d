r"""Job "steal": the end-to-end stealing attack against the (B4B-defended) API.

  python -m b4b_jax.main --config=configs/steal_simsiam.py:defended=1,sybils=2 --workdir=DIR

See b4b_jax/attacks/steal.py for the phases and docs/attacks.md for the paper's rows.
"""
from b4b_jax.attacks import steal


def run(config, workdir: str):
  return steal.run_steal(config, workdir)


def validate_config(config) -> None:
  """Run by run_job before the workdir is claimed, so a refused config leaves no trace."""
  steal._validate(config)  # pylint: disable=protected-access
