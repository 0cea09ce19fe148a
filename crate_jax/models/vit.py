"""The ViT baseline (pre-norm, timm layout), with the same interface as `CRATE`.

One block: x <- x + MHSA(LN x), x <- x + MLP(LN x) with MLP(x) = W2 GELU(W1 x + b1) + b2 (hidden
4d) and MHSA(x) = concat_h[softmax(q_h k_h^T / sqrt(p)) v_h] W_o + b_o, q/k/v = x W_{q,k,v} + b.
LayerNorm eps 1e-6. Initialisation as timm: linear kernels truncated N(0, 0.02), zero biases.
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import family
from crate_jax.models import layers as L
from crate_jax.models import posemb

Dtype = Any
VIT_LN_EPS = 1e-6
_TRUNC = nn.initializers.truncated_normal(0.02)


def _dense(*, features, dtype, name, axis=-1):
  return nn.DenseGeneral(features=features, axis=axis, dtype=dtype, param_dtype=jnp.float32,
                         kernel_init=_TRUNC, bias_init=nn.initializers.zeros, name=name)


class MHSA(nn.Module, kw_only=True):
  """Multi-head self-attention: one fused q/k/v projection, kernel (d, 3, heads, p), with biases."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  causal: bool = False            # token i attends to j <= i (the GPT baseline)

  @nn.compact
  def __call__(self, x, return_weights: bool = False, key_mask=None):
    d = x.shape[-1]
    qkv = _dense(features=(3, self.heads, self.dim_head), dtype=self.dtype, name="qkv")(x)
    q, k, v = qkv[:, :, 0], qkv[:, :, 1], qkv[:, :, 2]
    out, weights = L.attention(q, k, v, return_weights=return_weights,
                               implementation=self.attention_impl, causal=self.causal,
                               key_mask=key_mask)
    return _dense(features=d, dtype=self.dtype, name="proj", axis=(-2, -1))(out), weights


class MLP(nn.Module, kw_only=True):
  """W2 GELU(W1 x + b1) + b2 with hidden width mlp_ratio * d (exact, erf GELU)."""
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    h = _dense(features=self.mlp_ratio * d, dtype=self.dtype, name="fc1")(x)
    h = jax.nn.gelu(h, approximate=False)
    return _dense(features=d, dtype=self.dtype, name="fc2")(h)


class ViTBlock(nn.Module, kw_only=True):
  """x + MHSA(LN x), then x + MLP(LN x)."""
  heads: int
  dim_head: int
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  return_weights: bool = False
  dropout: float = 0.0            # on both branch outputs (timm's proj_drop / drop)
  deterministic: bool = True      # False while training: dropout and stochastic depth act
  causal: bool = False            # causal self-attention (the GPT baseline)

  @nn.compact
  def __call__(self, x, drop_rate=None, key_mask=None):
    """drop_rate: stochastic depth of both residual branches (timm's DropPath); key_mask (B, N):
    False at padding tokens, which no token attends to."""
    def branch(y):
      return L.residual_branch(self, y, dropout=self.dropout, deterministic=self.deterministic,
                               drop_rate=drop_rate)
    x = L.batch_split(x)
    attn, weights = MHSA(heads=self.heads, dim_head=self.dim_head, dtype=self.dtype,
                         attention_impl=self.attention_impl, causal=self.causal, name="attn")(
        L.layer_norm("norm1", self.dtype, VIT_LN_EPS)(x), return_weights=self.return_weights,
        key_mask=key_mask)
    x = L.batch_split(x + branch(attn))
    x = x + branch(MLP(mlp_ratio=self.mlp_ratio, dtype=self.dtype, name="mlp")(
        L.layer_norm("norm2", self.dtype, VIT_LN_EPS)(x)))
    return x, {"attention": weights, "blocks": x}


