"""CRATE-MAE's official PyTorch layout (`model/crate_ae`: FAIR MAE's wrapper with CRATE blocks)
<-> our Flax tree (numpy only, no torch).

  patch_embed.proj.{weight (d,C,p,p), bias}    -> encoder/patch_embed/{kernel (p,p,C,d), bias}
  cls_token, mask_token (1,1,d)                -> encoder/cls_token, mask_token
  blocks.{i}.layers.0.0.{norm, fn.qkv, fn.to_out.0}  -> encoder/layer_i/{norm_mssa, mssa}
  blocks.{i}.layers.0.1.{norm, fn.weight}      -> encoder/layer_i/{norm_ista, ista/D}
  norm                                          -> encoder/norm
  decoder_blocks.{i}.layers.0.0.{norm, fn.weight}    -> decoder/layer_i/{norm_ista, D}  y = D LN x
  decoder_blocks.{i}.layers.0.1.{norm, fn.qkv, fn.to_out.0} -> decoder/layer_i/{norm_mssa, mssa}
  decoder_norm, decoder_pred                    -> decoder/norm, decoder/pred

Present in the file but not parameters of our model (`UNUSED`), checked for shape on import and
written with fixed values on export (`fixed_tensors`):
  decoder_pos_embed (1, N+1, d): read by the forward pass (added before the encoder), but it is the
    fixed 2-D sin-cos table, which our model computes; on import its values must equal that table.
  pos_embed (1, N+1, d): never read by the forward pass; export writes the same sin-cos table (the
    official initial value).
  decoder_embed.{weight (d,d), bias (d)}: never read (the mask tokens enter the encoder); export
    writes the identity and zeros.
Every other tensor maps to one leaf; a missing, unexpected or mis-shaped tensor raises one
ValueError naming the key and both shapes.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from crate_jax.interop import torch_keys
from crate_jax.models.crate_mae import sincos_pos_embedding

UNUSED = ("pos_embed", "decoder_pos_embed", "decoder_embed.weight", "decoder_embed.bias")
POS_TOLERANCE = 1e-4  # float32 sin/cos of positions < 1000, computed either way


def _mssa_maps(t: str, f: tuple[str, ...], heads: int, dim_head: int):
  """MSSA (PreNorm(Attention) at torch prefix t) <-> flax subtree f's norm_mssa / mssa."""
  same = torch_keys.SAME
  qkv, out = torch_keys.heads_in(heads, dim_head), torch_keys.heads_out(heads, dim_head)
  return {f"{t}.norm.weight": ((*f, "norm_mssa", "scale"), *same),
          f"{t}.norm.bias": ((*f, "norm_mssa", "bias"), *same),
          f"{t}.fn.qkv.weight": ((*f, "mssa", "U"), *qkv),
          f"{t}.fn.to_out.0.weight": ((*f, "mssa", "out_kernel"), *out),
          f"{t}.fn.to_out.0.bias": ((*f, "mssa", "out_bias"), *same)}


def mae_key_map(model) -> dict:
  """torch key -> (flax path, torch->flax transform, flax->torch transform) for a CRATEMAE."""
  same, t, conv = torch_keys.SAME, torch_keys.TRANSPOSE, torch_keys.CONV
  m = {"patch_embed.proj.weight": (("encoder", "patch_embed", "kernel"), *conv),
       "patch_embed.proj.bias": (("encoder", "patch_embed", "bias"), *same),
       "cls_token": (("encoder", "cls_token"), *same),
       "mask_token": (("mask_token",), *same)}
  for i in range(model.depth):
    b, f = f"blocks.{i}.layers.0", ("encoder", f"layer_{i}")
    m.update(_mssa_maps(f"{b}.0", f, model.heads, model.dim_head))
    m.update({f"{b}.1.norm.weight": ((*f, "norm_ista", "scale"), *same),
              f"{b}.1.norm.bias": ((*f, "norm_ista", "bias"), *same),
              f"{b}.1.fn.weight": ((*f, "ista", "D"), *same)})
  m.update({"norm.weight": (("encoder", "norm", "scale"), *same),
            "norm.bias": (("encoder", "norm", "bias"), *same)})
  depth, heads = model.decoder_arch()
  for i in range(depth):
    b, f = f"decoder_blocks.{i}.layers.0", ("decoder", f"layer_{i}")
    m.update({f"{b}.0.norm.weight": ((*f, "norm_ista", "scale"), *same),
              f"{b}.0.norm.bias": ((*f, "norm_ista", "bias"), *same),
              f"{b}.0.fn.weight": ((*f, "D"), *same)})
    m.update(_mssa_maps(f"{b}.1", f, heads, model.dim // heads))
  m.update({"decoder_norm.weight": (("decoder", "norm", "scale"), *same),
            "decoder_norm.bias": (("decoder", "norm", "bias"), *same),
            "decoder_pred.weight": (("decoder", "pred", "kernel"), *t),
            "decoder_pred.bias": (("decoder", "pred", "bias"), *same)})
  return m


def fixed_tensors(model) -> dict[str, np.ndarray]:
  """The `UNUSED` tensors as export writes them: both position tables = the fixed sin-cos table
  (what the official code initialises them to), decoder_embed = identity and zeros."""
  if model.image_size is None:
    raise ValueError("the CRATE-MAE layout stores (N+1)-row position tables: build the model "
                     "with an image_size")
  g = model.image_size // model.patch_size
  table = sincos_pos_embedding(model.dim, (g, g))[None]
  return {"pos_embed": table, "decoder_pos_embed": table,
          "decoder_embed.weight": np.eye(model.dim, dtype=np.float32),
          "decoder_embed.bias": np.zeros((model.dim,), np.float32)}


def _check_unused(sd, fixed) -> None:
  """Shapes of the unused tensors; decoder_pos_embed must be the sin-cos table the model adds."""
  for key, want in fixed.items():
    got = np.asarray(torch_keys._to_numpy(sd[key]), np.float32)
    if got.shape != want.shape:
      raise ValueError(f"tensor {key!r} has shape {got.shape} but the CRATE-MAE layout expects "
                       f"{want.shape} (it is not used by the forward pass; its shape is checked)")
  pos = np.asarray(torch_keys._to_numpy(sd["decoder_pos_embed"]), np.float32)
  err = float(np.abs(pos - fixed["decoder_pos_embed"]).max())
  if not err <= POS_TOLERANCE:
    raise ValueError(f"tensor 'decoder_pos_embed' differs from the fixed 2-D sin-cos table by up "
                     f"to {err:.3g}; the model adds that table (it is not a parameter), so these "
                     "weights would not give the same reconstructions")


def torch_to_flax(state_dict: Mapping[str, Any], expected, model) -> dict[str, Any]:
  """The official crate_ae state dict -> params shaped like `expected` (a CRATEMAE's params)."""
  sd = torch_keys.unwrap_state_dict(state_dict)
  fixed = fixed_tensors(model)
  params = torch_keys.from_state_dict(sd, mae_key_map(model), expected, "CRATE-MAE",
                                      also_allowed=fixed)
  _check_unused(sd, fixed)
  return params


def flax_to_torch(params, model) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` plus the `fixed_tensors` (strict-loadable by the official class)."""
  return {**torch_keys.to_torch(params, mae_key_map(model)), **fixed_tensors(model)}
