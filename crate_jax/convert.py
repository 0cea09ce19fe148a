"""Import an official PyTorch CRATE checkpoint as an Orbax checkpoint our loop and model load.

  python -m crate_jax.convert --torch crate_small.pth --variant crate_small --out DIR
  python -m crate_jax.convert --torch crate_alpha_b16.pth --variant crate_alpha_b16 --out DIR
  python -m crate_jax.convert --npz crate_alpha_b16.npz --variant crate_alpha_b16 --out DIR
  python -m crate_jax.convert --torch checkpoint-799.pth --variant crate_mae_base --out DIR

--variant picks the layout: a crate_alpha_* variant reads the CRATE-alpha PyTorch port (--torch) or
the authors' big_vision checkpoint (--npz); a crate_mae_* variant reads the official CRATE-MAE
(`crate_ae`) layout; the other crate_* variants read the official CRATE layout.

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
  source.add_argument("--torch", help="official CRATE or CRATE-MAE, or CRATE-alpha port, .pth/.pt")
  source.add_argument("--npz", help="CRATE-alpha big_vision .npz checkpoint")
  parser.add_argument("--variant", required=True, help=f"one of {', '.join(models.names())}")
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--eta", type=float, default=0.1, help="ISTA step size (not in the file)")
  parser.add_argument("--lambd", type=float, default=None,
                      help="ISTA sparsity weight (default: the family's, 0.1 or CRATE-MAE's 0.5)")
  parser.add_argument("--num-classes", type=int, default=None)
  parser.add_argument("--image-size", type=int, default=None)
  args = parser.parse_args(argv)
  extra = {k: v for k, v in (("num_classes", args.num_classes),
                             ("image_size", args.image_size)) if v is not None}
  if args.npz and not args.npz.endswith(".npz"):
    parser.error(f"--npz {args.npz!r}: expected a .npz file")
  path = convert(args.torch or args.npz, args.variant, args.out, eta=args.eta, lambd=args.lambd,
                 **extra)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
