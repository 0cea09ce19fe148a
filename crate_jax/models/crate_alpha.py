"""CRATE-alpha (UCSC-VLAA/CRATE-alpha): CRATE with an overcomplete, decoupled, residual ISTA block.

One block (pre-norm, LayerNorm eps 1e-6):
  x <- x + MSSA(LN x)                      tied q = k = v projection U, output W_out, no biases
  x <- x + ISTA_alpha(LN x) = x + D1 z_K   z_K: K non-negative ISTA steps on D from z_0 = 0
with D, D1 in R^{d x r d} (r = 4, "overcomplete"), eta = lambda = 0.1 and K = 2 in the released
models:  z_1 = ReLU(eta D^T x - eta lambda),
          z_{k+1} = ReLU(z_k - eta D^T (D z_k - x) - eta lambda).
Unlike CRATE there is a residual around the sparse-coding step and the code is decoded by a second
dictionary D1. The parameter tree mirrors the official big_vision names (`embedding`, `cls`,
`pos_embedding`, `Transformer/encoderblock_{i}/...`, `encoder_norm`, `head`).
"""
from __future__ import annotations

from typing import Any, Callable, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import family
from crate_jax.models import layers as L
from crate_jax.models import posemb
from crate_jax.models.crate import mssa

Dtype = Any
ALPHA_LN_EPS = 1e-6  # Flax's LayerNorm default, used by the official model


def ista_alpha(x: jax.Array, D: jax.Array, D1: jax.Array, *, eta: float, lambd: float,
               num_steps: int):
  """ISTA_alpha(x) = D1 z_K, z_K = `overcomplete_ista(x, D)` from z_0 = 0; returns (D1 z_K, z_K).

  Special cases (tested): K = 1 gives D1 ReLU(eta D^T x - eta lambda); with lambda = 0, D = D1
  square orthogonal and D^T x >= 0, z_K = (1 - (1 - eta)^K) D^T x, so the output is
  (1 - (1 - eta)^K) x (= eta x for K = 1); D1 = 0 gives 0, i.e. the block is attention only.
  """
  z = L.overcomplete_ista(x, D, eta=eta, lambd=lambd, num_steps=num_steps)
  return jnp.einsum("...m,dm->...d", z, D1), z


class _Kernel(nn.Module, kw_only=True):
  """A lone `kernel` parameter (so the tree reads `proj/kernel`, `out/kernel` as in big_vision)."""
  shape: tuple[int, ...]
  init: Callable = nn.initializers.normal(0.02)

  @nn.compact
  def __call__(self):
    return self.param("kernel", self.init, self.shape, jnp.float32)


class SubspaceAttention(nn.Module, kw_only=True):
  """MSSA_alpha(z) = concat_k[softmax(w_k w_k^T / sqrt(p)) w_k] W_out with w_k = z U_k; no biases.

  The same tied-qkv maths as CRATE's `mssa` (called with a zero output bias); kernels N(0, 0.02).
  """
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, z, return_weights: bool = False):
    d = z.shape[-1]
    U = _Kernel(shape=(d, self.heads, self.dim_head), name="proj")()
    w_out = _Kernel(shape=(self.heads, self.dim_head, d), name="out")()
    z, U, w_out = L.cast(self.dtype, z, U, w_out)
    return mssa(z, U, w_out, jnp.zeros((), z.dtype), return_weights=return_weights,
                implementation=self.attention_impl)


class OvercompleteISTA(nn.Module, kw_only=True):
  """ISTA_alpha with learned D, D1 of shape (d, ratio * d), both kaiming-uniform U(+-sqrt(6/d))."""
  ratio: int = 4
  num_steps: int = 2
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    shape = (d, self.ratio * d)
    D = self.param("D", L.kaiming_uniform_init(d), shape, jnp.float32)
    D1 = self.param("D1", L.kaiming_uniform_init(d), shape, jnp.float32)
    x, D, D1 = L.cast(self.dtype, x, D, D1)
    return ista_alpha(x, D, D1, eta=self.eta, lambd=self.lambd, num_steps=self.num_steps)


