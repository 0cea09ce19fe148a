"""White-box analysis of a trained CRATE checkpoint: layer-wise coding rate and sparsity, CLS
attention maps and a PCA of the patch features of one layer.

  python -m crate_jax.analyze --config configs/embedded.py --checkpoint workdirs/embedded \
      --out analysis [--images FOLDER | --split test] [--num-images 8] [--layer -1] \
      [--image-size 56]

Writes into --out: layerwise.{png,json,csv}, attention_layerLL.png (ToST: memberships_layerLL.png,
each head's membership map Pi[:, k]), pca_layerLL.png. Everything
runs in float32. With --image-size other than the training size, the model is rebuilt for that
size and the checkpoint's positional embedding is resized (bicubic, CLS row kept). A language
model (CRATE-GPT, CRATE-BERT) gets the layer-wise statistics of the first --num-images sequences
of --split: layerwise.{png,json,csv}.
"""
from __future__ import annotations

import functools
import json
import os
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import analysis, cli, models, setups, whitebox
from crate_jax.training import checkpoint as ckpt_lib

AnalyzeError = analysis.AnalyzeError
build_model, checkpoint_params = analysis.build_model, analysis.checkpoint_params
training_image_size = analysis.training_image_size


# --------------------------------------------------------------------------------- analysis
def analyze(config, checkpoint: str, out_dir: str, *, images: str | np.ndarray | None = None,
            split: str | None = None, num_images: int = 8, layer: int = -1,
            image_size: int | None = None, names=None) -> dict:
  """Run the analysis and write the figures and tables into out_dir; returns their paths and
  the layer-wise statistics.

  images: a folder (or one file) of PNG/JPEG images, or an array (B, H, W, 3) in [0, 1]; when
  None, the first num_images of `split` (default config.data.eval_split) via crate_jax.data.
  Inputs are checked (checkpoint, images, layer, size) before any model is compiled.
  """
  setups.check(config, "analyze")
  if models.contract(models.from_config(config)).inputs == "tokens":
    if images is not None or image_size:
      raise AnalyzeError("--images / --image-size: a language model is analysed on its "
                         "dataset's sequences (--split, --num-images sequences)")
    return analyze_text(config, checkpoint, out_dir, split=split, num_sequences=num_images)
  size = int(image_size or training_image_size(config))
  if size <= 0:
    raise AnalyzeError(f"--image-size must be positive, got {size}")
  if num_images < 1:
    raise AnalyzeError(f"--num-images must be >= 1, got {num_images}")
  ckpt_lib.resolve(checkpoint)  # CheckpointError naming the path if there is none
  model = build_model(config, size)
  if not -model.depth <= layer < model.depth:
    raise AnalyzeError(f"--layer {layer} is out of range for a {model.depth}-layer model")
  layer = layer % model.depth
  if isinstance(images, str):
    shown, names = analysis.folder_images(images, size, num_images)
  elif images is not None:
    shown = analysis.resize(np.asarray(images, np.float32)[:num_images], size)
    names = list(names)[:len(shown)] if names else [f"image {i}" for i in range(len(shown))]
  else:
    split = split or config.data.eval_split
    shown, names = analysis.dataset_images(config, split, num_images)
    shown = analysis.resize(shown, size)
  mean, std = analysis.mean_std(config)
  normalised = (shown - mean) / std

  abstract = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            jnp.zeros((1, size, size, 3)))
  params, meta, weights = checkpoint_params(config, model, abstract, checkpoint)
  measured = jax.device_get(jax.jit(functools.partial(_image_arrays, model, layer=layer))(
      params, normalised))
  logits, stats, vis = measured["logits"], measured["stats"], measured["pca"]
  kind = "attention" if "attention" in measured else "memberships"
  maps = measured[kind]
  from crate_jax.whitebox import figures
  os.makedirs(out_dir, exist_ok=True)
  title = (f"{config.model.name}, {os.path.basename(os.path.normpath(checkpoint))}, "
           f"{len(shown)} images at {size}px")
  paths = {
      "curves": figures.curves_figure(stats, os.path.join(out_dir, "layerwise.png"), title=title),
      kind: figures.attention_figure(
          shown, np.asarray(maps), os.path.join(out_dir, f"{kind}_layer{layer:02d}.png"),
          layer=layer, names=names, what=kind),
      "pca": figures.pca_figure(shown, vis, os.path.join(out_dir, f"pca_layer{layer:02d}.png"),
                                layer=layer, names=names),
  }
  fresh = models.initial_params(model, jax.random.key(0), jnp.zeros((1, size, size, 3)))
  report = {"image_size": size, "training_image_size": training_image_size(config),
            "num_images": len(shown), "images": names, "layer": layer,
            **({} if logits is None else {
                "predictions": np.argmax(logits, -1).tolist(),
                **_predicted_names(checkpoint, logits)})}
  return _write_tables(config, checkpoint, out_dir, model, params, fresh, stats, meta, weights,
                       paths, report, title)


