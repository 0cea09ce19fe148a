"""DINO projection head for task="dino" (crate_jax.training.tasks.dino puts it on the backbone).

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


class DINOHead(nn.Module, kw_only=True):
  """MLP (GELU) -> bottleneck -> l2-normalise -> weight-normalised prototypes (K logits)."""
  out_dim: int = 65536
  hidden_dim: int = 2048
  bottleneck_dim: int = 256
  num_layers: int = 3

  @nn.compact
  def __call__(self, x):
    x = x.astype(jnp.float32)
    dense = lambda n, name: nn.Dense(n, kernel_init=nn.initializers.truncated_normal(0.02),
                                     bias_init=nn.initializers.zeros, name=name)
    for i in range(self.num_layers - 1):
      x = nn.gelu(dense(self.hidden_dim, f"mlp_{i}")(x), approximate=False)
    x = dense(self.bottleneck_dim, f"mlp_{self.num_layers - 1}")(x)
    return WeightNormDense(features=self.out_dim, name="prototypes")(l2_normalize(x))

