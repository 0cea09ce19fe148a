"""CRATE-MAE: masked completion with a CRATE encoder and the CRATE decoder that inverts it.

  encoder layer:  z <- ISTA(LN(z')),  z' = z + MSSA(LN z)   (the classifier CRATE layer, lambda 0.5)
  decoder layer:  y = D LN(x),  x <- y - MSSA(LN y)           (the encoder step run backwards)
A random 75% of the patches is replaced by a learnable mask token *before* the encoder, which sees
the whole sequence (N + 1 tokens). Positions: a fixed 2-D sin-cos table (zero row for the class
token) that is not a parameter. Loss: the per-patch pixel MSE averaged over the masked patches only.
"""
from __future__ import annotations

import functools
from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models import family
from crate_jax.models import layers as L
from crate_jax.models.crate import MSSA, CRATELayer, layer_macs

Dtype = Any
MAE_NORM_EPS = 1e-6  # encoder_norm / decoder_norm / fc_norm; the block LayerNorms keep torch's 1e-5


@functools.lru_cache(maxsize=None)
def sincos_pos_embedding(dim: int, grid: tuple[int, int]) -> np.ndarray:
  """Fixed table (1 + gh*gw, dim), MAE convention: row 0 (class token) is zero; the first dim/2
  channels encode the patch's column j, the last dim/2 its row i, each as [sin(t w), cos(t w)] with
  w_k = 10000^(-k / (dim/4)), k < dim/4. Patches are row-major, as in `patchify`.
  """
  if dim % 4:
    raise ValueError(f"sin-cos positions need dim divisible by 4, got {dim}")
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float64) / (dim / 4))
  rows, cols = np.meshgrid(np.arange(grid[0]), np.arange(grid[1]), indexing="ij")

  def one_d(t):
    angles = t.reshape(-1, 1) * omega
    return np.concatenate([np.sin(angles), np.cos(angles)], axis=1)

  table = np.concatenate([one_d(cols), one_d(rows)], axis=1)
  return np.concatenate([np.zeros((1, dim)), table], axis=0).astype(np.float32)


def num_masked(n: int, ratio: float) -> int:
  """round(ratio * n) patches are masked per image."""
  if not 0.0 <= ratio < 1.0:
    raise ValueError(f"mask_ratio must be in [0, 1), got {ratio}")
  return int(round(ratio * n))


def random_mask(key: jax.Array, batch: int, n: int, ratio: float) -> jax.Array:
  """(batch, n) bool, True = masked: per image the num_masked(n, ratio) patches of largest uniform
  noise (MAE's argsort rule: a uniformly random subset of exactly that size)."""
  noise = jax.random.uniform(key, (batch, n))
  ranks = jnp.argsort(jnp.argsort(noise, axis=1), axis=1)
  return ranks >= n - num_masked(n, ratio)


def patch_targets(images: jax.Array, patch_size: int, norm_pix: bool = False) -> jax.Array:
  """patchify(images), each patch optionally standardised: (t - mean) / sqrt(var + 1e-6), var with
  Bessel's correction as torch.var."""
  t = L.patchify(jnp.asarray(images, jnp.float32), patch_size)
  if norm_pix:
    t = (t - t.mean(-1, keepdims=True)) / jnp.sqrt(t.var(-1, ddof=1, keepdims=True) + 1e-6)
  return t


def _check_grid(images, image_size, patch_size, channels) -> tuple[int, int]:
  grid = L.check_images(images, patch_size, channels)
  if image_size is not None and grid[0] * grid[1] != L.num_patches(image_size, patch_size):
    raise ValueError(f"images of {images.shape[1]}x{images.shape[2]} do not match the model's "
                     f"image_size={image_size}; build it with the new image_size (or None): the "
                     "sin-cos positions need no checkpoint change")
  return grid


