"""The official ToST state-dict layouts <-> our params trees (numpy only, no torch).

Vision (tost_vision/tost.py VisionTransformer; `models.ToST`), S stem stages (4 at patch 16,
3 at patch 8), stage i at index 2i of patch_embed.proj (GELUs between); h heads of p = d / h:

  patch_embed.proj.{2i}.0.weight (o, c, 3, 3)        -> patch_embed/conv_i/kernel (3, 3, c, o)
  patch_embed.proj.{2i}.1.{weight, bias}             -> patch_embed/bn_i/{scale, bias}
  patch_embed.proj.{2i}.1.running_mean / _var        -> batch_stats/patch_embed/bn_i/mean / var
  patch_embed.proj.{2i}.1.num_batches_tracked        -> (none: read over; 0 on export)
  pos_embeder.token_projection.weight (d, 64, 1, 1)  -> pos_embed/kernel (64, d); bias
  blocks.{i}.norm1 / norm2.{weight, bias}            -> block_i/norm1 / norm2/{scale, bias}
  blocks.{i}.attn.qkv.weight (d, d), bias (d,)       -> block_i/attn/qkv/kernel (d,h,p), bias (h,p)
  blocks.{i}.attn.temp (h, 1)                        -> block_i/attn/temp (h,)
  blocks.{i}.attn.to_out.0.{weight, bias}            -> block_i/attn/proj/{kernel (h, p, d), bias}
  blocks.{i}.mlp.fc1 / fc2, gamma1, gamma2           -> block_i/mlp/fc1 / fc2, gamma1, gamma2
  cls_attn_blocks.{i}.norm1 / norm2                  -> cls_block_i/norm1 / norm2
  cls_attn_blocks.{i}.attn.qkv.weight (3d, d), bias  -> cls_block_i/qkv/kernel (d, 3, h, p), bias
  cls_attn_blocks.{i}.attn.proj.{weight, bias}       -> cls_block_i/proj/{kernel (h, p, d), bias}
  cls_attn_blocks.{i}.mlp.fc1 / fc2, gamma1, gamma2  -> cls_block_i/mlp/fc1 / fc2, gamma1, gamma2
  cls_token, norm, head                              -> cls_token, norm, head

Language (tost_lang/model_TSSA.py GPT with TSSA; `models.TextModel(block="tost")`):

  transformer.wte.weight (V, d), wpe.weight (T, d)   -> embedding, pos_embedding
  transformer.h.{i}.ln_1 / ln_2.{weight, bias}       -> layer_i/norm1 / norm2/{scale, bias}
  transformer.h.{i}.attn.c_attn.{weight, bias}       -> layer_i/attn/qkv/kernel (d,h,p), bias (h,p)
  transformer.h.{i}.attn.temp (h, 1)                 -> layer_i/attn/temp (h,)
  transformer.h.{i}.attn.denom_bias (h, T, 1)        -> layer_i/attn/denom_bias (h, T)
  transformer.h.{i}.attn.c_proj.{weight, bias}       -> layer_i/attn/proj/{kernel (h, p, d), bias}
  transformer.h.{i}.mlp.c_fc / c_proj                -> layer_i/mlp/fc1 / fc2
  transformer.h.{i}.gamma1 / gamma2                  -> layer_i/gamma1 / gamma2
  transformer.ln_f.{weight, bias}                    -> final_norm/{scale, bias}
  lm_head.weight                                     -> (tied: written as `embedding`; on import
                                                        it must equal transformer.wte.weight)

The official language training script builds GPTConfig(bias=False) (train.py's `bias =
False`): no Linear or LayerNorm biases, as our tost_gpt_* (use_bias=False). A model built with
use_bias=True exports the bias=True layout (GPTConfig's own default) and imports either (a
bias-free file: zero biases); convert infers use_bias from the file. nanoGPT's `_orig_mod.`
prefix (a torch.compile'd model's state dict) is dropped on import.
"""
from __future__ import annotations

from typing import Any, Mapping

import numpy as np

from crate_jax.interop import torch_keys
from crate_jax.interop.torch_keys import CONV, SAME, TRANSPOSE
from crate_jax.models.crate_lm import TextModel
from crate_jax.models.tost import STEM_WIDTHS, ToST, check_patch_size

VISION_ARCH = "ToST (official tost_vision VisionTransformer)"
LM_ARCH = "causal ToST (official tost_lang GPT, TSSA)"
COMPILED_PREFIX = "_orig_mod."


def _column():
  """A trailing unit axis dropped / restored: temp (h, 1) <-> (h,), denom_bias (h, T, 1) <->
  (h, T)."""
  def forward(t):
    return t[..., 0] if t.ndim >= 2 and t.shape[-1] == 1 else None
  return forward, lambda t: t[..., None]


