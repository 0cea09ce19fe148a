"""Fault injection: a real training subprocess is SIGKILLed between steps, during a save and
during eval, then resumed; corrupt latest checkpoints, a full disk and a foreign workdir."""
import json
import logging
import os
import re
import signal
import subprocess
import sys
import time

import jax
import numpy as np
import pytest

from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import hooks
from crate_jax import cli, train
from tests.helpers import ROOT, final_params, losses, tiny_config

OVERRIDES = {"num_train_steps": 12, "checkpoint_every_steps": 4, "eval_every_steps": 6,
             "keep_checkpoints": 5}


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return str(tmp_path_factory.mktemp("tfds"))


@pytest.fixture(scope="module")
def reference(tmp_path_factory, data_dir):
  """An uninterrupted run: its per-step loss log and final params."""
  workdir = str(tmp_path_factory.mktemp("reference"))
  train.train_and_evaluate(tiny_config(data_dir, **OVERRIDES), workdir)
  return losses(workdir), final_params(workdir), workdir


def run_worker(workdir, data_dir, fault=None):
  cmd = [sys.executable, os.path.join(ROOT, "tests", "training", "fault_worker.py"), str(workdir),
         json.dumps({**OVERRIDES, "data.data_dir": data_dir})] + ([fault] if fault else [])
  env = dict(os.environ, PYTHONPATH=ROOT)
  return subprocess.run(cmd, env=env, capture_output=True, text=True, timeout=300)


def assert_same_as_reference(workdir, reference):
  ref_losses, ref_params, _ = reference
  assert losses(workdir) == ref_losses
  jax.tree.map(np.testing.assert_array_equal, final_params(workdir), ref_params)


def assert_survivors_load(workdir):
  """After a kill: the save of step 4 is intact, and every surviving step loads cleanly."""
  ckpts = ckpt_lib.Checkpoints(str(workdir))
  survivors = ckpts.all_steps()
  ckpts.close()
  assert survivors and 4 in survivors, survivors
  for step in survivors:
    params, meta = ckpt_lib.load_params(str(workdir / "checkpoints" / str(step)))
    assert meta["step"] == step and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  return survivors


def _corrupt(step_dir):
  for root, _, files in os.walk(step_dir / "state"):
    for name in files:
      path = os.path.join(root, name)
      size = os.path.getsize(path)
      with open(path, "r+b") as f:
        f.truncate(size // 2)


def test_sigkill_anywhere_and_a_corrupt_latest_checkpoint_then_resume_exactly(
    tmp_path, data_dir, reference, caplog):
  """One workdir, killed again and again, each kill in a process that itself resumed:
  SIGKILL right after step 6, while the asynchronous save of step 8 is in flight, in the middle
  of the eval at step 6, and after step 9 (steps 4 and 8 saved) with step 8 then truncated on
  disk. The final resume falls back to step 4 with one warning, keeps step 8 aside (never
  deleted), and ends bit-identical to the uninterrupted run: per-step losses and params."""
  for fault in ("step:6", "save:8", "eval:6", "step:9"):
    killed = run_worker(tmp_path, data_dir, fault)
    assert killed.returncode == -signal.SIGKILL, (fault, killed.stderr[-2000:])
    survivors = assert_survivors_load(tmp_path)
  assert survivors == [4, 8]
  # Step 8 was written by a fresh process that resumed from step 4: exactly the reference's.
  jax.tree.map(np.testing.assert_array_equal,
               ckpt_lib.load_params(str(tmp_path / "checkpoints" / "8"))[0],
               ckpt_lib.load_params(os.path.join(reference[2], "checkpoints", "8"))[0])
  _corrupt(tmp_path / "checkpoints" / "8")
  with caplog.at_level(logging.WARNING):
    train.train_and_evaluate(tiny_config(data_dir, **OVERRIDES), str(tmp_path))
  warnings = [r.getMessage() for r in caplog.records if "unreadable" in r.getMessage()]
  assert len(warnings) == 1 and warnings[0].startswith("checkpoint step 8 is unreadable")
  assert (tmp_path / "checkpoints" / "8.corrupt-0" / "state").exists()  # kept, not deleted
  assert_same_as_reference(str(tmp_path), reference)


def test_resume_after_interrupt_is_exact(tmp_path, data_dir, reference):
  """An exception after step 6 (checkpoint at 4) and the same call again: identical run."""
  cfg = tiny_config(data_dir, **OVERRIDES)

  def interrupt(step, state):
    if step == 6:
      raise KeyboardInterrupt("simulated kill after step 6")

  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg, str(tmp_path), callbacks=[interrupt])
  assert ckpt_lib.Checkpoints(str(tmp_path)).latest_step() == 4
  assert max(losses(str(tmp_path))) == 5  # step 5 was logged after the save, then lost
  train.train_and_evaluate(cfg, str(tmp_path))
  assert sorted(losses(str(tmp_path))) == list(range(1, 13))
  assert_same_as_reference(str(tmp_path), reference)