def _image_arrays(model, params, x, *, layer: int) -> dict:
  """What analyze draws from one forward pass over images x, as one program (jit this): the
  logits, the layer-wise statistics, the class token's attention (ToST: the memberships) of
  `layer` and its PCA visualisation, both upsampled to the images' size."""
  size = x.shape[1:3]
  logits, out = whitebox.intermediates(model, params, x)
  grid, prefix = models.token_grid(model, *size), models.prefix_tokens(model)
  if "attention" in out:
    maps, kind = whitebox.cls_attention_maps(out["attention"][layer], grid), "attention"
  else:   # ToST: each head's memberships Pi[:, k]
    maps, kind = whitebox.membership_maps(out["memberships"][layer], grid, prefix), "memberships"
  vis = whitebox.pca_visualisation(out["features"][layer], grid, prefix=prefix)
  vis = {k: jax.image.resize(v.astype(jnp.float32), (v.shape[0], *size, *v.shape[3:]),
                             "nearest") for k, v in vis.items()}
  stats = whitebox.layerwise_stats(out, lambd=getattr(model, "lambd", 0.1))
  return {"logits": logits, "stats": stats, kind: whitebox.upsample_maps(maps, size), "pca": vis}


def _write_tables(config, checkpoint, out_dir, model, params, fresh, stats, meta, weights,
                  paths, report, title) -> dict:
  """layerwise.csv / .json (+ the subspace figure) of the layer-wise statistics, with the
  dictionary and subspace statistics of the trained and the fresh params."""
  from crate_jax.whitebox import figures, subspaces
  sub = subspaces.layer_subspace_stats(params)
  sub_init = subspaces.layer_subspace_stats(fresh) if sub else {}
  rows = [{"layer": l, **{k: float(v[l]) for k, v in sorted(stats.items())},
           **{k: float(v[l]) for k, v in sub.items()},
           **{f"{k}_random_init": float(v[l]) for k, v in sub_init.items()}}
          for l in range(model.depth)]
  paths["csv"] = analysis.write_csv(rows, os.path.join(out_dir, "layerwise.csv"))
  if sub:
    paths["subspaces"] = figures.subspaces_figure(
        sub, sub_init, os.path.join(out_dir, "layerwise_subspaces.png"), title=title)
  report = {"model": config.model.name, "checkpoint": str(checkpoint), "step": meta.get("step"),
            "weights": weights, **report, "eps": whitebox.OFFICIAL_EPS_SQ,
            "lambda": float(getattr(model, "lambd", 0.1)), "formulas": FORMULAS, "layers": rows}
  paths["json"] = os.path.join(out_dir, "layerwise.json")
  with open(paths["json"], "w") as f:
    json.dump(report, f, indent=2)
  return {"paths": paths, "stats": stats, "report": report}


def analyze_text(config, checkpoint: str, out_dir: str, *, split: str | None = None,
                 num_sequences: int = 8) -> dict:
  """The layer-wise coding rates and sparsity of a language model (CRATE-GPT / CRATE-BERT) on
  the first num_sequences sequences of `split` (default the eval split; the run's tokenizer):
  layerwise.{png,csv,json}, as for images, tokens in place of patches (N = seq_len, no class
  token)."""
  from crate_jax import data as data_lib
  from crate_jax.data import tokenizers
  from crate_jax.whitebox import figures
  if num_sequences < 1:
    raise AnalyzeError(f"--num-images (sequences) must be >= 1, got {num_sequences}")
  ckpt_lib.resolve(checkpoint)
  config = tokenizers.for_checkpoint(config, checkpoint)
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.compute_dtype = "float32"
  model = models.from_config(cfg)
  split = split or config.data.eval_split
  batch_size = -(-num_sequences // jax.device_count()) * jax.device_count()
  seqs = []
  for batch in data_lib.eval_iterator(config.data, global_batch_size=batch_size, split=split):
    seqs.extend(np.asarray(batch["tokens"])[np.asarray(batch["valid"]).astype(bool)])
    if len(seqs) >= num_sequences:
      break
  if not seqs:
    raise AnalyzeError(f"split {split!r} of dataset {config.data.name!r} yielded no sequences")
  tokens = np.stack(seqs[:num_sequences]).astype(np.int32)
  example = jnp.zeros((1, tokens.shape[1]), jnp.int32)
  abstract = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            example)
  params, meta, weights = checkpoint_params(config, model, abstract, checkpoint)
  stats = jax.device_get(jax.jit(lambda p, x: whitebox.layerwise_stats(
      whitebox.intermediates(model, p, x)[1], lambd=getattr(model, "lambd", 0.1)))(params, tokens))
  os.makedirs(out_dir, exist_ok=True)
  title = (f"{config.model.name}, {os.path.basename(os.path.normpath(checkpoint))}, "
           f"{len(tokens)} sequences of {tokens.shape[1]} tokens")
  paths = {"curves": figures.curves_figure(stats, os.path.join(out_dir, "layerwise.png"),
                                           title=title)}
  fresh = models.initial_params(model, jax.random.key(0), example)
  report = {"split": split, "num_sequences": len(tokens), "seq_len": int(tokens.shape[1])}
  return _write_tables(config, checkpoint, out_dir, model, params, fresh, stats, meta, weights,
                       paths, report, title)


