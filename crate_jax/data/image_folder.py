"""`image_folder`: your own images in the torchvision ImageFolder layout, as a prepared tfds
dataset.

  DIR/train/<class>/*.{jpg,jpeg,png}     DIR/val/<class>/*.{jpg,jpeg,png}

Classes are the sub-folder names, sorted (label i = i-th name), identical in train and val. Images
may have any size and be grey or colour (the pipeline decodes every image to RGB). Entries whose
name starts with '.' are ignored. On first use the folder is checked and written once, under a file
lock, into a tfds dataset at DIR/.tfds/<fingerprint>/ (the fingerprint hashes every file's path,
size and mtime), then reused by every later run until a file changes; the tfds pipeline
(per-process shards, deterministic resumable batches, augmentations, cache) then reads it like any
other dataset.

Bad input raises ImageFolderError, one line, before anything compiles: a missing train/ or val/, a
class folder without images, different class sets in train and val, a folder with no images, a file
outside a class folder, and any file that is not a readable JPEG or PNG image. An unreadable file is
fatal (never silently skipped): it is named so that it can be fixed or removed. A preparation that
fails (a bad image, an error or interrupt while writing) removes its DIR/.tfds/<fingerprint>/
folder, so no half-written copy is left for the next run; only the lock file DIR/.tfds/prepare.lock
stays.
"""
from __future__ import annotations

import dataclasses
import hashlib
import os
import shutil

SPLITS = ("train", "val")
FORMATS = ("JPEG", "PNG")
CACHE_DIR = ".tfds"


class ImageFolderError(ValueError):
  """The image folder does not have the layout or contents the loader needs."""


@dataclasses.dataclass(frozen=True)
class Listing:
  root: str
  classes: tuple[str, ...]
  files: dict[str, tuple[tuple[str, int], ...]]   # split -> ((path, label), ...) sorted

  def fingerprint(self) -> str:
    h = hashlib.sha256("\n".join(self.classes).encode())
    for split in SPLITS:
      for path, label in self.files[split]:
        st = os.stat(path)
        h.update(f"{split}|{os.path.relpath(path, self.root)}|{label}|{st.st_size}|"
                 f"{st.st_mtime_ns}\n".encode())
    return h.hexdigest()[:16]


def _visible(names):
  return sorted(n for n in names if not n.startswith("."))


def list_folder(root: str) -> Listing:
  """The classes and (path, label) pairs of DIR/train and DIR/val; ImageFolderError on bad
  layout."""
  if not root:
    raise ImageFolderError("config.data.name=image_folder needs config.data.data_dir=DIR (a folder "
                           "with DIR/train/<class>/* and DIR/val/<class>/*)")
  if not os.path.isdir(root):
    raise ImageFolderError(f"config.data.data_dir={root!r} is not a directory")
  per_split = {}
  for split in SPLITS:
    top = os.path.join(root, split)
    if not os.path.isdir(top):
      raise ImageFolderError(f"image folder {root!r} has no {split}/ sub-folder (expected "
                             f"{split}/<class>/<images>)")
    classes = {}
    for name in _visible(os.listdir(top)):
      path = os.path.join(top, name)
      if not os.path.isdir(path):
        raise ImageFolderError(f"{path} is not inside a class folder ({split}/<class>/<image>)")
      files = [os.path.join(path, f) for f in _visible(os.listdir(path))]
      files = [f for f in files if not os.path.isdir(f)]
      if not files:
        raise ImageFolderError(f"class folder {path} has no images")
      classes[name] = files
    per_split[split] = classes
  train, val = set(per_split["train"]), set(per_split["val"])
  if not train and not val:
    raise ImageFolderError(f"image folder {root!r} has no images (train/ and val/ have no class "
                           "folders)")
  if train != val:
    raise ImageFolderError(
        f"image folder {root!r}: train/ and val/ have different classes (only in train: "
        f"{sorted(train - val)}; only in val: {sorted(val - train)})")
  names = tuple(sorted(train))
  files = {s: tuple((f, i) for i, c in enumerate(names) for f in per_split[s][c]) for s in SPLITS}
  return Listing(os.path.abspath(root), names, files)


def check_image(path: str) -> None:
  """ImageFolderError unless `path` is a JPEG or PNG that decodes (the pixels are read)."""
  from PIL import Image
  try:
    with Image.open(path) as im:
      fmt = im.format
      im.load()
  except Exception as e:  # noqa: BLE001 - any unreadable file is reported the same way
    raise ImageFolderError(f"{path} is not a readable image ({type(e).__name__}: {e}); fix or "
                           "remove it (unreadable files are fatal, never skipped)") from None
  if fmt not in FORMATS:
    raise ImageFolderError(f"{path} is a {fmt} image; only JPEG and PNG are read")


def _builder_class():
  import tensorflow_datasets as tfds
  from crate_jax.data import prepare

  class ImageFolder(tfds.core.GeneratorBasedBuilder, skip_registration=True):
    """A prepared copy of one image folder (encoded bytes kept as they are)."""

    name = "image_folder"
    code_path = prepare.BuilderFile(__file__)
    VERSION = tfds.core.Version("1.0.0")

    def __init__(self, *, listing: Listing, **kwargs):
      self.listing = listing
      super().__init__(**kwargs)

    def _info(self):
      return tfds.core.DatasetInfo(
          builder=self, description=f"image folder {self.listing.root}",
          features=tfds.features.FeaturesDict({
              "image": tfds.features.Image(shape=(None, None, 3)),
              "label": tfds.features.ClassLabel(names=list(self.listing.classes)),
          }),
          supervised_keys=("image", "label"))

    def _split_generators(self, dl_manager):
      del dl_manager
      for split in SPLITS:
        for path, _ in self.listing.files[split]:
          check_image(path)
      return {s: self._generate_examples(s) for s in SPLITS}

    def _generate_examples(self, split):
      for i, (path, label) in enumerate(self.listing.files[split]):
        with open(path, "rb") as f:
          data = f.read()
        yield i, {"image": data, "label": label}

  return ImageFolder


def prepared_builder(root: str):
  """The tfds builder of the folder, checking and preparing it once (later runs reuse it)."""
  from crate_jax.data import prepare
  listing = list_folder(root)
  if not any(listing.files.values()):
    raise ImageFolderError(f"image folder {root!r} has no images")
  cls = _builder_class()
  cache = os.path.join(listing.root, CACHE_DIR)
  data_dir = os.path.join(cache, listing.fingerprint())
  return prepare.prepare_once(lambda: cls(listing=listing, data_dir=data_dir), cache,
                               "prepare.lock",
                               cleanup=lambda: shutil.rmtree(data_dir, ignore_errors=True))


def class_names(root: str) -> list[str]:
  """The folder's class names in label order (no images are read)."""
  return list(list_folder(root).classes)