def _heads_bias(heads: int, dim_head: int):
  """A (h p,) bias <-> (h, p)."""
  return (lambda b: b.reshape(heads, dim_head), lambda b: b.reshape(-1))


def _qkv3(heads: int, dim_head: int):
  """CaiT's fused (3 h p, d) qkv weight <-> (d, 3, h, p); its bias (3 h p,) <-> (3, h, p)."""
  kernel = (lambda w: w.T.reshape(w.shape[1], 3, heads, dim_head),
            lambda k: k.reshape(k.shape[0], -1).T)
  bias = (lambda b: b.reshape(3, heads, dim_head), lambda b: b.reshape(-1))
  return kernel, bias


_POINTWISE = (lambda w: w.reshape(w.shape[:2]).T if w.ndim == 4 and w.shape[2:] == (1, 1)
              else None,
              lambda k: k.T[:, :, None, None])   # 1x1 conv (d, c, 1, 1) <-> Dense (c, d)


def _guarded(key_map):
  """Every torch -> flax transform returns None (fill's shape error) instead of raising on a
  tensor of the wrong rank."""
  def guard(fn):
    def safe(x):
      try:
        return fn(x)
      except (IndexError, ValueError):
        return None
    return safe
  return {k: (path, guard(fwd), back) for k, (path, fwd, back) in key_map.items()}


def unwrap_state_dict(state_dict: Mapping[str, Any]) -> dict[str, Any]:
  """torch_keys.unwrap_state_dict, and nanoGPT's `_orig_mod.` prefix dropped."""
  return {(k[len(COMPILED_PREFIX):] if k.startswith(COMPILED_PREFIX) else k): v
          for k, v in torch_keys.unwrap_state_dict(state_dict).items()}


def _owned(tree):
  """A copy of every array: `fill` returns views of float32 torch tensors, which PyTorch
  updates in place (a reference's running statistics in train mode)."""
  return {k: _owned(v) if hasattr(v, "items") else np.array(v) for k, v in tree.items()}


def _linear(m: dict, torch_name: str, path: tuple, bias: bool = True) -> None:
  m[f"{torch_name}.weight"] = ((*path, "kernel"), *TRANSPOSE)
  if bias:
    m[f"{torch_name}.bias"] = ((*path, "bias"), *SAME)


def _norm(m: dict, torch_name: str, path: tuple, bias: bool = True) -> None:
  m[f"{torch_name}.weight"] = ((*path, "scale"), *SAME)
  if bias:
    m[f"{torch_name}.bias"] = ((*path, "bias"), *SAME)


# ------------------------------------------------------------------------------------ vision
def stem_stages(patch_size: int) -> int:
  return len(STEM_WIDTHS[check_patch_size(patch_size)])


def vision_key_map(*, depth: int, heads: int, dim_head: int, patch_size: int,
                   cls_layers: int = 2) -> dict[str, tuple]:
  """official key -> (flax path, torch->flax transform, flax->torch transform); the batch-norm
  running statistics' paths start with "batch_stats"."""
  m: dict[str, tuple] = {"cls_token": (("cls_token",), *SAME)}
  for i in range(stem_stages(patch_size)):
    t = f"patch_embed.proj.{2 * i}"
    m[f"{t}.0.weight"] = (("patch_embed", f"conv_{i}", "kernel"), *CONV)
    _norm(m, f"{t}.1", ("patch_embed", f"bn_{i}"))
    m[f"{t}.1.running_mean"] = (("batch_stats", "patch_embed", f"bn_{i}", "mean"), *SAME)
    m[f"{t}.1.running_var"] = (("batch_stats", "patch_embed", f"bn_{i}", "var"), *SAME)
  m["pos_embeder.token_projection.weight"] = (("pos_embed", "kernel"), *_POINTWISE)
  m["pos_embeder.token_projection.bias"] = (("pos_embed", "bias"), *SAME)
  for i in range(depth):
    t, f = f"blocks.{i}", f"block_{i}"
    _norm(m, f"{t}.norm1", (f, "norm1"))
    _norm(m, f"{t}.norm2", (f, "norm2"))
    m[f"{t}.attn.qkv.weight"] = ((f, "attn", "qkv", "kernel"),
                                 *torch_keys.heads_in(heads, dim_head))
    m[f"{t}.attn.qkv.bias"] = ((f, "attn", "qkv", "bias"), *_heads_bias(heads, dim_head))
    m[f"{t}.attn.temp"] = ((f, "attn", "temp"), *_column())
    m[f"{t}.attn.to_out.0.weight"] = ((f, "attn", "proj", "kernel"),
                                      *torch_keys.heads_out(heads, dim_head))
    m[f"{t}.attn.to_out.0.bias"] = ((f, "attn", "proj", "bias"), *SAME)
    _linear(m, f"{t}.mlp.fc1", (f, "mlp", "fc1"))
    _linear(m, f"{t}.mlp.fc2", (f, "mlp", "fc2"))
    m[f"{t}.gamma1"] = ((f, "gamma1"), *SAME)
    m[f"{t}.gamma2"] = ((f, "gamma2"), *SAME)
  qkv_kernel, qkv_bias = _qkv3(heads, dim_head)
  for i in range(cls_layers):
    t, f = f"cls_attn_blocks.{i}", f"cls_block_{i}"
    _norm(m, f"{t}.norm1", (f, "norm1"))
    _norm(m, f"{t}.norm2", (f, "norm2"))
    m[f"{t}.attn.qkv.weight"] = ((f, "qkv", "kernel"), *qkv_kernel)
    m[f"{t}.attn.qkv.bias"] = ((f, "qkv", "bias"), *qkv_bias)
    m[f"{t}.attn.proj.weight"] = ((f, "proj", "kernel"), *torch_keys.heads_out(heads, dim_head))
    m[f"{t}.attn.proj.bias"] = ((f, "proj", "bias"), *SAME)
    _linear(m, f"{t}.mlp.fc1", (f, "mlp", "fc1"))
    _linear(m, f"{t}.mlp.fc2", (f, "mlp", "fc2"))
    m[f"{t}.gamma1"] = ((f, "gamma1"), *SAME)
    m[f"{t}.gamma2"] = ((f, "gamma2"), *SAME)
  _norm(m, "norm", ("norm",))
  _linear(m, "head", ("head",))
  return m


