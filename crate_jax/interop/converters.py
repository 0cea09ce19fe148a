"""Published checkpoints -> our params (and Orbax checkpoints): official PyTorch CRATE, the
CRATE-alpha PyTorch port, official PyTorch CRATE-MAE (`crate_ae`), official PyTorch ToST (vision
`tost_cab_*`, with the stem's batch-norm statistics; language `tost_gpt_*`) (all by --variant's
family), CRATE-alpha big_vision `.npz` files, and `.safetensors` files (read without torch): the
official PyTorch names of those families, or our flat Flax names (safetensors_io) of any family,
e.g. a language model exported with `export --to safetensors`.

ToST has no ISTA step: eta / lambda do not apply (its LayerScale vectors are in the file).

eta and lambda are not stored in PyTorch checkpoints: they are arguments (lambda defaults to the
family's: 0.1 for CRATE and CRATE-alpha, 0.5 for CRATE-MAE), recorded in the meta. A .safetensors
file we wrote records its model's kwargs (eta and lambda included): they are used when it names
the same model as --variant, the arguments given winning.
Every key must be accounted for; any mismatch raises before anything is written, and an existing
output is never overwritten.
"""
from __future__ import annotations

import argparse
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np

from crate_jax import cli, models
from crate_jax.interop import alpha_keys, mae_keys, safetensors_io, torch_keys, tost_keys
from crate_jax.training import checkpoint as ckpt_lib


def infer_kwargs(state_dict, variant: str, channels: int = 3) -> dict:
  """num_classes and image_size as stored in the file (head rows, pos-emb rows); a ToST image
  model: num_classes (head rows; its positions fit any size); a ToST language model: vocab_size
  and max_len (wte and wpe rows)."""
  sd = torch_keys.unwrap_state_dict(state_dict)
  kwargs = {}
  tost = _tost_kind(variant)
  if tost is not None:
    sd = tost_keys.unwrap_state_dict(state_dict)
    rows = {"vision": {"head.weight": "num_classes"},
            "lm": {"transformer.wte.weight": "vocab_size", "transformer.wpe.weight": "max_len"}}
    for key, name in rows[tost].items():
      if key in sd and len(np.shape(sd[key])) == 2:
        kwargs[name] = int(np.shape(sd[key])[0])
    if tost == "lm":   # GPTConfig(bias=...) as saved
      kwargs["use_bias"] = "transformer.ln_f.bias" in sd
    return kwargs
  if "mlp_head.1.weight" in sd:
    kwargs["num_classes"] = int(np.shape(sd["mlp_head.1.weight"])[0])
  pos = next((k for k in ("pos_embedding", "decoder_pos_embed") if k in sd), None)
  if pos is not None and len(np.shape(sd[pos])) == 3:
    n = int(np.shape(sd[pos])[1]) - 1
    side = int(round(np.sqrt(n)))
    patch = models.variant_kwargs(variant).get("patch_size", 16)
    if side * side == n:
      kwargs["image_size"] = side * patch
  return kwargs


def convert_state_dict(state_dict, variant: str, *, eta: float = 0.1,
                       lambd: float | None = None, **model_kwargs):
  """(params, model kwargs) for an official state dict of `variant`'s family, validated against
  it. lambd=None: the family's default (recorded in the kwargs). ToST variants take neither eta
  nor lambd (no ISTA step; lambd given is refused)."""
  if _tost_kind(variant) is not None:
    if lambd is not None:
      raise ValueError(f"--variant {variant}: ToST has no ISTA step, --lambd does not apply")
    return convert_tost(state_dict, variant, **model_kwargs)
  kwargs = {**infer_kwargs(state_dict, variant), **model_kwargs, "eta": eta}
  if lambd is not None:
    kwargs["lambd"] = lambd
  model = models.get(variant, **kwargs)
  kwargs["lambd"] = model.lambd
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.image_size, model.image_size, model.channels)))
  arch = dict(depth=model.depth, heads=model.heads, dim_head=model.dim_head)
  if isinstance(model, models.CRATEMAE):
    return mae_keys.torch_to_flax(state_dict, expected["params"], model), kwargs
  if isinstance(model, models.CRATEAlpha):
    return alpha_keys.torch_to_flax(state_dict, expected["params"], **arch), kwargs
  if type(model) is not models.CRATE:
    raise ValueError(f"--variant {variant}: no PyTorch layout is known for "
                     f"{type(model).__name__} (CRATE, CRATE-alpha and CRATE-MAE are)")
  return torch_keys.torch_to_flax(state_dict, expected["params"], **arch), kwargs


