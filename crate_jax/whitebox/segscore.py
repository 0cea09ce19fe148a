"""Emergent segmentation, measured: every layer's masks (segment.py) scored by their Jaccard index
against a ground-truth foreground, per layer, head and method, with trivial baselines.

  masks = layer_masks(out, grid, has_class_token=True)    # {method: bool (L, B, gh, gw)}
  ious = mask_ious(masks, gt)                              # {method: (L, B)}
  inputs = segmentation_inputs(model, out, methods)        # in the (sharded) forward program
  scalars = segmentation_scalars(model, inputs, gt, grid, methods=methods)
                                                           # {"whitebox/seg_iou/layer_00": x}

Features: U^T LN(Z^l) concatenated over heads where the family has them (CRATE, CRATE-alpha,
CRATE-MAE; ToST's TSSA features), else each layer's output (ViT). The attention method reads the
class token's row; the memberships method (ToST) each head's membership map Pi[:, k], every head
a candidate mask, the layer's score that of its best head over the images scored.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax.models import family
from crate_jax.whitebox import segment, stats

METHODS = ("attention", "memberships", "pca", "maskcut")


class SegmentationError(ValueError):
  """A method the model cannot give (attention without a class token), an unknown method."""


def check_methods(model, methods) -> tuple[str, ...]:
  """The methods, checked against METHODS and the model family: one clear error each."""
  methods = tuple(methods)
  unknown = [m for m in methods if m not in METHODS]
  if unknown or not methods:
    raise SegmentationError(f"segmentation method(s) {unknown or methods} not among {METHODS}")
  offered = family.contract(model).whitebox
  if "attention" in methods and not (family.has_class_token(model) and "attention" in offered):
    raise SegmentationError(
        f"the attention method reads the class token's attention, and {type(model).__name__} has "
        "no class token attending in its layers; use the methods "
        f"{','.join(default_methods(model))}")
  if "memberships" in methods and "memberships" not in offered:
    raise SegmentationError(f"the memberships method reads TSSA's memberships (ToST), which "
                            f"{type(model).__name__} has not")
  return methods


def patch_features(model, out) -> jax.Array:
  """(L, B, n, D) patch features (class token dropped): the subspace features U^T LN(Z^l) over
  all heads when the family returns them, else each layer's output (already extracted where
  `out` is `segmentation_inputs`' output)."""
  if "patch_features" in out:
    return out["patch_features"]
  if "features" in out:
    x = out["features"]
    x = x.reshape(*x.shape[:3], -1)
  else:
    x = family.layer_outputs(model, out)
  return x[:, :, family.prefix_tokens(model):]


def patch_grid(model, images) -> tuple[int, int]:
  """(gh, gw): the patch grid of (B, H, W, C) images."""
  return family.token_grid(model, images.shape[1], images.shape[2])


def layer_masks(model, out, grid, *, methods=METHODS, share: float = 0.6, tau: float = 0.2,
                num_objects: int = 1) -> dict[str, jax.Array]:
  """{method: bool (L, B, gh, gw)} for every layer and image; "attention" adds
  "attention_heads" (L, B, K, gh, gw); "memberships" gives "memberships_heads" (L, B, K, gh, gw)
  only (its layer mask is a head chosen against the truth: `mask_ious`); maskcut's mask is the
  union of its objects. Jittable."""
  masks = {}
  if "memberships" in methods:
    pi = out["memberships"][:, :, family.prefix_tokens(model):]          # (L, B, n, K)
    masks["memberships_heads"] = jax.vmap(jax.vmap(
        lambda p: segment.attention_mass_mask(p.T, share).reshape(-1, *grid)))(pi)
  if "attention" in methods:
    heads, merged = jax.vmap(jax.vmap(lambda a: segment.attention_masks(a, grid, share)))(
        out["attention"])
    masks["attention"], masks["attention_heads"] = merged, heads
  if "pca" in methods or "maskcut" in methods:
    x = patch_features(model, out)
    if "pca" in methods:
      masks["pca"] = jax.vmap(jax.vmap(lambda f: segment.pca_mask(f, grid)))(x)
    if "maskcut" in methods:
      masks["maskcut"] = jax.vmap(jax.vmap(
          lambda f: jnp.any(segment.maskcut(f, grid, tau, num_objects), axis=0)))(x)
  return masks