class ViT(nn.Module, kw_only=True):
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
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the blocks (block_scan/...)
  attention_impl: str | None = None
  drop_path_rate: float = 0.0     # stochastic depth, rising linearly to this at the last block
  dropout: float = 0.0
  interpolate_pos: bool = False   # other grids than image_size's: positions resized on the fly

  head_params: ClassVar[tuple[str, ...]] = ("head",)
  # torch_layout: timm's VisionTransformer (crate_jax.interop.vit_keys)
  contract: ClassVar[family.Contract] = family.Contract(whitebox=frozenset({"attention"}),
                                                        torch_layout=True)

  def embed(self, images):
    """Conv p x p / stride p (with bias), class token at index 0, learned positions: (B, n+1, d).
    With interpolate_pos, another grid gets the positions resized (L.learned_positions)."""
    grid = L.patch_grid(self, images)
    n = grid[0] * grid[1]
    p = self.patch_size
    fan_in = p * p * self.channels
    x = nn.Conv(features=self.dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32, kernel_init=L.torch_linear_init(fan_in),
                bias_init=L.torch_linear_init(fan_in), name="patch_embed")(images)
    x = x.reshape(x.shape[0], n, self.dim)
    return L.with_class_token(self, x, cls_name="cls_token",
                              cls_init=nn.initializers.normal(1e-6),
                              positions=L.learned_positions(self, grid, _TRUNC))

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    L.check_pool(self.pool)
    x = self.embed(jnp.asarray(images, self.dtype))
    x, out = L.layer_stack(
        ViTBlock, x, depth=self.depth, name="block_{i}", remat=self.remat,
        scan=self.scan_layers, collect=return_intermediates, drop_path_rate=self.drop_path_rate,
        heads=self.heads, dim_head=self.dim_head, mlp_ratio=self.mlp_ratio, dtype=self.dtype,
        attention_impl=self.attention_impl, return_weights=return_intermediates,
        dropout=self.dropout, deterministic=not train)
    normed = L.layer_norm("norm", self.dtype, VIT_LN_EPS)(x)
    pre_logits = normed[:, 0] if self.pool == "cls" else normed[:, 1:].mean(axis=1)
    logits = _dense(features=self.num_classes, dtype=self.dtype, name="head")(pre_logits)
    logits = logits.astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    return logits, dict(out, tokens=x, pre_logits=pre_logits)

  @nn.nowrap
  def adapt_params(self, params: dict, abstract_params) -> dict:
    """Loaded top-level params fitted to this model: `pos_embedding` resized to its grid."""
    return posemb.fit_pos_embedding(params, abstract_params)

  @nn.nowrap
  def forward_flops(self) -> float:
    """Matmul FLOPs of one forward pass per image (see `vit_flops`)."""
    return vit_flops(image_size=self.image_size, patch_size=self.patch_size,
                     channels=self.channels, dim=self.dim, depth=self.depth, heads=self.heads,
                     dim_head=self.dim_head, mlp_ratio=self.mlp_ratio,
                     num_classes=self.num_classes)


def vit_flops(*, image_size: int, patch_size: int, channels: int, dim: int, depth: int,
              heads: int, dim_head: int, mlp_ratio: int, num_classes: int) -> float:
  """2 x MACs of one ViT forward pass per image: the conv stem (n P^2 C d); per block on N = n+1
  tokens q/k/v (3 N d inner), proj (N inner d), attention (2 N^2 inner), MLP (2 N d r d); head."""
  g = image_size // patch_size
  n, inner = g * g + 1, heads * dim_head
  block = 4 * n * dim * inner + 2 * n * n * inner + 2 * n * dim * mlp_ratio * dim
  stem = g * g * patch_size ** 2 * channels * dim
  return 2.0 * (stem + depth * block + dim * num_classes)


# name -> (dim, depth, heads), patch 16, dim_head 64.
VIT_SIZES = {"tiny": (192, 12, 3), "small": (384, 12, 6), "base": (768, 12, 12),
             "large": (1024, 24, 16)}