def masked_mse(pred: jax.Array, target: jax.Array, mask: jax.Array) -> jax.Array:
  """sum_i m_i mean_pix (pred_i - target_i)^2 / sum_i m_i: visible patches (m_i = 0) never count."""
  per_patch = jnp.mean((pred.astype(jnp.float32) - target) ** 2, axis=-1)
  mask = mask.astype(jnp.float32)
  return jnp.sum(per_patch * mask) / jnp.maximum(jnp.sum(mask), 1.0)


class DecoderLayer(nn.Module, kw_only=True):
  """y = D LN(x) (bias-free d x d, "D x" = x D^T in row form), then x <- y - MSSA(LN y)."""
  heads: int
  dim_head: int
  dtype: Dtype = jnp.float32
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    x = L.batch_split(x)
    d = x.shape[-1]
    D = self.param("D", L.kaiming_uniform_init(d), (d, d), jnp.float32)
    h, D = L.cast(self.dtype, L.layer_norm("norm_ista", self.dtype)(x), D)
    y = jnp.einsum("bnd,ed->bne", h, D)
    attn, _, _ = MSSA(dim=d, heads=self.heads, dim_head=self.dim_head, dtype=self.dtype,
                      attention_impl=self.attention_impl, init="xavier", name="mssa")(
        L.layer_norm("norm_mssa", self.dtype)(y))
    return y - attn, {}


class CRATEMAEEncoder(nn.Module, kw_only=True):
  """Conv stem -> [mask tokens] -> class token + fixed sin-cos positions -> CRATE layers -> LN.

  `mask` (B, n) bool, True = masked: those patch embeddings are replaced by `mask_token` (1, 1, d),
  which equals MAE's "keep visible, append mask tokens, unshuffle" but needs no gather.
  Returns (tokens (B, n+1, d), per-layer intermediates or None). `image_size` is the size the model
  is built for (other sizes raise); None accepts any multiple of the patch, the positions being a
  fixed table computed for the actual grid.
  """
  image_size: int | None = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  eta: float = 0.1
  lambd: float = 0.5
  channels: int = 3
  dtype: Dtype = jnp.float32
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the layers (layer_scan/...)
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, images, mask=None, mask_token=None, *, return_intermediates: bool = False):
    grid = _check_grid(images, self.image_size, self.patch_size, self.channels)
    p, fan_in = self.patch_size, self.patch_size ** 2 * self.channels
    x = nn.Conv(features=self.dim, kernel_size=(p, p), strides=(p, p), padding="VALID",
                dtype=self.dtype, param_dtype=jnp.float32,
                kernel_init=L.xavier_uniform_init(fan_in, self.dim),
                bias_init=L.torch_linear_init(fan_in), name="patch_embed")(
                    jnp.asarray(images, self.dtype))
    x = x.reshape(x.shape[0], grid[0] * grid[1], self.dim)
    if mask is not None:
      x = jnp.where(mask[..., None], jnp.asarray(mask_token, x.dtype), x)
    x = L.with_class_token(self, x, cls_name="cls_token", cls_init=nn.initializers.normal(0.02),
                           positions=sincos_pos_embedding(self.dim, grid))
    x, out = L.layer_stack(  # the classifier's layer, MAE init
        CRATELayer, x, depth=self.depth, name="layer_{i}", remat=self.remat,
        scan=self.scan_layers, collect=return_intermediates, dim=self.dim, heads=self.heads,
        dim_head=self.dim_head,
        eta=self.eta, lambd=self.lambd, dtype=self.dtype, attention_impl=self.attention_impl,
        return_weights=return_intermediates, mssa_init="xavier")
    return L.layer_norm("norm", self.dtype, MAE_NORM_EPS)(x), out


def _encoder_kwargs(model) -> dict[str, Any]:
  """The CRATEMAEEncoder arguments of a CRATEMAE / CRATEMAEClassifier (same names, same values)."""
  return {f: getattr(model, f) for f in ("image_size", "patch_size", "dim", "depth", "heads",
                                         "dim_head", "eta", "lambd", "channels", "dtype", "remat",
                                         "scan_layers", "attention_impl")}


