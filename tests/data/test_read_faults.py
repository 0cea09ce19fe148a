"""Input pipeline fault tolerance: transient read errors are retried with bit-identical batches,
an unreadable file is one DataReadError naming it, other errors pass straight through."""
import errno
import itertools
import logging
import os
import shutil

import numpy as np
import pytest
import tensorflow as tf

from crate_jax import data
from crate_jax.data import datasets, embedded, pipeline, retry
from tests.data.test_pipeline import assert_same, emb_cfg, take

GCS_FILE = "gs://bucket/tfds/embedded_mnist/1.0.0/embedded_mnist-train.tfrecord-00003-of-00016"


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("emb_faults")
  embedded.prepared_builder(str(root))
  return root


@pytest.fixture
def sleeps(monkeypatch):
  """The backoff waits, recorded instead of slept."""
  waits = []
  monkeypatch.setattr(retry, "_sleep", waits.append)
  return waits


@pytest.fixture
def warnings(caplog):
  caplog.set_level(logging.WARNING, logger=retry.__name__)
  return lambda: [r.getMessage() for r in caplog.records
                  if r.name == retry.__name__ and r.levelno == logging.WARNING]


def inject(monkeypatch, fail_after, error=None):
  """The i-th pipeline read (pipeline._read) raises `error` after fail_after[i] batches (None or
  past the list: never). Returns the list of opened reads."""
  real, opened = pipeline._read, []
  error = error or (lambda: tf.errors.UnavailableError(None, None, f"503 reading {GCS_FILE}"))

  def read(ds):
    it, after = real(ds), (fail_after[len(opened)] if len(opened) < len(fail_after) else None)
    opened.append(after)

    def batches():
      for n in itertools.count():
        if n == after:
          raise error()
        try:
          batch = next(it)
        except StopIteration:
          return
        yield batch
    return batches()
  monkeypatch.setattr(pipeline, "_read", read)
  return opened


# ---------------------------------------------------------------- transient errors are retried

@pytest.mark.parametrize("cache, fail_after, logged, waits", [
    # Per-epoch pipelines (4000 / 128 = 31 steps): epoch 1 fails at once, twice in a row.
    (False, [None, 0, 0],
     [("train step 31: ", "retry 1 of 5"), ("train step 31: ", "retry 2 of 5")], [1.0, 2.0]),
    # One pipeline over all epochs: fails at step 30, then at 31 (a batch between: count reset).
    (True, [2, 1], [("train step 30: ", "retry 1 of 5"), ("train step 31: ", "retry 1 of 5")],
     [1.0, 1.0]),
])
def test_transient_train_errors_retry_with_identical_batches(emb_dir, monkeypatch, sleeps,
                                                             warnings, cache, fail_after, logged,
                                                             waits):
  cfg = emb_cfg(emb_dir, cache=cache, flip=True, shuffle_buffer=500)
  expected = take(data.train_iterator(cfg, global_batch_size=128, seed=2, start_step=28), 6)
  opened = inject(monkeypatch, fail_after)
  got = take(data.train_iterator(cfg, global_batch_size=128, seed=2, start_step=28), 6)
  assert_same(got, expected)                       # bit-identical to the undisturbed run
  assert len(opened) > len(fail_after) and sleeps == waits
  assert len(warnings()) == len(logged)
  for message, (step, attempt) in zip(warnings(), logged):
    assert step in message and attempt in message, message
    assert "embedded_mnist:train" in message and GCS_FILE in message
    assert "UnavailableError" in message and "\n" not in message


@pytest.mark.parametrize("cache", [False, True])
def test_transient_eval_errors_retry_with_identical_batches(emb_dir, monkeypatch, sleeps,
                                                            warnings, cache):
  cfg = emb_cfg(emb_dir, cache=cache)
  expected = list(data.eval_iterator(cfg, global_batch_size=256))   # 1000 = 3 x 256 + 232
  assert len(expected) == 4 and expected[-1]["valid"].sum() == 232
  inject(monkeypatch, [2, 0])                      # batch 2 fails, and again on the reopen
  assert_same(list(data.eval_iterator(cfg, global_batch_size=256)), expected)
  assert sleeps == [1.0, 2.0] and len(warnings()) == 2
  assert all("eval batch 2: " in m and "embedded_mnist:test" in m for m in warnings())