class CRATEAlphaLayer(nn.Module, kw_only=True):
  """x + MSSA_alpha(LN x), then x + ISTA_alpha(LN x); with D1 = 0 only x + MSSA_alpha(LN x)."""
  heads: int
  dim_head: int
  ratio: int = 4
  num_steps: int = 2
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None
  return_weights: bool = False
  deterministic: bool = True      # False while training: stochastic depth acts

  @nn.compact
  def __call__(self, x, drop_rate=None):
    """drop_rate: stochastic depth of both residual branches (big_vision's DropPath)."""
    drop = ((lambda y: L.drop_path(self, y, drop_rate))
            if drop_rate is not None and not self.deterministic else (lambda y: y))
    x = L.batch_split(x)
    normed = L.layer_norm("LayerNorm_0", self.dtype, ALPHA_LN_EPS)(x)
    attn, features, weights = SubspaceAttention(
        heads=self.heads, dim_head=self.dim_head, dtype=self.dtype,
        attention_impl=self.attention_impl, name="MultiHeadDotProductSubspaceAttention_0")(
            normed, return_weights=self.return_weights)
    x_half = L.batch_split(x + drop(attn))
    decoded, codes = OvercompleteISTA(
        ratio=self.ratio, num_steps=self.num_steps, eta=self.eta, lambd=self.lambd,
        dtype=self.dtype, name="OvercompleteISTABlock_0")(
            L.layer_norm("LayerNorm_1", self.dtype, ALPHA_LN_EPS)(x_half))
    out = x_half + drop(decoded)
    return out, {"normed": normed, "features": features, "attention": weights, "mssa": x_half,
                 "codes": codes, "blocks": out}


class _Encoder(nn.Module, kw_only=True):
  """The stack of CRATE-alpha blocks (named `Transformer` in the parent, as in big_vision)."""
  depth: int
  heads: int
  dim_head: int
  ratio: int
  num_steps: int
  eta: float
  lambd: float
  dtype: Dtype
  remat: bool | str
  scan: bool
  attention_impl: str | None
  collect: bool
  drop_path_rate: float
  deterministic: bool

  @nn.compact
  def __call__(self, x):
    return L.layer_stack(
        CRATEAlphaLayer, x, depth=self.depth, name="encoderblock_{i}", remat=self.remat,
        scan=self.scan, collect=self.collect, drop_path_rate=self.drop_path_rate,
        heads=self.heads, dim_head=self.dim_head, ratio=self.ratio, num_steps=self.num_steps,
        eta=self.eta, lambd=self.lambd, dtype=self.dtype, attention_impl=self.attention_impl,
        return_weights=self.collect, deterministic=self.deterministic)


def alpha_flops(*, image_size: int, patch_size: int, channels: int, dim: int, depth: int,
                heads: int, dim_head: int, ratio: int, num_ista_steps: int,
                num_classes: int) -> float:
  """2 x MACs of one CRATE-alpha forward pass per image, as the code multiplies: the conv stem
  (n P^2 C d); per block on N = n+1 tokens U and W_out (2 N d inner), the attention (2 N^2 inner)
  and the K ISTA steps with D, D1 (d x m, m = ratio d): D^T x once, 2 matmuls per step after the
  first (which starts from z_0 = 0), D1 z once, so 2 K N d m; the head (d C)."""
  g = image_size // patch_size
  n, inner, m = g * g + 1, heads * dim_head, ratio * dim
  block = 2 * n * dim * inner + 2 * n * n * inner + 2 * num_ista_steps * n * dim * m
  stem = g * g * patch_size ** 2 * channels * dim
  return 2.0 * (stem + depth * block + dim * num_classes)


