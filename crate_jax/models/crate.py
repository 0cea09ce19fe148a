"""CRATE (Coding RAte reduction TransformEr) in Flax Linen, numerically equal to the official model.

One layer is one step on the sparse rate reduction objective:
  Z^{l+1/2} = Z^l + MSSA(LN(Z^l))                     (compression against subspaces U_[K])
  Z^{l+1}   = ReLU(x + eta * D^T (x - D x) - eta*lambda),  x = LN(Z^{l+1/2})   (one ISTA step)
There is no residual around ISTA, so every layer output is non-negative.
"""
from __future__ import annotations

from typing import Any

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import layers as L

Dtype = Any


def mssa(z: jax.Array, U: jax.Array, w_out: jax.Array, b_out: jax.Array, *,
         return_weights: bool = False, implementation: str | None = None):
  """MSSA(z) = concat_k[softmax(w_k w_k^T / sqrt(p)) w_k] W_out + b_out, with w_k = z U_k.

  z: (B, N, d) already normalised; U: (d, K, p); w_out: (K, p, d); b_out: (d,).
  Returns (output, w, attention weights or None), w = U^T z being the subspace features.
  """
  w = jnp.einsum("bnd,dhp->bnhp", z, U)
  heads_out, weights = L.subspace_attention(w, return_weights=return_weights,
                                            implementation=implementation)
  out = jnp.einsum("bnhp,hpd->bnd", heads_out, w_out) + b_out
  return out, w, weights


def ista(x: jax.Array, D: jax.Array, eta: float, lambd: float) -> jax.Array:
  """One non-negative ISTA step from z = x: ReLU(x + eta * D^T (x - D x) - eta * lambda).

  D has the official (d, d) orientation ("D x" is torch.nn.functional.linear(x, D) = x D^T in row
  form). Two matmuls instead of the official three: D^T x - D^T D x = D^T (x - D x).
  """
  residual = x - jnp.einsum("bnd,ed->bne", x, D)
  return jax.nn.relu(x + eta * jnp.einsum("bne,ed->bnd", residual, D) - eta * lambd)


class PatchEmbed(nn.Module):
  """Flattened patches -> LayerNorm -> Linear -> LayerNorm (the official stem; no convolution)."""
  patch_size: int
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = L.patchify(images, self.patch_size)
    fan_in = x.shape[-1]
    x = L.layer_norm("patch_norm", self.dtype)(x)
    x = nn.Dense(self.dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=L.torch_linear_init(fan_in), bias_init=L.torch_linear_init(fan_in),
                 name="proj")(x)
    return L.layer_norm("embed_norm", self.dtype)(x)


class MSSA(nn.Module):
  """Multi-head subspace self-attention with one tied bias-free projection U (q = k = v).

  init: "torch" (nn.Linear defaults, the classifier) or "xavier" (xavier-uniform U and W_out,
  zero b_out, as CRATE-MAE initialises it).
  """
  dim: int
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  init: str = "torch"

  @nn.compact
  def __call__(self, z, return_weights: bool = False):
    d, inner = self.dim, self.heads * self.dim_head
    if self.init == "xavier":
      inits = (L.xavier_uniform_init(d, inner), L.xavier_uniform_init(inner, d),
               nn.initializers.zeros)
    else:
      inits = (None, None, None)
    U = L.heads_kernel(self, "U", (d, self.heads, self.dim_head), d, inits[0])
    w_out = L.heads_kernel(self, "out_kernel", (self.heads, self.dim_head, d), inner, inits[1])
    b_out = L.heads_kernel(self, "out_bias", (d,), inner, inits[2])
    z, U, w_out, b_out = L.cast(self.dtype, z, U, w_out, b_out)
    return mssa(z, U, w_out, b_out, return_weights=return_weights,
                implementation=self.attention_impl)


