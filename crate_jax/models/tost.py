"""ToST (Token Statistics Transformer, ICLR 2025) for images, numerically equal to the official
model (RobinWu218/ToST, tost_vision/tost.py: XCiT's class-attention scaffold around TSSA).

  Z^0      = ConvStem(x) + Fourier(grid)                      (B, N, d), no class token yet
  Z^{l+1}  = Y + g2_l * MLP(LN(Y)),  Y = Z^l + g1_l * TSSA(LN(Z^l))   (LayerScale g, init eta)
  [c; Z]   -> 2 class-attention blocks (CaiT: only the class token queries)
  logits   = W LN(c) + b

TSSA (`tssa.tssa`) is the compression step of a variational coding rate: per-group second
moments of the tokens, cost O(N d) beyond its projections (no N x N matrix). The stem is 3 or 4
3x3 stride-2 convolutions with batch norm (patch 8 or 16); the batch-norm running statistics
are the model's state (`family.STATE`), updated in train mode, used in eval mode. The positions
are computed for whatever grid the stem gives: any image size works.

Where each choice comes from. The official file: the stem (bias-free convs, SyncBatchNorm with
PyTorch's momentum 0.1, eps 1e-5 and unbiased running variance; GELU between), the DETR-style
Fourier positions (32 frequencies, temperature 10,000, positions in (0, 2 pi], sin/cos
interleaved, y then x, a 1x1 conv to d), TSSA with one biased projection, `temp` ones, LayerNorm
eps 1e-6, LayerScale eta (1.0 at depth 12, 1e-5 at depth 24), a constant drop-path rate in every
TSSA block and none in the class-attention blocks, the class-attention blocks with
`tokens_norm=True` (their patch tokens leave as 2 LN(Z + g1 LN(Z)), as the official code computes
them; only the class token is read), timm's init (Linear trunc-normal 0.02, zero biases; conv
layers PyTorch's default) and the registered sizes. Ours: the NHWC layout, the intermediates.
"""
from __future__ import annotations

import math
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models import family
from crate_jax.models import layers as L
from crate_jax.models.tssa import causal_tssa, tssa

Dtype = Any
LN_EPS = 1e-6
BN_EPS, BN_MOMENTUM = 1e-5, 0.1       # PyTorch's BatchNorm defaults
STEM_WIDTHS = {16: (8, 4, 2, 1), 8: (4, 2, 1)}   # stem channels: dim // each
FOURIER_DIM, FOURIER_TEMPERATURE = 32, 10_000.0
_TRUNC = nn.initializers.truncated_normal(0.02)
_ZEROS = nn.initializers.zeros


def check_patch_size(patch_size: int) -> int:
  """The convolutional stem exists for patch 8 and 16 only (the official code's two)."""
  if patch_size not in STEM_WIDTHS:
    raise ValueError(f"patch_size={patch_size}: ToST's convolutional patch embedding supports "
                     f"patch sizes {sorted(STEM_WIDTHS)} only")
  return patch_size


