"""What `analyze` and `analyze --segment` share: their input errors, the images (a folder or a
dataset split), the model rebuilt for an image size, the checkpoint's weights and CSV tables."""
from __future__ import annotations

import csv
import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import models
from crate_jax.training import weights as weights_lib

IMAGE_EXTENSIONS = (".png", ".jpg", ".jpeg")


class AnalyzeError(ValueError):
  """Bad analysis input (images, layer, image size), raised before anything is compiled."""


# ----------------------------------------------------------------------------------- images
def image_files(path: str) -> list[str]:
  """The PNG/JPEG files of a folder (sorted), or [path] for one image file."""
  if not os.path.exists(path):
    raise AnalyzeError(f"--images {path}: no such file or folder")
  if os.path.isfile(path):
    files = [path]
  else:
    files = sorted(os.path.join(path, f) for f in os.listdir(path)
                   if f.lower().endswith(IMAGE_EXTENSIONS) and not f.startswith("."))
    if not files:
      raise AnalyzeError(f"--images {path}: the folder holds no PNG/JPEG images "
                         f"({', '.join(IMAGE_EXTENSIONS)})")
  return files


def read_image(path: str, size: int) -> np.ndarray:
  """RGB in [0, 1], (size, size, 3): shorter side resized to `size` (bicubic), centre crop."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      im = im.convert("RGB")
      w, h = im.size
      scale = size / min(w, h)
      nw, nh = max(size, round(w * scale)), max(size, round(h * scale))
      im = im.resize((nw, nh), Image.Resampling.BICUBIC)
      left, top = (nw - size) // 2, (nh - size) // 2
      im = im.crop((left, top, left + size, top + size))
      return np.asarray(im, np.float32) / 255.0
  except (OSError, ValueError, SyntaxError) as e:
    raise AnalyzeError(f"cannot read image {path}: {e}") from None


def folder_images(path: str, size: int, num_images: int):
  """(display images in [0, 1] (B, size, size, 3), names) of the first num_images files."""
  files = image_files(path)[:num_images]
  return np.stack([read_image(f, size) for f in files]), [os.path.basename(f) for f in files]


def dataset_images(config, split: str, num_images: int):
  """(display images in [0, 1], names) of the first num_images examples of a split."""
  try:
    from crate_jax import data as data_lib
  except ImportError as e:
    raise AnalyzeError(f"--split needs the data pipeline crate_jax.data, which is not "
                       f"importable ({e}); pass --images FOLDER instead") from None
  batch_size = -(-num_images // jax.device_count()) * jax.device_count()
  images, labels = [], []
  for batch in data_lib.eval_iterator(config.data, global_batch_size=batch_size, split=split):
    keep = np.asarray(batch.get("valid", np.ones(len(batch["image"]), bool))).astype(bool)
    images.extend(np.asarray(batch["image"])[keep])
    labels.extend(np.asarray(batch["label"])[keep])
    if len(images) >= num_images:
      break
  if not images:
    raise AnalyzeError(f"split {split!r} of dataset {config.data.name!r} yielded no images")
  mean, std = mean_std(config)
  shown = np.clip(np.stack(images[:num_images]) * std + mean, 0.0, 1.0)
  return shown.astype(np.float32), [f"{split} #{i} (label {int(l)})"
                                    for i, l in enumerate(labels[:num_images])]


def mean_std(config):
  return (np.asarray(config.data.mean, np.float32).reshape(1, 1, 1, -1),
          np.asarray(config.data.std, np.float32).reshape(1, 1, 1, -1))


def resize(images: np.ndarray, size: int) -> np.ndarray:
  if images.shape[1:3] == (size, size):
    return images
  out = jax.image.resize(jnp.asarray(images), (images.shape[0], size, size, images.shape[-1]),
                         method="bicubic")
  return np.clip(np.asarray(out), 0.0, 1.0)


# ------------------------------------------------------------------------------------ model
def training_image_size(config) -> int:
  return int(config.data.image_size)


def build_model(config, image_size: int):
  """The config's model rebuilt for `image_size`, computing in float32."""
  cfg = config.copy_and_resolve_references()
  with cfg.unlocked():
    cfg.model.kwargs.image_size = image_size
    cfg.compute_dtype = "float32"
  model = models.from_config(cfg)
  if not all(hasattr(model, a) for a in ("patch_size", "depth", "heads")):
    raise AnalyzeError(f"model {config.model.name!r} is not a CRATE classifier")
  if not hasattr(model, "token_grid") and image_size % model.patch_size:
    raise AnalyzeError(f"--image-size {image_size} is not a multiple of the patch size "
                       f"{model.patch_size}")
  return model


def checkpoint_params(config, model, abstract_params, checkpoint: str):
  """(params, meta, weights) of the checkpoint fitted to `model`: the weights that stand for
  its model, by its task's rule (crate_jax.training.weights; the EMA when evaluated, DINO's
  teacher backbone, ...). weights names what was loaded: "teacher", "ema", "student", "params"."""
  return weights_lib.load(checkpoint, config, abstract_params=abstract_params, model=model)


def write_csv(rows: list[dict], path: str, fieldnames=None) -> str:
  """rows as a CSV table (columns: `fieldnames`, else the first row's keys)."""
  with open(path, "w", newline="") as f:
    writer = csv.DictWriter(f, fieldnames=list(fieldnames or rows[0]))
    writer.writeheader()
    writer.writerows(rows)
  return path