def test_transient_error_while_opening_is_retried(emb_dir, monkeypatch, sleeps, warnings):
  real, calls = datasets.get_builder, []

  def flaky_builder(cfg):
    calls.append(1)
    if len(calls) <= 2:
      raise OSError(errno.EIO, "Input/output error", "/mnt/nfs/dataset_info.json")
    return real(cfg)
  monkeypatch.setattr(datasets, "get_builder", flaky_builder)
  cfg = emb_cfg(emb_dir, retry_backoff_s=0.25)
  batch = next(data.train_iterator(cfg, global_batch_size=64, seed=0))
  assert batch["image"].shape == (64, 28, 28, 3)
  assert sleeps == [0.25, 0.5] and len(warnings()) == 2
  assert "/mnt/nfs/dataset_info.json" in warnings()[0] and "train step 0" in warnings()[0]


# ---------------------------------------------------------------- retries used up

def test_retries_used_up_is_one_clear_error(emb_dir, monkeypatch, sleeps, warnings):
  cfg = emb_cfg(emb_dir, read_retries=2, retry_backoff_s=0.5)
  it = data.train_iterator(cfg, global_batch_size=128, seed=0, start_step=5)
  opened = inject(monkeypatch, [0] * 10)
  with pytest.raises(data.DataReadError) as e:
    next(it)
  message = str(e.value)
  assert GCS_FILE in message and "embedded_mnist:train" in message and str(emb_dir) in message
  assert "train step 5 after 2 retries" in message and "UnavailableError" in message
  assert e.value.paths == (GCS_FILE,) and e.value.position == "train step 5"
  assert isinstance(e.value.__cause__, tf.errors.UnavailableError)
  assert len(opened) == 3 and sleeps == [0.5, 1.0] and len(warnings()) == 2
  with pytest.raises(StopIteration):                # the iterator is finished
    next(it)


def test_retries_used_up_while_opening_names_the_dataset(emb_dir, monkeypatch, sleeps):
  def down(cfg):
    raise tf.errors.DeadlineExceededError(None, None, "metadata server timed out")
  monkeypatch.setattr(datasets, "get_builder", down)
  cfg = emb_cfg(emb_dir, read_retries=1)
  with pytest.raises(data.DataReadError, match=r"cannot read embedded_mnist:test, data_dir "
                     rf"{emb_dir} at eval batch 0 after 1 retries: DeadlineExceededError"):
    data.eval_iterator(cfg, global_batch_size=64)   # raised by the call, as config errors are
  assert sleeps == [1.0]


def test_zero_retries_and_bad_settings(emb_dir, monkeypatch, sleeps):
  cfg = emb_cfg(emb_dir, read_retries=0)
  it = data.train_iterator(cfg, global_batch_size=64, seed=0)
  inject(monkeypatch, [0])
  with pytest.raises(data.DataReadError, match="after 0 retries"):
    next(it)
  assert sleeps == []
  for bad in [dict(read_retries=-1), dict(retry_backoff_s=-1.0)]:
    with pytest.raises(ValueError, match="read_retries"):
      data.train_iterator(emb_cfg(emb_dir, **bad), global_batch_size=64, seed=0)


# ---------------------------------------------------------------- unreadable files

