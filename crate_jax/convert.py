"""Import an official PyTorch CRATE checkpoint as an Orbax checkpoint our loop and model load.

  python -m crate_jax.convert --torch crate_small.pth --variant crate_small --out DIR

eta and lambda are not stored in PyTorch checkpoints: pass --eta/--lambd if they differ from the
official 0.1/0.1 (they are recorded in the output's meta). Every key must be accounted for; any
mismatch raises before anything is written, and an existing output is never overwritten.
"""
from __future__ import annotations

import argparse
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import checkpoint as ckpt_lib
from crate_jax import models, torch_keys


def infer_kwargs(state_dict, variant: str, channels: int = 3) -> dict:
  """num_classes and image_size as stored in the file (head rows, pos-emb rows)."""
  sd = torch_keys.unwrap_state_dict(state_dict)
  kwargs = {}
  if "mlp_head.1.weight" in sd:
    kwargs["num_classes"] = int(np.shape(sd["mlp_head.1.weight"])[0])
  if "pos_embedding" in sd:
    n = int(np.shape(sd["pos_embedding"])[1]) - 1
    side = int(round(np.sqrt(n)))
    patch = models.variant_kwargs(variant).get("patch_size", 16)
    if side * side == n:
      kwargs["image_size"] = side * patch
  return kwargs


def convert_state_dict(state_dict, variant: str, *, eta: float = 0.1, lambd: float = 0.1,
                       **model_kwargs):
  """(params, model kwargs) for an official CRATE state dict, validated against `variant`."""
  kwargs = {**infer_kwargs(state_dict, variant), **model_kwargs, "eta": eta, "lambd": lambd}
  model = models.get(variant, **kwargs)
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.image_size, model.image_size, model.channels)))
  params = torch_keys.torch_to_flax(state_dict, expected["params"], depth=model.depth,
                                    heads=model.heads, dim_head=model.dim_head)
  return params, kwargs


def load_torch(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
  try:
    import torch
  except ImportError as e:
    raise ImportError("converting PyTorch checkpoints needs torch: pip install -e '.[torch]'") from e
  try:
    return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
    raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint: {e}") from e


def convert(torch_path: str, variant: str, out: str, *, eta: float = 0.1, lambd: float = 0.1,
            **model_kwargs) -> str:
  """Convert and write; returns the checkpoint step directory."""
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out {out!r} exists and is not empty; refusing to overwrite it")
  params, kwargs = convert_state_dict(load_torch(torch_path), variant, eta=eta, lambd=lambd,
                                      **model_kwargs)
  meta = {"model": variant, "model_kwargs": kwargs, "source": os.path.abspath(torch_path)}
  return ckpt_lib.save_params(out, params, meta)


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--torch", required=True, help="official CRATE .pth/.pt file")
  parser.add_argument("--variant", required=True, help=f"one of {', '.join(models.names())}")
  parser.add_argument("--out", required=True, help="output directory (must not exist or be empty)")
  parser.add_argument("--eta", type=float, default=0.1, help="ISTA step size (not in the file)")
  parser.add_argument("--lambd", type=float, default=0.1, help="ISTA sparsity weight")
  parser.add_argument("--num-classes", type=int, default=None)
  parser.add_argument("--image-size", type=int, default=None)
  args = parser.parse_args(argv)
  extra = {k: v for k, v in (("num_classes", args.num_classes),
                             ("image_size", args.image_size)) if v is not None}
  try:
    path = convert(args.torch, args.variant, args.out, eta=args.eta, lambd=args.lambd, **extra)
  except (ValueError, FileNotFoundError, FileExistsError, ImportError) as e:
    print(f"error: {e}", file=sys.stderr)
    return 2
  print(f"wrote {path}")
  return 0


if __name__ == "__main__":
  sys.exit(main())