class CRATEAlpha(nn.Module, kw_only=True):
  """The CRATE-alpha classifier: conv patch stem, class token, learned positions, blocks, LN, head.

  Same interface as `CRATE`: `apply(variables, images)` gives logits for NHWC images, and with
  `return_intermediates=True` `(logits, out)` where out holds, stacked over layers:
    normed (L, B, N, d) = LN(x), the attention's input, features (L, B, N, heads, dim_head),
    attention (L, B, heads, N, N), mssa (L, B, N, d) = x after the attention residual,
    codes (L, B, N, ratio*d) = the sparse codes z_K, blocks (L, B, N, d),
  plus tokens (B, N, d) = last block output and pre_logits (B, d) = LN(tokens)[:, 0].
  """
  num_classes: int = 1000
  image_size: int = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  channels: int = 3
  ratio: int = 4
  num_ista_steps: int = 2
  eta: float = 0.1
  lambd: float = 0.1
  dtype: Dtype = jnp.float32
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the blocks (Transformer/encoderblock_scan)
  attention_impl: str | None = None
  drop_path_rate: float = 0.0     # stochastic depth, rising linearly to this at the last block
  interpolate_pos: bool = False   # other grids than image_size's: positions resized on the fly

  head_params: ClassVar[tuple[str, ...]] = ("head",)
  contract: ClassVar[family.Contract] = family.Contract(whitebox=family.CRATE_WHITEBOX,
                                                        torch_layout=True)

  def embed(self, images):
    """Conv p x p / stride p (with bias), class token at index 0, learned positions: (B, n+1, d).
    With interpolate_pos, another grid gets the positions resized (L.learned_positions)."""
    grid = L.patch_grid(self, images)
    n = grid[0] * grid[1]
    p = self.patch_size
    x = nn.Conv(features=self.dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=nn.initializers.kaiming_uniform(), bias_init=nn.initializers.zeros,
                name="embedding")(images)
    x = x.reshape(x.shape[0], n, self.dim)
    return L.with_class_token(self, x, cls_name="cls", cls_init=nn.initializers.normal(1e-6),
                              positions=L.learned_positions(self, grid,
                                                            nn.initializers.normal(0.02)))

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    x = self.embed(jnp.asarray(images, self.dtype))
    tokens, out = _Encoder(
        depth=self.depth, heads=self.heads, dim_head=self.dim_head, ratio=self.ratio,
        num_steps=self.num_ista_steps, eta=self.eta, lambd=self.lambd, dtype=self.dtype,
        remat=self.remat, scan=self.scan_layers, attention_impl=self.attention_impl,
        collect=return_intermediates, drop_path_rate=self.drop_path_rate,
        deterministic=not train, name="Transformer")(x)
    pre_logits = L.layer_norm("encoder_norm", self.dtype, ALPHA_LN_EPS)(tokens)[:, 0]
    logits = nn.Dense(features=self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.normal(0.02), bias_init=nn.initializers.zeros,
                      name="head")(pre_logits).astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    return logits, dict(out, tokens=tokens, pre_logits=pre_logits)

  @nn.nowrap
  def adapt_params(self, params: dict, abstract_params) -> dict:
    """Loaded top-level params fitted to this model: the conv stem's kernel resized to its patch
    size (pre-training with /32 and fine-tuning with /16, say) and `pos_embedding` to its grid."""
    return posemb.fit_pos_embedding(posemb.fit_patch_kernel(params, abstract_params),
                                    abstract_params)

  @nn.nowrap
  def forward_flops(self) -> float:
    """Matmul FLOPs of one forward pass per image (see `alpha_flops`)."""
    return alpha_flops(image_size=self.image_size, patch_size=self.patch_size,
                       channels=self.channels, dim=self.dim, depth=self.depth, heads=self.heads,
                       dim_head=self.dim_head, ratio=self.ratio,
                       num_ista_steps=self.num_ista_steps, num_classes=self.num_classes)


# name -> (dim, depth, heads); the official `decode_variant` table (dim_head = dim / heads).
ALPHA_SIZES = {"tiny": (192, 12, 3), "small": (576, 12, 12), "base": (768, 12, 12),
               "large": (1024, 24, 16), "huge": (1280, 32, 16)}
# Registered short names crate_alpha_{letter}{patch}; the letter picks the size.
ALPHA_VARIANTS = {"t": ("tiny", (16,)), "s": ("small", (16, 32)), "b": ("base", (8, 16, 32)),
                  "l": ("large", (8, 14, 16, 32)), "h": ("huge", (14,))}


def alpha_kwargs(size: str, patch: int) -> dict[str, Any]:
  """Constructor arguments of CRATE-alpha-{size}/{patch}."""
  dim, depth, heads = ALPHA_SIZES[size]
  return dict(patch_size=patch, dim=dim, depth=depth, heads=heads, dim_head=dim // heads)
