"""Spatial read-outs of one layer: CLS-token attention maps and a PCA of the patch features.

Pure, jittable functions on the model's intermediates (token 0 = CLS, then the patch grid in
row-major order). The figures that draw them live in `figures.py`.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np


def cls_attention_maps(attention: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """A[b, k, 0, 1:] reshaped to the patch grid: attention (B, K, N, N) -> (B, K, gh, gw)."""
  b, k = attention.shape[:2]
  return attention[:, :, 0, 1:].reshape(b, k, *grid)


def membership_maps(memberships: jax.Array, grid: tuple[int, int], prefix: int = 0) -> jax.Array:
  """ToST's memberships Pi (B, N, K) over the patch grid: (B, K, gh, gw), head k's map Pi[:, k]
  (the share of each token assigned to group k)."""
  b, _, k = memberships.shape
  return jnp.moveaxis(memberships[:, prefix:], -1, 1).reshape(b, k, *grid)


def upsample_maps(maps: jax.Array, size: tuple[int, int], method: str = "nearest") -> jax.Array:
  """(..., gh, gw) -> (..., H, W); "nearest" keeps one value per patch (the DINO convention)."""
  return jax.image.resize(maps.astype(jnp.float32), (*maps.shape[:-2], *size), method=method)


def minmax(x: jax.Array, axes, mask: jax.Array | None = None) -> jax.Array:
  """(x - min) / (max - min) over `axes` (restricted to `mask` when given), in [0, 1]."""
  lo_src = x if mask is None else jnp.where(mask, x, jnp.inf)
  hi_src = x if mask is None else jnp.where(mask, x, -jnp.inf)
  lo = jnp.min(lo_src, axis=axes, keepdims=True)
  hi = jnp.max(hi_src, axis=axes, keepdims=True)
  return jnp.clip((x - lo) / jnp.maximum(hi - lo, 1e-12), 0.0, 1.0)


def pca(x: jax.Array, num_components: int, weights: jax.Array | None = None) -> jax.Array:
  """Projections of the rows of x (..., D) on the top principal axes of the (weighted) rows.

  mu = sum_i w_i x_i / sum_i w_i, C = sum_i w_i (x_i - mu)(x_i - mu)^T / sum_i w_i; returns
  (x - mu) V[:, :c] (..., c) with V the eigenvectors of C by decreasing eigenvalue, each signed so
  that its largest-magnitude loading is positive (deterministic).
  """
  rows = x.reshape(-1, x.shape[-1]).astype(jnp.float32)
  w = jnp.ones(rows.shape[0]) if weights is None else weights.reshape(-1).astype(jnp.float32)
  total = jnp.maximum(jnp.sum(w), 1e-12)
  mu = jnp.sum(w[:, None] * rows, axis=0) / total
  centred = rows - mu
  cov = (w[:, None] * centred).T @ centred / total
  _, vecs = jnp.linalg.eigh(cov)
  vecs = vecs[:, ::-1][:, :num_components]
  top = jnp.take_along_axis(vecs, jnp.argmax(jnp.abs(vecs), axis=0)[None], axis=0)
  vecs = vecs * jnp.sign(top + (top == 0))
  return ((x.astype(jnp.float32) - mu) @ vecs)


def _border(grid: tuple[int, int]) -> np.ndarray:
  """Static mask of the outermost ring of patches."""
  border = np.ones(grid, bool)
  border[1:-1, 1:-1] = False
  return border


def pca_visualisation(features: jax.Array, grid: tuple[int, int], threshold: float = 0.5,
                      prefix: int = 1):
  """PCA of the patch features U^T LN(Z^l) of one layer, fitted jointly over the images.

  features (B, N, K, p) with `prefix` class tokens first (dropped here; ToST's layers have
  none). Returns, each over the grid:
    first   (B, gh, gw)     first component, min-max normalised per image, oriented so that the
                            image border (taken as background) has the lower mean
    fg      (B, gh, gw)     foreground mask: first > threshold
    rgb     (B, gh, gw, 3)  first three components, min-max normalised per image
    fg_rgb  (B, gh, gw, 3)  three components of a PCA refitted on the foreground patches only,
                            normalised over each image's foreground; background 0 (black)
  """
  b = features.shape[0]
  x = features[:, prefix:].reshape(b, *grid, -1)
  comps = pca(x, 3)                                      # (B, gh, gw, 3)
  first = minmax(comps[..., 0], axes=(1, 2))
  if min(grid) > 2:  # one orientation for all images: the component is fitted jointly
    border = _border(grid)
    first = jnp.where(jnp.mean(first[:, border]) > jnp.mean(first[:, ~border]), 1.0 - first, first)
  fg = first > threshold
  rgb = minmax(comps, axes=(1, 2))
  fg_comps = pca(x, 3, weights=fg)
  fg_rgb = minmax(fg_comps, axes=(1, 2), mask=fg[..., None]) * fg[..., None]
  return {"first": first, "fg": fg, "rgb": rgb, "fg_rgb": fg_rgb}
