"""What the train loop asks of a model family, with defaults for modules that do not say.

  head_params(model)                        top-level param subtrees re-initialised by init_head
  adapt_params(model, params, abstract)     loaded top-level params fitted to the model's shapes
  forward_flops(model)                      matmul FLOPs of one forward pass per example, or None
"""
from __future__ import annotations


def head_params(model) -> tuple[str, ...]:
  """The model's `head_params` ClassVar; () for modules without one."""
  return tuple(getattr(model, "head_params", ()))


def adapt_params(model, params: dict, abstract_params) -> dict:
  """model.adapt_params(params, abstract_params); `params` unchanged for modules without it."""
  fit = getattr(model, "adapt_params", None)
  return params if fit is None else fit(params, abstract_params)


def forward_flops(model) -> float | None:
  """model.forward_flops() (2 per multiply-add, elementwise work not counted); None for modules
  without it (or that cannot tell, e.g. CRATE-MAE built with image_size=None)."""
  count = getattr(model, "forward_flops", None)
  value = None if count is None else count()
  return None if value is None else float(value)
