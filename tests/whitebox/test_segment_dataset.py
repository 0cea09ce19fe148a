"""Segmentation ground truth from a tfds dataset with masks (oxford_iiit_pet's trimaps), through
the data pipeline and `analyze --segment`, with tfds mock data: hand-made examples (tfds's random
mock examples are invalid for this dataset: its bounding boxes come out with min > max)."""
import io
import json
import pathlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from PIL import Image

from crate_jax import analyze_segment, config_lib, models
from crate_jax.training import checkpoint as ckpt_lib
from tests.data.test_pipeline import write_mock_metadata

N, H, W = 12, 48, 64      # non-square originals: the shorter-side resize and centre crop matter
SIZE, RESIZE = 32, 36
PET, BACKGROUND, EDGE = 1, 2, 3  # the trimap's values


def _png(array):
  buf = io.BytesIO()
  Image.fromarray(array).save(buf, format="PNG")
  return buf.getvalue()


def example(i):
  """A bright pet rectangle (trimap 1) with a 4-px grey edge ring (3) on black (2), placed at an
  offset that changes with i."""
  rng = np.random.default_rng(i)
  top, left = int(rng.integers(6, 20)), int(rng.integers(6, 30))
  h, w = int(rng.integers(14, 22)), int(rng.integers(14, 26))
  trimap = np.full((H, W), BACKGROUND, np.uint8)
  trimap[top - 4:top + h + 4, left - 4:left + w + 4] = EDGE
  trimap[top:top + h, left:left + w] = PET
  image = np.zeros((H, W, 3), np.uint8)
  image[trimap == EDGE] = 100
  image[trimap == PET] = (250, 200, 150)
  return image, trimap


def as_dataset(self, split, decoders=None, read_config=None, shuffle_files=False, **kwargs):
  """Encoded examples as the pipeline reads them (image features left encoded)."""
  del self, split, decoders, read_config, shuffle_files, kwargs
  rows = [example(i) for i in range(N)]
  return tf.data.Dataset.from_tensor_slices({
      "image": [_png(im) for im, _ in rows],
      "segmentation_mask": [_png(t) for _, t in rows],
      "label": np.arange(N, dtype=np.int64) % 37,
      "species": np.zeros(N, np.int64)})


@pytest.fixture(scope="module")
def pets(tmp_path_factory):
  root = tmp_path_factory.mktemp("pets")
  data_dir = write_mock_metadata(pathlib.Path(root), {"oxford_iiit_pet": {"train": N, "test": N}})
  config = config_lib.base_config(model="crate_tiny")
  with config.unlocked():
    config.model.kwargs = dict(image_size=SIZE, patch_size=8, num_classes=37, dim=32, depth=2,
                               heads=2, dim_head=16)
    config.data.update(name="oxford_iiit_pet", data_dir=data_dir, num_classes=37,
                       image_size=SIZE, eval_resize=RESIZE, train_split="train",
                       eval_split="test", cache=False)
  with tfds.testing.mock_data(data_dir=data_dir, as_dataset_fn=as_dataset):
    yield config, root


def test_trimap_foreground_is_aligned_with_the_image(pets):
  """The ground truth the scorer gets is the pet (trimap 1) only, cropped and resized exactly as
  its image: it covers the image's bright pixels, never its grey edge ring or the background."""
  config, _ = pets
  images, truth = analyze_segment.images_and_truth(config, "test", N)
  assert images.shape == (N, SIZE, SIZE, 3) and truth.shape == (N, SIZE, SIZE)
  mean, std = np.asarray(config.data.mean), np.asarray(config.data.std)
  pixels = (images * std + mean).mean(-1) * 255  # back to 0..255 grey levels
  bright, grey = pixels > 150, (pixels > 40) & (pixels < 150)
  for t, b, g in zip(truth, bright, grey):
    iou = (t & b).sum() / (t | b).sum()
    assert iou > 0.85, iou          # resize interpolation only blurs the rectangle's rim
    assert (t & g).sum() <= 0.1 * t.sum()  # the edge ring (trimap 3) is not foreground
    assert 0.05 < t.mean() < 0.6


def test_analyze_segment_scores_against_the_trimaps(pets, tmp_path):
  config, root = pets
  model = models.from_config(config)
  params = model.init(jax.random.key(1), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  ckpt = str(tmp_path / "ckpt")
  ckpt_lib.save_params(ckpt, params, {"model": "crate_tiny",
                                      "model_kwargs": dict(config.model.kwargs)})
  out = analyze_segment.segment_analysis(config, ckpt, str(tmp_path / "out"), num_images=N,
                                         methods=("attention", "pca"))
  report = json.load(open(out["paths"]["json"]))
  _, truth = analyze_segment.images_and_truth(config, "test", N)
  assert report["dataset"] == "oxford_iiit_pet" and report["num_images"] == N
  assert report["foreground_fraction"] == pytest.approx(truth.mean(), rel=1e-6)
  # all-foreground IoU = the foreground share of each image, averaged: the trimaps reached it
  assert report["baselines"]["all_foreground"] == pytest.approx(truth.mean(axis=(1, 2)).mean(),
                                                                rel=1e-5)
  for entry in report["layers"]:
    assert all(0.0 <= entry[m] <= 1.0 for m in ("attention", "pca"))