@pytest.mark.filterwarnings("error::pytest.PytestUnraisableExceptionWarning")
def test_full_disk_stops_clearly_and_keeps_earlier_checkpoints(tmp_path, data_dir, capsys):
  disk = tmp_path / "disk"
  disk.mkdir()
  if subprocess.run(["mount", "-t", "tmpfs", "-o", "size=48m", "tmpfs", str(disk)],
                    capture_output=True).returncode != 0:
    pytest.skip("cannot mount a tmpfs here (needs root)")
  try:
    def fill_disk(step, state):
      if step == 6:
        deadline = time.time() + 60  # let the asynchronous save of step 4 finish first
        while not (disk / "run" / "checkpoints" / "4" / "state").exists():
          assert time.time() < deadline, "step 4 was never saved"
          time.sleep(0.05)
        stat = os.statvfs(disk)
        with open(disk / "filler", "wb") as f:
          f.write(b"\0" * max(stat.f_bavail * stat.f_frsize - 4096, 0))

    @cli.command  # what `python -m crate_jax.train` prints, with the disk filled at step 6
    def run(argv):
      return train.train_and_evaluate(tiny_config(data_dir, **OVERRIDES), str(disk / "run"),
                                      callbacks=[fill_disk])

    assert run([]) == cli.EXIT_ERROR
    err = capsys.readouterr().err
    assert re.fullmatch(r"error: writing to .* failed at step \d+ .*Earlier checkpoints are "
                        r"intact: steps \[4\]", err.splitlines()[-1])
    # Not the bare "Event loop is closed" tracebacks of the failed save's late callbacks.
    assert "Traceback" not in err and "Event loop is closed" not in err
    # Nor the pending save failing again on the same full disk while the run stops.
    assert "while stopping after an error" not in err
    params, meta = ckpt_lib.load_params(str(disk / "run"))
    assert meta["step"] == 4 and all(np.isfinite(x).all() for x in jax.tree.leaves(params))
  finally:
    # Lazy: this process may still hold an open event file on it.
    subprocess.run(["umount", "-l", str(disk)], check=False)


def test_foreign_workdir_is_refused_unless_warm_starting(tmp_path, data_dir):
  train.train_and_evaluate(tiny_config(data_dir, num_train_steps=4), str(tmp_path / "a"))
  before = sorted(os.listdir(tmp_path / "a" / "checkpoints"))
  wider = tiny_config(data_dir, num_train_steps=4, **{"model.kwargs.dim": 48})
  with pytest.raises(ValueError, match=r"\['params'\]\['cls_token'\]: checkpoint \(1, 1, 32\) "
                                       r"vs model \(1, 1, 48\).*Refusing to resume.*init_from"):
    train.train_and_evaluate(wider, str(tmp_path / "a"))
  lion = tiny_config(data_dir, num_train_steps=4, **{"optimizer.name": "lion"})
  with pytest.raises(ValueError, match=r"unexpected \['opt_state'\].*Refusing to resume"):
    train.train_and_evaluate(lion, str(tmp_path / "a"))
  assert sorted(os.listdir(tmp_path / "a" / "checkpoints")) == before  # nothing touched
  with lion.unlocked():
    lion.init_from = str(tmp_path / "a")
  train.train_and_evaluate(lion, str(tmp_path / "b"))  # a warm start takes the params only
  assert ckpt_lib.Checkpoints(str(tmp_path / "b")).latest_step() == 4


def test_closing_a_failing_run_reports_only_a_different_second_error(caplog):
  class Pending:  # a checkpoint manager whose pending save fails when closed
    def __init__(self, error):
      self.error = error

    def close(self):
      raise self.error

  class Writer:
    def flush(self):
      pass

  full = OSError(28, "No space left on device")

  def stop(pending, failing=True):
    try:
      raise ckpt_lib.CheckpointWriteError("writing failed; earlier checkpoints intact") from full
    finally:
      hooks.close_quietly(pending, Writer(), failing=failing)

  for second, reported in ((OSError(28, "No space left on device"), False),
                           (OSError(5, "Input/output error"), True),
                           (ValueError("a bug in the close"), True)):
    caplog.clear()
    with caplog.at_level(logging.ERROR), pytest.raises(ckpt_lib.CheckpointWriteError):
      stop(Pending(second))
    assert any("while stopping after an error" in r.getMessage() for r in caplog.records) \
        == reported, second
  with pytest.raises(ValueError):  # a run that was not failing: the close's error is raised
    try:
      pass
    finally:
      hooks.close_quietly(Pending(ValueError("x")), Writer(), failing=False)
