"""Masks from one layer of a vision transformer, and their Jaccard index against ground truth.

Pure, jittable functions on ONE image's outputs (vmap them over a batch); the patch grid is
(gh, gw), the patches in row-major order, the class token (when there is one) first.

  attention_mass_mask(a, share)   the smallest set of patches holding `share` of the attention
                                  mass a (DINO's 60% rule)
  attention_masks(A, grid, share) per head and merged (mean over heads) from the class token's row
  pca_mask(x, grid)               first principal component of the patch features, split half-way
                                  between its extremes, oriented so
                                  the foreground is the minority side
  maskcut(x, grid, tau, objects)  normalized cut of the cosine patch-affinity graph, repeated on
                                  the patches left (MaskCut)
  upsample_mask(m, size, method)  patch grid -> pixels ("nearest"; "bilinear": > 0.5)
  jaccard(pred, gt)               |pred & gt| / |pred | gt| (1 when both are empty)
  centred_box(size, area)         the centred box covering `area` of the image (a baseline)
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

UPSAMPLING = ("nearest", "bilinear")


def eigh(M: jax.Array):
  """(eigenvalues ascending, eigenvectors) of symmetric M (..., n, n), solved on the host by
  numpy in float64 (jax.pure_callback): XLA:CPU was seen to hang intermittently running its own
  batched eigensolvers inside one program."""
  def solve(a):
    w, v = np.linalg.eigh(np.asarray(a, np.float64))
    return w.astype(np.float32), v.astype(np.float32)
  shapes = (jax.ShapeDtypeStruct(M.shape[:-1], jnp.float32),
            jax.ShapeDtypeStruct(M.shape, jnp.float32))
  return jax.pure_callback(solve, shapes, M, vmap_method="broadcast_all")


def attention_mass_mask(attention: jax.Array, share: float = 0.6) -> jax.Array:
  """The smallest set S of entries with sum_S a_i >= share * sum_i a_i (largest first).

  attention (..., n) >= 0 -> bool (..., n). Entry i is kept iff the mass of the entries strictly
  before it in decreasing order is < share of the total (so the top entry is always kept).
  """
  a = attention.astype(jnp.float32)
  a = a / jnp.maximum(jnp.sum(a, axis=-1, keepdims=True), 1e-30)
  order = jnp.argsort(-a, axis=-1, stable=True)
  sorted_a = jnp.take_along_axis(a, order, axis=-1)
  before = jnp.cumsum(sorted_a, axis=-1) - sorted_a
  keep_sorted = before < share
  ranks = jnp.argsort(order, axis=-1, stable=True)
  return jnp.take_along_axis(keep_sorted, ranks, axis=-1)


def attention_masks(attention: jax.Array, grid: tuple[int, int], share: float = 0.6):
  """(per head (K, gh, gw), merged (gh, gw)) from one image's attention (K, N, N), token 0 the
  class token: head k keeps the smallest patch set holding `share` of A[k, 0, 1:]; the merged
  mask applies the same rule to the head mean (1/K) sum_k A[k, 0, 1:]."""
  cls_row = attention[:, 0, 1:]
  heads = attention_mass_mask(cls_row, share).reshape(-1, *grid)
  merged = attention_mass_mask(jnp.mean(cls_row, axis=0), share).reshape(grid)
  return heads, merged


def pca_mask(features: jax.Array, grid: tuple[int, int]) -> jax.Array:
  """First principal component c_i = (x_i - mu) . v_1 of the patch features x (n, D),
  thresholded half-way between its extremes (as the PCA picture's min-max > 0.5):
  fg = {i : c_i > (min c + max c) / 2}, replaced by its complement when it holds more than half
  the patches (the foreground is the minority side). -> bool (gh, gw)."""
  x = features.astype(jnp.float32)
  centred = x - jnp.mean(x, axis=0)
  _, vecs = eigh(centred.T @ centred / x.shape[0])
  first = centred @ vecs[:, -1]
  fg = first > 0.5 * (jnp.min(first) + jnp.max(first))
  fg = jnp.where(2 * jnp.sum(fg) > fg.size, ~fg, fg)
  return fg.reshape(grid)


def cosine_affinity(features: jax.Array, tau: float, eps: float = 1e-5) -> jax.Array:
  """W_ij = 1 if cos(x_i, x_j) >= tau else eps, features (n, D) -> (n, n)."""
  x = features.astype(jnp.float32)
  x = x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  return jnp.where(x @ x.T >= tau, 1.0, eps)


def ncut_bipartition(W: jax.Array, active: jax.Array) -> jax.Array:
  """Normalized cut of the graph W restricted to the `active` nodes: the second-smallest
  generalized eigenvector x of (D - W) x = lambda D x, split at its mean over the active nodes;
  the foreground is the side holding the entry of largest |x|. -> bool (n,), False off `active`.

  Solved as the second-largest eigenvector y of D^-1/2 W D^-1/2 (x = D^-1/2 y); inactive nodes
  are cut out of W and put at eigenvalue -2 so they never come second.
  """
  m = active.astype(W.dtype)
  W = W * m[:, None] * m[None, :]
  d = jnp.sum(W, axis=-1)
  inv_sqrt = jnp.where(active, 1.0 / jnp.sqrt(jnp.maximum(d, 1e-30)), 0.0)
  M = W * inv_sqrt[:, None] * inv_sqrt[None, :] - 2.0 * jnp.diag(1.0 - m)
  _, vecs = eigh(M)
  x = vecs[:, -2] * inv_sqrt
  count = jnp.maximum(jnp.sum(m), 1.0)
  side = (x > jnp.sum(x * m) / count) & active
  top = jnp.argmax(jnp.where(active, jnp.abs(x), -1.0))
  return jnp.where(side[top], side, active & ~side)


def maskcut(features: jax.Array, grid: tuple[int, int], tau: float = 0.2,
            num_objects: int = 1) -> jax.Array:
  """MaskCut: `num_objects` successive normalized cuts (`ncut_bipartition`) of the cosine
  affinity graph of the patch features (n, D) (`cosine_affinity`, threshold tau), each on the
  patches not yet taken. -> bool (num_objects, gh, gw)."""
  W = cosine_affinity(features, tau)
  active = jnp.ones(W.shape[0], bool)
  objects = []
  for _ in range(num_objects):
    fg = ncut_bipartition(W, active)
    objects.append(fg)
    active = active & ~fg
  return jnp.stack(objects).reshape(num_objects, *grid)


def upsample_mask(mask: jax.Array, size: tuple[int, int], method: str = "nearest") -> jax.Array:
  """(..., gh, gw) bool -> (..., H, W) bool: "nearest" repeats each patch's value over its
  pixels; "bilinear" interpolates the 0/1 grid and keeps the pixels > 0.5."""
  if method not in UPSAMPLING:
    raise ValueError(f"upsampling {method!r} is not one of {UPSAMPLING}")
  up = jax.image.resize(mask.astype(jnp.float32), (*mask.shape[:-2], *size), method=method)
  return up > 0.5


def jaccard(pred: jax.Array, gt: jax.Array) -> jax.Array:
  """IoU = |pred & gt| / |pred | gt| over the last two axes, 1 when both are empty."""
  pred, gt = pred.astype(bool), gt.astype(bool)
  inter = jnp.sum(pred & gt, axis=(-2, -1))
  union = jnp.sum(pred | gt, axis=(-2, -1))
  return jnp.where(union > 0, inter / jnp.maximum(union, 1), 1.0)


def centred_box(size: tuple[int, int], area: float) -> jax.Array:
  """bool (H, W): the centred box of round(H sqrt(area)) x round(W sqrt(area)) pixels (the same
  aspect as the image), area a fraction in [0, 1]."""
  h, w = size
  side = float(np.sqrt(np.clip(area, 0.0, 1.0)))
  bh, bw = int(round(h * side)), int(round(w * side))
  top, left = (h - bh) // 2, (w - bw) // 2
  box = np.zeros((h, w), bool)
  box[top:top + bh, left:left + bw] = True
  return jnp.asarray(box)
