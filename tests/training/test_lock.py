"""One trainer per workdir: <workdir>/.lock refuses a second trainer naming the first, a lock left
by a killed process is taken over with a warning, and a normal run leaves none behind."""
import json
import logging
import os
import socket
import subprocess
import sys
import threading
import time

import pytest

from crate_jax import train
from crate_jax.training import lock
from tests.helpers import ROOT, tiny_config

HOLDER = ("import sys\nfrom crate_jax.training import lock\n"
          "lock.acquire(sys.argv[1], process_index=0)\nprint('held', flush=True)\n"
          "sys.stdin.read()\n")


def _lock_file(workdir):
  return os.path.join(str(workdir), lock.LOCK_NAME)


def _write_lock(workdir, **fields):
  record = {"host": socket.gethostname(), "pid": os.getpid(), "boot_id": lock._boot_id(),
            "started": time.time(), "heartbeat": time.time(), "token": "someone-else", **fields}
  with open(_lock_file(workdir), "w") as f:
    json.dump(record, f)


def test_trainer_refuses_a_held_workdir_then_takes_over_after_the_holder_is_killed(
    tmp_path, caplog):
  workdir = tmp_path / "run"
  workdir.mkdir()
  holder = subprocess.Popen([sys.executable, "-c", HOLDER, str(workdir)], cwd=ROOT,
                            env=dict(os.environ, PYTHONPATH=ROOT), stdin=subprocess.PIPE,
                            stdout=subprocess.PIPE, text=True)
  try:
    assert holder.stdout.readline().strip() == "held"
    cfg = tiny_config(tmp_path / "tfds", num_train_steps=2, checkpoint_every_steps=2)
    with pytest.raises(lock.WorkdirLockedError,
                       match=f"host {socket.gethostname()}, pid {holder.pid}, started"):
      train.train_and_evaluate(cfg, str(workdir))
    assert not (workdir / "checkpoints").exists()
  finally:
    holder.kill()
    holder.wait()
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(cfg, str(workdir))
  assert f"process {holder.pid} is no longer running" in caplog.text, caplog.text
  assert "stale lock" in caplog.text
  assert not os.path.exists(_lock_file(workdir))  # released after the normal run
  assert (workdir / "checkpoints" / "2").exists()


def test_release_removes_only_its_own_lock(tmp_path):
  held = lock.acquire(str(tmp_path), process_index=0)
  record = lock.read(_lock_file(tmp_path))
  assert record["pid"] == os.getpid() and record["host"] == socket.gethostname()
  held.release()
  assert not os.path.exists(_lock_file(tmp_path))
  held = lock.acquire(str(tmp_path), process_index=0)
  _write_lock(tmp_path, token="not-mine")  # someone replaced it meanwhile
  held.release()
  assert lock.read(_lock_file(tmp_path))["token"] == "not-mine"


def test_other_processes_of_a_job_take_no_lock(tmp_path):
  stand_in = lock.acquire(str(tmp_path), process_index=1)
  assert not stand_in.held and not os.path.exists(_lock_file(tmp_path))
  stand_in.release()


def test_another_hosts_lock_is_stale_only_without_a_recent_heartbeat(tmp_path, caplog):
  _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 10)
  with pytest.raises(lock.WorkdirLockedError, match="host elsewhere, pid 1"):
    lock.acquire(str(tmp_path), process_index=0, stale_after_s=60)
  _write_lock(tmp_path, host="elsewhere", pid=1, heartbeat=time.time() - 120)
  with caplog.at_level(logging.WARNING):
    held = lock.acquire(str(tmp_path), process_index=0, stale_after_s=60)
  assert "no heartbeat for 120 s" in caplog.text
  held.release()


def test_a_rebooted_machine_or_a_reused_pid_frees_the_lock(tmp_path):
  _write_lock(tmp_path, boot_id="an-earlier-boot")
  lock.acquire(str(tmp_path), process_index=0).release()
  _write_lock(tmp_path, pid_start=-5)  # our pid, but a process that started at another time
  lock.acquire(str(tmp_path), process_index=0).release()


def test_the_heartbeat_keeps_a_held_lock_fresh(tmp_path):
  held = lock.acquire(str(tmp_path), process_index=0, stale_after_s=0.2)  # beats every 0.05 s
  first = lock.read(_lock_file(tmp_path))["heartbeat"]
  time.sleep(0.3)
  assert lock.read(_lock_file(tmp_path))["heartbeat"] > first
  held.release()


def test_this_process_leftover_is_reused_but_a_live_thread_holds(tmp_path):
  lock.acquire(str(tmp_path), process_index=0)  # never released (as after an early error)
  again = lock.acquire(str(tmp_path), process_index=0)  # same thread: taken over silently
  errors = []

  def other_thread():
    try:
      lock.acquire(str(tmp_path), process_index=0)
    except lock.WorkdirLockedError as e:
      errors.append(e)

  t = threading.Thread(target=other_thread)
  t.start()
  t.join()
  assert errors and f"pid {os.getpid()}" in str(errors[0])
  again.release()
  assert not os.path.exists(_lock_file(tmp_path))