def encoder_flops(model) -> float:
  """2 x MACs of the CRATE-MAE encoder per image: conv stem (n P^2 C d), CRATE layers on n+1 tokens
  (the mask tokens are in the sequence, so masking saves nothing)."""
  g = model.image_size // model.patch_size
  stem = g * g * model.patch_size ** 2 * model.channels * model.dim
  layers = model.depth * layer_macs(g * g + 1, model.dim, model.heads * model.dim_head)
  return 2.0 * (stem + layers)


def decoder_layer_macs(n: int, d: int, inner: int) -> int:
  """Multiply-adds of one decoder layer on n tokens: D (n d^2), then MSSA: U and W_out
  (2 n d inner) and the attention (2 n^2 inner)."""
  return n * d * d + 2 * n * d * inner + 2 * n * n * inner


class CRATEMAEDecoder(nn.Module, kw_only=True):
  """CRATE decoder layers -> LN -> Linear(d -> p*p*C); the class token's row is dropped."""
  out_features: int
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  dtype: Dtype = jnp.float32
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the layers (layer_scan/...)
  attention_impl: str | None = None

  @nn.compact
  def __call__(self, x):
    x, _ = L.layer_stack(DecoderLayer, x, depth=self.depth, name="layer_{i}", remat=self.remat,
                         scan=self.scan_layers, heads=self.heads, dim_head=self.dim_head,
                         dtype=self.dtype,
                         attention_impl=self.attention_impl)
    x = L.layer_norm("norm", self.dtype, MAE_NORM_EPS)(x)
    pred = nn.Dense(features=self.out_features, dtype=self.dtype, param_dtype=jnp.float32,
                    kernel_init=L.xavier_uniform_init(x.shape[-1], self.out_features),
                    bias_init=nn.initializers.zeros, name="pred")(x)
    return pred[:, 1:].astype(jnp.float32)