def _tost_kind(variant: str) -> str | None:
  """"vision" / "lm" for a ToST variant (by its registered class), else None."""
  model = models.get(variant)
  if not tost_keys.is_tost(model):
    return None
  return "vision" if isinstance(model, models.ToST) else "lm"


def convert_tost(state_dict, variant: str, **model_kwargs):
  """(params with the batch-norm statistics, model kwargs) for an official ToST state dict."""
  kwargs = {**infer_kwargs(state_dict, variant), **model_kwargs}
  model = models.get(variant, **kwargs)
  if isinstance(model, models.ToST):
    example = jnp.zeros((1, model.image_size, model.image_size, model.channels))
  else:
    example = jnp.zeros((1, model.max_len), jnp.int32)
  expected = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            example)
  return tost_keys.torch_to_flax(state_dict, expected, model), kwargs


def convert_npz(arrays, variant: str, **model_kwargs):
  """(params, model kwargs) for a CRATE-alpha big_vision checkpoint (npz arrays by Flax path)."""
  flat = {k[len("params/"):] if k.startswith("params/") else k: v for k, v in arrays.items()}
  kwargs = {}
  if "head/kernel" in flat:
    kwargs["num_classes"] = int(np.shape(flat["head/kernel"])[1])
  if "pos_embedding" in flat and "embedding/kernel" in flat:
    n, patch = (int(np.shape(flat["pos_embedding"])[1]) - 1,
                int(np.shape(flat["embedding/kernel"])[0]))
    if int(round(np.sqrt(n))) ** 2 == n:
      kwargs["image_size"] = int(round(np.sqrt(n))) * patch
  kwargs.update(model_kwargs)
  model = models.get(variant, **kwargs)
  if not isinstance(model, models.CRATEAlpha):
    raise ValueError(f"--npz holds big_vision CRATE-alpha weights but --variant {variant} is a "
                     f"{type(model).__name__}; use a crate_alpha_* variant")
  expected = jax.eval_shape(model.init, jax.random.key(0),
                            jnp.zeros((1, model.image_size, model.image_size, model.channels)))
  return alpha_keys.npz_to_flax(flat, expected["params"]), kwargs


def load_npz(path: str) -> dict:
  if not os.path.isfile(path):
    raise FileNotFoundError(f"npz checkpoint {path!r} does not exist")
  try:
    with np.load(path, allow_pickle=False) as f:
      return {k: f[k] for k in f.files}
  except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
    raise ValueError(f"cannot read {path!r} as an .npz checkpoint: {e}") from e


def load_torch(path: str):
  if not os.path.isfile(path):
    raise FileNotFoundError(f"PyTorch checkpoint {path!r} does not exist")
  try:
    import torch
  except ImportError as e:
    raise ImportError("converting PyTorch checkpoints needs torch: "
                      "pip install -e '.[torch]'") from e
  try:  # MAE-style training checkpoints also pickle their argparse.Namespace of arguments
    with torch.serialization.safe_globals([argparse.Namespace]):
      return torch.load(path, map_location="cpu", weights_only=True)
  except Exception as e:  # noqa: BLE001 - report any unreadable file the same way
    raise ValueError(f"cannot read {path!r} as a PyTorch checkpoint: {e}") from e


