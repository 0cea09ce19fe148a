"""The derivation's own quantities, read from the parameters: how incoherent each layer's subspaces
U_[K] are, and how close its ISTA dictionary D is to orthogonal.

  incoherence(U)       ||U_k^T U_j||_2 over head pairs k != j: (max, mean); U (d, K, p)
  principal_cosines(U) the same with each U_k replaced by an orthonormal basis of its span:
                       the cosine of the smallest principal angle between the subspaces (in [0, 1])
  dictionary_orthogonality(D) = ||D^T D - I||_F / ||I||_F
  layer_subspace_stats(params)  the three per layer, for the CRATE families' parameter trees
"""
from __future__ import annotations

import re

import numpy as np

_LAYER = re.compile(r"^(?:layer|encoderblock|block)_(\d+)$")


def _pair_norms(U: np.ndarray) -> np.ndarray:
  """||U_k^T U_j||_2 for all k != j (flattened), U (d, K, p), in float64."""
  U = np.asarray(U, np.float64)
  K = U.shape[1]
  return np.array([np.linalg.norm(U[:, k].T @ U[:, j], 2)
                   for k in range(K) for j in range(K) if k != j])


def incoherence(U: np.ndarray) -> tuple[float, float]:
  """(max, mean) over head pairs k != j of the spectral norm ||U_k^T U_j||_2 (0 for one head)."""
  norms = _pair_norms(U)
  return (float(norms.max()), float(norms.mean())) if norms.size else (0.0, 0.0)


def principal_cosines(U: np.ndarray) -> tuple[float, float]:
  """(max, mean) over k != j of ||Q_k^T Q_j||_2, Q_k an orthonormal basis of span(U_k): the
  cosine of the smallest principal angle, scale-free (1 = the subspaces share a direction)."""
  U = np.asarray(U, np.float64)
  Q = np.stack([np.linalg.svd(U[:, k], full_matrices=False)[0] for k in range(U.shape[1])], 1)
  return incoherence(Q)


def dictionary_orthogonality(D: np.ndarray) -> float:
  """||D^T D - I||_F / ||I||_F (0 for an orthogonal D), D (d, m) -> I of size m."""
  D = np.asarray(D, np.float64)
  m = D.shape[-1]
  return float(np.linalg.norm(D.T @ D - np.eye(m)) / np.sqrt(m))


def _find(tree, name):
  """The first array named `name` under tree (depth first), or None."""
  if not hasattr(tree, "items"):
    return None
  for k, v in tree.items():
    if k == name and not hasattr(v, "items"):
      return v
    found = _find(v, name)
    if found is not None:
      return found
  return None


def _find_tree(tree, name):
  """The first subtree named `name` under tree, or None."""
  if not hasattr(tree, "items"):
    return None
  for k, v in tree.items():
    if k == name and hasattr(v, "items"):
      return v
    found = _find_tree(v, name)
    if found is not None:
      return found
  return None


def _layers(params) -> list:
  """The per-layer subtrees of a parameter tree in order (a scanned stack is unrolled first)."""
  from crate_jax.models import family
  params = family.scan_layout(params, False)

  def search(tree):
    if not hasattr(tree, "items"):
      return []
    found = {int(m.group(1)): v for k, v in tree.items() if (m := _LAYER.match(str(k)))}
    if found:
      return [found[i] for i in sorted(found)]
    for v in tree.values():
      inner = search(v)
      if inner:
        return inner
    return []
  return search(params)


def layer_subspace_stats(params) -> dict[str, np.ndarray]:
  """Per layer (L,): incoherence_max / _mean (||U_k^T U_j||_2), principal_cosine_max / _mean,
  dictionary_orthogonality; {} when the layers have no subspace parameter U (e.g. ViT). A layer
  without a dictionary D gets NaN there."""
  params = params.get("params", params) if hasattr(params, "get") else params
  rows = []
  for layer in _layers(params):
    U = _find(layer, "U")
    if U is None:  # ToST's TSSA projection: qkv/kernel (d, heads, p)
      qkv = _find_tree(layer, "qkv")
      U = None if qkv is None else qkv.get("kernel")
    if U is None:  # CRATE-alpha names it proj/kernel
      proj = _find_tree(layer, "proj")
      U = None if proj is None else proj.get("kernel")
    if U is None or np.ndim(U) != 3:
      return {}
    D = _find(layer, "D")
    inc, cos = incoherence(U), principal_cosines(U)
    rows.append({"incoherence_max": inc[0], "incoherence_mean": inc[1],
                 "principal_cosine_max": cos[0], "principal_cosine_mean": cos[1],
                 "dictionary_orthogonality": (np.nan if D is None
                                              else dictionary_orthogonality(D))})
  if not rows:
    return {}
  return {k: np.array([r[k] for r in rows]) for k in rows[0]}
