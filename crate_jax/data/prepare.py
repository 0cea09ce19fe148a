"""The data package's leaf: preparing an offline tfds builder once (file lock, cleanup), the
not-prepared error, the data directory rule and keeping TF off the accelerators. Every data source
(the embedded sets, image folders, text corpora) and the dataset table import this module; it
imports none of them.
"""
from __future__ import annotations

import contextlib
import functools
import os

from etils import epath


class DatasetNotPreparedError(FileNotFoundError):
  """The tfds dataset has no prepared data in the data dir (nothing is ever downloaded)."""


def resolve_data_dir(data_cfg) -> str | None:
  """config.data.data_dir, else $TFDS_DATA_DIR, else None (the tfds default dir)."""
  return getattr(data_cfg, "data_dir", None) or os.environ.get("TFDS_DATA_DIR") or None


@functools.cache
def hide_gpus_from_tf() -> None:
  """TF only feeds the host: keep it off the accelerators (JAX owns their memory)."""
  import tensorflow as tf
  try:
    tf.config.set_visible_devices([], "GPU")
  except RuntimeError:  # TF had already initialised its devices
    pass


class BuilderFile:
  """Class-level `code_path` = the builder's own file: tfds's own lookup imports
  importlib_resources, absent on a bare install, for any builder defined outside
  tensorflow_datasets."""

  def __init__(self, path: str):
    self.path = path

  def __get__(self, obj, objtype=None):
    return epath.Path(self.path)


@contextlib.contextmanager
def file_lock(root: str, name: str):
  """An exclusive flock on <root>/<name> (local dirs only; a no-op for gs:// and the like)."""
  if "://" in root:
    yield
    return
  import fcntl
  os.makedirs(root, exist_ok=True)
  with open(os.path.join(root, name), "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    try:
      yield
    finally:
      fcntl.flock(f, fcntl.LOCK_UN)


def prepare_once(make_builder, lock_root: str, lock_name: str, cleanup=None):
  """make_builder() -> a tfds builder, prepared into its data dir once, offline (the offline
  builders: embedded sets, image folders). Concurrent callers wait on the file lock; in a
  shared dir that cannot be locked, a failure after another host finished counts as prepared.
  A failed preparation calls cleanup() (under the lock) before re-raising, so a builder whose data
  dir is its own can remove what tfds left there."""
  builder = make_builder()
  if builder.is_prepared():
    return builder
  import tensorflow_datasets as tfds
  with file_lock(lock_root, lock_name):
    builder = make_builder()
    if not builder.is_prepared():
      config = tfds.download.DownloadConfig(
          compute_stats=tfds.download.ComputeStatsMode.SKIP, try_download_gcs=False)
      try:
        builder.download_and_prepare(download_config=config)
      except BaseException:  # re-raised unless another host prepared it meanwhile
        if not make_builder().is_prepared():
          if cleanup is not None:
            cleanup()
          raise
  return make_builder()


def split_size(builder, split) -> int:
  """Examples in a split or sub-split; ValueError naming the available splits."""
  try:
    return int(builder.info.splits[split].num_examples)
  except (KeyError, ValueError, AssertionError) as e:
    raise ValueError(f"{builder.name} has no split {split!r} (available: "
                     f"{sorted(builder.info.splits.keys())}): {e}") from None
