"""The official CRATE-MAE (`model/crate_ae`, `mae_crate_*`) state-dict layout <-> our Flax tree.

Official keys (numpy only here, no torch):
  cls_token, mask_token (1, 1, d);  patch_embed.proj.{weight (d, C, p, p), bias}
  blocks.{i}.layers.0.0 = PreNorm(MSSA): norm.*, fn.qkv.weight (h p, d), fn.to_out.0.{weight, bias}
  blocks.{i}.layers.0.1 = PreNorm(ISTA): norm.*, fn.weight D (d, d);  norm.* (encoder end)
  decoder_blocks.{i}.layers.0.0 = PreNorm(y = D x): norm.*, fn.weight (d, d)
  decoder_blocks.{i}.layers.0.1 = PreNorm(MSSA): norm.*, fn.qkv.weight, fn.to_out.0.*
  decoder_norm.*, decoder_pred.{weight (p p C, d), bias}
Three tensors are in every file but are not parameters of the computation:
  decoder_pos_embed (1, N+1, d): the fixed sin-cos table the *encoder* adds. Ours computes the same
    table; on import the file's must equal it (else the positions would silently differ).
  pos_embed (1, N+1, d): a second sin-cos table the official forward never reads (shape-checked).
  decoder_embed.{weight (d, d), bias (d,)}: a Linear the official forward never calls
    (shape-checked on import; exported as zeros).
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from crate_jax.interop import alpha_keys, torch_keys
from crate_jax.models.crate_mae import sincos_pos_embedding

_SAME = (lambda x: x, lambda x: x)
_T = (lambda x: x.T, lambda x: x.T)
_CONV = (lambda w: w.transpose(2, 3, 1, 0), lambda k: k.transpose(3, 2, 0, 1))  # OIHW <-> HWIO


def _mssa(torch_prefix: str, flax_prefix: tuple[str, ...], heads: int, dim_head: int):
  qkv = (lambda w: w.T.reshape(w.shape[1], heads, dim_head),        # (h p, d) <-> (d, h, p)
         lambda k: k.reshape(k.shape[0], -1).T)
  out = (lambda w: w.T.reshape(heads, dim_head, w.shape[0]),        # (d, h p) <-> (h, p, d)
         lambda k: k.reshape(-1, k.shape[-1]).T)
  return {f"{torch_prefix}.fn.qkv.weight": ((*flax_prefix, "mssa", "U"), *qkv),
          f"{torch_prefix}.fn.to_out.0.weight": ((*flax_prefix, "mssa", "out_kernel"), *out),
          f"{torch_prefix}.fn.to_out.0.bias": ((*flax_prefix, "mssa", "out_bias"), *_SAME)}


def _norm(torch_prefix: str, flax_path: tuple[str, ...]):
  return {f"{torch_prefix}.weight": ((*flax_path, "scale"), *_SAME),
          f"{torch_prefix}.bias": ((*flax_path, "bias"), *_SAME)}


def mae_key_map(*, depth: int, heads: int, dim_head: int, decoder_depth: int, decoder_heads: int,
                dim: int):
  """torch key -> (flax path, torch->flax transform, flax->torch transform), parameters only."""
  m = {"cls_token": (("encoder", "cls_token"), *_SAME),
       "mask_token": (("mask_token",), *_SAME),
       "patch_embed.proj.weight": (("encoder", "patch_embed", "kernel"), *_CONV),
       "patch_embed.proj.bias": (("encoder", "patch_embed", "bias"), *_SAME),
       **_norm("norm", ("encoder", "norm")),
       **_norm("decoder_norm", ("decoder", "norm")),
       "decoder_pred.weight": (("decoder", "pred", "kernel"), *_T),
       "decoder_pred.bias": (("decoder", "pred", "bias"), *_SAME)}
  for i in range(depth):
    t, f = f"blocks.{i}.layers.0", ("encoder", f"layer_{i}")
    m.update({**_norm(f"{t}.0.norm", (*f, "norm_mssa")), **_mssa(f"{t}.0", f, heads, dim_head),
              **_norm(f"{t}.1.norm", (*f, "norm_ista")),
              f"{t}.1.fn.weight": ((*f, "ista", "D"), *_SAME)})
  for i in range(decoder_depth):
    t, f = f"decoder_blocks.{i}.layers.0", ("decoder", f"layer_{i}")
    m.update({**_norm(f"{t}.0.norm", (*f, "norm_ista")), f"{t}.0.fn.weight": ((*f, "D"), *_SAME),
              **_norm(f"{t}.1.norm", (*f, "norm_mssa")),
              **_mssa(f"{t}.1", f, decoder_heads, dim // decoder_heads)})
  return m


def buffer_shapes(dim: int, num_patches: int) -> dict[str, tuple[int, ...]]:
  """The three non-parameter tensors of an official file and their shapes (see the module doc)."""
  return {"pos_embed": (1, num_patches + 1, dim), "decoder_pos_embed": (1, num_patches + 1, dim),
          "decoder_embed.weight": (dim, dim), "decoder_embed.bias": (dim,)}


def arch_of(model) -> dict[str, int]:
  depth, heads = model.decoder_arch()
  return dict(depth=model.depth, heads=model.heads, dim_head=model.dim_head, decoder_depth=depth,
              decoder_heads=heads, dim=model.dim)


def torch_to_flax(state_dict: Mapping[str, Any], expected, *, model) -> dict[str, Any]:
  """An official CRATE-MAE state dict -> params shaped like `expected` (the CRATEMAE's)."""
  sd = torch_keys.unwrap_state_dict(state_dict)
  key_map = mae_key_map(**arch_of(model))
  grid = (model.image_size // model.patch_size,) * 2
  buffers = buffer_shapes(model.dim, grid[0] * grid[1])
  alpha_keys._check_keys(sd, {**key_map, **buffers}, "state dict", "CRATE-MAE")
  for key, want in buffers.items():
    have = tuple(np.shape(torch_keys._to_numpy(sd[key])))
    if have != want:
      raise ValueError(f"tensor {key!r} has shape {have} but the CRATE-MAE layout expects {want}")
  table = sincos_pos_embedding(model.dim, grid)[None]
  got = np.asarray(torch_keys._to_numpy(sd["decoder_pos_embed"]), np.float32)
  if not np.allclose(got, table, atol=1e-5):
    raise ValueError("tensor 'decoder_pos_embed' is not the 2-D sin-cos table of a "
                     f"{grid[0]}x{grid[1]} grid (max difference {np.abs(got - table).max():.3g}); "
                     "the positions this model computes would differ from the file's")
  return alpha_keys._fill(((k, sd[k], p, f) for k, (p, f, _) in key_map.items()), expected)


def flax_to_torch(params, *, model) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax`: every key of the official class (strict-loadable); the fixed
  tables are the sin-cos table, the unused decoder_embed is zeros."""
  out = {k: np.ascontiguousarray(np.asarray(b(np.asarray(torch_keys._leaf(params, p), np.float32))))
         for k, (p, _, b) in mae_key_map(**arch_of(model)).items()}
  grid = (model.image_size // model.patch_size,) * 2
  table = sincos_pos_embedding(model.dim, grid)[None]
  out.update({"pos_embed": table.copy(), "decoder_pos_embed": table.copy(),
              "decoder_embed.weight": np.zeros((model.dim, model.dim), np.float32),
              "decoder_embed.bias": np.zeros((model.dim,), np.float32)})
  return out
