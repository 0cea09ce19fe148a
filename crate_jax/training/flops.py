"""Train FLOPs per example (from the model family's analytic count) and device peak FLOP/s, for
MFU (no clu / TensorFlow needed)."""
from __future__ import annotations

import jax

from crate_jax import models

# Dense bf16 peak FLOP/s per device, keyed by a substring of jax.Device.device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
}


def peak_flops(device=None) -> float | None:
  """The dense bf16 peak FLOP/s of `device` (default: the first), None if not in PEAK_FLOPS."""
  return peak_flops_of_kind((device or jax.devices()[0]).device_kind)


def peak_flops_of_kind(kind: str) -> float | None:
  """PEAK_FLOPS of a device kind ("TPU v5 lite", "NVIDIA H100 80GB HBM3", ...)."""
  for key, value in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      return value
  return None


def train_flops_per_example(model) -> float | None:
  """Forward + backward = 3x the family's analytic forward count (`models.forward_flops`);
  None for models that cannot tell."""
  forward = models.forward_flops(model)
  return None if forward is None else 3.0 * forward
