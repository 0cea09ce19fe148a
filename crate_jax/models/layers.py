"""Shared building blocks: PyTorch-equivalent initialisers, LayerNorm, patchify, the attention
core, the class-token/positions embedding and the depth loop.

Everything here is a small pure function so that CRATE, CRATE-alpha, CRATE-MAE and the ViT
baseline share the maths (and the plumbing) they have in common.
"""
from __future__ import annotations

import functools
import math
from typing import Any, Sequence

import einops
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np

Dtype = Any

# PyTorch's nn.LayerNorm default; Flax's is 1e-6 (a parity trap).
TORCH_LN_EPS = 1e-5
# Logical name of the batch axis of activations; the train program maps it to mesh axes.
BATCH_AXIS = "batch"


def batch_split(x: jax.Array) -> jax.Array:
  """x constrained to be split along its leading (batch) axis as the logical rule "batch" says.

  With FSDP the parameters are split over the mesh too, and without this the compiler may split
  the activations along a parameter's axis instead (measured: CRATE-B's train step needed 4x
  the HBM per chip with fsdp = 8). A no-op when no axis rules are set (no mesh: tests, analysis).
  """
  axes = dict(nn.get_logical_axis_rules()).get(BATCH_AXIS)
  if not axes:
    return x
  spec = jax.sharding.PartitionSpec(axes, *([None] * (x.ndim - 1)))
  return jax.lax.with_sharding_constraint(x, spec)   # on the mesh in context


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


def layer_norm(name: str, dtype: Dtype, eps: float = TORCH_LN_EPS,
               use_bias: bool = True) -> nn.LayerNorm:
  """LayerNorm with PyTorch numerics (eps 1e-5, two-pass variance); params stay fp32."""
  return nn.LayerNorm(epsilon=eps, use_fast_variance=False, use_bias=use_bias, dtype=dtype,
                      param_dtype=jnp.float32, name=name)


def patchify(images: jax.Array, patch_size: int) -> jax.Array:
  """(B, H, W, C) -> (B, H/P * W/P, P*P*C), patches row-major, within a patch (row, col, channel).

  The official `b c (h p1) (w p2) -> b (h w) (p1 p2 c)` rearrangement, written for NHWC.
  """
  p = patch_size
  return einops.rearrange(images, "b (h p1) (w p2) c -> b (h w) (p1 p2 c)", p1=p, p2=p)


def unpatchify(patches: jax.Array, patch_size: int, grid: tuple[int, int],
               channels: int) -> jax.Array:
  """Inverse of `patchify`: (B, gh*gw, P*P*C) -> (B, gh*P, gw*P, C)."""
  p = patch_size
  return einops.rearrange(patches, "b (h w) (p1 p2 c) -> b (h p1) (w p2) c", h=grid[0], w=grid[1],
                          p1=p, p2=p, c=channels)


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


# Token counts are padded to a multiple of this for a fused implementation (cuDNN's kernel refuses
# odd sequence lengths such as 197); the padded keys are masked out, the padded queries sliced off.
PAD_TOKENS_TO = {"cudnn": 16}


