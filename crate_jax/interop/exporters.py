"""Our checkpoints -> a PyTorch state dict (the official CRATE / CRATE-MAE / ToST classes, the
CRATE-alpha port or timm's VisionTransformer for ViT, strict=True), a .safetensors file (the same
tensors; flat Flax names for the other families: crate_jax.interop.safetensors_io) or a
serialized StableHLO forward pass (jax.export, symbolic batch dimension). CRATE-MAE's tensors
that are not parameters of ours are written as mae_keys.fixed_tensors says.

Nothing is written unless the whole export succeeds; an existing output is refused.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

import ml_collections

from crate_jax import models, setups
from crate_jax.interop import (alpha_keys, mae_keys, safetensors_io, torch_keys, tost_keys,
                               vit_keys)
from crate_jax.models import registry
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import weights as weights_lib

STABLEHLO_FILE = "forward.stablehlo"


class ExportError(ValueError):
  """The checkpoint cannot be exported as asked."""


def refuse_existing(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out {out!r} exists; refusing to overwrite it")


def model_spec(meta: dict):
  """(registered model name, its kwargs, config-or-None) as the checkpoint's meta describes it:
  a training run's config (the model it trains; a DINO run's backbone), or a converted
  checkpoint's model name and kwargs."""
  if "config" in meta:
    cfg = meta["config"]
    name = cfg["model"]["name"]
    kwargs = registry.data_kwargs(name, cfg["model"]["kwargs"], cfg.get("data"))
  elif "model" in meta:
    cfg, name, kwargs = None, meta["model"], dict(meta.get("model_kwargs", {}))
  else:
    raise ExportError("the checkpoint's meta names no model (neither a training config nor a "
                      "converted model)")
  return name, registry.without_data_only_kwargs(name, kwargs), cfg


def model_from_meta(meta: dict):
  """(float32, unscanned model, config-or-None) as the checkpoint's meta describes it
  (`model_spec`)."""
  name, kwargs, cfg = model_spec(meta)
  return models.get(name, **kwargs), cfg


def example_input(model, cfg) -> jax.ShapeDtypeStruct:
  """One example batch of what the model reads: (1, H, W, 3) float32 images or (1, T) int32
  tokens (T = the run's sequence length, else the model's max_len)."""
  if models.contract(model).inputs == "tokens":
    length = int(((cfg or {}).get("data") or {}).get("seq_len") or model.max_len)
    return jax.ShapeDtypeStruct((1, length), jnp.int32)
  return jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3), jnp.float32)


def load(checkpoint: str, target: str | None = None):
  """(model, params, config-or-None) of the latest step under `checkpoint`: the weights that
  stand for the run's model (crate_jax.training.weights: the EMA where evaluated, a DINO run's
  teacher backbone), in the model's unscanned layout. With `target`, a model that cannot be
  exported there is refused (one line) before anything is read."""
  path = os.fspath(ckpt_lib.resolve(checkpoint))  # CheckpointError if there is none
  model, cfg = model_from_meta(ckpt_lib.read_meta(path))
  if target is not None:
    setups.check_export(model, target, setup=_setup(cfg, model))
  x = example_input(model, cfg)
  abstract = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            jnp.zeros(x.shape, x.dtype))
  config = ml_collections.ConfigDict(cfg) if cfg is not None else None
  params, _, _ = weights_lib.load(path, config, abstract_params=abstract, model=model)
  return model, params, cfg


def _setup(cfg, model) -> str:
  if cfg is None:
    return f"converted model {type(model).__name__}"
  return f"task {cfg.get('task', 'classification')!r} with model {cfg['model']['name']!r}"


def torch_state_dict(model, params) -> dict[str, np.ndarray]:
  """The official PyTorch layout of `params` (CRATE, CRATE-MAE, ToST (vision; and language:
  TextModel with ToST blocks); CRATE-alpha: its PyTorch port; ViT: timm's VisionTransformer),
  from either layer layout (a run with scan_layers saves the layers stacked)."""
  params = models.scan_layout(jax.device_get(params), False)
  if isinstance(model, models.CRATEMAE):
    return mae_keys.flax_to_torch(params, model)  # its position tables need an image_size
  if isinstance(model, models.CRATEAlpha):
    return alpha_keys.flax_to_torch(params, depth=model.depth, heads=model.heads,
                                    dim_head=model.dim_head)
  if isinstance(model, models.ViT):  # timm's VisionTransformer (class token, LN eps 1e-6)
    return vit_keys.flax_to_torch(params, depth=model.depth, heads=model.heads,
                                  dim_head=model.dim_head)
  if tost_keys.is_tost(model):  # the official ToST VisionTransformer / GPT (TSSA)
    try:
      return tost_keys.flax_to_torch(params, model)
    except ValueError as e:
      raise ExportError(str(e)) from None
  if type(model) is not models.CRATE:
    setups.check_export(model, "torch", setup=f"model {type(model).__name__}")
  return torch_keys.flax_to_torch(params, depth=model.depth, heads=model.heads,
                                  dim_head=model.dim_head)