def corrupt_copy(emb_dir, tmp_path, split, how):
  """A copy of the prepared dataset whose `split` shard is truncated or overwritten mid-file."""
  root = tmp_path / "data"
  shutil.copytree(emb_dir, root)
  shard = root / "embedded_mnist" / "1.0.0" / f"embedded_mnist-{split}.tfrecord-00000-of-00001"
  size = shard.stat().st_size
  if how == "truncate":
    os.truncate(shard, size // 2)
  else:
    with open(shard, "r+b") as f:
      f.seek(size // 2)
      f.write(b"\xa5" * 64)
  return root, str(shard)


@pytest.mark.parametrize("how", ["truncate", "overwrite"])
def test_corrupt_train_file_is_one_error_naming_it(emb_dir, tmp_path, sleeps, warnings, how):
  root, shard = corrupt_copy(emb_dir, tmp_path, "train", how)
  it = data.train_iterator(emb_cfg(root, cache=False, shuffle_buffer=100), global_batch_size=128,
                           seed=0)
  with pytest.raises(data.DataReadError) as e:
    take(it, 31)
  message = str(e.value)
  assert shard in message and "DataLossError" in message and "corrupt or truncated" in message
  assert e.value.paths == (shard,) and e.value.position.startswith("train step ")
  assert isinstance(e.value.__cause__, tf.errors.DataLossError)
  assert sleeps == [] and warnings() == []           # not transient: no retry


def test_corrupt_eval_file_is_one_error_naming_it(emb_dir, tmp_path, sleeps):
  root, shard = corrupt_copy(emb_dir, tmp_path, "test", "overwrite")
  with pytest.raises(data.DataReadError, match="eval batch") as e:
    list(data.eval_iterator(emb_cfg(root, cache=False), global_batch_size=64))
  assert shard in str(e.value) and sleeps == []


def test_missing_train_file_is_one_error_naming_it(emb_dir, tmp_path, sleeps):
  root, shard = corrupt_copy(emb_dir, tmp_path, "train", "truncate")
  os.remove(shard)
  it = data.train_iterator(emb_cfg(root, cache=False), global_batch_size=64, seed=0)
  with pytest.raises(data.DataReadError, match="missing") as e:
    next(it)
  assert e.value.paths == (shard,) and sleeps == []


def write_records(path, sizes, seed):
  rng = np.random.default_rng(seed)
  with tf.io.TFRecordWriter(path) as w:
    for n in sizes:
      w.write(rng.integers(0, 256, n, dtype=np.uint8).tobytes())


@pytest.mark.parametrize("where", ["mid-record", "first header", "truncated"])
def test_locate_the_file_with_the_bad_record(tmp_path, where):
  """Several shards: the DataLossError names no file; the record offset finds the one."""
  files = [str(tmp_path / f"shard-{i}.tfrecord") for i in range(4)]
  for i, f in enumerate(files):
    write_records(f, [300 + 37 * ((i + j) % 5) for j in range(12)], seed=i)
  bad = files[2]
  size = os.path.getsize(bad)
  if where == "truncated":
    os.truncate(bad, size - 100)
  else:
    with open(bad, "r+b") as f:
      f.seek(size // 2 if where == "mid-record" else 0)
      f.write(b"\x5a" * 8)
  with pytest.raises(tf.errors.DataLossError) as e:
    for _ in tf.data.TFRecordDataset(files):
      pass
  assert not any(f in e.value.message for f in files)
  assert retry.locate_bad_record(e.value, files) == [bad]


def test_error_classes_and_file_names():
  assert retry.classify(tf.errors.UnavailableError(None, None, "x")) == retry.TRANSIENT
  assert retry.classify(tf.errors.InternalError(None, None, "x")) == retry.TRANSIENT
  assert retry.classify(OSError(errno.EIO, "I/O error")) == retry.TRANSIENT
  assert retry.classify(TimeoutError("read timed out")) == retry.TRANSIENT
  assert retry.classify(tf.errors.DataLossError(None, None, "x")) == retry.UNREADABLE
  assert retry.classify(tf.errors.NotFoundError(None, None, "x")) == retry.UNREADABLE
  bad_arg = tf.errors.InvalidArgumentError(None, None, "x")
  for other in [ValueError("x"), KeyError("x"), FileNotFoundError("x"), bad_arg,
                datasets.DatasetNotPreparedError("x"), data.DataReadError("x"),
                KeyboardInterrupt()]:
    assert retry.classify(other) is None, other
  decorated = tf.errors.UnavailableError(None, None, (
      "{{function_node __wrapped__IteratorGetNext_device_/job:localhost/replica:0/task:0/device:"
      f"CPU:0}}}} HTTP request failed: 503 when reading {GCS_FILE} [Op:IteratorGetNext]"))
  assert retry.path_in_error(decorated) == GCS_FILE
  assert retry.summary(decorated) == (f"UnavailableError: HTTP request failed: 503 when reading "
                                      f"{GCS_FILE}")
  assert retry.path_in_error(OSError(errno.EIO, "I/O error", "/data/x")) == "/data/x"
  assert retry.path_in_error(tf.errors.DataLossError(None, None, "corrupted record at 12")) is None


# ---------------------------------------------------------------- other errors pass through

@pytest.mark.parametrize("error", [lambda: ValueError("a bug in a map function"),
                                   lambda: tf.errors.InvalidArgumentError(None, None, "bad JPEG")])
def test_non_transient_errors_pass_straight_through(emb_dir, monkeypatch, sleeps, warnings,
                                                    error):
  made = []
  opened = inject(monkeypatch, [1], error=lambda: made.append(error()) or made[-1])
  it = data.train_iterator(emb_cfg(emb_dir), global_batch_size=64, seed=0)
  next(it)
  with pytest.raises(type(error())) as e:
    next(it)
  assert e.value is made[0]                        # the very same exception, not wrapped
  assert len(opened) == 1 and sleeps == [] and warnings() == []