class CRATEMAE(nn.Module, kw_only=True):
  """CRATE-MAE. `apply(variables, images, rngs={"mask": key})` returns a dict:
    loss ()  masked_mse(pred, target, mask);   pred (B, N, p*p*C);   mask (B, N), 1 = masked;
    target (B, N, p*p*C);   latent (B, N+1, d), the encoder output.
  `method=CRATEMAE.encode` gives unmasked encoder tokens (for fine-tuning), `method=
  CRATEMAE.reconstruct` gives (masked, reconstructed, original) images. The decoder mirrors the
  encoder's width; its depth and heads default to the encoder's.
  """
  image_size: int | None = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  decoder_depth: int | None = None
  decoder_heads: int | None = None
  channels: int = 3
  eta: float = 0.1
  lambd: float = 0.5
  mask_ratio: float = 0.75
  norm_pix_loss: bool = False
  dtype: Dtype = jnp.float32
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the layers (layer_scan/...)
  attention_impl: str | None = None

  head_params: ClassVar[tuple[str, ...]] = ()
  class_token: ClassVar[bool] = False  # its class token is never read: the decoder drops its row
  layer_output_key: ClassVar[str] = "codes"  # `encode`'s layer outputs are the ISTA codes
  # Its white-box quantities come from `encode` (the unmasked encoder).
  contract: ClassVar[family.Contract] = family.Contract(whitebox=family.CRATE_WHITEBOX,
                                                        classifier=False, torch_layout=True)

  @nn.nowrap
  def decoder_arch(self) -> tuple[int, int]:
    """(depth, heads) of the decoder: the encoder's unless decoder_depth / decoder_heads say."""
    depth = self.depth if self.decoder_depth is None else self.decoder_depth
    return depth, self.decoder_heads or self.heads

  def setup(self):
    self.encoder = CRATEMAEEncoder(**_encoder_kwargs(self))
    self.mask_token = self.param("mask_token", nn.initializers.normal(0.02), (1, 1, self.dim),
                                 jnp.float32)
    depth, heads = self.decoder_arch()
    self.decoder = CRATEMAEDecoder(out_features=self.patch_size ** 2 * self.channels, depth=depth,
                                   heads=heads, dim_head=self.dim // heads, dtype=self.dtype,
                                   remat=self.remat, scan_layers=self.scan_layers,
                                   attention_impl=self.attention_impl)

  @nn.nowrap
  def adapt_params(self, params: dict, abstract_params) -> dict:
    """Nothing to fit: the positions are a fixed sin-cos table, not a parameter."""
    return params

  @nn.nowrap
  def forward_flops(self) -> float | None:
    """Matmul FLOPs of one masked-completion pass per image (encoder, decoder, pred); None when
    image_size is None (the grid is unknown)."""
    if self.image_size is None:
      return None
    depth, heads = self.decoder_arch()
    g = self.image_size // self.patch_size
    n, d, out = g * g + 1, self.dim, self.patch_size ** 2 * self.channels
    decoder = depth * decoder_layer_macs(n, d, heads * (d // heads)) + n * d * out
    return encoder_flops(self) + 2.0 * decoder

  def __call__(self, images, *, train: bool = False, mask_ratio: float | None = None):
    ratio = self.mask_ratio if mask_ratio is None else mask_ratio
    grid = _check_grid(images, self.image_size, self.patch_size, self.channels)
    mask = random_mask(self.make_rng("mask"), images.shape[0], grid[0] * grid[1], ratio)
    latent, _ = self.encoder(images, mask, self.mask_token)
    pred = self.decoder(latent)
    target = patch_targets(images, self.patch_size, self.norm_pix_loss)
    return {"loss": masked_mse(pred, target, mask), "pred": pred,
            "mask": mask.astype(jnp.float32), "target": target, "latent": latent}

  def encode(self, images, *, return_intermediates: bool = False):
    """Encoder tokens (B, N+1, d) of the unmasked images (and per-layer intermediates if asked)."""
    tokens, inter = self.encoder(images, return_intermediates=return_intermediates)
    return (tokens, inter) if return_intermediates else tokens

  def reconstruct(self, images, mask_ratio: float | None = None):
    """(masked, reconstructed, original) images, NHWC. Masked patches are zero in `masked`;
    `reconstructed` keeps the visible patches and fills the masked ones with the prediction
    (de-standardised with the true patch statistics when norm_pix_loss is on)."""
    out = self(images, mask_ratio=mask_ratio)
    grid = L.check_images(images, self.patch_size, self.channels)
    patches = L.patchify(jnp.asarray(images, jnp.float32), self.patch_size)
    pred = out["pred"]
    if self.norm_pix_loss:
      pred = (pred * jnp.sqrt(patches.var(-1, ddof=1, keepdims=True) + 1e-6)
              + patches.mean(-1, keepdims=True))
    m = out["mask"][..., None]
    to_image = lambda x: L.unpatchify(x, self.patch_size, grid, self.channels)
    return (to_image(patches * (1 - m)), to_image(patches * (1 - m) + pred * m),
            to_image(patches))


class CRATEMAEClassifier(nn.Module, kw_only=True):
  """Fine-tuning classifier: the CRATE-MAE encoder (same `encoder` subtree) -> pool -> LN -> Linear.

  Copy a pre-trained encoder with `classifier_params_from_mae`. With `return_intermediates=True`
  returns (logits, out): the encoder's per-layer normed (LN(Z^l), the MSSA input) / features /
  attention / mssa / codes stacked over layers, tokens (B, N+1, d) and pre_logits (B, d).
  """
  num_classes: int = 1000
  image_size: int | None = 224
  patch_size: int = 16
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  channels: int = 3
  eta: float = 0.1
  lambd: float = 0.5
  pool: str = "cls"
  dtype: Dtype = jnp.float32
  remat: bool | str = False       # or a policy: layers.REMAT_POLICIES
  scan_layers: bool = False       # one nn.scan over the layers (layer_scan/...)
  attention_impl: str | None = None

  head_params: ClassVar[tuple[str, ...]] = ("head", "fc_norm")
  layer_output_key: ClassVar[str] = "codes"  # each layer's output Z^{l+1} is its ISTA code
  contract: ClassVar[family.Contract] = family.Contract(whitebox=family.CRATE_WHITEBOX)

  @nn.compact
  def __call__(self, images, *, train: bool = False, return_intermediates: bool = False):
    L.check_pool(self.pool)
    tokens, inter = CRATEMAEEncoder(**_encoder_kwargs(self), name="encoder")(
        images, return_intermediates=return_intermediates)
    pooled = tokens[:, 0] if self.pool == "cls" else tokens[:, 1:].mean(axis=1)
    pre_logits = L.layer_norm("fc_norm", self.dtype, MAE_NORM_EPS)(pooled)
    logits = nn.Dense(features=self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=L.xavier_uniform_init(self.dim, self.num_classes),
                      bias_init=nn.initializers.zeros, name="head")(pre_logits)
    logits = logits.astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    return logits, dict(inter, tokens=tokens, pre_logits=pre_logits)

  @nn.nowrap
  def adapt_params(self, params: dict, abstract_params) -> dict:
    """Nothing to fit: the positions are a fixed sin-cos table, not a parameter."""
    return params

  @nn.nowrap
  def forward_flops(self) -> float | None:
    """Matmul FLOPs of one forward pass per image (encoder + head); None when image_size is None."""
    if self.image_size is None:
      return None
    return encoder_flops(self) + 2.0 * self.dim * self.num_classes


def classifier_params_from_mae(mae_params, classifier_params):
  """Classifier params whose `encoder` subtree is the pre-trained CRATE-MAE encoder (head kept)."""
  mae_params = mae_params.get("params", mae_params)
  classifier_params = classifier_params.get("params", classifier_params)
  want = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), classifier_params["encoder"])
  got = jax.tree.map(lambda x: (tuple(x.shape), x.dtype), mae_params["encoder"])
  if want != got:
    raise ValueError("the CRATE-MAE encoder does not fit this classifier (compare patch_size, dim, "
                     "depth, heads, dim_head)")
  return {**classifier_params, "encoder": mae_params["encoder"]}