class ISTA(nn.Module):
  """Sparsification by one ISTA step against a square dictionary D (d x d)."""
  dim: int
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    D = self.param("D", L.kaiming_uniform_init(self.dim), (self.dim, self.dim), jnp.float32)
    x, D = L.cast(self.dtype, x, D)
    return ista(x, D, self.eta, self.lambd)


class CRATELayer(nn.Module):
  """Pre-norm layer: z + MSSA(LN z), then ISTA(LN .) with no outer residual."""
  dim: int
  heads: int
  dim_head: int
  eta: float
  lambd: float
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  return_weights: bool = False
  mssa_init: str = "torch"

  @nn.compact
  def __call__(self, z):
    attn_out, features, weights = MSSA(self.dim, self.heads, self.dim_head, self.dtype,
                                       self.attention_impl, self.mssa_init, name="mssa")(
        L.layer_norm("norm_mssa", self.dtype)(z), self.return_weights)
    z_half = z + attn_out
    codes = ISTA(self.dim, self.eta, self.lambd, self.dtype, name="ista")(
        L.layer_norm("norm_ista", self.dtype)(z_half))
    return codes, {"features": features, "attention": weights, "mssa": z_half, "codes": codes}


class CRATE(nn.Module):
  """The CRATE classifier.

  `model.apply(variables, images)` returns logits for NHWC images. With
  `return_intermediates=True` it returns `(logits, out)` where `out` holds, stacked over layers
  (leading axis = layer):
    features  (L, B, N, heads, dim_head)  U^T LN(Z^l): the subspace projections MSSA compresses
    attention (L, B, heads, N, N)         softmax attention of each head
    mssa      (L, B, N, dim)              Z^{l+1/2}
    codes     (L, B, N, dim)              Z^{l+1}, the ISTA sparse codes (layer outputs, >= 0)
  plus `tokens` (B, N, dim) = last layer output and `pre_logits` (B, dim) = pooled, normalised.
  Token 0 is the class token.
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  dim: int = 384
  depth: int = 12
  heads: int = 6
  dim_head: int = 64
  channels: int = 3
  pool: str = "cls"
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool = False
  attention_impl: str | None = None

  def embed(self, images):
    """Patch embedding, class token at index 0, learned positional embedding: (B, n+1, d)."""
    n = L.check_patch_count(images, self.image_size, self.patch_size, self.channels)
    x = PatchEmbed(self.patch_size, self.dim, self.dtype, name="patch_embed")(images)
    cls = self.param("cls_token", nn.initializers.normal(1.0), (1, 1, self.dim), jnp.float32)
    pos = self.param("pos_embedding", nn.initializers.normal(1.0), (1, n + 1, self.dim),
                     jnp.float32)
    cls = jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.dim))
    return jnp.concatenate([cls, x], axis=1) + pos.astype(x.dtype)

  def pool_and_head(self, tokens):
    pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
    pre_logits = L.layer_norm("head_norm", self.dtype)(pooled)
    logits = nn.Dense(self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=L.torch_linear_init(self.dim),
                      bias_init=L.torch_linear_init(self.dim), name="head")(pre_logits)
    return logits.astype(L.at_least_f32(self.dtype)), pre_logits

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    if self.pool not in ("cls", "mean"):
      raise ValueError(f"pool must be 'cls' or 'mean', got {self.pool!r}")
    z = self.embed(jnp.asarray(images, self.dtype))
    layer_cls = L.maybe_remat(CRATELayer, self.remat)
    per_layer = []
    for i in range(self.depth):
      z, inter = layer_cls(self.dim, self.heads, self.dim_head, self.eta, self.lambd, self.dtype,
                           self.attention_impl, return_intermediates, name=f"layer_{i}")(z)
      if return_intermediates:
        per_layer.append(inter)
    logits, pre_logits = self.pool_and_head(z)
    if not return_intermediates:
      return logits
    out = L.stack_layers(per_layer)
    out.update(tokens=z, pre_logits=pre_logits)
    return logits, out
