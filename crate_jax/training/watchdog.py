"""A watchdog for the train loop: nothing in it may wait forever.

Each phase of the loop (a step, an evaluation, the white-box hook, a save) runs under
`watchdog.phase(name, step)`. If a phase outlasts `timeout_s`, the watchdog prints one line
naming the phase and the step, then every thread's Python stack, and ends the process with
EXIT_HUNG (a scheduler then restarts it from the last checkpoint, as after a preemption). A
SIGTERM (`preempted`) shortens the deadline to `grace_s`: a run stuck where the preemption save
cannot be reached still exits instead of waiting for SIGKILL.

The timer is a Python thread; as a backstop, faulthandler (a C thread that needs no GIL) dumps
and exits `BACKSTOP_S` later, should the process hold the GIL while stuck.
"""
from __future__ import annotations

import contextlib
import faulthandler
import os
import sys
import threading
import time
import traceback

EXIT_HUNG = 3
BACKSTOP_S = 60.0


def all_stacks() -> str:
  """Every thread's Python stack, innermost call last."""
  names = {t.ident: t.name for t in threading.enumerate()}
  parts = []
  for ident, frame in sys._current_frames().items():
    parts.append(f"Thread {names.get(ident, ident)}:\n" + "".join(traceback.format_stack(frame)))
  return "\n".join(parts)


class Watchdog:
  def __init__(self, timeout_s: float, grace_s: float, *, exit_fn=os._exit, stream=None):
    self.timeout_s, self.grace_s = float(timeout_s), float(grace_s)
    self._exit, self._stream = exit_fn, stream
    self._lock = threading.Lock()
    self._deadline: float | None = None
    self._cap: float | None = None  # set by a SIGTERM: no phase may end later
    self._what = ""
    self._stop = threading.Event()
    self._thread = None
    if self.timeout_s > 0:
      self._thread = threading.Thread(target=self._watch, daemon=True, name="train-watchdog")
      self._thread.start()

  @property
  def enabled(self) -> bool:
    return self._thread is not None

  def _arm(self, seconds: float, what: str) -> None:
    with self._lock:
      deadline = time.monotonic() + seconds
      self._deadline = deadline if self._cap is None else min(deadline, self._cap)
      self._what = what if self._cap is None else f"{what} (after SIGTERM)"
      left = self._deadline - time.monotonic()
    faulthandler.dump_traceback_later(max(left, 0.0) + BACKSTOP_S, exit=True,
                                      file=sys.__stderr__)

  def _disarm(self) -> None:
    with self._lock:
      self._deadline = self._cap
    if self._cap is None:
      faulthandler.cancel_dump_traceback_later()

  @contextlib.contextmanager
  def phase(self, name: str, step: int):
    """Run the block under the deadline; phases do not nest."""
    if not self.enabled:
      yield
      return
    self._arm(self.timeout_s, f"{name} at step {step}")
    try:
      yield
    finally:
      self._disarm()

  def preempted(self, step: int) -> None:
    """After SIGTERM: from now on the loop has grace_s to save and exit."""
    if self.enabled:
      with self._lock:
        self._cap = time.monotonic() + self.grace_s
        self._deadline = self._cap if self._deadline is None else min(self._deadline, self._cap)
        self._what = f"{self._what or 'the loop'} (after SIGTERM at step {step})"

  def _watch(self) -> None:
    while not self._stop.wait(0.5):
      with self._lock:
        deadline, what = self._deadline, self._what
      if deadline is not None and time.monotonic() > deadline:
        stream = self._stream or sys.stderr
        print(f"error: the train loop made no progress in {what} within its deadline "
              f"(config.hang_timeout_s={self.timeout_s:.0f}, after a SIGTERM "
              f"config.preemption_grace_s={self.grace_s:.0f}); stacks follow, exiting with "
              f"status {EXIT_HUNG}. Checkpoints already written are intact.", file=stream,
              flush=True)
        stream.write(all_stacks())
        stream.flush()
        self._exit(EXIT_HUNG)
        return

  def close(self) -> None:
    if self.enabled:
      with self._lock:
        self._cap = self._deadline = None
      faulthandler.cancel_dump_traceback_later()
      self._stop.set()
