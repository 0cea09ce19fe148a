"""Fault-tolerant reading: retry transient read errors, one clear DataReadError for unreadable data.

An iterator is opened at a position (train: global step; eval: batch of the pass). On an error:
  transient  tf.errors Unavailable / DeadlineExceeded / Aborted / ResourceExhausted / Internal, and
             OSErrors other than missing-file / permission ones (e.g. a GCS or NFS hiccup):
             log one warning, sleep backoff_s * 2**(i-1) (at most MAX_BACKOFF_S), reopen at the
             position of the failed batch. After `retries` failures in a row: DataReadError.
  unreadable tf.errors DataLoss (corrupt / truncated TFRecord), NotFound, PermissionDenied:
             DataReadError at once, naming the file (from the TF message; else, for a corrupt
             record of local TFRecords, the file that holds it; else the dataset and data dir).
  other      config and programming errors pass through untouched.
A batch produced resets the count, so a long run survives any number of separate hiccups.

No TensorFlow import here: it is looked up only to classify an error that TF raised.
"""
from __future__ import annotations

import contextlib
import dataclasses
import logging
import os
import re
import struct
import sys
import tempfile
import time
from typing import Callable, Iterator

log = logging.getLogger(__name__)

MAX_BACKOFF_S = 60.0
LOCATE_BUDGET_S = 60.0  # time spent looking for the file that holds a corrupt record
TRANSIENT, UNREADABLE = "transient", "unreadable"
_TRANSIENT_TF = ("UnavailableError", "DeadlineExceededError", "AbortedError",
                 "ResourceExhaustedError", "InternalError")
_UNREADABLE_TF = ("DataLossError", "NotFoundError", "PermissionDeniedError")
_PERMANENT_OS = (FileNotFoundError, PermissionError, IsADirectoryError, NotADirectoryError)
_HINTS = {
    "DataLossError": "the file is corrupt or truncated: restore it from a good copy or prepare "
                     "the dataset again",
    "NotFoundError": "the file is missing: restore it or prepare the dataset again",
    "PermissionDeniedError": "check the read permissions of the data dir",
}


class DataReadError(RuntimeError):
  """Input data could not be read: a corrupt or missing file, or transient errors that persisted.

  Not an OSError on purpose: the train loop reports OSErrors as checkpoint write failures.
  Attributes: paths (the files named, possibly empty), position (e.g. "train step 12").
  """

  def __init__(self, message: str, paths: tuple[str, ...] = (), position: str = ""):
    super().__init__(message)
    self.paths = tuple(paths)
    self.position = position


@dataclasses.dataclass(frozen=True)
class Source:
  """What an iterator reads, for messages."""
  what: str                                   # e.g. "embedded_mnist:train, data_dir /data"
  position: str                               # "train step" or "eval batch"
  files: Callable[[], list[str]] = list       # the files this iterator reads (asked on error)


def classify(e: BaseException) -> str | None:
  """TRANSIENT, UNREADABLE, or None (not a read error: pass it through)."""
  if isinstance(e, DataReadError) or not isinstance(e, Exception):
    return None
  tf = sys.modules.get("tensorflow")
  errors = getattr(tf, "errors", None)
  if errors is not None and isinstance(e, errors.OpError):
    if isinstance(e, tuple(getattr(errors, n) for n in _TRANSIENT_TF)):
      return TRANSIENT
    if isinstance(e, tuple(getattr(errors, n) for n in _UNREADABLE_TF)):
      return UNREADABLE
    return None
  if isinstance(e, OSError) and not isinstance(e, _PERMANENT_OS):
    return TRANSIENT
  return None


def _message(e: BaseException) -> str:
  """The error's text without TF's function-node / op decorations."""
  text = getattr(e, "message", None) or str(e)
  text = re.sub(r"\{\{function_node [^}]*\}\}", "", text)
  text = re.sub(r"\[\[\{\{node [^}]*\}\}\]\]", "", text)
  return re.sub(r"\[Op:[^\]]*\](\s*name:.*)?", "", text)


def summary(e: BaseException) -> str:
  """'ErrorType: first line of the message' (at most 300 characters)."""
  lines = [line.strip() for line in _message(e).splitlines() if line.strip()]
  return f"{type(e).__name__}: {lines[0][:300] if lines else ''}".rstrip(": ")


_PATH = re.compile(r"(?:[A-Za-z][\w+.-]*://|/[\w.~-])[^\s;,'\"()\[\]{}<>]*")


def path_in_error(e: BaseException, candidates=()) -> str | None:
  """A file the error names: a known candidate it mentions, else a path or URL in its first line."""
  filename = getattr(e, "filename", None)
  if filename:
    return os.fsdecode(filename)
  text = _message(e)
  for path in sorted(candidates, key=len, reverse=True):
    if path and path in text:
      return path
  lines = [line for line in text.splitlines() if line.strip()]
  for match in _PATH.finditer(lines[0] if lines else ""):
    path = match.group(0).rstrip(".:")
    if "://" in path or (path.count("/") >= 2 and "/job:" not in path):
      return path
  return None