def reconstruction_figure(images, params, model: CRATEMAE, rng, path, *, mask_ratio=None,
                          max_images: int = 8):
  """Write a PNG with rows masked / reconstructed / original (one column per image); returns path.

  Each column is scaled to [0, 1] with its original's range. matplotlib is imported here only.
  """
  import matplotlib
  matplotlib.use("Agg")
  import matplotlib.pyplot as plt

  variables = params if "params" in params else {"params": params}
  images = jnp.asarray(images)[:max_images]
  rows = model.apply(variables, images, mask_ratio=mask_ratio, method=CRATEMAE.reconstruct,
                     rngs={"mask": rng})
  rows = [np.asarray(r, np.float32) for r in rows]
  lo = rows[2].min(axis=(1, 2, 3), keepdims=True)
  hi = rows[2].max(axis=(1, 2, 3), keepdims=True)
  rows = [np.clip((r - lo) / np.maximum(hi - lo, 1e-8), 0, 1) for r in rows]
  n = rows[0].shape[0]
  fig, axes = plt.subplots(3, n, figsize=(1.6 * n, 5), squeeze=False)
  for r, (label, imgs) in enumerate(zip(("masked", "reconstructed", "original"), rows)):
    for c in range(n):
      ax = axes[r, c]
      ax.imshow(imgs[c].squeeze(-1) if imgs.shape[-1] == 1 else imgs[c],
                cmap="gray" if imgs.shape[-1] == 1 else None, interpolation="nearest")
      ax.set_xticks([])
      ax.set_yticks([])
      if c == 0:
        ax.set_ylabel(label)
  fig.tight_layout()
  fig.savefig(path, dpi=100)
  plt.close(fig)
  return path


# name -> (dim, depth, heads): the official mae_crate_* factories (patch 16, decoder = encoder).
MAE_SIZES = {"tiny": (384, 12, 6), "small": (576, 12, 12), "base": (768, 12, 12),
             "large": (1024, 24, 16)}
