"""Optimiser and learning-rate schedule from the config (optax).

Schedule: linear warm-up from 0 to the peak lr, then cosine decay to final_lr_fraction * lr, stepped
per optimiser step (the official code steps an equivalent per-epoch schedule; per-step is smoother
and does not depend on the epoch length).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import optax

OPTIMIZERS = ("lion", "adamw")
DECAY_MASKS = ("all", "kernels", "named_kernels")


def learning_rate_schedule(opt_cfg, total_steps: int, steps_per_epoch: int) -> optax.Schedule:
  """lr(t) = lr * t / W for t < W, then lr * cosine decay over the remaining steps."""
  warmup = int(round(opt_cfg.warmup_epochs * steps_per_epoch))
  warmup = min(warmup, max(total_steps - 1, 0))
  return optax.warmup_cosine_decay_schedule(
      init_value=0.0, peak_value=opt_cfg.lr, warmup_steps=warmup,
      decay_steps=max(total_steps, warmup + 1), end_value=opt_cfg.lr * opt_cfg.final_lr_fraction)


def decay_mask(params, mode: str):
  """Which leaves get weight decay: every leaf ("all", the official CRATE recipe), matrices only
  ("kernels": leaves of 2+ dimensions with more than one row, not named `bias`: a head-shaped
  (heads, dim_head) bias is still a bias, as timm's and nanoGPT's filters have it), or leaves
  named `kernel` ("named_kernels": big_vision's `.*/kernel$`, as the CRATE-alpha recipe; not D,
  D1, cls, positions, LayerNorms or biases)."""
  if mode == "all":
    return jax.tree.map(lambda _: True, params)
  if mode == "named_kernels":
    return jax.tree_util.tree_map_with_path(
        lambda path, _: getattr(path[-1], "key", None) == "kernel", params)
  return jax.tree_util.tree_map_with_path(
      lambda path, p: p.ndim >= 2 and p.shape[0] > 1 and getattr(path[-1], "key", None) != "bias",
      params)


def layer_decay_scales(layer_ids, depth: int, decay: float):
  """lr multipliers decay^(depth + 1 - id): 1 for the head (id depth + 1), decay^(depth - i) for
  layer i (id i + 1), decay^(depth + 1) for the embeddings (id 0)."""
  return jax.tree.map(lambda i: float(decay) ** (depth + 1 - np.asarray(i, np.float32)),
                      layer_ids)


def scale_by_tree(scales) -> optax.GradientTransformation:
  """Multiply each leaf's update by a fixed scale: a per-parameter learning rate (the decoupled
  weight decay inside the update is scaled with it, as in per-group learning rates)."""
  def update(updates, state, params=None):
    del params
    return jax.tree.map(lambda u, s: u * s, updates, scales), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def weight_decay_schedule(opt_cfg, total_steps: int | None):
  """The decoupled weight decay: opt_cfg.weight_decay, or with opt_cfg.weight_decay_final >= 0
  a cosine from weight_decay to weight_decay_final over the run, per optimiser step (DINO's and
  SimDINO's 0.04 -> 0.4: wd(t) = final + (wd - final) (1 + cos(pi t / T)) / 2)."""
  start, final = float(opt_cfg.weight_decay), float(opt_cfg.get("weight_decay_final", -1.0))
  if final < 0 or not total_steps:
    return start
  frac = lambda t: jnp.minimum(jnp.asarray(t, jnp.float32) / max(int(total_steps), 1), 1.0)
  return lambda t: final + (start - final) * 0.5 * (1.0 + jnp.cos(jnp.pi * frac(t)))


def clip_by_param_norm(max_norm: float) -> optax.GradientTransformation:
  """Each leaf's gradient g <- g min(1, c / (||g|| + 1e-6)) on its own (DINO's and SimDINO's
  `clip_gradients`, per parameter tensor; not the global norm)."""
  def update(updates, state, params=None):
    del params
    scale = lambda g: jnp.minimum(1.0, max_norm / (optax.tree.norm(g) + 1e-6))
    return jax.tree.map(lambda g: g * scale(g).astype(g.dtype), updates), state
  return optax.GradientTransformation(lambda params: optax.EmptyState(), update)


def make_optimizer(opt_cfg, schedule: optax.Schedule, *, layer_ids=None, depth: int | None = None,
                   total_steps: int | None = None):
  """Lion or AdamW with decoupled weight decay (constant, or a cosine schedule over total_steps:
  `weight_decay_schedule`), optional gradient clipping (the global norm, or each parameter's
  with opt_cfg.clip_per_param), and with opt_cfg.layer_decay < 1 layer-wise lr decay over
  `layer_ids` (models.layer_ids)."""
  if opt_cfg.name not in OPTIMIZERS:
    raise ValueError(f"config.optimizer.name={opt_cfg.name!r} is not one of {OPTIMIZERS}")
  if opt_cfg.decay_mask not in DECAY_MASKS:
    raise ValueError(f"config.optimizer.decay_mask={opt_cfg.decay_mask!r} is not one of "
                     f"{DECAY_MASKS}")
  mask = lambda params: decay_mask(params, opt_cfg.decay_mask)
  wd = weight_decay_schedule(opt_cfg, total_steps)
  if opt_cfg.name == "lion":
    tx = optax.lion(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, weight_decay=wd, mask=mask)
  else:
    tx = optax.adamw(schedule, b1=opt_cfg.b1, b2=opt_cfg.b2, eps=opt_cfg.eps,
                     weight_decay=wd, mask=mask,
                     mu_dtype=opt_cfg.mu_dtype or None)
  if opt_cfg.layer_decay < 1.0 and layer_ids is not None:
    tx = optax.chain(tx, scale_by_tree(layer_decay_scales(layer_ids, depth, opt_cfg.layer_decay)))
  if opt_cfg.grad_clip_norm > 0:
    clip = (clip_by_param_norm if opt_cfg.get("clip_per_param", False)
            else optax.clip_by_global_norm)
    tx = optax.chain(clip(opt_cfg.grad_clip_norm), tx)
  return tx
