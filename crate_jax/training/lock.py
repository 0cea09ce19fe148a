"""One trainer per workdir: <workdir>/.lock, held while train_and_evaluate runs.

The lock is a JSON file {host, pid, boot_id, pid_start, started, heartbeat, token}. Only process 0
of a job takes it (the other processes of a multi-host job write nothing). On a local path it is
created atomically: written to a temporary file, then hard-linked into place, so of two trainers
started together exactly one wins, and nobody ever reads a half-written lock. It is removed when the
run ends, normally or with an error (and at interpreter exit as a last resort).

A lock left by a run that died without removing it (SIGKILL, power loss) is stale and is taken over
with a warning when:
- it was written on this machine (same hostname and boot id) by a process that is gone (or whose
  pid now belongs to a process started later);
- it was written under this hostname before the machine last rebooted;
- it was written on another machine and its heartbeat, rewritten every HEARTBEAT_S seconds by the
  holder, is older than $CRATE_JAX_LOCK_STALE_S seconds (default 300): a remote pid can't be
  checked. A run killed on one host and restarted on another within that time is refused, naming
  the old holder; delete the .lock file if you know that run is gone.
A lock of this very process is taken over silently when the thread that took it has finished with
it (e.g. an earlier train_and_evaluate in this thread that raised before releasing); one held by
another live thread refuses like any other.

Remote workdirs (gs://, via etils.epath) use the same file and rules, but creating it is
check-then-write, not atomic: two trainers started within the same moment may both pass.
"""
from __future__ import annotations

import atexit
import datetime
import json
import logging
import os
import socket
import threading
import time
import uuid

LOCK_NAME = ".lock"
HEARTBEAT_S = 30.0
STALE_ENV = "CRATE_JAX_LOCK_STALE_S"
DEFAULT_STALE_S = 300.0

_HELD: dict[str, "WorkdirLock"] = {}  # lock path -> the lock this process holds there


class WorkdirLockedError(RuntimeError):
  """Another live trainer holds the workdir."""


class WorkdirLock:
  """A held lock (or, for processes other than 0, a stand-in that holds nothing)."""

  def __init__(self, path: str | None = None, record: dict | None = None):
    self.path, self.record = path, record
    self.thread = threading.get_ident()
    self._stop = threading.Event()
    self._beat = None

  @property
  def held(self) -> bool:
    return self.path is not None and not self._stop.is_set()

  def release(self) -> None:
    """Stop the heartbeat and remove the lock file if it is still ours; idempotent, and never
    raises (it runs in `finally` blocks: a failing store only gets a warning)."""
    if not self.held:
      return
    self._stop.set()
    if self._beat is not None and self._beat is not threading.current_thread():
      self._beat.join(timeout=10)
    if _HELD.get(self.path) is self:
      del _HELD[self.path]
    try:
      if _is_ours(self.path, self.record):
        _remove(self.path)
    except OSError as e:
      logging.warning("could not remove the workdir lock %s (%s); the next run will find it "
                      "stale", self.path, e)

  def __enter__(self):
    return self

  def __exit__(self, *exc):
    self.release()

  def _start_heartbeat(self, interval: float) -> None:
    self._beat = threading.Thread(target=self._heartbeat, args=(interval,), daemon=True,
                                  name=f"workdir-lock-heartbeat {self.path}")
    self._beat.start()

  def _heartbeat(self, interval: float) -> None:
    while not self._stop.wait(interval):
      try:
        if _is_ours(self.path, self.record):
          self.record = dict(self.record, heartbeat=time.time())
          _replace(self.path, self.record)
      except OSError as e:  # a flaky remote store: the next beat tries again
        logging.debug("lock heartbeat of %s failed: %s", self.path, e)


def acquire(workdir: str, *, process_index: int | None = None,
            stale_after_s: float | None = None) -> WorkdirLock:
  """Take <workdir>/.lock for this run (process 0 only); WorkdirLockedError naming the holder."""
  if process_index is None:
    import jax
    process_index = jax.process_index()
  if process_index != 0:
    return WorkdirLock()
  path = lock_path(workdir)
  stale_after = _stale_after(stale_after_s)
  for _ in range(5):
    record = _new_record()
    if _create(path, record):
      return _hold(path, record, stale_after)
    held = read(path)
    if held is None and not _exists(path):
      continue  # released in the meantime
    reason = _stale_reason(path, held, stale_after)
    if reason is None:
      raise WorkdirLockedError(_locked_message(workdir, path, held))
    if reason:
      logging.warning("%s: taking over a stale lock (%s): %s", workdir, reason, describe(held))
    _remove(path)
  raise WorkdirLockedError(f"could not take the lock {path}: other trainers keep taking it")


def lock_path(workdir: str) -> str:
  workdir = os.fspath(workdir)
  return workdir.rstrip("/") + "/" + LOCK_NAME if _remote(workdir) else os.path.join(
      workdir, LOCK_NAME)


def read(path: str) -> dict | None:
  """The lock's record; {} if unreadable as JSON; None if there is no lock."""
  try:
    if _remote(path):
      text = _path(path).read_text()
    else:
      with open(path) as f:
        text = f.read()
  except FileNotFoundError:
    return None
  try:
    record = json.loads(text)
  except ValueError:
    return {}
  return record if isinstance(record, dict) else {}