def _bad_record_at(path: str, offset: int, deadline: float) -> bool:
  """Whether local TFRecord file `path` has an unreadable record that TF reports at `offset`.

  TF reports a record's start (bad header) or its start + 12 (bad data). Walks the record headers
  up to `offset` (8 bytes read per record), then reads that one record with TF's own reader.
  """
  fd = os.open(path, os.O_RDONLY)
  try:
    size = os.fstat(fd).st_size
    if hasattr(os, "posix_fadvise"):
      with contextlib.suppress(OSError):  # no read-ahead of whole files for 8-byte reads
        os.posix_fadvise(fd, 0, 0, os.POSIX_FADV_RANDOM)
    pos = 0
    while pos <= offset and pos < size and time.monotonic() < deadline:
      header = os.pread(fd, 8, pos)  # length, crc(length), data, crc(data)
      end = pos + 16 + struct.unpack("<Q", header)[0] if len(header) == 8 else size + 1
      if pos in (offset, offset - 12):
        return end > size or not _record_readable(os.pread(fd, end - pos, pos))
      pos = end
    return False
  finally:
    os.close(fd)


def _record_readable(record: bytes) -> bool:
  """Whether TF reads one framed TFRecord (checksums included) without a DataLossError."""
  import tensorflow as tf
  with tempfile.TemporaryDirectory() as tmp:
    path = os.path.join(tmp, "record.tfrecord")
    with open(path, "wb") as f:
      f.write(record)
    try:
      for _ in tf.data.TFRecordDataset(path):
        pass
    except tf.errors.DataLossError:
      return False
  return True


def locate_bad_record(e: BaseException, files, budget_s: float = LOCATE_BUDGET_S) -> list[str]:
  """The local files holding the corrupt / truncated record a TF DataLossError reports."""
  match = re.search(r"(?:corrupted|truncated) record at (\d+)", _message(e))
  if not match:
    return []
  offset, deadline = int(match.group(1)), time.monotonic() + budget_s
  bad = []
  for path in files:
    if "://" in path or time.monotonic() > deadline:
      continue
    try:
      if _bad_record_at(path, offset, deadline):
        bad.append(path)
    except OSError:
      continue
  return bad


class _Attempts:
  """Consecutive failures at one position: log and back off, or raise the final error."""

  def __init__(self, source: Source, retries: int, backoff_s: float):
    self.source, self.retries, self.backoff_s = source, retries, backoff_s
    self.failures = 0

  def retry(self, e: Exception, position: int) -> bool:
    """After an error at `position`: True once slept (reopen), False to re-raise `e` as it is.

    Raises DataReadError for an unreadable file, or when the retries are used up.
    """
    kind = classify(e)
    if kind is None:
      return False
    where = f"{self.source.position} {position}"
    if kind == UNREADABLE:
      self._fail(e, kind, where, "")
    if self.failures >= self.retries:
      self._fail(e, kind, where, f" after {self.retries} retries")
    self.failures += 1
    delay = min(self.backoff_s * 2 ** (self.failures - 1), MAX_BACKOFF_S)
    text, path = summary(e), path_in_error(e)
    log.warning("Transient read error in %s at %s%s: %s; retry %d of %d in %.1f s",
                self.source.what, where, f" ({path})" if path and path not in text else "", text,
                self.failures, self.retries, delay)
    _sleep(delay)
    return True

  def _fail(self, e, kind, where, retried):
    try:  # only to name the file: the list of files this iterator reads
      files = [str(f) for f in self.source.files()]
    except Exception:  # noqa: BLE001
      files = []
    path = path_in_error(e, files)
    paths = [path] if path else []
    if not paths and kind == UNREADABLE:  # a record of one of the files read is bad
      paths = locate_bad_record(e, files) or (files if len(files) == 1 else [])
    what = f"{', '.join(paths)} ({self.source.what})" if paths else self.source.what
    hint = _HINTS.get(type(e).__name__, "")
    raise DataReadError(f"cannot read {what} at {where}{retried}: {summary(e)}"
                        + (f"; {hint}" if hint else ""), tuple(paths), where) from e


def _sleep(seconds: float) -> None:
  time.sleep(seconds)


def resilient(open_at: Callable[[int], Iterator], start: int, source: Source, *, retries: int,
              backoff_s: float) -> Iterator:
  """The batches of open_at(start), reopened with open_at(position) after a transient error.

  open_at(start) runs now, so its config errors raise here; open_at(k) must yield the same
  batches as the first iterator from its k-th on (the pipelines are deterministic).
  """
  if retries < 0 or backoff_s < 0:
    raise ValueError(f"config.data.read_retries={retries} and config.data.retry_backoff_s="
                     f"{backoff_s} must be >= 0")
  attempts = _Attempts(source, int(retries), float(backoff_s))
  while True:
    try:
      first = open_at(start)
      break
    except Exception as e:  # noqa: BLE001 - classified in retry()
      if not attempts.retry(e, start):
        raise
  return _batches(open_at, first, start, attempts)


def _batches(open_at, iterator, position: int, attempts: _Attempts):
  try:
    while True:
      try:
        if iterator is None:
          iterator = open_at(position)
        batch = next(iterator)
      except StopIteration:
        return
      except Exception as e:  # noqa: BLE001 - classified in retry()
        _close(iterator)
        iterator = None
        if not attempts.retry(e, position):
          raise
        continue
      attempts.failures = 0
      position += 1
      yield batch
  finally:
    _close(iterator)


def _close(iterator) -> None:
  close = getattr(iterator, "close", None)
  if close is not None:
    close()
