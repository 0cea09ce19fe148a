"""Emergent segmentation, measured (`python -m crate_jax.analyze --segment`): every layer's masks
(CLS attention, PCA, MaskCut) scored by IoU against the dataset's ground-truth foreground, for
the checkpoint and for the same model at random initialisation, beside trivial baselines.

  python -m crate_jax.analyze --segment --config configs/embedded.py \
      --checkpoint workdirs/embedded --out analysis [--num-images 500] [--layer -1] \
      [--seg_methods attention,pca,maskcut] [--seg_share 0.6] [--seg_tau 0.2] [--seg_objects 1]

A task="dino" checkpoint is scored on its teacher's backbone (the EMA, with config.eval_ema as
dino_config sets it; never the projection head), like `evaluate --protocol knn|linear`; the
report's "weights" says which.
Writes segmentation.{json,csv,png} and segmentation_overlay_layerLL.png into --out.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import analysis
from crate_jax import models, setups
from crate_jax.data.datasets import NoMasksError
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.whitebox import segment, segscore

AnalyzeError = analysis.AnalyzeError
CHUNK = 32            # images per compiled call
OVERLAY_IMAGES = 6


def check_inputs(config, checkpoint: str, *, num_images: int, layer: int, methods,
                 upsampling: str, share: float, tau: float, num_objects: int):
  """(model, methods, layer index): every input checked before anything is compiled."""
  if num_images < 1:
    raise AnalyzeError(f"--num-images must be >= 1, got {num_images}")
  if not 0.0 < share <= 1.0:
    raise AnalyzeError(f"--seg_share {share} must be in (0, 1]")
  if not -1.0 <= tau <= 1.0:
    raise AnalyzeError(f"--seg_tau {tau} must be a cosine in [-1, 1]")
  if num_objects < 1:
    raise AnalyzeError(f"--seg_objects must be >= 1, got {num_objects}")
  if upsampling not in segment.UPSAMPLING:
    raise AnalyzeError(f"--seg_upsampling {upsampling!r} is not one of {segment.UPSAMPLING}")
  model = analysis.build_model(config, analysis.training_image_size(config))
  try:
    methods = segscore.check_methods(model, segscore.default_methods(model) if not methods
                                     else methods)
  except segscore.SegmentationError as e:
    raise AnalyzeError(f"--seg_methods: {e} (model {config.model.name!r})") from None
  try:
    setups.check(config, "segment")
  except NoMasksError as e:
    raise AnalyzeError(f"--segment: {e}") from None
  if not -model.depth <= layer < model.depth:
    raise AnalyzeError(f"--layer {layer} is out of range for a {model.depth}-layer model")
  try:
    from crate_jax.data import datasets
  except ImportError as e:
    raise AnalyzeError(f"--segment needs the data pipeline crate_jax.data ({e})") from None
  try:
    datasets.check_masks(config.data)
  except datasets.NoMasksError as e:
    raise AnalyzeError(f"--segment: {e}") from None
  ckpt_lib.resolve(checkpoint)
  return model, methods, layer % model.depth


def images_and_truth(config, split: str, num_images: int):
  """(normalised images (B, H, W, 3), ground truth bool (B, H, W)) of the first examples."""
  from crate_jax import data as data_lib
  batch_size = -(-min(num_images, 256) // jax.device_count()) * jax.device_count()
  images, truth = [], []
  for batch in data_lib.eval_iterator(config.data, global_batch_size=batch_size, split=split,
                                      masks=True):
    keep = np.asarray(batch["valid"]).astype(bool)
    images.extend(np.asarray(batch["image"])[keep])
    truth.extend(np.asarray(batch["foreground"])[keep].astype(bool))
    if len(images) >= num_images:
      break
  if not images:
    raise AnalyzeError(f"split {split!r} of dataset {config.data.name!r} yielded no images")
  return np.stack(images[:num_images]), np.stack(truth[:num_images])


def per_image_ious(fn, params, images, gt) -> dict[str, np.ndarray]:
  """fn(params, images, gt) over fixed-size chunks (padded), concatenated on the image axis."""
  parts = []
  for start in range(0, len(images), CHUNK):
    x, g = images[start:start + CHUNK], gt[start:start + CHUNK]
    n = len(x)
    if n < CHUNK:
      x = np.concatenate([x, np.zeros((CHUNK - n, *x.shape[1:]), x.dtype)])
      g = np.concatenate([g, np.zeros((CHUNK - n, *g.shape[1:]), g.dtype)])
    out = jax.device_get(fn(params, x, g))
    parts.append({k: v[:, :n] for k, v in out.items()})
  return {k: np.concatenate([p[k] for p in parts], axis=1) for k in parts[0]}


def segment_analysis(config, checkpoint: str, out_dir: str, *, split: str | None = None,
                     num_images: int = 256, layer: int = -1, methods=None,
                     share: float = 0.6, tau: float = 0.2, num_objects: int = 1,
                     upsampling: str = "nearest", seed: int = 0) -> dict:
  """Score every layer's masks against the ground truth; write the tables and figures. Returns
  {"paths", "report"}; report["layers"][l][method] is the mean IoU of layer l."""
  model, methods, layer = check_inputs(config, checkpoint, num_images=num_images, layer=layer,
                                       methods=methods, upsampling=upsampling, share=share,
                                       tau=tau, num_objects=num_objects)
  split = split or config.data.eval_split
  size = analysis.training_image_size(config)
  images, gt = images_and_truth(config, split, num_images)
  abstract = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))
  params, meta, weights = analysis.checkpoint_params(config, model, abstract,
                                                        checkpoint)
  random = models.initial_params(model, jax.random.key(seed), jnp.zeros((1, size, size, 3)))
  kw = dict(methods=methods, share=share, tau=tau, num_objects=num_objects, upsampling=upsampling)
  fn = jax.jit(lambda p, x, g: segscore.segmentation_ious(model, p, x, g, **kw))
  trained = per_image_ious(fn, params, images, gt)
  at_init = per_image_ious(fn, random, images, gt)
  for ious in (trained, at_init):   # the best membership head over all the images, not a chunk
    if "memberships_heads" in ious:
      ious["memberships"] = np.asarray(segscore.best_head(ious["memberships_heads"]))
  base = segscore.baselines(gt)

  rows, layers = [], []
  for l in range(model.depth):
    entry = {"layer": l}
    for m in methods:
      entry[m] = float(trained[m][l].mean())
      entry[f"{m}_random_init"] = float(at_init[m][l].mean())
    layers.append(entry)
  for variant, ious in (("trained", trained), ("random_init", at_init)):
    for m in methods:
      label = {"attention": "merged", "memberships": "best"}.get(m, "")
      rows += [{"model": variant, "method": m, "layer": l, "head": label,
                "iou": float(ious[m][l].mean())} for l in range(model.depth)]
      if f"{m}_heads" in ious:
        heads = ious[f"{m}_heads"].mean(axis=1)  # (L, K)
        rows += [{"model": variant, "method": m, "layer": l, "head": k,
                  "iou": float(heads[l, k])} for l in range(model.depth)
                 for k in range(heads.shape[1])]
  rows += [{"model": "baseline", "method": name, "layer": "", "head": "", "iou": v}
           for name, v in base.items()]

  from crate_jax.whitebox import figures
  os.makedirs(out_dir, exist_ok=True)
  paths = {}
  paths["csv"] = analysis.write_csv(rows, os.path.join(out_dir, "segmentation.csv"),
                                     ["model", "method", "layer", "head", "iou"])
  title = (f"{config.model.name}, {os.path.basename(os.path.normpath(checkpoint))} "
           f"({weights}): "
           f"{len(images)} {config.data.name}:{split} images")
  paths["png"] = figures.segmentation_figure(
      {m: [e[m] for e in layers] for m in methods}, base,
      os.path.join(out_dir, "segmentation.png"), title=title,
      random_ious={m: [e[f"{m}_random_init"] for e in layers] for m in methods})
  kw_overlay = dict(kw, best_head=(int(np.argmax(trained["memberships_heads"][layer].mean(0)))
                                   if "memberships_heads" in trained else 0))
  paths["overlay"] = overlay(model, params, config, images, gt, layer, methods, kw_overlay,
                             os.path.join(out_dir, f"segmentation_overlay_layer{layer:02d}.png"))
  report = {
      "model": config.model.name, "checkpoint": str(checkpoint), "step": meta.get("step"),
      "weights": weights, "dataset": config.data.name, "split": split, "num_images": len(images),
      "image_size": size, "foreground_fraction": float(gt.mean()), "methods": list(methods),
      "share": share, "tau": tau, "num_objects": num_objects, "upsampling": upsampling,
      "random_init_seed": seed, "baselines": base, "layers": layers,
      "heads": {m: {"trained": trained[f"{m}_heads"].mean(axis=1).tolist(),
                    "random_init": at_init[f"{m}_heads"].mean(axis=1).tolist()}
                for m in methods if f"{m}_heads" in trained} or None,
      "definitions": DEFINITIONS}
  paths["json"] = os.path.join(out_dir, "segmentation.json")
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=2)
  return {"paths": paths, "report": report}


DEFINITIONS = {
    "iou": "|mask & truth| / |mask | truth| per image (patch mask upsampled to the image), "
           "then the mean over images",
    "attention": "smallest patch set holding `share` of the class token's attention (mean over "
                 "heads; per head in `heads`)",
    "memberships": "ToST: per head k, the smallest patch set holding `share` of its membership "
                   "map Pi[:, k]; the layer's figure is its best head (highest mean IoU over the "
                   "images scored: chosen against the truth); every head in `heads`",
    "pca": "first principal component of the patch features above the midpoint of its range, "
           "minority side",
    "maskcut": "normalized cut of the cosine affinity graph (W = 1 if cos >= tau else 1e-5), "
               "union of num_objects cuts",
    "features": "U^T LN(Z^l) over all heads (CRATE families; ToST's TSSA w), else the layer "
                "output",
    "centred_box": "the centred box covering the mean ground-truth area",
    "all_foreground": "every pixel foreground",
}


def overlay(model, params, config, images, gt, layer, methods, kw, path) -> str:
  """The masks of `layer` over the first few images (upsampled as scored)."""
  from crate_jax.whitebox import figures, stats
  x, g = images[:OVERLAY_IMAGES], gt[:OVERLAY_IMAGES]
  grid = segscore.patch_grid(model, x)

  @jax.jit
  def masks(p, x):
    _, out = stats.intermediates(model, p, x)
    out = {k: v[layer:layer + 1] for k, v in out.items() if getattr(v, "ndim", 0) >= 4}
    found = segscore.layer_masks(model, out, grid, methods=methods, share=kw["share"],
                                 tau=kw["tau"], num_objects=kw["num_objects"])
    if "memberships" in methods:   # the best head's mask (chosen on all the scored images)
      found["memberships"] = found["memberships_heads"][:, :, kw["best_head"]]
    return {m: segment.upsample_mask(found[m][0], g.shape[-2:], kw["upsampling"])
            for m in methods}
  found = jax.device_get(masks(params, x))
  mean, std = analysis.mean_std(config)
  shown = np.clip(x * std + mean, 0.0, 1.0)
  return figures.overlay_figure(shown, g, {m: found[m] for m in methods}, path, layer=layer)