def describe(record: dict | None) -> str:
  if not record:
    return "an unreadable lock"
  started = datetime.datetime.fromtimestamp(record.get("started", 0)).isoformat(" ", "seconds")
  return f"host {record.get('host')}, pid {record.get('pid')}, started {started}"


# ------------------------------------------------------------------------------ the holder
def _new_record() -> dict:
  now = time.time()
  return {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": _boot_id(),
          "pid_start": _pid_start(os.getpid()), "started": now, "heartbeat": now,
          "token": uuid.uuid4().hex}


def _hold(path: str, record: dict, stale_after: float) -> WorkdirLock:
  lock = WorkdirLock(path, record)
  _HELD[path] = lock
  lock._start_heartbeat(min(HEARTBEAT_S, stale_after / 4))
  return lock


def _stale_reason(path: str, held: dict, stale_after: float) -> str | None:
  """None if the holder may be alive; else why not ('' for a leftover of this very process)."""
  if not held:
    return "unreadable lock file"
  mine = _HELD.get(path)
  if mine is not None and mine.record.get("token") == held.get("token"):
    if mine.thread != threading.get_ident() and _thread_alive(mine.thread):
      return None
    mine.release()
    return ""
  same_host = held.get("host") == socket.gethostname()
  if same_host and held.get("boot_id") and _boot_id() and held["boot_id"] != _boot_id():
    return "the machine has rebooted since"
  if same_host and held.get("boot_id") == _boot_id():
    start = _pid_start(held.get("pid", -1))
    if not _pid_alive(held.get("pid", -1)):
      return f"process {held.get('pid')} is no longer running"
    if start is not None and held.get("pid_start") not in (None, start):
      return f"pid {held.get('pid')} now belongs to another process"
    return None
  age = time.time() - float(held.get("heartbeat", 0))
  if age > stale_after:
    return f"no heartbeat for {age:.0f} s (> {stale_after:.0f} s, ${STALE_ENV})"
  return None


def _locked_message(workdir: str, path: str, held: dict) -> str:
  return (f"workdir {workdir} is in use by another trainer ({describe(held)}); stop it or use "
          f"another --workdir. If that run is gone, delete {path}")


def _stale_after(value: float | None) -> float:
  return float(value if value is not None else os.environ.get(STALE_ENV, DEFAULT_STALE_S))


def _thread_alive(ident: int) -> bool:
  return any(t.ident == ident for t in threading.enumerate())


def _pid_alive(pid: int) -> bool:
  if pid <= 0:
    return False
  try:
    os.kill(pid, 0)
  except ProcessLookupError:
    return False
  except PermissionError:
    return True  # alive, another user's
  stat = _proc_stat(pid)
  return stat is None or stat[0] != "Z"  # a zombie has exited


def _pid_start(pid: int) -> int | None:
  stat = _proc_stat(pid)
  return None if stat is None else stat[1]


def _proc_stat(pid: int) -> tuple[str, int] | None:
  """(state, start time in clock ticks after boot) from /proc (Linux); None elsewhere."""
  try:
    with open(f"/proc/{pid}/stat") as f:
      fields = f.read().rsplit(")", 1)[1].split()
    return fields[0], int(fields[19])
  except (OSError, IndexError, ValueError):
    return None


def _boot_id() -> str | None:
  try:
    with open("/proc/sys/kernel/random/boot_id") as f:
      return f.read().strip()
  except OSError:
    return None


# ------------------------------------------------------------------------------ the file
def _remote(path: str) -> bool:
  return "://" in os.fspath(path)


def _path(path: str):
  from etils import epath
  return epath.Path(path)


def _exists(path: str) -> bool:
  return _path(path).exists() if _remote(path) else os.path.lexists(path)


def _create(path: str, record: dict) -> bool:
  """Write the lock if there is none; False if there is one."""
  if _remote(path):
    if _path(path).exists():
      return False
    _path(path).write_text(json.dumps(record))
    return True
  tmp = _write_tmp(path, record)
  try:
    os.link(tmp, path)
    return True
  except FileExistsError:
    return False
  finally:
    os.unlink(tmp)


def _replace(path: str, record: dict) -> None:
  if _remote(path):
    _path(path).write_text(json.dumps(record))
  else:
    os.replace(_write_tmp(path, record), path)


def _write_tmp(path: str, record: dict) -> str:
  tmp = f"{path}.{record['token']}.{threading.get_ident()}.tmp"
  try:
    with open(tmp, "w") as f:
      json.dump(record, f)
  except OSError:
    _remove(tmp)
    raise
  return tmp


def _remove(path: str) -> None:
  try:
    if _remote(path):
      _path(path).unlink()
    else:
      os.unlink(path)
  except FileNotFoundError:
    pass


def _is_ours(path: str, record: dict) -> bool:
  held = read(path)
  return bool(held) and held.get("token") == record.get("token")


@atexit.register
def _release_all() -> None:
  for lock in list(_HELD.values()):
    lock.release()
