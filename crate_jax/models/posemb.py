"""Resize a learned positional embedding to another patch grid (bicubic, class-token row kept)."""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp
import numpy as np


def resize_pos_embedding(pos: jax.Array, new_grid: tuple[int, int] | int,
                         num_prefix_tokens: int = 1) -> jax.Array:
  """(1, prefix + gh*gw, d) -> (1, prefix + nh*nw, d); prefix rows (the cls token) are unchanged.

  The old grid is taken to be square. Patch rows are resized bicubically over the 2-D grid.
  """
  if isinstance(new_grid, int):
    new_grid = (new_grid, new_grid)
  pos = jnp.asarray(pos)
  prefix, grid_tokens = pos[:, :num_prefix_tokens], pos[:, num_prefix_tokens:]
  n = grid_tokens.shape[1]
  side = int(round(math.sqrt(n)))
  if side * side != n:
    raise ValueError(f"positional embedding has {n} patch rows, not a square grid")
  if (side, side) == tuple(new_grid):
    return pos
  d = pos.shape[-1]
  grid = grid_tokens.reshape(side, side, d).astype(jnp.float32)
  resized = jax.image.resize(grid, (*new_grid, d), method="bicubic", antialias=False)
  resized = resized.reshape(1, new_grid[0] * new_grid[1], d).astype(pos.dtype)
  return jnp.concatenate([prefix, resized], axis=1)


def resize_params_pos_embedding(params, image_size: int, patch_size: int):
  """Return a copy of a model's params with `pos_embedding` resized for image_size/patch_size."""
  params = jax.tree_util.tree_map(lambda x: x, dict(params))
  g = image_size // patch_size
  params["pos_embedding"] = resize_pos_embedding(np.asarray(params["pos_embedding"]), (g, g))
  return params


def fit_pos_embedding(params: dict, abstract_params) -> dict:
  """`params` with a learned `pos_embedding` resized (bicubic, cls row kept) to the patch grid of
  `abstract_params` (the model's param shapes) when only the grid differs; otherwise unchanged."""
  target = abstract_params.get("params", abstract_params)
  if "pos_embedding" not in params or "pos_embedding" not in target:
    return params
  have, want = tuple(params["pos_embedding"].shape), tuple(target["pos_embedding"].shape)
  if have == want or have[-1] != want[-1]:
    return params
  side = int(round(math.sqrt(want[1] - 1)))
  if side * side != want[1] - 1:
    return params
  return {**params, "pos_embedding": resize_pos_embedding(params["pos_embedding"], (side, side))}


def resize_patch_kernel(kernel, patch_size: int):
  """A conv patch-embedding kernel (p, p, C, d) resized bilinearly to (q, q, C, d), q =
  patch_size, as CRATE-alpha's recipe does when fine-tuning with another patch than it
  pre-trained with (values are resampled, not rescaled)."""
  kernel = jnp.asarray(kernel)
  if kernel.shape[0] == patch_size and kernel.shape[1] == patch_size:
    return kernel
  out = jax.image.resize(kernel.astype(jnp.float32), (patch_size, patch_size, *kernel.shape[2:]),
                         method="bilinear", antialias=False)
  return out.astype(kernel.dtype)


def fit_patch_kernel(params: dict, abstract_params, name: str = "embedding") -> dict:
  """`params` with the `name/kernel` conv stem resized to `abstract_params`' patch size when only
  the patch size differs; otherwise unchanged."""
  target = abstract_params.get("params", abstract_params)
  if name not in params or name not in target:
    return params
  have, want = tuple(params[name]["kernel"].shape), tuple(target[name]["kernel"].shape)
  if have == want or have[2:] != want[2:] or want[0] != want[1]:
    return params
  return {**params, name: {**params[name],
                           "kernel": resize_patch_kernel(params[name]["kernel"], want[0])}}