def _predicted_names(checkpoint, logits) -> dict:
  """{"predicted_classes": [...]} by the class names the run saved (image folders), else {}."""
  from crate_jax.data import datasets
  saved = datasets.saved_class_names(str(checkpoint))
  if saved is None:
    return {}
  return {"predicted_classes": [saved[i] for i in np.argmax(logits, -1).tolist()]}


FORMULAS = {
    "coding_rate_c": "1/2 sum_k logdet(I_N + p/(N eps) X_k X_k^T), X_k = rownorm(U_k^T LN(Z^l)), "
                     "CLS included (official)",
    "coding_rate": "1/2 logdet(I_N + d/(N eps) Y Y^T), Y = rownorm(LN(Z^l))",
    "rate_reduction": "coding_rate - coding_rate_c",
    "l0": "||Z^{l+1}||_0 / N (nonzeros per token of the ISTA codes)",
    "objective": "coding_rate_c + lambda * l0 - coding_rate",
    "sparsity": "fraction of exact zeros of Z^{l+1} over N*d entries (CLS included)",
    "density": "1 - sparsity", "l1_over_l0": "||Z^{l+1}||_1 / ||Z^{l+1}||_0",
    "incoherence_max": "max over head pairs k != j of ||U_k^T U_j||_2 (_mean: their mean; "
                       "_random_init: the same model initialised with key 0)",
    "principal_cosine_max": "the same with orthonormal bases of span(U_k): cos of the smallest "
                            "principal angle",
    "dictionary_orthogonality": "||D^T D - I||_F / ||I||_F",
    "aggregation": "per image, then mean and std (ddof=0) over images; eps = 0.01 plays eps^2",
}


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  cli.add_config_argument(parser)
  parser.add_argument("--checkpoint", required=True, help="workdir, checkpoints dir or step dir")
  parser.add_argument("--out", required=True, help="output folder for the figures and tables")
  parser.add_argument("--images", default=None,
                      help="folder (or file) of PNG/JPEG images to analyse")
  parser.add_argument("--split", default=None,
                      help="dataset split to take images from (default: the eval split)")
  parser.add_argument("--num-images", "--num_images", dest="num_images", type=int, default=None,
                      help="number of images or sequences (default 8; --segment: 256)")
  parser.add_argument("--segment", action="store_true",
                      help="measure emergent segmentation (IoU per layer, head and method "
                           "against the dataset's ground truth) instead")
  parser.add_argument("--seg_methods", "--seg-methods", default="",
                      help="--segment: methods (default attention,pca,maskcut; pca,maskcut for "
                           "families whose class token is never read, CRATE-MAE)")
  parser.add_argument("--seg_share", "--seg-share", type=float, default=0.6,
                      help="--segment: attention mass kept (DINO's 60%% rule)")
  parser.add_argument("--seg_tau", "--seg-tau", type=float, default=0.2,
                      help="--segment: MaskCut's cosine affinity threshold")
  parser.add_argument("--seg_objects", "--seg-objects", type=int, default=1,
                      help="--segment: MaskCut objects (their union is scored)")
  parser.add_argument("--seg_upsampling", "--seg-upsampling", default="nearest",
                      help="--segment: nearest or bilinear")
  parser.add_argument("--layer", type=int, default=-1,
                      help="layer for the attention maps and PCA (negative: from the end)")
  parser.add_argument("--image-size", "--image_size", dest="image_size", type=int, default=None,
                      help="input resolution (default: the training size)")
  f = cli.parse_args(parser, argv)
  if f.images and f.split:
    raise AnalyzeError("pass either --images or --split, not both")
  if not f.images:
    try:
      cli.import_tensorflow()
    except ImportError:
      pass  # dataset_images() says what is missing
  if f.segment:
    if f.images:
      raise AnalyzeError("--segment scores against a dataset's ground truth: pass --split (or "
                         "nothing: the eval split), not --images")
    from crate_jax import analyze_segment
    result = analyze_segment.segment_analysis(
        f.config, f.checkpoint, f.out, split=f.split, num_images=f.num_images or 256,
        layer=f.layer, methods=[m.strip() for m in f.seg_methods.split(",") if m.strip()],
        share=f.seg_share, tau=f.seg_tau, num_objects=f.seg_objects,
        upsampling=f.seg_upsampling)
    print(json.dumps(result["paths"], indent=2))
    return 0
  result = analyze(f.config, f.checkpoint, f.out, images=f.images, split=f.split,
                   num_images=f.num_images or 8, layer=f.layer, image_size=f.image_size)
  print(json.dumps(result["paths"], indent=2))
  return 0


if __name__ == "__main__":
  sys.exit(main())
