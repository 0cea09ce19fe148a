"""The train loop's periodic hooks beside the step: the white-box metrics, the preemption signal,
and closing the writers without hiding the error that stopped the run."""
from __future__ import annotations

import logging
import signal
import sys

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import data as data_lib
from crate_jax import models


class Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly (the
  watchdog bounds how long that may take: config.preemption_grace_s)."""

  def __init__(self, on_signal=None):
    self.requested = False
    self._on_signal = on_signal
    self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True
    if self._on_signal is not None:
      self._on_signal()

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def close_quietly(ckpts, writer, failing: bool):
  """Finish pending saves; if the run is already failing, report (not raise) a second error,
  unless it is the same OS error again (a full disk fails the pending save too), which the
  failure's own message already names."""
  in_flight = sys.exc_info()[1]  # called from a `finally:`: the error stopping the run, if any
  for close in (ckpts.close, writer.flush):
    try:
      close()
    except Exception as e:  # noqa: BLE001
      if not failing:
        raise
      if same_os_error(e, in_flight):
        logging.debug("while stopping after an error, again: %s", e)
      else:
        logging.exception("while stopping after an error")


def same_os_error(error: BaseException, failure: BaseException | None) -> bool:
  """`error` has the OS error number of `failure` or of the error `failure` was raised from."""
  errno = getattr(error, "errno", None)
  if not isinstance(error, OSError) or errno is None or failure is None:
    return False
  return any(isinstance(f, OSError) and f.errno == errno for f in (failure, failure.__cause__))


def whitebox_hook(config, p):
  """Per-layer coding rate / sparsity on a fixed eval batch, every whitebox_every_steps (the
  setup was checked: crate_jax.setups); where the dataset has ground-truth masks also
  whitebox/seg_iou/layer_LL (the segmentation IoU of the class token's attention, or of the
  features' PCA for families without a class token). The hook takes the weights that stand for
  the model (its task's rule: the EMA, DINO's teacher backbone, ...)."""
  from crate_jax import whitebox
  from crate_jax.data import sources
  from crate_jax.whitebox import segscore
  contract = models.contract(p.model)
  masks = sources.source(config.data.name).has_masks
  if not masks:
    logging.info("whitebox: dataset %s has no segmentation masks; no whitebox/seg_iou",
                 config.data.name)
  batch = next(iter(data_lib.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                           **({"masks": True} if masks else {}))))
  n = min(32, int(np.sum(batch["valid"])))
  inputs = jnp.asarray(batch[contract.batch_key][:n])
  if not masks:
    fn = jax.jit(lambda params: whitebox.whitebox_metrics(p.model, params, inputs))
    return lambda params: {k: float(v) for k, v in jax.device_get(fn(params)).items()}

  # Two programs: the sharded one computes the metrics and the (small) mask inputs; these are
  # gathered to the host and the masks, whose eigensolves call back to numpy, are scored in a
  # single-device program (a host callback inside the sharded program aborted XLA:CPU).
  from jax.experimental import multihost_utils
  from crate_jax.whitebox import stats
  methods = segscore.default_methods(p.model)
  grid = segscore.patch_grid(p.model, inputs)
  gt = np.asarray(batch["foreground"][:n]).astype(bool)

  def sharded(params):
    _, out = stats.intermediates(p.model, params, inputs)
    return stats.metrics_of(p.model, out), segscore.segmentation_inputs(p.model, out, methods)
  first = jax.jit(sharded)
  score = jax.jit(lambda seg_inputs: segscore.segmentation_scalars(p.model, seg_inputs, gt, grid,
                                                                   methods=methods))

  def hook(params):
    out, seg_inputs = first(params)
    seg_inputs = multihost_utils.process_allgather(seg_inputs, tiled=True)
    out = {**jax.device_get(out), **jax.device_get(score(seg_inputs))}
    return {k: float(v) for k, v in out.items()}
  return hook
