r"""`python -m b4b_jax.serve --config=configs/serve.py --workdir=DIR`: b4b_jax.main for the serve job,
without the generic entry point's TensorFlow import (the service never feeds tf.data), so a restart is
seconds faster. Same flags and behaviour as `python -m b4b_jax.main --config=configs/serve.py ...`."""
from absl import app

from b4b_jax import main as main_lib  # defines --config and --workdir


def main(argv):
  if main_lib._CONFIG.value.get("job") != "serve":  # pylint: disable=protected-access
    raise app.UsageError("python -m b4b_jax.serve runs configs whose job is 'serve'")
  main_lib._hide_gpus_from_tensorflow = lambda: None  # pylint: disable=protected-access
  main_lib.main(argv)


if __name__ == "__main__":
  app.run(main)
