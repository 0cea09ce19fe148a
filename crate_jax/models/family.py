"""What the train loop asks of a model family, with defaults for modules that do not say.

  head_params(model)                        top-level param subtrees re-initialised by init_head
  adapt_params(model, params, abstract)     loaded top-level params fitted to the model's shapes
  forward_flops(model)                      matmul FLOPs of one forward pass per example, or None
  layer_outputs(model, out)                 (L, B, N, d) each layer's output, from intermediates
  layer_ids(model, params)                  per leaf: 0 embeddings, i + 1 layer i, depth + 1 head
"""
from __future__ import annotations

import re

import jax

# The families' layer names (layers.layer_stack formats) and embedding parameters.
LAYER_NAME = re.compile(r"^(?:layer|block|encoderblock)_(\d+)$")
EMBED_NAMES = frozenset({"patch_embed", "embedding", "cls_token", "cls", "pos_embedding",
                         "mask_token"})


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


def layer_outputs(model, out: dict):
  """Each layer's output stacked (L, B, N, d) from `return_intermediates=True`'s dict: the
  model's `layer_output_key` ("codes" for CRATE, whose layer output is the ISTA code; "blocks"
  for CRATE-alpha and ViT, whose codes are not the layer output)."""
  return out[getattr(model, "layer_output_key", "blocks")]


def layer_ids(model, params):
  """A tree like `params` of depth positions for layer-wise lr decay: 0 for the embeddings
  (patch stem, class token, positions), i + 1 for layer i, depth + 1 for the rest (final norms,
  the head), found from the parameter names the families use."""
  depth = int(model.depth)

  def position(path, _):
    names = [getattr(k, "key", str(k)) for k in path]
    for name in names:
      m = LAYER_NAME.match(name)
      if m:
        return int(m.group(1)) + 1
    return 0 if EMBED_NAMES.intersection(names) else depth + 1

  return jax.tree_util.tree_map_with_path(position, params)