def attention(q: jax.Array, k: jax.Array, v: jax.Array, *, return_weights: bool = False,
              implementation: str | None = None, pad_to: int | None = None,
              causal: bool = False, mask: jax.Array | None = None,
              key_mask: jax.Array | None = None):
  """Per head softmax(q_h k_h^T * p^-1/2 + M) v_h for (B, N, heads, p) inputs; returns
  (out, weights).

  The logits and softmax are at least fp32 (float64 inputs stay float64). With return_weights=False
  and an `implementation` (as in jax.nn.dot_product_attention, e.g. "cudnn") the fused kernel is
  used, tokens padded to a multiple of `pad_to` (default PAD_TOKENS_TO[implementation], else 1);
  weights is then None. Subspace attention (MSSA) is the tied case attention(w, w, w).
  Masking (M = 0 where allowed, -inf elsewhere), the same in both paths: causal=True lets query i
  see keys j <= i (square, N_q = N_k); `mask` is a boolean array broadcastable to
  (B, heads, N_q, N_k), True where a query may attend (e.g. a key-value cache's filled slots);
  `key_mask` (B, N_k) bool, False at padding keys, which no query attends to.
  """
  scale = q.shape[-1] ** -0.5
  if key_mask is not None:
    keep = key_mask[:, None, None, :]
    mask = keep if mask is None else jnp.logical_and(mask, keep)
  if causal and q.shape[1] != k.shape[1]:
    raise ValueError(f"causal attention needs as many queries as keys, got {q.shape[1]} and "
                     f"{k.shape[1]} (pass an explicit mask for a key-value cache)")
  if not return_weights and implementation is not None:
    pad_to = PAD_TOKENS_TO.get(implementation, 1) if pad_to is None else pad_to
    return padded_dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                        pad_to=pad_to, causal=causal, mask=mask), None
  # Heads moved next to the batch first, so both products are batched matmuls with the batch
  # dimensions leading: XLA:CPU runs "bqhd,bkhd->bhqk"-shaped dots (and the softmax between
  # them) 2-4x slower than the transposes plus the canonical dots (CRATE-T's attention, 16 x 224
  # px, forward + backward on 2 cores: 79 -> 46 ms a layer); on TPUs and GPUs the layout pass
  # absorbs the transposes.
  qh, kh, vh = (jnp.swapaxes(x, 1, 2) for x in (q, k, v))   # (B, heads, N, p)
  logits = jnp.einsum("bhqd,bhkd->bhqk", qh, kh,
                      preferred_element_type=at_least_f32(q.dtype)) * scale
  allowed = attention_mask(q.shape[1], k.shape[1], causal=causal, mask=mask)
  if allowed is not None:
    logits = jnp.where(allowed, logits, jnp.finfo(logits.dtype).min)
  weights = jax.nn.softmax(logits, axis=-1)
  out = jnp.swapaxes(jnp.einsum("bhqk,bhkd->bhqd", weights.astype(v.dtype), vh), 1, 2)
  return out, (weights if return_weights else None)


def attention_mask(n_q: int, n_k: int, *, causal: bool = False,
                   mask: jax.Array | None = None) -> jax.Array | None:
  """The boolean (.., N_q, N_k) mask `attention` applies (None: everything allowed): the lower
  triangle j <= i when causal, and-ed with `mask`."""
  out = None
  if causal:
    out = jnp.tril(jnp.ones((n_q, n_k), bool))
  if mask is not None:
    out = mask if out is None else jnp.logical_and(out, mask)
  return out


