"""Ground-truth masks through the data pipeline to the IoU scorer: oxford_iiit_pet's trimaps
(hand-made tfds mock records, offline) aligned with their images and scored against a known
prediction, `analyze --segment` on them, and the training hook on a dataset without masks."""
import json
import logging
import os
import pathlib
import types

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds

from crate_jax import config_lib
from crate_jax.whitebox import segscore
from tests.helpers import EMBEDDED, TINY_ARCH

SIZE, RESIZE = 28, 32          # eval: shorter side -> 32, centre crop 28
H, W = 64, 96                  # raw pet images: shorter side 64 -> 32, so 96 -> 48
TOP, LEFT = 2, 10              # the 28 x 28 crop of the 32 x 48 resized image
# Pet boxes (top, left, height, width) in the cropped 28 x 28 frame, one per test example.
BOXES = [(7, 7, 14, 14), (0, 14, 14, 14), (14, 0, 8, 20)]
PET, BACKGROUND, EDGE = 1, 2, 3    # the trimap's values


def trimap(box) -> np.ndarray:
  """(H, W, 1) uint8 trimap: the pet box, a ring of 'edge' around it, background elsewhere,
  plus a pet-valued blob in the strip the centre crop cuts away. Drawn on the 32 x 48 grid the
  eval resize produces, then doubled, so nearest-neighbour resizing has no ties."""
  top, left, h, w = box
  small = np.full((RESIZE, RESIZE * W // H), BACKGROUND, np.uint8)
  t, l = top + TOP, left + LEFT
  small[max(t - 1, 0):t + h + 1, max(l - 1, 0):l + w + 1] = EDGE
  small[t:t + h, l:l + w] = PET
  small[10:20, 1:6] = PET        # outside the crop: must not reach the ground truth
  return np.kron(small, np.ones((2, 2), np.uint8))[..., None]


def expected_foreground(box) -> np.ndarray:
  top, left, h, w = box
  gt = np.zeros((SIZE, SIZE), bool)
  gt[top:top + h, left:left + w] = True
  return gt


def pet_image(mask) -> np.ndarray:
  """Bright pet, mid-grey edge, dark background: the image says where its mask is."""
  value = np.select([mask == PET, mask == EDGE], [220, 120], 20).astype(np.uint8)
  return np.repeat(value, 3, axis=-1)


def fake_pets(self, split, decoders=None, read_config=None, shuffle_files=False):
  """FileReaderBuilder._as_dataset for tfds.testing.mock_data: the BOXES as pet records,
  images and trimaps PNG-encoded where the reader skips decoding (as crate_jax's does)."""
  del split, read_config, shuffle_files
  skip = {k for k, d in (decoders or {}).items() if isinstance(d, tfds.decode.SkipDecoding)}
  masks = [trimap(b) for b in BOXES]
  features = {
      "image": np.stack([pet_image(m) for m in masks]),
      "segmentation_mask": np.stack(masks),
      "label": np.arange(len(BOXES), dtype=np.int64),
      "species": np.zeros(len(BOXES), np.int64),
      "file_name": np.array([f"pet_{i}.png".encode() for i in range(len(BOXES))]),
      "head_bbox": np.zeros((len(BOXES), 4), np.float32)}
  ds = tf.data.Dataset.from_tensor_slices(features)

  def encode(ex):
    return {k: tf.io.encode_png(v) if k in skip else v for k, v in ex.items()}
  return ds.map(encode)


@pytest.fixture(scope="module")
def pets_dir(tmp_path_factory):
  """A 'prepared' oxford_iiit_pet: its metadata only."""
  from tests.data.test_pipeline import write_mock_metadata
  return write_mock_metadata(pathlib.Path(tmp_path_factory.mktemp("pets_tfds")),
                             {"oxford_iiit_pet": {"train": len(BOXES), "test": len(BOXES)}})


@pytest.fixture
def pets(pets_dir):
  """oxford_iiit_pet reading fake_pets' records (mock_data: no files, no network)."""
  with tfds.testing.mock_data(data_dir=pets_dir, as_dataset_fn=fake_pets):
    yield pets_dir


def pets_config(data_dir):
  return config_lib.load_config(EMBEDDED, **{
      "model.kwargs": dict(TINY_ARCH, num_classes=37), "data.name": "oxford_iiit_pet",
      "data.num_classes": 37, "data.data_dir": str(data_dir), "data.image_size": SIZE,
      "data.eval_resize": RESIZE, "data.mean": (0.5,) * 3, "data.std": (0.25,) * 3,
      "data.cache": False})


def test_pet_trimaps_reach_the_scorer_aligned(pets):
  """The pipeline crops and resizes each trimap as its image, keeps only value 1 (the pet, not
  the edge nor the pet-valued blob cut away by the crop), and the IoU against a known
  prediction is the hand-counted one."""
  from crate_jax import analyze_segment
  config = pets_config(pets)
  images, gt = analyze_segment.images_and_truth(config, "test", num_images=len(BOXES))
  assert images.shape == (len(BOXES), SIZE, SIZE, 3) and gt.shape == (len(BOXES), SIZE, SIZE)
  want = np.stack([expected_foreground(b) for b in BOXES])
  np.testing.assert_array_equal(gt, want)
  # the image's own bright pixels (through its bilinear resize) sit on the same pixels
  bright = (images * 0.25 + 0.5).mean(-1) > 170 / 255
  for b, g in zip(bright, gt):
    assert np.sum(b & g) / np.sum(b | g) > 0.85
  # a patch mask (7-pixel patches, 4 x 4 grid): rows 1-2, columns 1-3
  pred = np.zeros((len(BOXES), 4, 4), bool)
  pred[:, 1:3, 1:4] = True
  ious = np.asarray(segscore.mask_ious({"attention": jnp.asarray(pred)}, jnp.asarray(gt))[
      "attention"])
  # box 0: 196 shared of 294; box 1 (rows 0-13, cols 14-27): rows 7-13 x cols 14-27 = 98 shared,
  # union 196 + 294 - 98; box 2 (rows 14-21, cols 0-19): rows 14-20 x cols 7-19 = 91 shared,
  # union 160 + 294 - 91
  np.testing.assert_allclose(ious, [196 / 294, 98 / 392, 91 / 363], rtol=1e-6)
  base = segscore.baselines(gt)
  np.testing.assert_allclose(base["all_foreground"], np.mean([196, 196, 160]) / SIZE**2,
                             rtol=1e-6)


def test_analyze_segment_on_pets(pets, tmp_path):
  """`analyze --segment` end to end on the mocked pets: the tables hold every layer's IoU in
  [0, 1] and the baselines of the pets' ground truth."""
  from crate_jax import analyze_segment, models
  from crate_jax.training import checkpoint as ckpt_lib
  config = pets_config(pets)
  model = models.from_config(config)
  params = model.init(jax.random.key(3), jnp.zeros((1, SIZE, SIZE, 3)))["params"]
  ckpt = ckpt_lib.save_params(str(tmp_path / "work"), jax.device_get(params), {"step": 0})
  out = analyze_segment.segment_analysis(config, ckpt, str(tmp_path / "out"),
                                         num_images=len(BOXES), methods=("attention", "pca"))
  report = out["report"]
  assert report["dataset"] == "oxford_iiit_pet" and report["num_images"] == len(BOXES)
  np.testing.assert_allclose(report["foreground_fraction"], np.mean([196, 196, 160]) / SIZE**2,
                             rtol=1e-6)
  assert len(report["layers"]) == TINY_ARCH["depth"]
  for entry in report["layers"]:
    for key in ("attention", "pca", "attention_random_init", "pca_random_init"):
      assert 0.0 <= entry[key] <= 1.0, (key, entry)
  with open(out["paths"]["json"]) as f:
    assert json.load(f)["baselines"] == report["baselines"]
  assert all(os.path.getsize(p) > 0 for p in out["paths"].values())


# ------------------------------------------- the training loop's hook (with masks: test_loop.py)
def test_whitebox_hook_without_masks_skips_seg_iou(caplog, tmp_path):
  """A dataset without masks (cifar10, mock data): the hook logs that and gives the other
  white-box metrics, no whitebox/seg_iou."""
  from crate_jax import models
  from crate_jax.training import hooks
  from tests.data.test_pipeline import write_mock_metadata
  root = write_mock_metadata(tmp_path / "tfds", {"cifar10": {"train": 8, "test": 8}})
  cfg = config_lib.load_config(EMBEDDED, **{
      "model.kwargs": dict(TINY_ARCH, image_size=32, patch_size=8), "data.name": "cifar10",
      "data.data_dir": root, "data.image_size": 32, "data.eval_resize": 32,
      "eval_batch_size": 8, "whitebox_every_steps": 1})
  model = models.from_config(cfg)
  params = model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  with caplog.at_level(logging.INFO), tfds.testing.mock_data(num_examples=8, data_dir=root):
    hook = hooks.whitebox_hook(cfg, types.SimpleNamespace(model=model))
  assert "dataset cifar10 has no segmentation masks" in caplog.text
  metrics = hook(params)
  assert "whitebox/layer_01/sparsity" in metrics
  assert not any("seg_iou" in k for k in metrics)
