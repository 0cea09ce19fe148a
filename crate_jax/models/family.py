"""What the train loop asks of a model family, with defaults for modules that do not say.

  head_params(model)                        top-level param subtrees re-initialised by init_head
  adapt_params(model, params, abstract)     loaded top-level params fitted to the model's shapes
  forward_flops(model)                      matmul FLOPs of one forward pass per example, or None
  layer_outputs(model, out)                 (L, B, N, d) each layer's output, from intermediates
  layer_ids(model, params)                  per leaf: 0 embeddings, i + 1 layer i, depth + 1 head
  has_class_token(model)                    whether a class token's attention can be read
  prefix_tokens(model), token_grid(model, h, w)   the layers' tokens: class tokens, patch grid
  init_params(model, key, example)          params at init (every rng stream seeded)
  initial_params(model, key, example)       the same, compiled as one program (outside jit)
  variables(params) / apply_train(...)      a params tree as Flax variables; a train-mode
                                            forward that also returns the updated model state
  contract(model)                           what the family reads and which white-box
                                            quantities its intermediates carry (`Contract`)
  scan_layout(params, scanned)              params between unrolled (layer_i) and scanned stacks
"""
from __future__ import annotations

import dataclasses
import functools
import re

import jax
import numpy as np

# The families' layer names (layers.layer_stack formats) and embedding parameters.
LAYER_NAME = re.compile(r"^(?:layer|block|encoderblock)_(\d+)$")
SCANNED_NAME = re.compile(r"^(layer|block|encoderblock)_scan$")
EMBED_NAMES = frozenset({"patch_embed", "embedding", "cls_token", "cls", "pos_embedding",
                         "pos_embed", "mask_token"})


# The white-box quantities a family's `return_intermediates=True` output may carry, stacked over
# layers: normed LN(Z^l) (L, B, N, d), features U^T LN(Z^l) (L, B, N, K, p), attention
# (L, B, K, N, N), codes (the ISTA outputs, L, B, N, d'), memberships (ToST's Pi, L, B, N, K).
WHITEBOX = frozenset({"normed", "features", "attention", "codes", "memberships"})
CRATE_WHITEBOX = frozenset({"normed", "features", "attention", "codes"})


@dataclasses.dataclass(frozen=True)
class Contract:
  """What a family consumes and offers, declared by its class (`contract` ClassVar or property).

  inputs       "images" (NHWC floats, batch key "image") or "tokens" (int ids, key "tokens")
  whitebox     the WHITEBOX quantities its intermediates carry
  classifier   apply(x) returns logits (False: e.g. CRATE-MAE's reconstruction-loss dict)
  causal       a next-token model (generate)
  torch_layout an official PyTorch layout to export to (crate_jax.interop.exporters)
  """
  inputs: str = "images"
  whitebox: frozenset = frozenset()
  classifier: bool = True
  causal: bool = False
  torch_layout: bool = False

  @property
  def batch_key(self) -> str:
    return "tokens" if self.inputs == "tokens" else "image"


def contract(model) -> Contract:
  """The model's declared Contract; modules that declare none: an image classifier offering
  no white-box quantities."""
  declared = getattr(model, "contract", None)
  return declared if isinstance(declared, Contract) else Contract()


# A family's non-trainable state (ToST's batch-norm running statistics) lives in the one params
# tree under this key, so that every command that saves, restores, shards, averages (EMA) or
# exports weights carries it unchanged; `variables` splits it out for model.apply. It gets no
# gradient (train mode normalises with the batch's statistics) and the train step overwrites
# it after each update with the running statistics the forward pass returned (`apply_train`).
STATE = "batch_stats"


def variables(params) -> dict:
  """A params tree as model.apply's variables: {"params": ..., STATE: ...} (the state only
  where the tree holds one)."""
  if hasattr(params, "items") and STATE in params:
    return {"params": {k: v for k, v in params.items() if k != STATE}, STATE: params[STATE]}
  return {"params": params}


def params_of(variables_: dict) -> dict:
  """Inverse of `variables`: model.init's variables as one params tree."""
  params = variables_["params"]
  return {**params, STATE: variables_[STATE]} if STATE in variables_ else params


def with_state(params, state):
  """params with its STATE subtree replaced by `state` (None: unchanged)."""
  return params if state is None else {**params, STATE: state}


def apply_train(model, params, *args, **kwargs):
  """(output, updated STATE or None): model.apply(variables(params), *args, train=True, ...),
  the running statistics updated where the family keeps state."""
  if not (hasattr(params, "items") and STATE in params):
    return model.apply(variables(params), *args, train=True, **kwargs), None
  out, updated = model.apply(variables(params), *args, train=True, mutable=[STATE], **kwargs)
  return out, updated[STATE]


