"""The train loop cannot wait forever: the watchdog ends a stuck phase, and the coding rate (the
white-box hook's hang) no longer calls jaxlib's CPU LAPACK kernels."""
import io
import threading
import time

import jax
import numpy as np

from crate_jax import whitebox
from crate_jax.training import watchdog as watchdog_lib


def _watched(timeout_s, grace_s=60.0):
  exited, stream = threading.Event(), io.StringIO()
  codes = []

  def exit_fn(code):
    codes.append(code)
    exited.set()
  return watchdog_lib.Watchdog(timeout_s, grace_s, exit_fn=exit_fn, stream=stream), exited, \
      codes, stream


def test_a_stuck_phase_ends_the_process_with_its_name_and_the_stacks():
  dog, exited, codes, stream = _watched(0.3)
  try:
    with dog.phase("the white-box hook", 6):
      assert exited.wait(10), "the watchdog did not fire"
  finally:
    dog.close()
  assert codes == [watchdog_lib.EXIT_HUNG]
  text = stream.getvalue()
  assert text.startswith("error: the train loop made no progress in the white-box hook at "
                         "step 6")
  assert "test_a_stuck_phase_ends_the_process" in text  # the stacks follow


def test_phases_that_finish_in_time_do_not_fire():
  dog, exited, codes, _ = _watched(1.0)
  try:
    for step in range(5):
      with dog.phase("the train step", step):
        time.sleep(0.3)
    time.sleep(1.5)  # between phases nothing is armed
  finally:
    dog.close()
  assert not exited.is_set() and codes == []


def test_after_sigterm_the_grace_period_bounds_even_a_fresh_phase():
  dog, exited, codes, stream = _watched(60.0, grace_s=0.3)
  try:
    dog.preempted(4)
    with dog.phase("the checkpoint save", 4):  # a new phase may not extend the grace
      assert exited.wait(10), "the watchdog did not fire after SIGTERM"
  finally:
    dog.close()
  assert codes == [watchdog_lib.EXIT_HUNG] and "after SIGTERM" in stream.getvalue()


def test_coding_rate_on_cpu_calls_no_solver_kernel_and_matches_float64():
  """jaxlib's batched CPU Cholesky blocked XLA's intra-op pool (the white-box hook hung in 4 of
  5 runs on 2 cores); the CPU path factors with XLA ops, to float32 rounding of float64."""
  z = np.random.default_rng(0).normal(size=(4, 3, 17, 24)).astype(np.float32)
  fn = jax.jit(lambda x: whitebox.coding_rate(x, 0.5))
  hlo = fn.lower(z).compile().as_text()
  targets = [line for line in hlo.splitlines() if "custom_call_target=" in line]
  assert not [t for t in targets if "lapack" in t or "potrf" in t], targets
  d = z.astype(np.float64)
  gram = np.swapaxes(d, -1, -2) @ d
  want = 0.5 * np.linalg.slogdet(np.eye(24) + 24 / (17 * 0.5) * gram)[1]
  np.testing.assert_allclose(np.asarray(fn(z)), want, rtol=2e-5)
