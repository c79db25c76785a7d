r"""Every benchmark at GPU/TPU sizes in one process, then one table: ours, reference, ratio, FLOP/s share.

  bash benchmarks/device.sh            # what to run on the first GPU or TPU (under 5 minutes)
  bash benchmarks/device.sh --smoke    # tiny sizes, any machine (tests/test_benchmarks_device.py)

Sizes (full mode): encoders ResNet-50 and ViT-S/16 forward at batch 256, 224 px; the stealing step
ResNet-50 batch 256, 224 px in float32 and bfloat16; the defense at 1024 users per serving batch of
1024 (D=2048) with its overhead on the two encoders at batch 256; the 50k x 2048 linear probe. PyTorch
references run on CUDA when JAX is on a GPU and torch sees one (on a TPU they run on the host CPU: the
ratio is then against a CPU, said in each row). A benchmark that fails prints its error and the rest
still run; the exit status is 1 if any failed. FLOP/s shares use benchmarks/common.PEAK_TFLOPS.
"""
import argparse
import sys
import time
import traceback

from benchmarks import common


def _plan(smoke: bool):
  if smoke:
    return [
        ("encoders", ["--models=resnet50", "--batch=2", "--size=32", "--iters=1"]),
        ("steal_step", ["--tiny"]),
        ("steal_step", ["--tiny", "--compute-dtype=bfloat16"]),
        ("defense", ["--tiny", "--encoders=resnet18_w0.25", "--encoder-batch=2", "--encoder-size=32"]),
        ("linear_probe", ["--tiny"]),
    ]
  return [
      ("encoders", ["--models=resnet50,vit_small", "--batch=256", "--iters=10"]),
      ("steal_step", ["--settings=resnet50_b256", "--steps=10"]),
      ("steal_step", ["--settings=resnet50_b256", "--steps=10", "--compute-dtype=bfloat16"]),
      ("defense", ["--users=1,64,1024", "--encoders=resnet50,vit_small", "--encoder-batch=256"]),
      ("linear_probe", []),
  ]


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--smoke", action="store_true", help="tiny sizes (seconds; any machine)")
  parser.add_argument("--only", default="", help="comma-separated subset, e.g. encoders,defense")
  args = parser.parse_args(argv)
  import importlib  # pylint: disable=g-import-not-at-top
  if args.smoke:  # a check that every script runs, not a measurement: compile fast
    import jax  # pylint: disable=g-import-not-at-top
    jax.config.update("jax_disable_most_optimizations", True)
  rows, failed = [], []
  start = time.perf_counter()
  for name, bench_args in _plan(args.smoke):
    if args.only and name not in args.only.split(","):
      continue
    print(f"\n### benchmarks.{name} {' '.join(bench_args)}", flush=True)
    t0 = time.perf_counter()
    try:
      module = importlib.import_module(f"benchmarks.{name}")
      result = module.main(bench_args)
      rows.extend(module.rows(result) if name == "defense" else result)
    except Exception:  # pylint: disable=broad-except
      traceback.print_exc()
      failed.append(name)
    print(f"### {name}: {time.perf_counter() - t0:.0f} s", flush=True)
  load = common.load_average()
  common.print_table(rows, f"{'smoke' if args.smoke else 'device'} benchmarks, "
                           f"{time.perf_counter() - start:.0f} s, load {load}")
  if failed:
    print(f"FAILED: {', '.join(failed)}")
  return 1 if failed else 0


if __name__ == "__main__":
  sys.exit(main())
