"""Published checkpoints -> our params (and Orbax checkpoints): official PyTorch CRATE, official
CRATE-MAE (`mae_crate_*`), the CRATE-alpha PyTorch port (each by --variant's family) and
CRATE-alpha big_vision `.npz` files.

eta and lambda are not stored in PyTorch checkpoints: they are arguments (default: the variant's,
0.1/0.1 for CRATE, 0.1/0.5 for CRATE-MAE), recorded in the meta.
Every key must be accounted for; any mismatch raises before anything is written, and an existing
output is never overwritten.
"""
from __future__ import annotations

import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import models
from crate_jax.interop import alpha_keys, mae_keys, torch_keys
from crate_jax.training import checkpoint as ckpt_lib


def infer_kwargs(state_dict, variant: str, channels: int = 3) -> dict:
  """num_classes, image_size (head rows, pos-emb rows) and, for CRATE-MAE, the patch size and
  decoder depth, as stored in the file."""
  sd = torch_keys.unwrap_state_dict(state_dict)
  kwargs = {}
  if "mlp_head.1.weight" in sd:
    kwargs["num_classes"] = int(np.shape(sd["mlp_head.1.weight"])[0])
  patch = models.variant_kwargs(variant).get("patch_size", 16)
  if "patch_embed.proj.weight" in sd:  # CRATE-MAE
    patch = kwargs["patch_size"] = int(np.shape(sd["patch_embed.proj.weight"])[-1])
    kwargs["decoder_depth"] = len({k.split(".")[1] for k in sd if k.startswith("decoder_blocks.")})
  for key in ("pos_embedding", "decoder_pos_embed"):
    if key in sd:
      n = int(np.shape(sd[key])[1]) - 1
      side = int(round(np.sqrt(n)))
      if side * side == n:
        kwargs["image_size"] = side * patch
  return kwargs


def abstract_params(model):
  """The model's params as ShapeDtypeStructs (no computation)."""
  shape = (1, model.image_size, model.image_size, model.channels)
  rngs = {"params": jax.random.key(0), "mask": jax.random.key(1)}  # CRATE-MAE draws its mask
  return jax.eval_shape(lambda: model.init(rngs, jnp.zeros(shape)))["params"]


def convert_state_dict(state_dict, variant: str, *, eta: float | None = None,
                       lambd: float | None = None, **model_kwargs):
  """(params, model kwargs) for an official state dict (CRATE, CRATE-MAE or the CRATE-alpha port,
  by `variant`'s family), validated against `variant`. eta/lambd None: the variant's own."""
  steps = {k: v for k, v in (("eta", eta), ("lambd", lambd)) if v is not None}
  kwargs = {**infer_kwargs(state_dict, variant), **model_kwargs, **steps}
  model = models.get(variant, **kwargs)
  expected = abstract_params(model)
  if isinstance(model, models.CRATEAlpha):
    params = alpha_keys.torch_to_flax(state_dict, expected, depth=model.depth, heads=model.heads,
                                      dim_head=model.dim_head)
  elif isinstance(model, models.CRATEMAE):
    params = mae_keys.torch_to_flax(state_dict, expected, model=model)
  elif type(model) is models.CRATE:
    params = torch_keys.torch_to_flax(state_dict, expected, depth=model.depth, heads=model.heads,
                                      dim_head=model.dim_head)
  else:
    raise ValueError(f"--variant {variant}: no PyTorch layout is known for "
                     f"{type(model).__name__} (CRATE, CRATE-MAE and CRATE-alpha are)")
  return params, {**kwargs, "eta": model.eta, "lambd": model.lambd}


def convert_npz(arrays, variant: str, **model_kwargs):
  """(params, model kwargs) for a CRATE-alpha big_vision checkpoint (npz arrays by Flax path)."""
  flat = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in arrays.items()}
  kwargs = {}
  if "head/kernel" in flat:
    kwargs["num_classes"] = int(np.shape(flat["head/kernel"])[1])
  if "pos_embedding" in flat and "embedding/kernel" in flat:
    n, patch = int(np.shape(flat["pos_embedding"])[1]) - 1, int(np.shape(flat["embedding/kernel"])[0])
    if int(round(np.sqrt(n))) ** 2 == n:
      kwargs["image_size"] = int(round(np.sqrt(n))) * patch
  kwargs.update(model_kwargs)
  kwargs = {k: v for k, v in kwargs.items() if v is not None}
  model = models.get(variant, **kwargs)
  if not isinstance(model, models.CRATEAlpha):
    raise ValueError(f"--npz holds big_vision CRATE-alpha weights but --variant {variant} is a "
                     f"{type(model).__name__}; use a crate_alpha_* variant")
  return alpha_keys.npz_to_flax(flat, abstract_params(model)), kwargs


def load_npz(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz checkpoint {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
    raise ValueError(f"cannot read {path!r} as an .npz checkpoint: {e}") from e


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


def convert(torch_path: str, variant: str, out: str, *, eta: float | None = None,
            lambd: float | None = None, **model_kwargs) -> str:
  """Convert and write; returns the checkpoint step directory."""
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out {out!r} exists and is not empty; refusing to overwrite it")
  if torch_path.endswith(".npz"):
    params, kwargs = convert_npz(load_npz(torch_path), variant, eta=eta, lambd=lambd,
                                 **model_kwargs)
  else:
    params, kwargs = convert_state_dict(load_torch(torch_path), variant, eta=eta, lambd=lambd,
                                        **model_kwargs)
  meta = {"model": variant, "model_kwargs": kwargs, "source": os.path.abspath(torch_path)}
  return ckpt_lib.save_params(out, params, meta)