def stem_grid(size: int, patch_size: int) -> int:
  """Tokens along one side after the stem: each 3x3 stride-2 conv (padding 1) maps n to
  ceil(n / 2); 224 px -> 14 at patch 16, 28 at patch 8."""
  for _ in STEM_WIDTHS[check_patch_size(patch_size)]:
    size = -(-size // 2)
  return size


def fourier_positions(grid_h: int, grid_w: int, hidden: int = FOURIER_DIM,
                      temperature: float = FOURIER_TEMPERATURE) -> np.ndarray:
  """(grid_h * grid_w, 2 hidden) features of each patch position, row-major (DETR's sine
  encoding): y_i = 2 pi i / (H + 1e-6) for rows i = 1..H (x likewise),
  w_j = T^(2 floor(j/2) / hidden), [sin(y / w_0), cos(y / w_1), sin(y / w_2), ...] for y, then
  the same for x."""
  def encode(pos):                                        # (n,) -> (n, hidden)
    freq = temperature ** (2 * (np.arange(hidden) // 2) / hidden)
    angle = pos[:, None] / freq
    return np.stack([np.sin(angle[:, 0::2]), np.cos(angle[:, 1::2])], axis=-1).reshape(
        len(pos), hidden)
  eps, scale = 1e-6, 2 * math.pi
  ys = np.arange(1, grid_h + 1, dtype=np.float64) / (grid_h + eps) * scale
  xs = np.arange(1, grid_w + 1, dtype=np.float64) / (grid_w + eps) * scale
  fy, fx = encode(ys), encode(xs)
  table = np.concatenate([np.repeat(fy[:, None], grid_w, 1), np.repeat(fx[None], grid_h, 0)], -1)
  return table.reshape(grid_h * grid_w, 2 * hidden).astype(np.float32)


class BatchNorm(nn.Module, kw_only=True):
  """PyTorch's BatchNorm2d on NHWC: train mode normalises with the batch's mean and (biased)
  variance over (B, H, W), and, when the state is mutable, updates running <- (1 - m) running +
  m batch (the variance's unbiased estimate), m = 0.1; eval mode normalises with the running
  statistics. Under jit over a mesh the batch statistics are the global batch's (SyncBatchNorm).
  Statistics in float32 at least."""
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    c = x.shape[-1]
    f = L.at_least_f32(x.dtype)
    scale = self.param("scale", nn.initializers.ones, (c,), jnp.float32)
    bias = self.param("bias", _ZEROS, (c,), jnp.float32)
    mean = self.variable(family.STATE, "mean", lambda: jnp.zeros((c,), jnp.float32))
    var = self.variable(family.STATE, "var", lambda: jnp.ones((c,), jnp.float32))
    y = x.astype(f)
    if train:
      mu = jnp.mean(y, axis=(0, 1, 2))
      sigma2 = jnp.mean(jnp.square(y - mu), axis=(0, 1, 2))
      if self.is_mutable_collection(family.STATE) and not self.is_initializing():
        n = y.size // c
        mean.value = (1 - BN_MOMENTUM) * mean.value + BN_MOMENTUM * mu.astype(mean.value.dtype)
        var.value = (1 - BN_MOMENTUM) * var.value + BN_MOMENTUM * (
            sigma2 * n / max(n - 1, 1)).astype(var.value.dtype)
    else:
      mu, sigma2 = mean.value.astype(f), var.value.astype(f)
    y = (y - mu) * jax.lax.rsqrt(sigma2 + BN_EPS) * scale.astype(f) + bias.astype(f)
    return y.astype(self.dtype)


class ConvStem(nn.Module, kw_only=True):
  """ConvPatchEmbed: 3x3 stride-2 convs (no bias) each with batch norm, GELU between them;
  channels dim/8, dim/4, dim/2, dim (patch 16) or dim/4, dim/2, dim (patch 8). (B, H, W, C) ->
  (B, h, w, dim)."""
  dim: int
  patch_size: int = 16
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x, *, train: bool):
    widths = STEM_WIDTHS[check_patch_size(self.patch_size)]
    for i, div in enumerate(widths):
      fan_in = 9 * x.shape[-1]
      x = nn.Conv(features=self.dim // div, kernel_size=(3, 3), strides=(2, 2),
                  padding=((1, 1), (1, 1)), use_bias=False, dtype=self.dtype,
                  param_dtype=jnp.float32, kernel_init=L.torch_linear_init(fan_in),
                  name=f"conv_{i}")(x)
      x = BatchNorm(dtype=self.dtype, name=f"bn_{i}")(x, train=train)
      if i < len(widths) - 1:
        x = jax.nn.gelu(x, approximate=False)
    return x


def kernel_inits(scheme: str, depth: int):
  """(into, out of) a residual branch's kernel initialisers: "timm" trunc-normal 0.02 both;
  "gpt" N(0, 0.02) in and N(0, 0.02 / sqrt(2 depth)) out (GPT-2's scaled residual init)."""
  if scheme == "gpt":
    return nn.initializers.normal(0.02), nn.initializers.normal(0.02 / math.sqrt(2 * depth))
  return _TRUNC, _TRUNC


class TSSA(nn.Module, kw_only=True):
  """Token statistics self-attention: w = U x + b (one (d, heads, d/heads) projection), the
  TSSA operator (`tssa.tssa`, or `tssa.causal_tssa` with a learned per-position `denom_bias`),
  then heads merged and W_o (+ b_o). Returns (out, w, Pi).

  init_scheme: "timm" (the vision model: trunc-normal 0.02, zero biases) or "gpt" (the language
  model: N(0, 0.02), W_o ~ N(0, 0.02 / sqrt(2 init_depth)), zero biases). (Not `init`: that
  would hide Module.init.)"""
  heads: int
  dtype: Dtype = jnp.float32
  causal: bool = False
  max_len: int = 1024             # causal: the rows of denom_bias (the position limit)
  use_bias: bool = True
  init_scheme: str = "timm"
  init_depth: int = 1
  decode: bool = False            # causal: continue from the running sums (`decode_step`)

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    if d % self.heads:
      raise ValueError(f"TSSA: width {d} is not divisible by heads={self.heads}")
    k_in, k_out = kernel_inits(self.init_scheme, self.init_depth)
    w = nn.DenseGeneral(features=(self.heads, d // self.heads), use_bias=self.use_bias,
                        dtype=self.dtype, param_dtype=jnp.float32, kernel_init=k_in,
                        bias_init=_ZEROS, name="qkv")(x)
    temp = self.param("temp", nn.initializers.ones, (self.heads,), jnp.float32)
    if self.causal:
      bias = self.param("denom_bias", _ZEROS, (self.heads, self.max_len), jnp.float32)
      if self.decode:
        out, pi = self.decode_step(w, temp, bias)
      else:
        out, pi = causal_tssa(w, temp, bias, return_memberships=True)
    else:
      out, pi = tssa(w, temp, return_memberships=True)
    out = nn.DenseGeneral(features=d, axis=(-2, -1), use_bias=self.use_bias, dtype=self.dtype,
                          param_dtype=jnp.float32, kernel_init=k_out, bias_init=_ZEROS,
                          name="proj")(out)
    return out, w, pi

  def decode_step(self, w, temp, bias):
    """causal_tssa through its running sums kept in the "cache" collection: a state of
    O(heads d) per sequence, whatever the length (no key-value cache). The first call
    (model.init with decode=True) makes the zero state; each later call continues from it."""
    b, _, h, p = w.shape
    f = L.at_least_f32(w.dtype)
    ready = self.has_variable("cache", "index")
    index = self.variable("cache", "index", lambda: jnp.zeros((), jnp.int32))
    energy = self.variable("cache", "energy", jnp.zeros, (b, h, p), f)
    weighted = self.variable("cache", "weighted", jnp.zeros, (b, h, p), f)
    mass = self.variable("cache", "mass", jnp.zeros, (b, h), f)
    if not ready:
      return causal_tssa(w, temp, bias, return_memberships=True)
    out, pi, (index.value, energy.value, weighted.value, mass.value) = causal_tssa(
        w, temp, bias, return_memberships=True,
        carry=(index.value, energy.value, weighted.value, mass.value))
    return out, pi


class MLP(nn.Module, kw_only=True):
  """W2 GELU(W1 x + b1) + b2, hidden mlp_ratio * d (exact GELU); init as `TSSA`'s."""
  mlp_ratio: int = 4
  dtype: Dtype = jnp.float32
  use_bias: bool = True
  init_scheme: str = "timm"
  init_depth: int = 1

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    k_in, k_out = kernel_inits(self.init_scheme, self.init_depth)
    dense = lambda n, k, name: nn.Dense(features=n, use_bias=self.use_bias, dtype=self.dtype,
                                        param_dtype=jnp.float32, kernel_init=k, bias_init=_ZEROS,
                                        name=name)
    return dense(d, k_out, "fc2")(jax.nn.gelu(dense(self.mlp_ratio * d, k_in, "fc1")(x),
                                              approximate=False))


class ToSTBlock(nn.Module, kw_only=True):
  """Z + g1 * TSSA(LN Z), then + g2 * MLP(LN .): LayerScale vectors g initialised to `eta`.
  The layer of both ToST models (vision: non-causal, LN eps 1e-6; language: causal, eps 1e-5).
  Intermediates: normed LN(Z) (B, N, d), features w (B, N, heads, d/heads), memberships Pi
  (B, N, heads), blocks (the output)."""
  heads: int
  mlp_ratio: int = 4
  eta: float = 1.0
  ln_eps: float = LN_EPS
  causal: bool = False
  max_len: int = 1024
  use_bias: bool = True
  init_scheme: str = "timm"
  init_depth: int = 1
  decode: bool = False
  dtype: Dtype = jnp.float32
  deterministic: bool = True
  dropout: float = 0.0
  attention_impl: str | None = None   # (layer_stack's common arguments; TSSA has no kernel choice)
  return_weights: bool = False

  @nn.compact
  def __call__(self, x, drop_rate=None):
    d = x.shape[-1]

    def branch(y, gamma_name):
      gamma = self.param(gamma_name, nn.initializers.constant(self.eta), (d,), jnp.float32)
      return L.residual_branch(self, y * gamma.astype(y.dtype), dropout=self.dropout,
                               deterministic=self.deterministic, drop_rate=drop_rate)

    x = L.batch_split(x)
    normed = L.layer_norm("norm1", self.dtype, self.ln_eps, self.use_bias)(x)
    attn, w, pi = TSSA(heads=self.heads, dtype=self.dtype, causal=self.causal,
                       max_len=self.max_len, use_bias=self.use_bias, init_scheme=self.init_scheme,
                       init_depth=self.init_depth, decode=self.decode, name="attn")(normed)
    x = L.batch_split(x + branch(attn, "gamma1"))
    h = L.layer_norm("norm2", self.dtype, self.ln_eps, self.use_bias)(x)
    mlp = MLP(mlp_ratio=self.mlp_ratio, dtype=self.dtype, use_bias=self.use_bias,
              init_scheme=self.init_scheme, init_depth=self.init_depth, name="mlp")
    x = x + branch(mlp(h), "gamma2")
    return x, {"normed": normed, "features": w, "memberships": pi, "blocks": x}


class ClassAttentionBlock(nn.Module, kw_only=True):
  """CaiT's class attention with XCiT's tokens_norm=True, as the official code computes it:

    A = [softmax(q_c K^T / sqrt(p)) V W_o + b_o ; LN1(X)_{1:}]      (q_c: the class token's query)
    Y = LN2(X + g1 A);   out = Y + [g2 MLP(Y_c) ; Y_{1:}]

  X (B, 1 + N, d) with the class token first. Returns (out, class-token attention (B, h, N+1))."""
  heads: int
  mlp_ratio: int = 4
  eta: float = 1.0
  dtype: Dtype = jnp.float32

  @nn.compact
  def __call__(self, x):
    d = x.shape[-1]
    p = d // self.heads
    dense = lambda feats, name, axis=-1: nn.DenseGeneral(
        features=feats, axis=axis, dtype=self.dtype, param_dtype=jnp.float32,
        kernel_init=_TRUNC, bias_init=_ZEROS, name=name)
    gamma = lambda name: self.param(name, nn.initializers.constant(self.eta), (d,), jnp.float32)
    y = L.layer_norm("norm1", self.dtype, LN_EPS)(x)
    qkv = dense((3, self.heads, p), "qkv")(y)
    cls, weights = L.attention(qkv[:, :1, 0], qkv[:, :, 1], qkv[:, :, 2], return_weights=True)
    cls = dense(d, "proj", axis=(-2, -1))(cls)
    x = x + gamma("gamma1").astype(x.dtype) * jnp.concatenate([cls, y[:, 1:]], axis=1)
    x = L.layer_norm("norm2", self.dtype, LN_EPS)(x)
    mlp = MLP(mlp_ratio=self.mlp_ratio, dtype=self.dtype, name="mlp")(x[:, :1])
    return x + jnp.concatenate([gamma("gamma2").astype(x.dtype) * mlp, x[:, 1:]], axis=1), \
        weights[:, :, 0]


class ToST(nn.Module, kw_only=True):
  """ToST image classifier: `apply(variables, images, train=...)` -> logits for NHWC images of
  any size (the stem's grid sets N). Variables: params and the stem's batch-norm statistics
  (`family.variables(params)` of a params tree from this library).

  With `return_intermediates=True`: (logits, out), out holding per TSSA block (stacked over
  layers) normed (L, B, N, d), features (L, B, N, heads, d/heads), memberships (L, B, N, heads),
  blocks (L, B, N, d); class_attention (C, B, heads, N + 1) of the class-attention blocks (the
  grid: `stem_grid` of the image's sides); tokens (B, N, d) = the last TSSA block's output;
  pre_logits (B, d).
  """
  num_classes: int = 1000
  image_size: int = 224           # the planned / exported size; any size is accepted
  patch_size: int = 16
  dim: int = 192
  depth: int = 12
  heads: int = 4
  mlp_ratio: int = 4
  channels: int = 3
  eta: float = 1.0                # LayerScale init (official: 1.0 at depth 12, 1e-5 at 24)
  cls_layers: int = 2
  dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan_layers: bool = False
  drop_path_rate: float = 0.0     # the same rate in every TSSA block (the official schedule)

  head_params: ClassVar[tuple[str, ...]] = ("head",)
  prefix_tokens: ClassVar[int] = 0         # the TSSA blocks see the patches only
  class_token: ClassVar[bool] = False      # ... so no layer's token 0 is a class token
  interpolate_pos: ClassVar[bool] = True   # Fourier positions: every grid (DINO's local crops)
  contract: ClassVar[family.Contract] = family.Contract(
      whitebox=frozenset({"normed", "features", "memberships"}), torch_layout=True)

  def embed(self, images, train: bool):
    """ConvStem + Fourier positions (1x1 conv to d): (B, h w, d), and the grid (h, w)."""
    if images.ndim != 4 or images.shape[-1] != self.channels:
      raise ValueError(f"images must be (batch, height, width, {self.channels}), got shape "
                       f"{images.shape}")
    x = ConvStem(dim=self.dim, patch_size=self.patch_size, dtype=self.dtype,
                 name="patch_embed")(images, train=train)
    b, h, w, d = x.shape
    pos = nn.Dense(features=d, dtype=self.dtype, param_dtype=jnp.float32,
                   kernel_init=L.torch_linear_init(2 * FOURIER_DIM),
                   bias_init=L.torch_linear_init(2 * FOURIER_DIM), name="pos_embed")(
        jnp.asarray(fourier_positions(h, w), self.dtype))
    return x.reshape(b, h * w, d) + pos[None], (h, w)

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    x, _ = self.embed(jnp.asarray(images, self.dtype), train)
    x, out = L.layer_stack(
        ToSTBlock, x, depth=self.depth, name="block_{i}", remat=self.remat,
        scan=self.scan_layers, collect=return_intermediates, drop_path_rate=self.drop_path_rate,
        drop_path_schedule="constant", heads=self.heads, mlp_ratio=self.mlp_ratio, eta=self.eta,
        dtype=self.dtype, deterministic=not train)
    cls = self.param("cls_token", _TRUNC, (1, 1, self.dim), jnp.float32)
    z = jnp.concatenate([jnp.broadcast_to(cls.astype(x.dtype), (x.shape[0], 1, self.dim)), x], 1)
    maps = []
    for i in range(self.cls_layers):
      z, weights = ClassAttentionBlock(heads=self.heads, mlp_ratio=self.mlp_ratio, eta=self.eta,
                                       dtype=self.dtype, name=f"cls_block_{i}")(z)
      maps.append(weights)
    pre_logits = L.layer_norm("norm", self.dtype, LN_EPS)(z)[:, 0]
    logits = nn.Dense(features=self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=_TRUNC, bias_init=_ZEROS, name="head")(pre_logits)
    logits = logits.astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    return logits, dict(out, class_attention=jnp.stack(maps), tokens=x, pre_logits=pre_logits)

  @nn.nowrap
  def token_grid(self, height: int, width: int) -> tuple[int, int]:
    """The stem's grid for (height, width) images (`stem_grid`)."""
    return stem_grid(height, self.patch_size), stem_grid(width, self.patch_size)

  @nn.nowrap
  def forward_flops(self) -> float:
    """Matmul FLOPs of one forward pass per image at image_size (`tost_flops`)."""
    return tost_flops(image_size=self.image_size, patch_size=self.patch_size,
                      channels=self.channels, dim=self.dim, depth=self.depth,
                      mlp_ratio=self.mlp_ratio, cls_layers=self.cls_layers,
                      num_classes=self.num_classes)


def tost_flops(*, image_size: int, patch_size: int, channels: int, dim: int, depth: int,
               mlp_ratio: int, cls_layers: int, num_classes: int) -> float:
  """2 x MACs per image: the stem's convs (9 C_in C_out per output pixel), the positions' 1x1
  conv (N 64 d), per TSSA block U and W_o (2 N d^2) and the MLP (2 r N d^2) -- TSSA itself is
  O(N d) elementwise work, not counted -- per class-attention block q/k/v over N + 1 tokens,
  the class token's attention (2 (N + 1) d), W_o and the MLP on it; the head."""
  size, cin, stem = image_size, channels, 0
  for div in STEM_WIDTHS[check_patch_size(patch_size)]:
    size = -(-size // 2)
    stem += size * size * 9 * cin * (dim // div)
    cin = dim // div
  n = size * size
  block = 2 * n * dim * dim + 2 * mlp_ratio * n * dim * dim
  ca = 3 * (n + 1) * dim * dim + 2 * (n + 1) * dim + dim * dim + 2 * mlp_ratio * dim * dim
  return 2.0 * (stem + n * 2 * FOURIER_DIM * dim + depth * block + cls_layers * ca
                + dim * num_classes)


# The official factories: name -> (dim, depth, heads); eta 1.0 at depth 12, 1e-5 at depth 24;
# each at patch 16 and 8 (tost_cab_{size}_{p16|p8}).
TOST_SIZES = {"tiny_12": (192, 12, 4), "small_12": (384, 12, 8), "tiny_24": (192, 24, 4),
              "small_24": (384, 24, 8), "medium_24": (512, 24, 8), "large_24": (768, 24, 16)}


def tost_kwargs(size: str, patch_size: int) -> dict:
  dim, depth, heads = TOST_SIZES[size]
  return dict(patch_size=patch_size, dim=dim, depth=depth, heads=heads,
              eta=1.0 if depth <= 12 else 1e-5)
