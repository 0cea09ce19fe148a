"""config.data.name=image_folder: real digits written as PNG class folders, trained and evaluated
through the main command; every malformed folder refused with one line before anything compiles."""
import json
import os
import subprocess
import sys

import ml_collections
import numpy as np
import pytest
from PIL import Image

from crate_jax.data import datasets, embedded
from crate_jax.data.image_folder import ImageFolderError
from tests.helpers import ROOT, xla_flags

TRAIN_PER_CLASS, VAL_PER_CLASS = 40, 10


def write_digits(root, train_per_class=TRAIN_PER_CLASS, val_per_class=VAL_PER_CLASS):
  """The embedded set's digits as root/{train,val}/<digit>/<row>.png (val from its test rows);
  every third train image is written as RGB at 32 px, so sizes and channels differ."""
  images, labels = embedded.load_csv()
  test = embedded.test_rows(labels)
  for split, mask, n in (("train", ~test, train_per_class), ("val", test, val_per_class)):
    for c in range(10):
      folder = os.path.join(root, split, str(c))
      os.makedirs(folder, exist_ok=True)
      for j, r in enumerate(np.flatnonzero(mask & (labels == c))[:n]):
        im = Image.fromarray(images[r, :, :, 0])
        if split == "train" and j % 3 == 0:
          im = im.convert("RGB").resize((32, 32))
        im.save(os.path.join(folder, f"{r}.png"))


def _cfg(root, num_classes=10):
  return ml_collections.ConfigDict({"name": "image_folder", "data_dir": str(root),
                                    "num_classes": num_classes})


@pytest.fixture(scope="module")
def trained(tmp_path_factory):
  """A small CRATE trained on the digit folder by `python -m crate_jax.train` (one subprocess)."""
  tmp = tmp_path_factory.mktemp("folder")
  write_digits(str(tmp / "digits"))
  env = {k: v for k, v in os.environ.items() if k != "CRATE_JAX_DEBUG"}
  # One CPU device in the subprocess: the folder is what is tested here, and 8 simulated devices'
  # collectives abort (XLA's 40 s rendezvous timeout) when the 2 CPU cores are heavily shared.
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu",
             XLA_FLAGS=xla_flags(1))
  r = subprocess.run(
      [sys.executable, "-m", "crate_jax.train", "--config", "configs/image_folder.py",
       f"--config.data.data_dir={tmp / 'digits'}", f"--workdir={tmp / 'run'}",
       "--config.num_epochs=15", "--config.batch_size=48", "--config.eval_batch_size=40",
       "--config.model.kwargs.depth=2", "--config.model.kwargs.dim=48",
       "--config.model.kwargs.heads=2", "--config.model.kwargs.dim_head=24",
       "--config.optimizer.lr=4e-3", "--config.optimizer.warmup_epochs=0.5",
       "--config.log_every_steps=1000", "--config.eval_every_steps=1000",
       "--config.checkpoint_every_steps=1000"],
      cwd=ROOT, env=env, capture_output=True, text=True, timeout=600)
  assert r.returncode == 0, (r.stdout[-2000:], r.stderr[:6000])
  return tmp


def test_digit_folder_learns_and_saves_class_names(trained):
  from crate_jax import evaluate
  from crate_jax.training import checkpoint as ckpt_lib
  run = trained / "run"
  assert json.loads((run / "class_names.json").read_text()) == [str(c) for c in range(10)]
  _, meta = ckpt_lib.load_params(str(run))
  config = ml_collections.ConfigDict(meta["config"])
  assert datasets.check_class_names(config.data, str(run)) == [str(c) for c in range(10)]
  result = evaluate.evaluate_checkpoint(config, str(run))
  print("digit folder val top1:", result)
  assert result["top1"] > 0.4  # chance is 0.1 (100 held-out digits)
  # the prepared copy is reused: same fingerprint folder, no second preparation
  assert len(os.listdir(trained / "digits" / ".tfds")) == 2  # <fingerprint>/ and prepare.lock


def test_other_classes_are_refused(trained, tmp_path):
  other = tmp_path / "other"
  for split in ("train", "val"):
    for c in ["0", "1", "seven"]:
      _png(str(other / split / c / "x.png"))
  with pytest.raises(ValueError, match=r"only in the data: \['seven'\]; only in the checkpoint: "
                     r"\['2', '3', '4', '5', '6', '7', '8', '9'\]"):
    datasets.check_class_names(_cfg(other, 3), str(trained / "run" / "checkpoints"))


def test_resumed_batches_equal_uninterrupted_ones(trained):
  from crate_jax.data import pipeline
  cfg = ml_collections.ConfigDict(json.loads((trained / "run" / "config.json").read_text())["data"])
  full = pipeline.train_iterator(cfg, global_batch_size=16, seed=3, process_index=0,
                                 process_count=2)
  batches = [next(full) for _ in range(3)]
  resumed = next(pipeline.train_iterator(cfg, global_batch_size=16, seed=3, start_step=2,
                                         process_index=0, process_count=2))
  np.testing.assert_array_equal(resumed["image"], batches[2]["image"])
  other = next(pipeline.train_iterator(cfg, global_batch_size=16, seed=3, process_index=1,
                                       process_count=2))
  assert not np.array_equal(other["image"], batches[0]["image"])


def _png(path, size=8, mode="L"):
  os.makedirs(os.path.dirname(path), exist_ok=True)
  Image.new(mode, (size, size), 128).save(path)


@pytest.mark.parametrize("case,message", [
    ("no_val", "has no val/ sub-folder"),
    ("empty_class", "has no images"),
    ("different_classes", "only in train: ['b']; only in val: ['c']"),
    ("nothing", "has no images"),
    ("loose_file", "is not inside a class folder"),
    ("num_classes", "config.data.num_classes=3 but image folder"),
    ("unreadable", "broken.png is not a readable image"),
])
def test_bad_folders_are_refused_before_anything_compiles(tmp_path, case, message):
  d = tmp_path / "d"
  for split in ("train", "val"):
    os.makedirs(d / split)
  if case == "no_val":
    os.rmdir(d / "val")
  elif case == "empty_class":
    _png(str(d / "train" / "a" / "x.png"))
    os.makedirs(d / "val" / "a")
  elif case == "different_classes":
    for c in ("a", "b"):
      _png(str(d / "train" / c / "x.png"))
    for c in ("a", "c"):
      _png(str(d / "val" / c / "x.png"), mode="RGB", size=5)
  elif case == "loose_file":
    _png(str(d / "train" / "x.png"))
  elif case in ("num_classes", "unreadable"):
    for split in ("train", "val"):
      for c in ("a", "b"):
        _png(str(d / split / c / "x.jpg"))
    if case == "unreadable":
      (d / "val" / "b" / "broken.png").write_bytes(b"not an image at all")
  n = 3 if case == "num_classes" else 2
  with pytest.raises(ImageFolderError) as e:
    datasets.get_builder(_cfg(d, n))
  assert message in str(e.value) and "\n" not in str(e.value)

