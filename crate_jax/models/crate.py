"""CRATE (Coding RAte reduction TransformEr) in Flax Linen, numerically equal to the official model.

One layer is one step on the sparse rate reduction objective:
  Z^{l+1/2} = Z^l + MSSA(LN(Z^l))                     (compression against subspaces U_[K])
  Z^{l+1}   = ReLU(x + eta * D^T (x - D x) - eta*lambda),  x = LN(Z^{l+1/2})   (one ISTA step)
There is no residual around ISTA, so every layer output is non-negative.
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


def mssa(z: jax.Array, U: jax.Array, w_out: jax.Array, b_out: jax.Array, *,
         return_weights: bool = False, implementation: str | None = None,
         causal: bool = False, memory=None, key_mask: jax.Array | None = None):
  """MSSA(z) = concat_k[softmax(w_k w_k^T / sqrt(p)) w_k] W_out + b_out, with w_k = z U_k.

  z: (B, N, d) already normalised; U: (d, K, p); w_out: (K, p, d); b_out: (d,).
  causal: token i attends to tokens j <= i only (CRATE-GPT). memory: w -> (keys, mask), the
  features attended to instead of w itself (a key-value cache: with q = k = v one array serves as
  both keys and values). Returns (output, w, attention weights or None), w = U^T z being the
  subspace features. The derivation's tied output is w_out = U^T (jnp.moveaxis(U, 0, -1)),
  b_out = 0: sum_k U_k softmax(.) w_k. key_mask (B, N) bool: False keys (padding) are never
  attended to.
  """
  w = jnp.einsum("bnd,dhp->bnhp", z, U)
  keys, mask = (w, None) if memory is None else memory(w)
  heads_out, weights = L.attention(w, keys, keys, return_weights=return_weights,
                                   implementation=implementation, causal=causal, mask=mask,
                                   key_mask=key_mask)
  out = jnp.einsum("bnhp,hpd->bnd", heads_out, w_out) + b_out
  return out, w, weights


def cached_features(module: nn.Module, w: jax.Array):
  """A key-value cache of the subspace features in `module`'s "cache" collection: (keys, mask).

  The first call (model.init with decode=True on (B, max_len) tokens) makes a zero cache
  (B, max_len, K, p) and attends causally over w itself; each later call writes the t new
  features at the cache index and lets new token i (absolute position index + i) attend to slots
  j <= index + i. Since MSSA ties q = k = v, one cache replaces the usual key and value caches.
  """
  ready = module.has_variable("cache", "features")
  cache = module.variable("cache", "features", jnp.zeros, w.shape, w.dtype)
  index = module.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
  if not ready:
    return w, jnp.tril(jnp.ones((w.shape[1], w.shape[1]), bool))
  t, size = w.shape[1], cache.value.shape[1]
  cache.value = jax.lax.dynamic_update_slice(cache.value, w.astype(cache.value.dtype),
                                             (0, index.value, 0, 0))
  mask = jnp.arange(size)[None, :] <= index.value + jnp.arange(t)[:, None]
  index.value = index.value + t
  return cache.value, mask


def ista(x: jax.Array, D: jax.Array, eta: float, lambd: float) -> jax.Array:
  """One non-negative ISTA step from z = x: ReLU(x + eta * D^T (x - D x) - eta * lambda).

  D has the official (d, d) orientation ("D x" is torch.nn.functional.linear(x, D) = x D^T in row
  form). Two matmuls instead of the official three: D^T x - D^T D x = D^T (x - D x).
  """
  residual = x - jnp.einsum("bnd,ed->bne", x, D)
  return jax.nn.relu(x + eta * jnp.einsum("bne,ed->bnd", residual, D) - eta * lambd)


class PatchEmbed(nn.Module, kw_only=True):
  """Flattened patches -> LayerNorm -> Linear -> LayerNorm (the official stem; no convolution)."""
  patch_size: int
  dim: int
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, images):
    x = L.patchify(images, self.patch_size)
    fan_in = x.shape[-1]
    x = L.layer_norm("patch_norm", self.dtype)(x)
    x = nn.Dense(features=self.dim, dtype=self.dtype, param_dtype=jnp.float32,
                 kernel_init=L.torch_linear_init(fan_in), bias_init=L.torch_linear_init(fan_in),
                 name="proj")(x)
    return L.layer_norm("embed_norm", self.dtype)(x)


MSSA_OUTPUTS = ("free", "tied")


class MSSA(nn.Module, kw_only=True):
  """Multi-head subspace self-attention with one tied bias-free projection U (q = k = v).

  init: "torch" (nn.Linear defaults, the classifier), "xavier" (xavier-uniform U and W_out,
  zero b_out, as CRATE-MAE initialises it) or "gpt" (the official CRATE-GPT / GPT-2:
  U ~ N(0, 0.02), W_out ~ N(0, 0.02 / sqrt(2 init_depth)), b_out = 0; init_depth = the model's
  depth). output: "free" (a learned W_out, b_out: the official model) or "tied" (the
  derivation's U_[K] itself, no bias: no out_kernel / out_bias parameters).
  """
  dim: int
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  init: str = "torch"
  causal: bool = False            # token i attends to j <= i (CRATE-GPT)
  decode: bool = False            # attend through a key-value cache (`cached_features`)
  output: str = "free"
  init_depth: int = 1             # "gpt" init: the number of layers L in 0.02 / sqrt(2 L)

  @nn.compact
  def __call__(self, z, return_weights: bool = False, key_mask=None):
    d, inner = self.dim, self.heads * self.dim_head
    if self.output not in MSSA_OUTPUTS:
      raise ValueError(f"mssa_output={self.output!r} is not one of {MSSA_OUTPUTS}")
    if self.init == "xavier":
      inits = (L.xavier_uniform_init(d, inner), L.xavier_uniform_init(inner, d),
               nn.initializers.zeros)
    elif self.init == "gpt":
      inits = (nn.initializers.normal(0.02),
               nn.initializers.normal(0.02 / (2 * self.init_depth) ** 0.5), nn.initializers.zeros)
    else:
      inits = (None, None, None)
    U = L.heads_kernel(self, "U", (d, self.heads, self.dim_head), d, inits[0])
    if self.output == "tied":
      z, U = L.cast(self.dtype, z, U)
      w_out, b_out = jnp.moveaxis(U, 0, -1), jnp.zeros((), z.dtype)
    else:
      w_out = L.heads_kernel(self, "out_kernel", (self.heads, self.dim_head, d), inner, inits[1])
      b_out = L.heads_kernel(self, "out_bias", (d,), inner, inits[2])
      z, U, w_out, b_out = L.cast(self.dtype, z, U, w_out, b_out)
    memory = (lambda w: cached_features(self, w)) if self.decode else None
    return mssa(z, U, w_out, b_out, return_weights=return_weights,
                implementation=self.attention_impl, causal=self.causal and not self.decode,
                memory=memory, key_mask=key_mask)


class ISTA(nn.Module, kw_only=True):
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


class CRATELayer(nn.Module, kw_only=True):
  """Pre-norm layer: z + MSSA(LN z), then ISTA(LN .) with no outer residual."""
  dim: int
  heads: int
  dim_head: int
  eta: float
  lambd: float
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  return_weights: bool = False
  mssa_init: str = "torch"        # MSSA.init: "torch", "xavier" or "gpt"
  mssa_init_depth: int = 1        # MSSA.init_depth ("gpt" init only)
  mssa_output: str = "free"       # or "tied": U itself projects back (MSSA.output)
  dropout: float = 0.0            # on the MSSA output (the official to_out Dropout; 0 there)
  deterministic: bool = True      # False while training: dropout and stochastic depth act
  causal: bool = False            # causal MSSA (CRATE-GPT)
  decode: bool = False            # MSSA through a key-value cache (generation)

  @nn.compact
  def __call__(self, z, drop_rate=None, key_mask=None):
    """drop_rate: stochastic depth of the MSSA residual branch (ISTA has no residual to drop);
    key_mask (B, N): False at padding tokens, which no token attends to."""
    z = L.batch_split(z)
    normed = L.layer_norm("norm_mssa", self.dtype)(z)
    attn_out, features, weights = MSSA(
        dim=self.dim, heads=self.heads, dim_head=self.dim_head, dtype=self.dtype,
        attention_impl=self.attention_impl, init=self.mssa_init, causal=self.causal,
        decode=self.decode, output=self.mssa_output, init_depth=self.mssa_init_depth,
        name="mssa")(
            normed, return_weights=self.return_weights, key_mask=key_mask)
    if self.dropout > 0:
      attn_out = nn.Dropout(rate=self.dropout)(attn_out, deterministic=self.deterministic)
    if drop_rate is not None and not self.deterministic:
      attn_out = L.drop_path(self, attn_out, drop_rate)
    z_half = L.batch_split(z + attn_out)
    codes = ISTA(dim=self.dim, eta=self.eta, lambd=self.lambd, dtype=self.dtype, name="ista")(
        L.layer_norm("norm_ista", self.dtype)(z_half))
    return codes, {"normed": normed, "features": features, "attention": weights, "mssa": z_half,
                   "codes": codes}


def layer_macs(n: int, d: int, inner: int) -> int:
  """Multiply-adds of one CRATE layer on n tokens: U and W_out (2 n d inner), the two-matmul ISTA
  (2 n d^2) and the attention w w^T, A w (2 n^2 inner)."""
  return n * (2 * d * inner + 2 * d * d) + 2 * n * n * inner


def crate_flops(*, image_size: int, patch_size: int, channels: int, dim: int, depth: int,
                  heads: int, dim_head: int, num_classes: int) -> float:
  """2 x MACs of one CRATE forward pass per image: stem Linear (n P^2 C d), layers, head (d C)."""
  g = image_size // patch_size
  stem = g * g * patch_size ** 2 * channels * dim
  layers = depth * layer_macs(g * g + 1, dim, heads * dim_head)
  return 2.0 * (stem + layers + dim * num_classes)


class CRATE(nn.Module, kw_only=True):
  """The CRATE classifier.

  `model.apply(variables, images)` returns logits for NHWC images. With
  `return_intermediates=True` it returns `(logits, out)` where `out` holds, stacked over layers
  (leading axis = layer):
    normed    (L, B, N, dim)              LN(Z^l), the input of each layer's MSSA
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
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the layers (params stacked: layer_scan/...)
  attention_impl: str | None = None
  drop_path_rate: float = 0.0     # stochastic depth, rising linearly to this at the last layer
  dropout: float = 0.0            # MSSA output dropout (official default 0)
  emb_dropout: float = 0.0        # dropout after the positional embedding (official default 0)
  interpolate_pos: bool = False   # other grids than image_size's: positions resized on the fly
  mssa_output: str = "free"       # "tied": MSSA projects back with U itself (the derivation)

  head_params: ClassVar[tuple[str, ...]] = ("head", "head_norm")
  layer_output_key: ClassVar[str] = "codes"  # each layer's output Z^{l+1} is its ISTA code
  contract: ClassVar[family.Contract] = family.Contract(whitebox=family.CRATE_WHITEBOX,
                                                        torch_layout=True)

  def embed(self, images):
    """Patch embedding, class token at index 0, learned positional embedding: (B, n+1, d).
    With interpolate_pos, images of another grid than image_size's get the table resized
    (bicubic, class row kept; posemb.resize_pos_embedding) inside the forward pass."""
    grid = L.patch_grid(self, images)
    x = PatchEmbed(patch_size=self.patch_size, dim=self.dim, dtype=self.dtype,
                   name="patch_embed")(images)
    init = nn.initializers.normal(1.0)
    return L.with_class_token(self, x, cls_name="cls_token", cls_init=init,
                              positions=L.learned_positions(self, grid, init))

  def pool_and_head(self, tokens):
    pooled = tokens[:, 0] if self.pool == "cls" else tokens.mean(axis=1)
    pre_logits = L.layer_norm("head_norm", self.dtype)(pooled)
    logits = nn.Dense(features=self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=L.torch_linear_init(self.dim),
                      bias_init=L.torch_linear_init(self.dim), name="head")(pre_logits)
    return logits.astype(L.at_least_f32(self.dtype)), pre_logits

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    L.check_pool(self.pool)
    if self.mssa_output not in MSSA_OUTPUTS:
      raise ValueError(f"mssa_output must be one of {MSSA_OUTPUTS}, got {self.mssa_output!r}")
    z = self.embed(jnp.asarray(images, self.dtype))
    if self.emb_dropout > 0:
      z = nn.Dropout(rate=self.emb_dropout)(z, deterministic=not train)
    z, out = L.layer_stack(
        CRATELayer, z, depth=self.depth, name="layer_{i}", remat=self.remat,
        scan=self.scan_layers, collect=return_intermediates, drop_path_rate=self.drop_path_rate,
        dim=self.dim, heads=self.heads, dim_head=self.dim_head, eta=self.eta, lambd=self.lambd,
        dtype=self.dtype, attention_impl=self.attention_impl,
        return_weights=return_intermediates, dropout=self.dropout, deterministic=not train,
        mssa_output=self.mssa_output)
    logits, pre_logits = self.pool_and_head(z)
    if not return_intermediates:
      return logits
    return logits, dict(out, tokens=z, pre_logits=pre_logits)

  @nn.nowrap
  def adapt_params(self, params: dict, abstract_params) -> dict:
    """Loaded top-level params fitted to this model: `pos_embedding` resized to its grid."""
    return posemb.fit_pos_embedding(params, abstract_params)

  @nn.nowrap
  def forward_flops(self) -> float:
    """Matmul FLOPs of one forward pass per image (see `crate_flops`)."""
    return crate_flops(image_size=self.image_size, patch_size=self.patch_size,
                         channels=self.channels, dim=self.dim, depth=self.depth, heads=self.heads,
                         dim_head=self.dim_head, num_classes=self.num_classes)
