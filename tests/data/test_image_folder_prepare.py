"""A failed image_folder preparation leaves nothing in DIR/.tfds but the lock file, and the next run
prepares the whole folder again (no half-written copy is reused)."""
import builtins
import os

import ml_collections
import pytest
from PIL import Image

from crate_jax.data import datasets, image_folder
from crate_jax.data.image_folder import ImageFolderError

PER_CLASS = 3


def _folder(root):
  for split in ("train", "val"):
    for c in ("a", "b"):
      os.makedirs(root / split / c)
      for j in range(PER_CLASS):
        Image.new("L", (8, 8), 40 * j + (c == "b") * 10).save(root / split / c / f"{j}.png")


def _cfg(root):
  return ml_collections.ConfigDict({"name": "image_folder", "data_dir": str(root),
                                    "num_classes": 2})


@pytest.mark.parametrize("failure", ["unreadable_image", "error_while_writing"])
def test_failed_prepare_leaves_nothing_behind(tmp_path, monkeypatch, failure):
  d = tmp_path / "d"
  _folder(d)
  if failure == "unreadable_image":
    (d / "val" / "b" / "broken.png").write_bytes(b"not an image")
    expected = ImageFolderError
  else:  # the 2nd val image read fails: train's split is written by then, val half-way
    reads = []

    def failing_open(path, *args, **kwargs):
      reads.append(path)
      if len(reads) == 4 * PER_CLASS - 1:
        raise OSError(f"simulated read error on {path}")
      return builtins.open(path, *args, **kwargs)
    monkeypatch.setattr(image_folder, "open", failing_open, raising=False)
    expected = OSError
  with pytest.raises(expected):
    datasets.get_builder(_cfg(d))
  assert os.listdir(d / ".tfds") == ["prepare.lock"]  # no <fingerprint>/ folder, complete or not

  if failure == "unreadable_image":
    os.remove(d / "val" / "b" / "broken.png")
  else:
    assert len(reads) == 4 * PER_CLASS - 1  # the failure really was mid-way through the writing
    monkeypatch.undo()
  builder = datasets.get_builder(_cfg(d))
  assert builder.is_prepared()
  assert {s: int(builder.info.splits[s].num_examples) for s in ("train", "val")} == {
      "train": 2 * PER_CLASS, "val": 2 * PER_CLASS}
  assert len(os.listdir(d / ".tfds")) == 2  # <fingerprint>/ and prepare.lock
