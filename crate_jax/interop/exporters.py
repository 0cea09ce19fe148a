"""Our checkpoints -> a PyTorch state dict (the official CRATE / CRATE-MAE classes or the
CRATE-alpha port, strict=True) or a serialized StableHLO forward pass (jax.export, symbolic batch
dimension). CRATE-MAE's tensors that are not parameters of ours are written as
mae_keys.fixed_tensors says.

Nothing is written unless the whole export succeeds; an existing output is refused.
"""
from __future__ import annotations

import functools
import json
import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import models
from crate_jax.interop import alpha_keys, mae_keys, torch_keys
from crate_jax.training import checkpoint as ckpt_lib

STABLEHLO_FILE = "forward.stablehlo"


class ExportError(ValueError):
  """The checkpoint cannot be exported as asked."""


def refuse_existing(out: str) -> None:
  if os.path.exists(out) and (not os.path.isdir(out) or os.listdir(out)):
    raise FileExistsError(f"--out {out!r} exists; refusing to overwrite it")


def model_from_meta(meta: dict):
  """(float32, unscanned model, config-or-None) as the checkpoint's meta describes it: a training
  run's config, or a converted checkpoint's model name and kwargs."""
  if "config" in meta:
    cfg = meta["config"]
    name, kwargs = cfg["model"]["name"], dict(cfg["model"]["kwargs"])
  elif "model" in meta:
    cfg, name, kwargs = None, meta["model"], dict(meta.get("model_kwargs", {}))
  else:
    raise ExportError("the checkpoint's meta names no model (neither a training config nor a "
                      "converted model)")
  return models.get(name, **kwargs), cfg


def load(checkpoint: str):
  """(model, params, config-or-None) of the latest step under `checkpoint` (EMA where the run
  evaluates it), the params in the model's unscanned layout."""
  path = os.fspath(ckpt_lib.resolve(checkpoint))  # CheckpointError if there is none
  _, meta = ckpt_lib.load_params(path)
  model, cfg = model_from_meta(meta)
  ema = bool(cfg and cfg.get("ema_decay", 0) > 0 and cfg.get("eval_ema", True))
  shape = (1, model.image_size, model.image_size, 3)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))["params"]
  params, _ = ckpt_lib.load_params_for(abstract, path, ema=ema,
                                      adapt=functools.partial(models.adapt_params, model))
  return model, params, cfg


def torch_state_dict(model, params) -> dict[str, np.ndarray]:
  """The official PyTorch layout of `params` (CRATE, CRATE-MAE; CRATE-alpha: its PyTorch port),
  from either layer layout (a run with scan_layers saves the layers stacked)."""
  params = models.scan_layout(jax.device_get(params), False)
  if isinstance(model, models.CRATEMAE):
    return mae_keys.flax_to_torch(params, model)  # its position tables need an image_size
  if isinstance(model, models.CRATEAlpha):
    return alpha_keys.flax_to_torch(params, depth=model.depth, heads=model.heads,
                                    dim_head=model.dim_head)
  if type(model) is not models.CRATE:
    raise ExportError(f"model {type(model).__name__} has no PyTorch layout to export to (CRATE, "
                      "CRATE-alpha and CRATE-MAE have one)")
  return torch_keys.flax_to_torch(params, depth=model.depth, heads=model.heads,
                                  dim_head=model.dim_head)


def export_torch(checkpoint: str, out: str) -> str:
  refuse_existing(out)
  model, params, _ = load(checkpoint)
  sd = torch_state_dict(model, params)
  import torch
  tmp = out + ".partial"
  torch.save({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, tmp)
  os.replace(tmp, out)
  return out


def forward_fn(model, params):
  """images (B, H, W, 3) float32, normalised -> logits (B, classes) float32."""
  def forward(images):
    out = model.apply({"params": params}, images)
    return jnp.asarray(out, jnp.float32)
  return forward


def stablehlo_artifact(model, params) -> bytes:
  """jax.export of the forward pass with a symbolic batch dimension `b`, serialized."""
  if isinstance(model, models.CRATEMAE):
    raise ExportError("CRATE-MAE pre-training checkpoints have no classifier forward pass to "
                      "export; fine-tune a crate_mae_classifier_* first")
  from jax import export
  b, = export.symbolic_shape("b")
  spec = jax.ShapeDtypeStruct((b, model.image_size, model.image_size, 3), jnp.float32)
  exported = export.export(jax.jit(forward_fn(model, params)))(spec)
  return bytes(exported.serialize())


_README = """# {name}: StableHLO forward pass

`{file}` is a serialized `jax.export` artifact (StableHLO with the weights inside):
images float32 `(batch, {size}, {size}, 3)`, channels last, normalised as in training
({norm}) -> logits float32 `(batch, {classes})`.
The batch dimension is symbolic: any batch size works. Loading needs jax only:

```python
import jax, numpy as np
with open("{file}", "rb") as f:
    forward = jax.export.deserialize(bytearray(f.read()))
logits = forward.call(np.zeros((4, {size}, {size}, 3), np.float32))
```
{classes_line}"""


def export_stablehlo(checkpoint: str, out: str) -> str:
  refuse_existing(out)
  model, params, cfg = load(checkpoint)
  data = (cfg or {}).get("data", {})
  blob = stablehlo_artifact(model, params)
  from crate_jax.data import datasets
  names = datasets.saved_class_names(checkpoint)
  info = {"model": type(model).__name__, "image_size": model.image_size,
          "mean": list(data.get("mean", [])), "std": list(data.get("std", [])),
          "class_names": names}
  logits = jax.eval_shape(forward_fn(model, params),
                          jax.ShapeDtypeStruct((1, model.image_size, model.image_size, 3),
                                               jnp.float32))
  tmp = out.rstrip("/") + ".partial"
  os.makedirs(tmp, exist_ok=False)
  with open(os.path.join(tmp, STABLEHLO_FILE), "wb") as f:
    f.write(blob)
  with open(os.path.join(tmp, "meta.json"), "w") as f:
    json.dump(info, f, indent=1)
  with open(os.path.join(tmp, "README.md"), "w") as f:
    f.write(_README.format(name=info["model"], file=STABLEHLO_FILE, size=model.image_size,
                           norm=(f"`(pixel / 255 - mean) / std`, mean = {info['mean']}, "
                                 f"std = {info['std']}" if info["mean"] else
                                 "the normalisation the imported weights were trained with"),
                           classes=logits.shape[-1],
                           classes_line=("\nClass names (logit order) are in meta.json.\n"
                                         if names else "")))
  if os.path.isdir(out):
    os.rmdir(out)  # empty (refuse_existing checked)
  os.replace(tmp, out)
  return out