def batch_counters(patch_size: int) -> list[str]:
  """The stem's `num_batches_tracked` buffers (no counterpart of ours)."""
  return [f"patch_embed.proj.{2 * i}.1.num_batches_tracked"
          for i in range(stem_stages(patch_size))]


def _vision_arch(model: ToST) -> dict:
  return dict(depth=model.depth, heads=model.heads, dim_head=model.dim // model.heads,
              patch_size=model.patch_size, cls_layers=model.cls_layers)


def vision_to_flax(state_dict: Mapping[str, Any], expected, model: ToST) -> dict[str, Any]:
  """An official VisionTransformer state dict -> a params tree shaped like `expected` (the
  model's params with its "batch_stats"); `num_batches_tracked` is accepted and not read."""
  sd = unwrap_state_dict(state_dict)
  return _owned(torch_keys.from_state_dict(
      sd, _guarded(vision_key_map(**_vision_arch(model))), expected, VISION_ARCH,
      also_allowed=batch_counters(model.patch_size)))


def vision_to_torch(params, model: ToST) -> dict[str, np.ndarray]:
  """params (with batch_stats, unrolled layers) -> the official state dict: float32 tensors and
  the int64 0-d `num_batches_tracked` counters (0: we do not count; PyTorch reads them only
  with momentum=None, which the official stem does not use)."""
  sd = torch_keys.to_torch(params, vision_key_map(**_vision_arch(model)))
  sd.update({k: np.array(0, np.int64) for k in batch_counters(model.patch_size)})
  return sd


# ---------------------------------------------------------------------------------- language
def lm_key_map(*, depth: int, heads: int, dim_head: int, bias: bool = True) -> dict[str, tuple]:
  """official key -> (flax path, torch->flax, flax->torch) without the tied lm_head.weight;
  bias=False: the GPTConfig(bias=False) layout (no Linear / LayerNorm biases)."""
  m: dict[str, tuple] = {
      "transformer.wte.weight": (("embedding",), *SAME),
      "transformer.wpe.weight": (("pos_embedding",), *SAME),
  }
  for i in range(depth):
    t, f = f"transformer.h.{i}", f"layer_{i}"
    _norm(m, f"{t}.ln_1", (f, "norm1"), bias)
    m[f"{t}.attn.c_attn.weight"] = ((f, "attn", "qkv", "kernel"),
                                    *torch_keys.heads_in(heads, dim_head))
    if bias:
      m[f"{t}.attn.c_attn.bias"] = ((f, "attn", "qkv", "bias"), *_heads_bias(heads, dim_head))
    m[f"{t}.attn.c_proj.weight"] = ((f, "attn", "proj", "kernel"),
                                    *torch_keys.heads_out(heads, dim_head))
    if bias:
      m[f"{t}.attn.c_proj.bias"] = ((f, "attn", "proj", "bias"), *SAME)
    m[f"{t}.attn.temp"] = ((f, "attn", "temp"), *_column())
    m[f"{t}.attn.denom_bias"] = ((f, "attn", "denom_bias"), *_column())
    _norm(m, f"{t}.ln_2", (f, "norm2"), bias)
    _linear(m, f"{t}.mlp.c_fc", (f, "mlp", "fc1"), bias)
    _linear(m, f"{t}.mlp.c_proj", (f, "mlp", "fc2"), bias)
    m[f"{t}.gamma1"] = ((f, "gamma1"), *SAME)
    m[f"{t}.gamma2"] = ((f, "gamma2"), *SAME)
  _norm(m, "transformer.ln_f", ("final_norm",), bias)
  return m


