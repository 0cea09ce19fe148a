"""Export a checkpoint: a PyTorch state dict, a .safetensors file or a serialized StableHLO
forward pass.

  python -m crate_jax.export --checkpoint workdirs/embedded --to torch --out crate.pth
  python -m crate_jax.export --checkpoint workdirs/embedded --to safetensors --out crate.safetensors
  python -m crate_jax.export --checkpoint workdirs/embedded --to stablehlo --out crate_hlo

--to torch writes the official PyTorch class's state dict (CRATE, CRATE-MAE, ToST; CRATE-alpha: its
PyTorch port; ViT: timm's), loadable with strict=True;
--to safetensors writes the same tensors under the same names (safetensors.torch.load_file, then
load_state_dict(strict=True)); a family without a PyTorch layout (the language models, the
CRATE-MAE classifier) is written with flat names, its Flax parameter paths joined with "/"
(layer_0/mssa/U). The metadata holds the model's name and kwargs (JSON); nothing is pickled, and
torch is not needed. `python -m crate_jax.convert --safetensors FILE` reads it back;
--to stablehlo writes DIR/forward.stablehlo (jax.export, any batch size), DIR/meta.json and a
README.md saying how to call it with jax alone. An existing output is refused; nothing is
written unless the export succeeds.
"""
from __future__ import annotations

import sys

from crate_jax import cli


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints dir or step dir")
  parser.add_argument("--to", required=True, choices=("torch", "safetensors", "stablehlo"))
  parser.add_argument("--out", required=True,
                      help="output file (torch, safetensors) or directory (stablehlo)")
  args = parser.parse_args(argv)
  from crate_jax.interop import exporters
  exporters.refuse_existing(args.out)
  if args.to == "torch":
    path = exporters.export_torch(args.checkpoint, args.out)
  elif args.to == "safetensors":
    path = exporters.export_safetensors(args.checkpoint, args.out)
  else:
    path = exporters.export_stablehlo(args.checkpoint, args.out)
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
