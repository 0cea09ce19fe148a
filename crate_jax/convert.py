"""Import an official PyTorch CRATE checkpoint (or a .safetensors file) as an Orbax checkpoint
our loop and model load.

  python -m crate_jax.convert --torch crate_small.pth --variant crate_small --out DIR
  python -m crate_jax.convert --torch crate_alpha_b16.pth --variant crate_alpha_b16 --out DIR
  python -m crate_jax.convert --npz crate_alpha_b16.npz --variant crate_alpha_b16 --out DIR
  python -m crate_jax.convert --torch checkpoint-799.pth --variant crate_mae_base --out DIR
  python -m crate_jax.convert --safetensors crate.safetensors --variant crate_small --out DIR
  python -m crate_jax.convert --safetensors gpt.safetensors --variant crate_gpt_small --out DIR

--variant picks the layout: a crate_alpha_* variant reads the CRATE-alpha PyTorch port (--torch) or
the authors' big_vision checkpoint (--npz); a crate_mae_* variant reads the official CRATE-MAE
(`crate_ae`) layout; the other crate_* variants read the official CRATE layout.

--safetensors (or --torch with a .safetensors file) reads the same official names without torch,
or the flat names `python -m crate_jax.export --to safetensors` writes for the families without a
PyTorch layout (the language models: Flax parameter paths joined with "/"), as the file's metadata
says. Its recorded model kwargs apply when it names the same model as --variant.

eta and lambda are not stored in PyTorch checkpoints: pass --eta/--lambd if they differ from the
official values (eta 0.1; lambda 0.1, or 0.5 for CRATE-MAE); they are recorded in the output's
meta. Every key must be accounted for; any mismatch raises before anything is written, and an
existing output is never overwritten.
"""
from __future__ import annotations

import sys

from crate_jax import cli, models
from crate_jax.interop.converters import convert


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  source = parser.add_mutually_exclusive_group(required=True)
  source.add_argument("--torch", help="official CRATE, CRATE-MAE or ToST, or CRATE-alpha port, "
                      ".pth/.pt (or .safetensors)")
  source.add_argument("--npz", help="CRATE-alpha big_vision .npz checkpoint")
  source.add_argument("--safetensors", help="a .safetensors file: official PyTorch names, or the "
                      "flat names of our export")
  parser.add_argument("--variant", required=True, help=f"one of {', '.join(models.names())}")
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--eta", type=float, default=None,
                      help="ISTA step size (default: a .safetensors file's own, else 0.1)")
  parser.add_argument("--lambd", type=float, default=None,
                      help="ISTA sparsity weight (default: a .safetensors file's own, else the "
                      "family's, 0.1 or CRATE-MAE's 0.5)")
  parser.add_argument("--num-classes", type=int, default=None)
  parser.add_argument("--image-size", type=int, default=None)
  args = parser.parse_args(argv)
  extra = {k: v for k, v in (("num_classes", args.num_classes),
                             ("image_size", args.image_size)) if v is not None}
  if args.npz and not args.npz.endswith(".npz"):
    parser.error(f"--npz {args.npz!r}: expected a .npz file")
  if args.safetensors and not args.safetensors.lower().endswith(".safetensors"):
    parser.error(f"--safetensors {args.safetensors!r}: expected a .safetensors file")
  path = convert(args.torch or args.npz or args.safetensors, args.variant, args.out, eta=args.eta,
                 lambd=args.lambd, **extra)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