def init_params(model, key, example):
  """model.init's params for one example batch, every rng stream a family may draw at init
  ("mask": CRATE-MAE's masking) seeded from `key`, with the family's STATE inside. Jittable,
  and fine under jax.eval_shape."""
  return params_of(model.init({"params": key, "mask": key, "dropout": key}, example))


def initial_params(model, key, example):
  """init_params compiled as one program, for callers outside jit: run eagerly, model.init
  compiles each of its few hundred ops on its own (seconds on a CPU, more on a TPU host)."""
  return jax.jit(functools.partial(init_params, model))(key, example)


def head_params(model) -> tuple[str, ...]:
  """The model's `head_params` ClassVar; () for modules without one."""
  return tuple(getattr(model, "head_params", ()))


def adapt_params(model, params: dict, abstract_params) -> dict:
  """Loaded params fitted to the model: first to its layer layout (unrolled or scanned, see
  `scan_layout`), then by model.adapt_params (e.g. positions resized) where the family has it."""
  params = scan_layout(params, _is_scanned(abstract_params))
  fit = getattr(model, "adapt_params", None)
  return params if fit is None else fit(params, abstract_params)


def _is_scanned(tree) -> bool:
  if not isinstance(tree, dict) and not hasattr(tree, "items"):
    return False
  return any(SCANNED_NAME.match(str(k)) or _is_scanned(v) for k, v in tree.items())


def scan_layout(params, scanned: bool):
  """`params` with every layer stack in the layout asked for: unrolled ({"layer_0": p_0, ...,
  "layer_{L-1}": p_{L-1}}) or scanned ({"layer_scan": p}, each leaf stacked on a new leading
  layer axis, as nn.scan keeps it); nested stacks (Transformer/encoderblock_i, encoder/layer_i,
  decoder/layer_i) too. Converting twice returns the original arrays."""
  if not hasattr(params, "items"):
    return params
  out, stacks, changed = {}, {}, False
  for key, value in params.items():
    m, s = LAYER_NAME.match(str(key)), SCANNED_NAME.match(str(key))
    if scanned and m:
      stacks.setdefault(str(key).rsplit("_", 1)[0], {})[int(m.group(1))] = value
    elif not scanned and s:
      changed = True
      depth = len(jax.tree.leaves(value)[0])
      for i in range(depth):
        out[f"{s.group(1)}_{i}"] = jax.tree.map(lambda a, i=i: a[i], value)
    else:
      out[key] = scan_layout(value, scanned)
      changed = changed or out[key] is not value
  if not (changed or stacks):
    return params  # nothing to convert here: the very same tree
  for prefix, layers in stacks.items():
    if sorted(layers) != list(range(len(layers))):
      raise ValueError(f"layers {prefix}_i are not numbered 0..{len(layers) - 1}: "
                       f"{sorted(layers)}")
    out[f"{prefix}_scan"] = jax.tree.map(lambda *a: np.stack([np.asarray(x) for x in a]),
                                         *[layers[i] for i in range(len(layers))])
  return out


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


def has_class_token(model) -> bool:
  """The model's `class_token` ClassVar: True when token 0 is a class token its objective reads
  (so its attention row is a read-out); True for modules that do not say."""
  return bool(getattr(model, "class_token", True))


def prefix_tokens(model) -> int:
  """How many tokens precede the patch grid in the layers' intermediates: the model's
  `prefix_tokens` ClassVar; 1 (a class token at index 0) for modules that do not say (ToST: 0,
  its class token joins after the TSSA blocks)."""
  return int(getattr(model, "prefix_tokens", 1))


def token_grid(model, height: int, width: int) -> tuple[int, int]:
  """The patch grid of (height, width) images: model.token_grid where the family has its own
  (ToST's strided stem), else (height // patch_size, width // patch_size)."""
  own = getattr(model, "token_grid", None)
  if own is not None:
    return tuple(own(height, width))
  return height // model.patch_size, width // model.patch_size


def layer_ids(model, params):
  """A tree like `params` of depth positions for layer-wise lr decay: 0 for the embeddings
  (patch stem, class token, positions), i + 1 for layer i, depth + 1 for the rest (final norms,
  the head), found from the parameter names the families use; a scanned stack's leaves get an
  array (L, 1, ...) of ids 1..L."""
  depth = int(model.depth)

  def position(path, leaf):
    names = [getattr(k, "key", str(k)) for k in path]
    for name in names:
      m = LAYER_NAME.match(name)
      if m:
        return int(m.group(1)) + 1
      if SCANNED_NAME.match(name):  # a stacked leaf: ids 1..L along its leading layer axis
        return np.arange(1, leaf.shape[0] + 1).reshape((-1,) + (1,) * (len(leaf.shape) - 1))
    return 0 if EMBED_NAMES.intersection(names) else depth + 1

  return jax.tree_util.tree_map_with_path(position, params)
