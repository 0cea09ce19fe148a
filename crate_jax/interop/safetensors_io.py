"""safetensors files of our models, both ways (the `safetensors` package's numpy API: no torch,
nothing pickled).

Tensor names. A family with an official PyTorch layout (CRATE, CRATE-alpha's port, CRATE-MAE,
ViT as timm's, ToST, the causal ToST) is written with exactly the tensors `export --to torch`
writes, under the official names (`safetensors.torch.load_file` + `load_state_dict(strict=True)`
in the PyTorch class). Every other family (the language models CRATE-GPT / CRATE-BERT / GPT /
BERT, the CRATE-MAE classifier) is written "flat": one tensor per leaf of our unscanned params
tree (layers as `layer_i`, never stacked), named by its Flax path joined with "/", e.g.
`layer_0/mssa/U`, `token_embed/embedding`; a family's model state (ToST's batch statistics) sits
under `batch_stats/...`. Arrays keep their dtype and shape (no transposes).

Metadata (str -> str) in every file we write:
  format          "crate_jax"
  format_version  FORMAT_VERSION
  layout          "torch" (official names) or "flax" (flat names, SEPARATOR)
  model           the registered model name; model_kwargs: its keyword arguments, as JSON
  model_class     the model's class name (informational)
Importing (crate_jax.interop.converters) reads `layout` (a file without our metadata: the
--variant's family decides) and the kwargs when the file names the same model as --variant.
"""
from __future__ import annotations

import json
import os
from typing import Any, Mapping

import numpy as np

FORMAT = "crate_jax"
FORMAT_VERSION = "1"
SEPARATOR = "/"
SUFFIX = ".safetensors"
LAYOUTS = ("torch", "flax")


class SafetensorsError(ValueError):
  """A .safetensors file that cannot be read, or whose tensors do not fit the model."""


def is_safetensors(path: str) -> bool:
  return os.fspath(path).lower().endswith(SUFFIX)


def flatten(params: Mapping[str, Any], prefix: str = "") -> dict[str, np.ndarray]:
  """A nested params tree -> {"a/b/c": contiguous numpy array}."""
  out: dict[str, np.ndarray] = {}
  for key, value in params.items():
    name = f"{prefix}{key}"
    if SEPARATOR in str(key):
      raise SafetensorsError(f"parameter name {name!r} contains {SEPARATOR!r}")
    if hasattr(value, "items"):
      out.update(flatten(value, name + SEPARATOR))
    else:
      out[name] = np.ascontiguousarray(np.asarray(value))
  return out


def unflatten(flat: Mapping[str, Any]) -> dict[str, Any]:
  """{"a/b/c": array} -> the nested tree."""
  tree: dict[str, Any] = {}
  for name, value in flat.items():
    *parents, leaf = name.split(SEPARATOR)
    node = tree
    for p in parents:
      node = node.setdefault(p, {})
    node[leaf] = value
  return tree


def metadata(layout: str, model_name: str, model_kwargs: Mapping[str, Any],
             model_class: str) -> dict[str, str]:
  """The str -> str metadata we store (see the module docstring)."""
  if layout not in LAYOUTS:
    raise ValueError(f"layout {layout!r} is not one of {LAYOUTS}")
  return {"format": FORMAT, "format_version": FORMAT_VERSION, "layout": layout,
          "model": model_name, "model_class": model_class,
          "model_kwargs": json.dumps(dict(model_kwargs), sort_keys=True)}


def write(path: str, tensors: Mapping[str, np.ndarray], meta: Mapping[str, str]) -> str:
  """Write atomically: a `.partial` file renamed into place; nothing is left on failure."""
  from safetensors.numpy import save_file
  tmp = os.fspath(path) + ".partial"
  try:
    save_file({k: np.ascontiguousarray(v) for k, v in tensors.items()}, tmp,
              metadata=dict(meta))
    os.replace(tmp, path)
  except BaseException:
    if os.path.exists(tmp):
      os.remove(tmp)
    raise
  return os.fspath(path)


def read(path: str) -> tuple[dict[str, np.ndarray], dict[str, str]]:
  """(tensors by name, metadata) of a .safetensors file; one SafetensorsError for a file that is
  not one (truncated, corrupt)."""
  if not os.path.isfile(path):
    raise FileNotFoundError(f"safetensors file {path!r} does not exist")
  try:
    from safetensors import safe_open
  except ImportError as e:
    raise ImportError("reading .safetensors files needs safetensors: "
                      "pip install 'safetensors>=0.4,<1'") from e
  try:
    with safe_open(path, framework="np") as f:
      meta = dict(f.metadata() or {})
      tensors = {k: f.get_tensor(k) for k in f.keys()}
  except Exception as e:  # noqa: BLE001 - the library's errors are one class, report them alike
    raise SafetensorsError(f"cannot read {path!r} as a .safetensors file: {e}") from None
  return tensors, meta


def layout(meta: Mapping[str, str], default: str) -> str:
  """The file's tensor naming ("torch" / "flax"); `default` for a file without our metadata."""
  value = meta.get("layout", default)
  if value not in LAYOUTS:
    raise SafetensorsError(f"the file's metadata names layout {value!r}; expected one of "
                           f"{LAYOUTS}")
  return value


def saved_kwargs(meta: Mapping[str, str], variant: str) -> dict[str, Any]:
  """The model kwargs the file records when it was written from `variant`, else {}."""
  if meta.get("model") != variant or "model_kwargs" not in meta:
    return {}
  try:
    kwargs = json.loads(meta["model_kwargs"])
  except json.JSONDecodeError as e:
    raise SafetensorsError(f"the file's metadata model_kwargs is not JSON: {e}") from None
  if not isinstance(kwargs, dict):
    raise SafetensorsError("the file's metadata model_kwargs is not a JSON object")
  return kwargs


def params_from_flat(flat: Mapping[str, Any], expected: Mapping[str, Any],
                     arch: str) -> dict[str, Any]:
  """A params tree shaped like `expected` (arrays or ShapeDtypeStructs) from flat tensors: one
  error naming the missing / unexpected names, or the first tensor of the wrong shape."""
  from crate_jax.interop import torch_keys
  want = flatten_abstract(expected)
  torch_keys.check_keys(flat, want, "the flat safetensors file", arch)
  out = {}
  for name, leaf in want.items():
    value = np.asarray(flat[name])
    if tuple(value.shape) != tuple(leaf.shape):
      raise SafetensorsError(f"tensor {name!r} has shape {tuple(value.shape)} but the model "
                             f"expects {tuple(leaf.shape)}")
    out[name] = value if value.dtype == leaf.dtype else value.astype(leaf.dtype)
  return unflatten(out)


def flatten_abstract(tree: Mapping[str, Any], prefix: str = "") -> dict[str, Any]:
  """{"a/b/c": leaf} of a tree whose leaves need not be arrays (e.g. jax.ShapeDtypeStruct)."""
  out: dict[str, Any] = {}
  for key, value in tree.items():
    if hasattr(value, "items"):
      out.update(flatten_abstract(value, f"{prefix}{key}{SEPARATOR}"))
    else:
      out[f"{prefix}{key}"] = value
  return out
