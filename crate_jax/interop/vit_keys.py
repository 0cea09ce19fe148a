"""timm's VisionTransformer state-dict layout <-> our ViT parameter tree (numpy only, no torch).

  cls_token (1,1,d), pos_embed (1,N+1,d)          -> cls_token, pos_embedding
  patch_embed.proj.{weight (d,C,p,p), bias}        -> patch_embed/{kernel (p,p,C,d), bias}
  blocks.{i}.norm1 / norm2.{weight, bias}          -> block_i/norm1 / norm2/{scale, bias}
  blocks.{i}.attn.qkv.{weight (3hp, d), bias}      -> block_i/attn/qkv/{kernel (d,3,h,p), bias}
  blocks.{i}.attn.proj.{weight (d, hp), bias}      -> block_i/attn/proj/{kernel (h,p,d), bias}
  blocks.{i}.mlp.fc1 / fc2.{weight, bias}          -> block_i/mlp/fc1 / fc2/{kernel, bias}
  norm.{weight, bias}, head.{weight, bias}         -> norm/{scale, bias}, head/{kernel, bias}

timm's rows of qkv are ordered (q|k|v, head, dim_head), as our kernel's (3, heads, dim_head) axes.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from crate_jax.interop import torch_keys
from crate_jax.interop.torch_keys import CONV, SAME, TRANSPOSE


def _qkv(heads: int, dim_head: int):
  """(3 h p, d) Linear weight <-> (d, 3, h, p); its bias (3 h p,) <-> (3, h, p)."""
  kernel = (lambda w: w.T.reshape(w.shape[1], 3, heads, dim_head),
            lambda k: k.reshape(k.shape[0], -1).T)
  bias = (lambda b: b.reshape(3, heads, dim_head), lambda b: b.reshape(-1))
  return kernel, bias


def vit_key_map(depth: int, heads: int, dim_head: int) -> dict[str, tuple]:
  """timm key -> (flax param path, torch->flax transform, flax->torch transform)."""
  qkv_kernel, qkv_bias = _qkv(heads, dim_head)
  m: dict[str, tuple] = {
      "cls_token": (("cls_token",), *SAME),
      "pos_embed": (("pos_embedding",), *SAME),
      "patch_embed.proj.weight": (("patch_embed", "kernel"), *CONV),
      "patch_embed.proj.bias": (("patch_embed", "bias"), *SAME),
      "norm.weight": (("norm", "scale"), *SAME),
      "norm.bias": (("norm", "bias"), *SAME),
      "head.weight": (("head", "kernel"), *TRANSPOSE),
      "head.bias": (("head", "bias"), *SAME),
  }
  for i in range(depth):
    t, f = f"blocks.{i}", f"block_{i}"
    for norm in ("norm1", "norm2"):
      m[f"{t}.{norm}.weight"] = ((f, norm, "scale"), *SAME)
      m[f"{t}.{norm}.bias"] = ((f, norm, "bias"), *SAME)
    m.update({
        f"{t}.attn.qkv.weight": ((f, "attn", "qkv", "kernel"), *qkv_kernel),
        f"{t}.attn.qkv.bias": ((f, "attn", "qkv", "bias"), *qkv_bias),
        f"{t}.attn.proj.weight": ((f, "attn", "proj", "kernel"),
                                  *torch_keys.heads_out(heads, dim_head)),
        f"{t}.attn.proj.bias": ((f, "attn", "proj", "bias"), *SAME),
    })
    for fc in ("fc1", "fc2"):
      m[f"{t}.mlp.{fc}.weight"] = ((f, "mlp", fc, "kernel"), *TRANSPOSE)
      m[f"{t}.mlp.{fc}.bias"] = ((f, "mlp", fc, "bias"), *SAME)
  return m


def torch_to_flax(state_dict: Mapping[str, Any], expected, *, depth: int, heads: int,
                  dim_head: int) -> dict[str, Any]:
  """A timm VisionTransformer state dict -> params shaped like `expected`."""
  return torch_keys.from_state_dict(torch_keys.unwrap_state_dict(state_dict),
                                    vit_key_map(depth, heads, dim_head), expected, "ViT (timm)")


def flax_to_torch(params, *, depth: int, heads: int, dim_head: int) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax`: a state dict timm's VisionTransformer loads strictly."""
  return torch_keys.to_torch(params, vit_key_map(depth, heads, dim_head))
