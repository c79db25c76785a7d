"""Converts a PyTorch checkpoint into a b4b_jax encoder directory, without torch.

  python -m weight_conversion.convert --kind simsiam --checkpoint checkpoint_0099.pth.tar \
      --output encoders/simsiam_resnet50
  python -m weight_conversion.convert --kind dino \
      --checkpoint dino_deitsmall16_pretrain_full_checkpoint.pth --output encoders/dino_vits16 \
      [--dino-weights teacher|student]
  python -m weight_conversion.convert --kind torchvision_resnet --checkpoint resnet18.pth --output DIR

Without --output, simsiam and dino write to the directories the stealing configs read by default
(encoders/simsiam_resnet50, encoders/dino_vits16; converters.DEFAULT_OUTPUTS).
The architecture is inferred from the tensor shapes; --arch (e.g. resnet50, vit_small) makes it a check.
Load the result with b4b_jax.models.load_encoder(DIR). An existing DIR is refused unless --overwrite,
and --overwrite only replaces an encoder directory (one whose manifest.json this tool wrote), in one
atomic swap. Path problems (DIR under a regular file, a read-only parent, a directory as --checkpoint)
are reported before the conversion starts; every error is one line on stderr and exit status 2.
"""
import argparse
import sys

from weight_conversion import converters


def parse_args(argv):
  parser = argparse.ArgumentParser(prog="python -m weight_conversion.convert", description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--kind", required=True, choices=converters.KINDS)
  parser.add_argument("--checkpoint", required=True, help=".pth / .pth.tar file written by torch.save")
  parser.add_argument("--output", default=None,
                      help="encoder directory to create (default for simsiam / dino: "
                      + ", ".join(f"{k}: {v}" for k, v in converters.DEFAULT_OUTPUTS.items())
                      + ", where configs/steal_*.py look for the victim)")
  parser.add_argument("--arch", default=None, help="expected architecture (resnet50, vit_small, ...)")
  parser.add_argument("--dino-weights", "--dino_weights", dest="dino_weights", default="teacher",
                      choices=converters.DINO_WEIGHTS, help="which network of a DINO full checkpoint")
  parser.add_argument("--n-last-blocks", "--n_last_blocks", dest="n_last_blocks", type=int, default=4,
                      help="DINO representation: CLS tokens of this many last blocks (B4B: 4)")
  parser.add_argument("--overwrite", action="store_true", help="replace an existing output directory")
  args = parser.parse_args(argv)
  if args.output is None:
    if args.kind not in converters.DEFAULT_OUTPUTS:
      parser.error(f"--output is required for --kind {args.kind}")
    args.output = converters.DEFAULT_OUTPUTS[args.kind]
  return args


def main(argv=None) -> int:
  args = parse_args(sys.argv[1:] if argv is None else argv)
  try:
    manifest = converters.convert_checkpoint(
        args.kind, args.checkpoint, args.output, arch=args.arch, dino_weights=args.dino_weights,
        n_last_blocks=args.n_last_blocks, overwrite=args.overwrite)
  except (ValueError, OSError) as e:  # bad input, path problems (PathError), unreadable files
    print(f"error: {e}", file=sys.stderr)
    return 2
  arch = manifest["architecture"]
  print(f"wrote {args.output}: {arch['name']} {arch['kwargs']}, rep_dim {manifest['rep_dim']}, "
        f"source sha256 {manifest['source']['sha256']}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
