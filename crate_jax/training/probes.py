"""Frozen-feature evaluation: a k-NN classifier and a linear probe on features of any layer.

k-NN (as DINO reports it): cosine similarity of l2-normalised features, the k = 20 nearest train
examples vote with weight exp(sim / T), T = 0.07; the class with the largest summed weight wins.
Linear probe (closed-form ridge, as big_vision's few-shot evaluator): standardised features,
W = argmin ||X W - Y||^2 + lambda ||W||^2 on one-hot targets Y (+ a bias), predictions argmax;
lambda is chosen from a grid on a held-out tenth of the train features.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

RIDGE_GRID = (1e-3, 1e-2, 1e-1, 1.0, 10.0, 100.0)


def knn_predict(train_x, train_y, test_x, *, num_classes: int, k: int = 20,
                temperature: float = 0.07, chunk: int = 1024) -> np.ndarray:
  """Predicted classes of test_x by temperature-weighted votes of the k nearest (cosine)."""
  normalise = lambda x: x / jnp.maximum(jnp.linalg.norm(x, axis=-1, keepdims=True), 1e-12)
  train_x = normalise(jnp.asarray(train_x, jnp.float32))
  train_y = jnp.asarray(train_y, jnp.int32)
  k = min(k, train_x.shape[0])

  @jax.jit
  def predict(x):
    sims, idx = jax.lax.top_k(normalise(x) @ train_x.T, k)
    weights = jnp.exp((sims - sims[:, :1]) / temperature)  # shifted by the row max: no overflow
    votes = jax.nn.one_hot(train_y[idx], num_classes) * weights[..., None]
    return jnp.argmax(votes.sum(axis=1), axis=-1)

  test_x = np.asarray(test_x, np.float32)
  return np.concatenate([np.asarray(predict(test_x[i:i + chunk]))
                         for i in range(0, len(test_x), chunk)])


def _ridge_fit(x, y_onehot, lam):
  """(W, b) minimising ||x W + b - y||^2 + lam ||W||^2 (x already standardised)."""
  xm, ym = x.mean(0), y_onehot.mean(0)
  xc, yc = x - xm, y_onehot - ym
  w = np.linalg.solve(xc.T @ xc + lam * np.eye(x.shape[1]), xc.T @ yc)
  return w, ym - xm @ w


def linear_probe_predict(train_x, train_y, test_x, *, num_classes: int,
                         grid=RIDGE_GRID, seed: int = 0) -> tuple[np.ndarray, float]:
  """(predicted classes of test_x, the chosen lambda): ridge on one-hot targets."""
  train_x = np.asarray(train_x, np.float64)
  mean, std = train_x.mean(0), train_x.std(0) + 1e-6
  scale = lambda x: (np.asarray(x, np.float64) - mean) / std
  x, y = scale(train_x), np.asarray(train_y)
  onehot = np.eye(num_classes)[y]
  perm = np.random.default_rng(seed).permutation(len(x))
  held, fit = perm[: max(len(x) // 10, 1)], perm[max(len(x) // 10, 1):]
  accuracy = {}
  for lam in grid:
    w, b = _ridge_fit(x[fit], onehot[fit], lam * len(fit))
    accuracy[lam] = float(np.mean(np.argmax(x[held] @ w + b, 1) == y[held]))
  best = max(grid, key=lambda lam: (accuracy[lam], lam))
  w, b = _ridge_fit(x, onehot, best * len(x))
  return np.argmax(scale(test_x) @ w + b, axis=1), best


def pool(tokens, how: str):
  """(..., N, d) tokens -> (..., d): the class token (index 0) or the mean over all tokens
  (numpy or jax arrays)."""
  from crate_jax.models import layers
  if layers.check_pool(how) == "cls":
    return tokens[..., 0, :]
  return tokens.mean(axis=-2)
