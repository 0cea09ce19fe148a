"""CRATE-alpha's published layouts <-> our Flax tree (numpy only, no torch).

- big_vision `.npz` (the authors' JAX checkpoints): keys are the Flax paths joined by '/'
  (`embedding/kernel`, `cls`, `pos_embedding`, `Transformer/encoderblock_{i}/...`, `encoder_norm/*`,
  `head/*`), the same tree as crate_jax.models.CRATEAlpha, so they load leaf for leaf.
- the PyTorch port (`conv1`, `cls_token`, `transformer.layers.{i}.0.fn.qkv`, `...1.fn.D/D1`,
  `mlp_head`): mapped by `alpha_key_map`. The port's `mlp_head.0` LayerNorm uses eps 1e-5 where the
  JAX model (and ours) uses 1e-6 for `encoder_norm`; the weights are the same.

Every tensor must be accounted for; a missing, unexpected or mis-shaped one raises one ValueError
naming the key and both shapes.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from crate_jax.interop import torch_keys

ATTN, ISTA = "MultiHeadDotProductSubspaceAttention_0", "OvercompleteISTABlock_0"


def alpha_key_map(depth: int, heads: int, dim_head: int):
  """torch key -> (flax path, torch->flax transform, flax->torch transform)."""
  same, t, conv = torch_keys.SAME, torch_keys.TRANSPOSE, torch_keys.CONV
  qkv, out = torch_keys.heads_in(heads, dim_head), torch_keys.heads_out(heads, dim_head)
  m = {"conv1.weight": (("embedding", "kernel"), *conv),
       "conv1.bias": (("embedding", "bias"), *same),
       "cls_token": (("cls",), *same),
       "pos_embedding": (("pos_embedding",), *same)}
  for i in range(depth):
    tk, f = f"transformer.layers.{i}", ("Transformer", f"encoderblock_{i}")
    m.update({
        f"{tk}.0.norm.weight": ((*f, "LayerNorm_0", "scale"), *same),
        f"{tk}.0.norm.bias": ((*f, "LayerNorm_0", "bias"), *same),
        f"{tk}.0.fn.qkv.weight": ((*f, ATTN, "proj", "kernel"), *qkv),
        f"{tk}.0.fn.to_out.0.weight": ((*f, ATTN, "out", "kernel"), *out),
        f"{tk}.1.norm.weight": ((*f, "LayerNorm_1", "scale"), *same),
        f"{tk}.1.norm.bias": ((*f, "LayerNorm_1", "bias"), *same),
        f"{tk}.1.fn.D": ((*f, ISTA, "D"), *same),
        f"{tk}.1.fn.D1": ((*f, ISTA, "D1"), *same),
    })
  m.update({"mlp_head.0.weight": (("encoder_norm", "scale"), *same),
            "mlp_head.0.bias": (("encoder_norm", "bias"), *same),
            "mlp_head.1.weight": (("head", "kernel"), *t),
            "mlp_head.1.bias": (("head", "bias"), *same)})
  return m


def torch_to_flax(state_dict: Mapping[str, Any], expected, *, depth: int, heads: int,
                  dim_head: int) -> dict[str, Any]:
  """The PyTorch port's state dict -> params shaped like `expected`."""
  return torch_keys.from_state_dict(torch_keys.unwrap_state_dict(state_dict),
                                    alpha_key_map(depth, heads, dim_head), expected,
                                    "CRATE-alpha")


def flax_to_torch(params, *, depth: int, heads: int, dim_head: int) -> dict[str, np.ndarray]:
  """Inverse of `torch_to_flax` (the port's state dict, strict-loadable)."""
  return torch_keys.to_torch(params, alpha_key_map(depth, heads, dim_head))


def _paths(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, "items"):
      yield from _paths(v, (*prefix, k))
    else:
      yield (*prefix, k)


def npz_to_flax(arrays: Mapping[str, Any], expected) -> dict[str, Any]:
  """A big_vision checkpoint ('/'-joined Flax paths; a leading 'params/' is accepted)."""
  flat = {(k[len("params/"):] if k.startswith("params/") else k): v for k, v in arrays.items()}
  want = {"/".join(p): p for p in _paths(expected)}
  torch_keys.check_keys(flat, want, "npz checkpoint", "CRATE-alpha")
  return torch_keys.fill(((k, flat[k], p, lambda x: x) for k, p in want.items()), expected)