def _abstract_params(model):
  """The model's params tree (ShapeDtypeStructs, with its model state) at init."""
  if models.contract(model).inputs == "tokens":
    example = jnp.zeros((1, model.max_len), jnp.int32)
  else:
    example = jnp.zeros((1, model.image_size, model.image_size, getattr(model, "channels", 3)))
  return jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                        example)


def convert_flat(tensors, variant: str, **model_kwargs):
  """(params, model kwargs) from flat-named tensors (safetensors_io: Flax paths joined by "/")
  of `variant` built with `model_kwargs`."""
  model = models.get(variant, **model_kwargs)
  params = safetensors_io.params_from_flat(tensors, _abstract_params(model), type(model).__name__)
  return params, dict(model_kwargs)


def convert_safetensors(path: str, variant: str, *, eta: float | None = None,
                        lambd: float | None = None, **model_kwargs):
  """(params, model kwargs) of a .safetensors file: official PyTorch names (ours exported, or a
  published file) through `convert_state_dict`, or our flat names (its metadata's layout "flax")
  through `convert_flat`. The file's recorded kwargs apply when it names --variant's model;
  arguments given here win. A mismatch names the model the file was written from."""
  tensors, meta = safetensors_io.read(path)
  model = models.get(variant)
  layout = safetensors_io.layout(meta, "torch" if models.contract(model).torch_layout else "flax")
  saved = safetensors_io.saved_kwargs(meta, variant)
  saved.pop("scan_layers", None)   # a run's layer layout, not the file's (it holds them unrolled)
  try:
    if layout == "flax":
      ista = {k: v for k, v in (("eta", eta), ("lambd", lambd)) if v is not None}
      return convert_flat(tensors, variant, **{**saved, **model_kwargs, **ista})
    if not models.contract(model).torch_layout:
      raise safetensors_io.SafetensorsError(
          f"--variant {variant}: {type(model).__name__} has no PyTorch layout, and the file "
          "holds official PyTorch names")
    if _tost_kind(variant) is not None:  # its `eta` (LayerScale init) is a model kwarg
      if lambd is not None:
        raise ValueError(f"--variant {variant}: ToST has no ISTA step, --lambd does not apply")
      return convert_tost(tensors, variant, **{**saved, **model_kwargs})
    eta = saved.pop("eta", 0.1) if eta is None else eta
    lambd = saved.pop("lambd", None) if lambd is None else lambd
    saved = {k: v for k, v in saved.items() if k not in ("eta", "lambd")}
    return convert_state_dict(tensors, variant, eta=eta, lambd=lambd, **{**saved, **model_kwargs})
  except ValueError as e:
    written = meta.get("model")
    if not written or written == variant:
      raise
    raise safetensors_io.SafetensorsError(
        f"{cli.one_line(e)} (the file was exported from model {written!r}: try --variant "
        f"{written})") from None


def convert(torch_path: str, variant: str, out: str, *, eta: float | None = None,
            lambd: float | None = None,
            **model_kwargs) -> str:
  """Convert and write; returns the checkpoint step directory. A .npz, .safetensors or PyTorch
  file by its suffix. eta=None: the file's (a .safetensors file we wrote), else 0.1."""
  if os.path.exists(out) and os.listdir(out):
    raise FileExistsError(f"--out {out!r} exists and is not empty; refusing to overwrite it")
  if safetensors_io.is_safetensors(torch_path):
    params, kwargs = convert_safetensors(torch_path, variant, eta=eta, lambd=lambd,
                                         **model_kwargs)
  elif torch_path.endswith(".npz"):
    ista = {"eta": 0.1 if eta is None else eta, **({} if lambd is None else {"lambd": lambd})}
    params, kwargs = convert_npz(load_npz(torch_path), variant, **ista, **model_kwargs)
  else:
    params, kwargs = convert_state_dict(load_torch(torch_path), variant,
                                        eta=0.1 if eta is None else eta, lambd=lambd,
                                        **model_kwargs)
  meta = {"model": variant, "model_kwargs": kwargs, "source": os.path.abspath(torch_path)}
  return ckpt_lib.save_params(out, params, meta)