def export_torch(checkpoint: str, out: str) -> str:
  refuse_existing(out)
  model, params, _ = load(checkpoint, "torch")
  sd = torch_state_dict(model, params)
  import torch
  tmp = out + ".partial"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp)
  os.replace(tmp, out)
  return out


def safetensors_tensors(model, params) -> tuple[str, dict[str, np.ndarray]]:
  """(layout, tensors) a .safetensors export holds: "torch" and `torch_state_dict` where the
  family has an official PyTorch layout, else "flax" and the unscanned params tree flattened
  (crate_jax.interop.safetensors_io)."""
  if models.contract(model).torch_layout:
    return "torch", torch_state_dict(model, params)
  return "flax", safetensors_io.flatten(models.scan_layout(jax.device_get(params), False))


def export_safetensors(checkpoint: str, out: str) -> str:
  """Write the checkpoint's weights as a .safetensors file (names: safetensors_io's docstring)
  with the model's name and kwargs in its metadata."""
  refuse_existing(out)
  model, params, _ = load(checkpoint)
  name, kwargs, _ = model_spec(ckpt_lib.read_meta(os.fspath(ckpt_lib.resolve(checkpoint))))
  layout, tensors = safetensors_tensors(model, params)
  meta = safetensors_io.metadata(layout, name, kwargs, type(model).__name__)
  return safetensors_io.write(out, tensors, meta)


def forward_fn(model, params):
  """inputs (B, H, W, 3) float32 normalised images, or (B, T) int32 tokens -> logits float32."""
  def forward(inputs):
    out = model.apply(models.variables(params), inputs)
    return jnp.asarray(out, jnp.float32)
  return forward


def stablehlo_artifact(model, params, example: jax.ShapeDtypeStruct | None = None) -> bytes:
  """jax.export of the forward pass with a symbolic batch dimension `b`, serialized."""
  setups.check_export(model, "stablehlo", setup=f"model {type(model).__name__}")
  from jax import export
  example = example_input(model, None) if example is None else example
  b, = export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, *example.shape[1:]), example.dtype)
  exported = export.export(jax.jit(forward_fn(model, params)))(spec)
  return bytes(exported.serialize())


_README = """# {name}: StableHLO forward pass

`{file}` is a serialized `jax.export` artifact (StableHLO with the weights inside):
{inputs} -> logits float32 `{logits}`.
The batch dimension is symbolic: any batch size works. Loading needs jax only:

```python
import jax, numpy as np
with open("{file}", "rb") as f:
    forward = jax.export.deserialize(bytearray(f.read()))
logits = forward.call(np.zeros({example}, np.{dtype}))
```
{classes_line}"""


def export_stablehlo(checkpoint: str, out: str) -> str:
  refuse_existing(out)
  model, params, cfg = load(checkpoint, "stablehlo")
  data = (cfg or {}).get("data", {})
  x = example_input(model, cfg)
  blob = stablehlo_artifact(model, params, x)
  from crate_jax.data import datasets
  names = datasets.saved_class_names(checkpoint)
  tokens = models.contract(model).inputs == "tokens"
  info = {"model": type(model).__name__, "input_shape": list(x.shape[1:]),
          "input_dtype": str(x.dtype), "class_names": names}
  if tokens:
    info["tokenizer"] = data.get("tokenizer")
    inputs = (f"token ids int32 `(batch, {x.shape[1]})` (the run's {info['tokenizer']} "
              "tokenizer; a BPE run's tokenizer.json is beside its checkpoints)")
  else:
    info.update(image_size=model.image_size, mean=list(data.get("mean", [])),
                std=list(data.get("std", [])))
    norm = (f"`(pixel / 255 - mean) / std`, mean = {info['mean']}, std = {info['std']}"
            if info["mean"] else "the normalisation the imported weights were trained with")
    inputs = (f"images float32 `(batch, {model.image_size}, {model.image_size}, 3)`, channels "
              f"last, normalised as in training ({norm})")
  logits = jax.eval_shape(forward_fn(model, params), x)
  tmp = out.rstrip("/") + ".partial"
  os.makedirs(tmp, exist_ok=False)
  with open(os.path.join(tmp, STABLEHLO_FILE), "wb") as f:
    f.write(blob)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(info, f, indent=1)
  with open(os.path.join(tmp, "README.md"), "w") as f:
    f.write(_README.format(name=info["model"], file=STABLEHLO_FILE, inputs=inputs,
                           logits="(batch, " + ", ".join(map(str, logits.shape[1:])) + ")",
                           example=(4, *x.shape[1:]), dtype="int32" if tokens else "float32",
                           classes_line=("\nClass names (logit order) are in meta.json.\n"
                                         if names else "")))
  if os.path.isdir(out):
    os.rmdir(out)  # empty (refuse_existing checked)
  os.replace(tmp, out)
  return out
