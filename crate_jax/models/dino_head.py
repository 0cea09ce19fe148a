"""Projection heads: DINO's for task="dino", SimDINO's for task="simdino" (their task modules put
them on the backbone).

Head (DINO paper's design and defaults): 3-layer MLP d -> 2048 -> 2048 -> 256 with GELU, the
256-d bottleneck l2-normalised, then a weight-normalised linear layer without bias to K prototypes,
W = g V / ||V|| per prototype with the gain g fixed to 1 (their `norm_last_layer`), so the
logits are cosines scaled by nothing: g_k(x) = <z / ||z||, v_k / ||v_k||>. Truncated-normal (0.02)
init, zero biases. The backbone's pooled, normalised class token (`pre_logits`) is the feature,
as in DINO (the CRATE classifier's `head` is unused by the loss).
"""
from __future__ import annotations

import flax.linen as nn
import jax.numpy as jnp


def l2_normalize(x, axis=-1, eps: float = 1e-12):
  """x / max(||x||, eps)."""
  return x / jnp.maximum(jnp.linalg.norm(x, axis=axis, keepdims=True), eps)


class WeightNormDense(nn.Module, kw_only=True):
  """y = x (V / ||V||_col), gain 1, no bias: each output is x's projection on a unit prototype."""
  features: int

  @nn.compact
  def __call__(self, x):
    v = self.param("kernel", nn.initializers.truncated_normal(0.02), (x.shape[-1], self.features),
                   jnp.float32)
    return x @ l2_normalize(v, axis=0).astype(x.dtype)


def projection_mlp(x, *, hidden_dim: int, bottleneck_dim: int, num_layers: int):
  """The heads' MLP in float32, called inside a compact module: num_layers Dense layers
  `mlp_0..` (GELU between, truncated-normal 0.02, zero biases) to bottleneck_dim."""
  x = x.astype(jnp.float32)
  dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.truncated_normal(0.02),
                                   bias_init=nn.initializers.zeros, name=name)
  for i in range(num_layers - 1):
    x = nn.gelu(dense(hidden_dim, f"mlp_{i}")(x), approximate=False)
  return dense(bottleneck_dim, f"mlp_{num_layers - 1}")(x)


class DINOHead(nn.Module, kw_only=True):
  """MLP (GELU) -> bottleneck -> l2-normalise -> weight-normalised prototypes (K logits)."""
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = projection_mlp(x, hidden_dim=self.hidden_dim, bottleneck_dim=self.bottleneck_dim,
                       num_layers=self.num_layers)
    return WeightNormDense(features=self.out_dim, name="prototypes")(l2_normalize(x))


class SimDINOHead(nn.Module, kw_only=True):
  """SimDINO's head: the same MLP to z_dim (2048 -> 2048 -> 256), then z / ||z||: the features
  the coding rate and the cosines are taken of; no prototypes (RobinWu218/SimDINO removes the
  weight-normalised last layer)."""
  z_dim: int = 256
  hidden_dim: int = 2048
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    return l2_normalize(projection_mlp(x, hidden_dim=self.hidden_dim, bottleneck_dim=self.z_dim,
                                       num_layers=self.num_layers))