def check_lm(model: TextModel) -> None:
  """The official layout is a causal ToST with a tied head and a final LayerNorm."""
  if not (isinstance(model, TextModel) and model.block == "tost"):
    raise ValueError(f"{type(model).__name__} is not a causal ToST language model")
  problems = [what for bad, what in (
      (not model.tie_embeddings, "tie_embeddings=False (the official head is tied to wte)"),
      (not model.final_norm, "final_norm=False (the official has ln_f)"),
      (model.num_classes > 0, f"num_classes={model.num_classes} (the official is an LM)"),
      (model.mlp_ratio != 4, f"mlp_ratio={model.mlp_ratio} (the official MLP is 4 d wide)"),
  ) if bad]
  if problems:
    raise ValueError("no official ToST layout for this TextModel: " + "; ".join(problems))


def _lm_arch(model: TextModel) -> dict:
  return dict(depth=model.depth, heads=model.heads, dim_head=model.dim // model.heads)


def lm_to_flax(state_dict: Mapping[str, Any], expected, model: TextModel) -> dict[str, Any]:
  """An official GPT (TSSA) state dict -> params shaped like `expected`. Either bias layout; a
  bias-free one gives zero biases. denom_bias rows past max_len (a block size cropped by the
  official `crop_block_size`, which crops wpe only) are dropped."""
  check_lm(model)
  sd = unwrap_state_dict(state_dict)
  bias = "transformer.ln_f.bias" in sd
  if bias and not model.use_bias:
    raise ValueError("state dict: it has biases (GPTConfig(bias=True)) and the model was built "
                     "with use_bias=False (the official training's); build it with "
                     "use_bias=True (--config.model.kwargs.use_bias=true)")
  key_map = _guarded(lm_key_map(**_lm_arch(model), bias=bias))
  for key, (path, fwd, back) in list(key_map.items()):
    if path[-1] == "denom_bias":
      key_map[key] = (path, (lambda t, f=fwd: None if f(t) is None else f(t)[:, :model.max_len]),
                      back)
  if "lm_head.weight" in sd and "transformer.wte.weight" in sd:
    head, wte = (torch_keys._to_numpy(sd[k]) for k in ("lm_head.weight", "transformer.wte.weight"))
    if np.shape(head) != np.shape(wte) or not np.array_equal(head, wte):
      raise ValueError("state dict: 'lm_head.weight' differs from 'transformer.wte.weight'; the "
                       f"{LM_ARCH} ties them")
  params = torch_keys.from_state_dict(sd, key_map, expected, LM_ARCH,
                                      also_allowed=("lm_head.weight",))
  if not bias and model.use_bias:   # a bias-free file into a model with biases: zero biases
    for path in _bias_paths(expected):
      torch_keys._set(params, path, np.zeros(torch_keys._leaf(expected, path).shape, np.float32))
  return _owned(params)


def _bias_paths(tree, prefix=()):
  for k, v in tree.items():
    if hasattr(v, "items"):
      yield from _bias_paths(v, prefix + (k,))
    elif k == "bias":
      yield prefix + (k,)


def lm_to_torch(params, model: TextModel) -> dict[str, np.ndarray]:
  """params (unrolled layers) -> the official GPT state dict (GPTConfig(bias=model.use_bias)),
  lm_head.weight the same array as transformer.wte.weight (the tie)."""
  check_lm(model)
  sd = torch_keys.to_torch(params, lm_key_map(**_lm_arch(model), bias=model.use_bias))
  sd["lm_head.weight"] = sd["transformer.wte.weight"]
  return sd


# ------------------------------------------------------------------------------- either one
def is_tost(model) -> bool:
  """A model with an official ToST layout: models.ToST, or a TextModel with ToST blocks."""
  return isinstance(model, ToST) or (isinstance(model, TextModel) and model.block == "tost")


def torch_to_flax(state_dict, expected, model) -> dict[str, Any]:
  return (vision_to_flax if isinstance(model, ToST) else lm_to_flax)(state_dict, expected, model)


def flax_to_torch(params, model) -> dict[str, np.ndarray]:
  return (vision_to_torch if isinstance(model, ToST) else lm_to_torch)(params, model)
