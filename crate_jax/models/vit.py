"""The ViT baseline (pre-norm, timm layout), with the same interface as `CRATE`.

One block: x <- x + MHSA(LN x), x <- x + MLP(LN x) with MLP(x) = W2 GELU(W1 x + b1) + b2 (hidden
4d) and MHSA(x) = concat_h[softmax(q_h k_h^T / sqrt(p)) v_h] W_o + b_o, q/k/v = x W_{q,k,v} + b.
LayerNorm eps 1e-6. Initialisation as timm: linear kernels truncated N(0, 0.02), zero biases.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import layers as L

Dtype = Any
VIT_LN_EPS = 1e-6
_TRUNC = nn.initializers.truncated_normal(0.02)


def _dense(features, dtype, name, axis=-1):
  return nn.DenseGeneral(features, axis=axis, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=_TRUNC, bias_init=nn.initializers.zeros, name=name)


class MHSA(nn.Module):
  """Multi-head self-attention: one fused q/k/v projection, kernel (d, 3, heads, p), with biases."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x, return_weights: bool = False):
    d = x.shape[-1]
    qkv = _dense((3, self.heads, self.dim_head), self.dtype, "qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out, weights = L.multihead_attention(q, k, v, return_weights=return_weights,
                                         implementation=self.attention_impl)
    return _dense(d, self.dtype, "proj", axis=(-2, -1))(out), weights


class MLP(nn.Module):
  """W2 GELU(W1 x + b1) + b2 with hidden width mlp_ratio * d (exact, erf GELU)."""
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = jax.nn.gelu(_dense(self.mlp_ratio * d, self.dtype, "fc1")(x), approximate=False)
    return _dense(d, self.dtype, "fc2")(h)


class ViTBlock(nn.Module):
  """x + MHSA(LN x), then x + MLP(LN x)."""
  heads: int
  dim_head: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  return_weights: bool = False

  @nn.compact
  def __call__(self, x):
    attn, weights = MHSA(self.heads, self.dim_head, self.dtype, self.attention_impl, name="attn")(
        L.layer_norm("norm1", self.dtype, VIT_LN_EPS)(x), self.return_weights)
    x = x + attn
    x = x + MLP(self.mlp_ratio, self.dtype, name="mlp")(
        L.layer_norm("norm2", self.dtype, VIT_LN_EPS)(x))
    return x, {"attention": weights, "blocks": x}


class ViT(nn.Module):
  """ViT classifier: conv patch embedding, cls token, learned positions, blocks, LN, head.

  `apply(variables, images)` gives logits for NHWC images; with `return_intermediates=True` it gives
  `(logits, out)` with attention (L, B, heads, N, N), blocks (L, B, N, d) (each block's output),
  tokens (B, N, d) = last block output and pre_logits (B, d) = LN(tokens)[:, 0] (or the mean).
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  mlp_ratio: int = 4
  channels: int = 3
  pool: str = "cls"
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  def embed(self, images):
    """Conv p x p / stride p (with bias), class token at index 0, learned positions: (B, n+1, d)."""
    n = L.check_patch_count(images, self.image_size, self.patch_size, self.channels)
    p = self.patch_size
    fan_in = p * p * self.channels
    x = nn.Conv(self.dim, (p, p), strides=(p, p), padding="VALID", dtype=self.dtype,
                param_dtype=jnp.float32, kernel_init=L.torch_linear_init(fan_in),
                bias_init=L.torch_linear_init(fan_in), name="patch_embed")(images)
    x = x.reshape(x.shape[0], n, self.dim)
    cls = self.param("cls_token", nn.initializers.normal(1e-6), (1, 1, self.dim), jnp.float32)
    pos = self.param("pos_embedding", _TRUNC, (1, n + 1, self.dim), jnp.float32)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.dim))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
    x = self.embed(jnp.asarray(images, self.dtype))
    block_cls = L.maybe_remat(ViTBlock, self.remat)
    per_layer = []
    for i in range(self.depth):
      x, inter = block_cls(self.heads, self.dim_head, self.mlp_ratio, self.dtype,
                           self.attention_impl, return_intermediates, name=f"block_{i}")(x)
      per_layer.append(inter)
    normed = L.layer_norm("norm", self.dtype, VIT_LN_EPS)(x)
    pre_logits = normed[:, 0] if self.pool == "cls" else normed[:, 1:].mean(axis=1)
    logits = _dense(self.num_classes, self.dtype, "head")(pre_logits).astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    out = L.stack_layers(per_layer)
    out.update(tokens=x, pre_logits=pre_logits)
    return logits, out


# name -> (dim, depth, heads), patch 16, dim_head 64.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
             "large": (1024, 24, 16)}