def mask_ious(masks: dict, gt: jax.Array, upsampling: str = "nearest") -> dict[str, jax.Array]:
  """{name: IoU (..., B) or (L, B, K)} of each patch mask upsampled to gt's size (B, H, W)."""
  size = gt.shape[-2:]
  out = {}
  for name, m in masks.items():
    pred = segment.upsample_mask(m, size, upsampling)
    target = gt[:, None] if name.endswith("_heads") else gt
    out[name] = segment.jaccard(pred, target)
  if "memberships_heads" in out:
    out["memberships"] = best_head(out["memberships_heads"])
  return out


def best_head(head_ious: jax.Array) -> jax.Array:
  """(L, B, K) per-head IoUs -> (L, B): each layer's head with the best mean IoU over the B
  images (a head chosen against the truth, as a best-head figure is)."""
  best = jnp.argmax(jnp.mean(head_ious, axis=1), axis=-1)                # (L,)
  return jnp.take_along_axis(head_ious, best[:, None, None], axis=-1)[..., 0]


def baselines(gt: np.ndarray) -> dict[str, float]:
  """Mean IoU of masks that look at nothing: the centred box of the mean foreground area
  (`segment.centred_box`) and the whole image (all foreground). gt (B, H, W) bool."""
  gt = np.asarray(gt, bool)
  box = segment.centred_box(gt.shape[-2:], float(gt.mean()))
  return {"centred_box": float(np.mean(segment.jaccard(box[None], gt))),
          "all_foreground": float(np.mean(segment.jaccard(np.ones_like(gt), gt)))}


def segmentation_ious(model, params, images, gt, *, methods=METHODS, share: float = 0.6,
                      tau: float = 0.2, num_objects: int = 1,
                      upsampling: str = "nearest") -> dict[str, jax.Array]:
  """{method: per-image IoU (L, B)} (+ "attention_heads" (L, B, K)) of a model on normalised
  images (B, H, W, 3) against gt (B, H, W) bool. Jittable."""
  _, out = stats.intermediates(model, params, images)
  grid = patch_grid(model, images)
  masks = layer_masks(model, out, grid, methods=methods, share=share, tau=tau,
                      num_objects=num_objects)
  return mask_ious(masks, gt, upsampling)


def default_methods(model) -> tuple[str, ...]:
  """attention where a class token attends in the layers, memberships where the family has
  them (ToST), then pca and maskcut."""
  offered = family.contract(model).whitebox
  first = (("attention",) if family.has_class_token(model) and "attention" in offered else ()) + (
      ("memberships",) if "memberships" in offered else ())
  return (*first, "pca", "maskcut")


def segmentation_inputs(model, out, methods) -> dict[str, jax.Array]:
  """What `layer_masks` reads of the intermediates `out`, and no more: the class token's attention
  row (L, B, K, 1, N) and the patch features (L, B, n, D). Small enough to gather to one host."""
  inputs = {}
  if "attention" in methods:
    inputs["attention"] = out["attention"][..., :1, :]
  if "memberships" in methods:
    inputs["memberships"] = out["memberships"]
  if "pca" in methods or "maskcut" in methods:
    inputs["patch_features"] = patch_features(model, out)
  return inputs


def segmentation_scalars(model, inputs, gt, grid, *, methods) -> dict[str, jax.Array]:
  """{"whitebox/seg_iou/layer_00": mean IoU, ...} from `segmentation_inputs`' output: the
  attention method's where the family has a class token, else the first method's; plus
  "whitebox/seg_iou_<method>/layer_00" for every method. The masks solve eigenproblems on the
  host (segment.eigh): run this in a single-device program, never inside a sharded one."""
  ious = mask_ious(layer_masks(model, inputs, grid, methods=methods), gt)
  main = "attention" if "attention" in methods else methods[0]
  scalars = {}
  for name in (main, *methods):
    prefix = "whitebox/seg_iou" if name == main and not scalars else f"whitebox/seg_iou_{name}"
    mean = jnp.mean(ious[name], axis=-1)
    scalars.update({f"{prefix}/layer_{l:02d}": mean[l] for l in range(mean.shape[0])})
  return scalars


def foreground_of_images(images: np.ndarray, threshold: float = 0.5) -> np.ndarray:
  """The exact ground truth of an image that is its own object (a digit on black): the pixels
  whose mean over channels exceeds `threshold`; images (B, H, W, C) in [0, 1] -> bool (B, H, W)."""
  return np.asarray(images, np.float32).mean(axis=-1) > threshold
