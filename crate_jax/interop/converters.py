"""Official PyTorch CRATE checkpoints -> our params (and Orbax checkpoints).

eta and lambda are not stored in PyTorch checkpoints: they are arguments, recorded in the meta.
Every key must be accounted for; any mismatch raises before anything is written, and an existing
output is never overwritten.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import models
from crate_jax.interop import torch_keys
from crate_jax.training import checkpoint as ckpt_lib


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
