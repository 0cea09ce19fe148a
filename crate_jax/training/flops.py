"""Analytic FLOP counts and device peak FLOP/s, for MFU (no clu / TensorFlow needed)."""
from __future__ import annotations

import jax

# Dense bf16 peak FLOP/s per device, keyed by a substring of jax.Device.device_kind.
PEAK_FLOPS = {
    "TPU v4": 275e12, "TPU v5 lite": 197e12, "TPU v5e": 197e12, "TPU v5p": 459e12,
    "TPU v5": 459e12, "TPU v6 lite": 918e12, "TPU v6e": 918e12, "TPU7x": 2307e12,
    "H200": 989e12, "H100": 989e12, "A100": 312e12, "L4": 121e12,
}


def peak_flops(device=None) -> float | None:
  kind = (device or jax.devices()[0]).device_kind
  for key, value in PEAK_FLOPS.items():
    if key.lower() in kind.lower():
      return value
  return None


def crate_forward_flops(model) -> float:
  """Matmul FLOPs of one forward pass per image (2 per MAC) for CRATE-like models.

  Per layer and token: U (d x hp), out (hp x d), ISTA 2 d^2 (two-matmul form), attention 2 N hp.
  Plus the patch stem and the head. Elementwise work is not counted (the MFU convention).
  """
  g = model.image_size // model.patch_size
  n = g * g + 1
  d, inner = model.dim, model.heads * model.dim_head
  stem = g * g * model.patch_size ** 2 * model.channels * d
  layer = n * (2 * d * inner + 2 * d * d) + 2 * n * n * inner
  return 2.0 * (stem + model.depth * layer + d * model.num_classes)


def train_flops_per_example(model) -> float | None:
  """Forward + backward = 3x forward, for models we can count; None otherwise."""
  needed = ("image_size", "patch_size", "dim", "heads", "dim_head", "depth", "num_classes",
            "channels")
  if type(model).__name__ != "CRATE" or not all(hasattr(model, a) for a in needed):
    return None
  return 3.0 * crate_forward_flops(model)