def padded_dot_product_attention(q: jax.Array, k: jax.Array, v: jax.Array, *, scale: float,
                                 implementation: str | None, pad_to: int = 1,
                                 causal: bool = False, mask: jax.Array | None = None) -> jax.Array:
  """jax.nn.dot_product_attention with the tokens zero-padded to a multiple of pad_to, the padded
  keys masked (key_value_seq_lengths) and the padded query rows sliced off: exact. `causal` and
  `mask` as in `attention` (padded keys lie after every real query, so causal stays exact)."""
  n = q.shape[1]
  if mask is not None:
    mask = jnp.broadcast_to(mask, (q.shape[0], q.shape[2], q.shape[1], k.shape[1]))
  padded = -(-n // pad_to) * pad_to
  if padded == n or k.shape[1] != n:
    return jax.nn.dot_product_attention(q, k, v, scale=scale, implementation=implementation,
                                        is_causal=causal, mask=mask)
  pad = lambda x: jnp.pad(x, ((0, 0), (0, padded - n), (0, 0), (0, 0)))
  if mask is not None:
    mask = jnp.pad(mask, ((0, 0), (0, 0), (0, padded - n), (0, padded - n)))
  lengths = jnp.full((q.shape[0],), n, jnp.int32)
  out = jax.nn.dot_product_attention(pad(q), pad(k), pad(v), scale=scale,
                                     implementation=implementation, key_value_seq_lengths=lengths,
                                     is_causal=causal, mask=mask)
  return out[:, :n]


def heads_kernel(module: nn.Module, name: str, shape: Sequence[int], fan_in: int, init=None):
  """A parameter kept fp32 with PyTorch-Linear default init unless `init` is given."""
  return module.param(name, init or torch_linear_init(fan_in), tuple(shape), jnp.float32)


def stack_layers(per_layer: Sequence[dict]) -> dict:
  """[{name: array} per layer] -> {name: array stacked on a new leading layer axis}."""
  return {k: jnp.stack([d[k] for d in per_layer]) for k in per_layer[0]}


# remat policy name -> what each layer saves for the backward pass (jax.checkpoint_policies).
REMAT_POLICIES = ("none", "full", "layer_input", "dots_saveable",
                  "dots_with_no_batch_dims_saveable")


def remat_name(remat: bool | str | None) -> str:
  """The one normalisation of a `remat` value (a model field or config.remat, which may arrive
  as a string from the command line) to its REMAT_POLICIES name: False / None / "" / "False" ->
  "none", True / "True" -> "full"; ValueError for anything else."""
  name = {"true": "full", "false": "none", "": "none"}.get(str(remat).lower()) if (
      remat is None or isinstance(remat, (bool, str))) else None
  name = "none" if remat is None else (name or remat)
  if name not in REMAT_POLICIES:
    raise ValueError(f"remat={remat!r} is not one of {REMAT_POLICIES} (or True/False)")
  return name


def remat_policy(remat: bool | str):
  """(remat on, jax checkpoint policy) of a model's `remat` field: "none" = off; "full" /
  "layer_input" = recompute everything inside each layer, keep only its input;
  "dots_saveable" keeps every matmul output; "dots_with_no_batch_dims_saveable" keeps the ones
  without batch dimensions (the weight-sized ones). Any form `remat_name` accepts."""
  name = remat_name(remat)
  if name == "none":
    return False, None
  if name in ("full", "layer_input"):
    return True, jax.checkpoint_policies.nothing_saveable
  return True, getattr(jax.checkpoint_policies, name)


def scanned_name(name: str) -> str:
  """The parameter name of a scanned stack: "layer_{i}" -> "layer_scan"."""
  return name.format(i="scan")


def drop_path_rates(rate: float, depth: int) -> np.ndarray:
  """Stochastic depth rising linearly with depth: rate * l / (depth - 1) for layer l."""
  return np.asarray([rate * l / max(depth - 1, 1) for l in range(depth)], np.float32)


def residual_branch(module: nn.Module, y: jax.Array, *, dropout: float, deterministic: bool,
                    drop_rate=None) -> jax.Array:
  """A residual branch's output before it is added: dropout (rate `dropout`) then stochastic
  depth (`drop_path`, rate `drop_rate`), both only while training (deterministic=False)."""
  if dropout > 0:
    y = nn.Dropout(rate=dropout)(y, deterministic=deterministic)
  if drop_rate is not None and not deterministic:
    y = drop_path(module, y, drop_rate)
  return y


def drop_path(module: nn.Module, x: jax.Array, rate) -> jax.Array:
  """Stochastic depth on a residual branch: per example, 0 with probability `rate`, else
  x / (1 - rate) (rate may be traced, e.g. scanned per layer). Uses the "dropout" rng."""
  keep = 1.0 - rate
  mask = jax.random.bernoulli(module.make_rng("dropout"), keep, (x.shape[0],) + (1,) * (x.ndim - 1))
  # x's dtype kept: a traced float32 rate would otherwise promote a bf16 residual stream (and
  # break a scanned stack's carry).
  return jnp.where(mask, (x / keep).astype(x.dtype), jnp.zeros_like(x))


def layer_stack(layer_cls, x: jax.Array, *, depth: int, name: str, remat: bool | str = False,
                scan: bool = False, collect: bool = False, drop_path_rate: float = 0.0,
                drop_path_schedule: str = "linear", key_mask: jax.Array | None = None,
                **layer_kwargs):
  """Z^{l+1}, inter_l = f_l(Z^l) for l < depth,
  f_l = layer_cls(**layer_kwargs, name=name.format(i=l)).

  Call it inside the parent's compact method; the one place that runs a family's layers. Every
  layer returns (x, {name: array}); with collect=True the intermediates are stacked (L, ...),
  else None. remat takes a policy (`remat_policy`). scan=True runs one nn.scan over the layers:
  one layer is compiled instead of `depth`, its parameters stacked on a leading layer axis under
  `scanned_name(name)` (convert checkpoints with models.scan_layout). With drop_path_rate > 0 a
  layer l is called as f_l(Z, drop_rate_l) (stochastic depth, `drop_path_rates`; with
  drop_path_schedule="constant" every layer gets drop_path_rate, as ToST's code). key_mask
  (B, N) bool, False at padding: every layer is called as f_l(Z, drop_rate_l, key_mask) and no
  token attends to a padding key.
  Returns (Z^depth, stacked intermediates or None).
  """
  on, policy = remat_policy(remat)
  cls = nn.remat(layer_cls, policy=policy, prevent_cse=not scan) if on else layer_cls
  if drop_path_schedule not in ("linear", "constant"):
    raise ValueError(f"drop_path_schedule={drop_path_schedule!r} is not 'linear' or 'constant'")
  rates = None
  if drop_path_rate > 0:
    rates = (drop_path_rates(drop_path_rate, depth) if drop_path_schedule == "linear"
             else np.full((depth,), drop_path_rate, np.float32))
  # Call arguments after Z: drop_rate (per layer), then key_mask (the same for every layer);
  # none when neither is set, drop_rate=None when only key_mask is.
  tail = () if key_mask is None else (key_mask,)
  passes_rate = rates is not None or key_mask is not None
  if scan:
    args = ((None if rates is None else jnp.asarray(rates),) if passes_rate else ()) + tail
    in_axes = ((0 if rates is not None else nn.broadcast,) if passes_rate else ()) + (
        (nn.broadcast,) * len(tail))
    stack = nn.scan(cls, variable_axes={"params": 0},
                    split_rngs={"params": True, "dropout": True},
                    in_axes=in_axes or 0, length=depth)(**layer_kwargs, name=scanned_name(name))
    x, inter = stack(x, *args)
    return x, (inter if collect else None)
  per_layer = []
  for i in range(depth):
    layer = cls(**layer_kwargs, name=name.format(i=i))
    rate = (None if rates is None else float(rates[i]),) if passes_rate else ()
    x, inter = layer(x, *rate, *tail)
    per_layer.append(inter)
  return x, (stack_layers(per_layer) if collect else None)


def with_class_token(module: nn.Module, x: jax.Array, *, cls_name: str, cls_init,
                     positions) -> jax.Array:
  """[x_cls; x_1 .. x_n] + E: (B, n, d) -> (B, n+1, d), the class token at index 0.

  `cls_name` / `cls_init`: the (1, 1, d) class-token parameter of `module`. `positions`: an
  initialiser (a learned fp32 `pos_embedding` (1, n+1, d)) or a fixed (n+1, d) table.
  """
  b, n, d = x.shape
  cls = module.param(cls_name, cls_init, (1, 1, d), jnp.float32)
  if callable(positions):
    positions = module.param("pos_embedding", positions, (1, n + 1, d), jnp.float32)
  cls = jnp.broadcast_to(cls.astype(x.dtype), (b, 1, d))
  return jnp.concatenate([cls, x], axis=1) + jnp.asarray(positions, x.dtype)


def patch_grid(module: nn.Module, images: jax.Array) -> tuple[int, int]:
  """The images' patch grid (`check_images`); it must be the one `module.image_size` gives
  (`check_patch_count`) unless the module resizes its positions (`module.interpolate_pos`)."""
  grid = check_images(images, module.patch_size, module.channels)
  if not getattr(module, "interpolate_pos", False):
    check_patch_count(images, module.image_size, module.patch_size, module.channels)
  return grid


def learned_positions(module: nn.Module, grid: tuple[int, int], init):
  """`positions` for `with_class_token`: the initialiser on the model's own grid; on another grid
  (interpolate_pos: DINO's local crops, say) the learned (1, n+1, d) table resized bicubically
  inside the forward pass, the class row kept (posemb.resize_pos_embedding)."""
  from crate_jax.models import posemb
  n = num_patches(module.image_size, module.patch_size)
  if grid[0] * grid[1] == n:
    return init
  table = module.param("pos_embedding", init, (1, n + 1, module.dim), jnp.float32)
  return posemb.resize_pos_embedding(table, grid)[0]


POOLS = ("cls", "mean")  # a classifier's read-out: the class token, or the mean of the tokens


def check_pool(pool: str) -> str:
  """The one check of a pooling choice (model fields, probes): ValueError unless in POOLS."""
  if pool not in POOLS:
    raise ValueError(f"pool must be one of {POOLS}, got {pool!r}")
  return pool


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
