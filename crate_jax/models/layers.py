"""Shared building blocks: PyTorch-equivalent initialisers, LayerNorm, patchify, MSSA attention core.

Everything here is a small pure function or a thin Linen module so that CRATE, CRATE-alpha,
CRATE-MAE and the ViT baseline can share the maths they have in common.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import flax.linen as nn
import jax
import jax.numpy as jnp

Dtype = Any

# PyTorch's nn.LayerNorm default; Flax's is 1e-6 (a parity trap).
TORCH_LN_EPS = 1e-5


def uniform_init(bound: float):
  """U(-bound, bound) initialiser."""

  def init(key, shape, dtype=jnp.float32):
    return jax.random.uniform(key, shape, dtype, -bound, bound)

  return init


def torch_linear_init(fan_in: int):
  """nn.Linear's default (kaiming-uniform, a=sqrt(5)) for weight and bias: U(-1/sqrt(fan_in), +)."""
  return uniform_init(1.0 / math.sqrt(fan_in))


def kaiming_uniform_init(fan_in: int):
  """nn.init.kaiming_uniform_ defaults (gain sqrt(2)): U(-sqrt(6/fan_in), +)."""
  return uniform_init(math.sqrt(6.0 / fan_in))


def layer_norm(name: str, dtype: Dtype, eps: float = TORCH_LN_EPS) -> nn.LayerNorm:
  """LayerNorm with PyTorch numerics (eps 1e-5, two-pass variance); params stay fp32."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/P * W/P, P*P*C), patches row-major, within a patch (row, col, channel).

  This is the official `b c (h p1) (w p2) -> b (h w) (p1 p2 c)` ordering, written for NHWC.
  """
  b, h, w, c = images.shape
  p = patch_size
  x = images.reshape(b, h // p, p, w // p, p, c)
  x = x.transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, (h // p) * (w // p), p * p * c)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int], channels: int) -> jax.Array:
  """Inverse of `patchify`: (B, gh*gw, P*P*C) -> (B, gh*P, gw*P, C)."""
  b = patches.shape[0]
  gh, gw = grid
  p = patch_size
  x = patches.reshape(b, gh, gw, p, p, channels).transpose(0, 1, 3, 2, 4, 5)
  return x.reshape(b, gh * p, gw * p, channels)


def check_images(images: jax.Array, patch_size: int, channels: int) -> tuple[int, int]:
  """Validate an NHWC batch and return the patch grid, raising one clear ValueError otherwise."""
  if images.ndim != 4:
    raise ValueError(f"images must be (batch, height, width, channels), got shape {images.shape}")
  _, h, w, c = images.shape
  if c != channels:
    raise ValueError(f"images have {c} channels but the model expects channels={channels} "
                     "(images must be NHWC)")
  if h % patch_size or w % patch_size:
    raise ValueError(f"image size {h}x{w} is not divisible by patch_size={patch_size}")
  return h // patch_size, w // patch_size


def subspace_attention(w: jax.Array, *, return_weights: bool = False,
                       implementation: str | None = None):
  """Tied-qkv attention per head: softmax(w_k w_k^T * p^-1/2) w_k for w of shape (B, N, heads, p).

  The softmax is taken in fp32 whatever the compute dtype. With return_weights=False the fused
  `jax.nn.dot_product_attention` is used (`implementation` as in that function, e.g. "cudnn").
  """
  scale = w.shape[-1] ** -0.5
  if not return_weights and implementation is not None:
    # cuDNN's fused kernel refuses odd sequence lengths such as 197: pad the tokens to a
    # multiple of 16 and mask the padding out as keys (key_value_seq_lengths), then slice.
    pad_to = 16 if implementation == "cudnn" else 1
    return fused_attention(w, scale, implementation, pad_to), None
  logits = jnp.einsum("bqhd,bkhd->bhqk", w, w, preferred_element_type=at_least_f32(w.dtype)) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(w.dtype), w)
  return out, (weights if return_weights else None)


def fused_attention(w: jax.Array, scale: float, implementation: str | None,
                    pad_to: int = 1) -> jax.Array:
  """jax.nn.dot_product_attention with q = k = v = w, tokens zero-padded to a multiple of pad_to."""
  n = w.shape[1]
  padded = -(-n // pad_to) * pad_to
  if padded == n:
    return jax.nn.dot_product_attention(w, w, w, scale=scale, implementation=implementation)
  wp = jnp.pad(w, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
  lengths = jnp.full((w.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(wp, wp, wp, scale=scale, implementation=implementation,
                                     key_value_seq_lengths=lengths)
  return out[:, :n]


def heads_kernel(module: nn.Module, name: str, shape: Sequence[int], fan_in: int, init=None):
  """A parameter kept fp32 with PyTorch-Linear default init unless `init` is given."""
  return module.param(name, init or torch_linear_init(fan_in), tuple(shape), jnp.float32)


def maybe_remat(cls, remat: bool):
  """Wrap a block class in nn.remat (activation rematerialisation) when asked."""
  return nn.remat(cls) if remat else cls


def stack_layers(per_layer: Sequence[dict]) -> dict:
  """[{name: array} per layer] -> {name: array stacked on a new leading layer axis}."""
  return {k: jnp.stack([d[k] for d in per_layer]) for k in per_layer[0]}


def at_least_f32(dtype: Dtype) -> Dtype:
  """float32 for low-precision compute dtypes, float64 when computing in float64 (parity tests)."""
  return jnp.promote_types(dtype, jnp.float32)


def cast(dtype: Dtype, *xs):
  return tuple(jnp.asarray(x, dtype) for x in xs)


@functools.lru_cache(maxsize=None)
def num_patches(image_size: int, patch_size: int) -> int:
  if image_size % patch_size:
    raise ValueError(f"image_size={image_size} is not divisible by patch_size={patch_size}")
  return (image_size // patch_size) ** 2


# ---- helpers shared by CRATE-alpha, CRATE-MAE and the ViT baseline ----

def xavier_uniform_init(fan_in: int, fan_out: int):
  """torch xavier_uniform_ on the 2-D (out, in) view: U(-sqrt(6 / (fan_in + fan_out)), +)."""
  return uniform_init(math.sqrt(6.0 / (fan_in + fan_out)))


def check_patch_count(images: jax.Array, image_size: int, patch_size: int, channels: int) -> int:
  """`check_images`, plus: the grid must match a learned positional table built for image_size."""
  grid = check_images(images, patch_size, channels)
  n = num_patches(image_size, patch_size)
  if grid[0] * grid[1] != n:
    raise ValueError(
        f"images of {images.shape[1]}x{images.shape[2]} give {grid[0] * grid[1]} patches but the "
        f"model was built for image_size={image_size} ({n} patches); build it with the new "
        "image_size and resize the checkpoint with crate_jax.models.resize_pos_embedding")
  return n


def overcomplete_ista(x: jax.Array, D: jax.Array, *, eta: float, lambd: float, num_steps: int,
                      z0: jax.Array | None = None) -> jax.Array:
  """Non-negative ISTA on min_{z >= 0} 1/2 ||x - D z||^2 + lambda ||z||_1, D of shape (d, m):

    z <- ReLU(z - eta * D^T (D z - x) - eta * lambda),   num_steps times from z0 (default 0).

  Row form, as in CRATE's `ista`: D^T x = x D and D z = z D^T. From z0 = 0 the first step is
  ReLU(eta D^T x - eta lambda). CRATE's one-step ISTA is the case m = d, z0 = x, num_steps = 1.
  Returns the codes z (..., m).
  """
  if num_steps < 1:
    raise ValueError(f"num_steps must be >= 1, got {num_steps}")
  dtx = jnp.einsum("...d,dm->...m", x, D)
  if z0 is None:
    z, num_steps = jax.nn.relu(eta * dtx - eta * lambd), num_steps - 1
  else:
    z = z0
  for _ in range(num_steps):
    dz = jnp.einsum("...m,dm->...d", z, D)
    z = jax.nn.relu(z - eta * (jnp.einsum("...d,dm->...m", dz, D) - dtx) - eta * lambd)
  return z


def multihead_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, return_weights: bool = False,
                        implementation: str | None = None):
  """Per head softmax(q_h k_h^T * p^-1/2) v_h for (B, N, heads, p) inputs (the ViT attention).

  Same numerics as `subspace_attention` (fp32 softmax; fused kernel when no weights are wanted and
  `implementation` is given); `subspace_attention(w)` is the tied case q = k = v = w.
  """
  scale = q.shape[-1] ** -0.5
  if not return_weights and implementation is not None:
    out = jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation)
    return out, None
  logits = jnp.einsum("bqhd,bkhd->bhqk", q, k, preferred_element_type=at_least_f32(q.dtype)) * scale
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.einsum("bhqk,bkhd->bqhd", weights.astype(v.dtype), v)
  return out, (weights if return_weights else None)
