"""Model registry: named variants (`get("crate_base")`) over a few model classes."""
from __future__ import annotations

import dataclasses
from typing import Any, Callable

import flax.linen as nn

_REGISTRY: dict[str, tuple[Callable[..., nn.Module], dict[str, Any]]] = {}


def register(name: str, cls: Callable[..., nn.Module], **defaults) -> None:
  """Register `name` as `cls(**defaults)`; later `get(name, **overrides)` builds it."""
  _REGISTRY[name] = (cls, dict(defaults))


def names() -> list[str]:
  return sorted(_REGISTRY)


def variant_kwargs(name: str) -> dict[str, Any]:
  """The default constructor arguments of a registered variant."""
  _check(name)
  return dict(_REGISTRY[name][1])


def get(name: str, **overrides) -> nn.Module:
  """Build a registered model; unknown names and unknown arguments raise one clear ValueError."""
  _check(name)
  cls, defaults = _REGISTRY[name]
  fields = {f.name for f in dataclasses.fields(cls)} - {"parent", "name"}
  unknown = sorted(set(overrides) - fields)
  if unknown:
    raise ValueError(f"model {name!r} ({cls.__name__}) has no argument(s) {unknown}; "
                     f"valid: {sorted(fields)}")
  return cls(**{**defaults, **overrides})


def _check(name: str) -> None:
  if name not in _REGISTRY:
    raise ValueError(f"unknown model {name!r}; registered models: {', '.join(names())}")


def without_data_only_kwargs(name: str, kwargs: dict) -> dict:
  """kwargs without the data's class count where the family has no head to give it to
  (CRATE-MAE pre-training): configs set model.kwargs.num_classes from config.data."""
  _check(name)
  fields = {f.name for f in dataclasses.fields(_REGISTRY[name][0])}
  return {k: v for k, v in kwargs.items() if k != "num_classes" or k in fields}


def data_kwargs(name: str, kwargs: dict, data=None) -> dict:
  """A config's model kwargs as the model takes them: the data's image_size / num_classes where
  the kwargs lost their reference to config.data (a kwargs dict replaced on the command line)
  and the family has the field; the class count dropped for headless families."""
  _check(name)
  fields = {f.name for f in dataclasses.fields(_REGISTRY[name][0])}
  kwargs = dict(kwargs)
  for key in ("image_size", "num_classes"):
    if key in fields and key not in kwargs and (data or {}).get(key, 0):
      kwargs[key] = data[key]
  return without_data_only_kwargs(name, kwargs)


def from_config(config) -> nn.Module:
  """The model a train config describes (crate_jax.config_lib.base_config's keys):
  config.model.{name, kwargs, scan_layers, mssa_output, drop_path_rate}, compute_dtype, remat (a
  policy name or True/False)."""
  import jax.numpy as jnp  # local: keep this module import-light
  name = config.model.name
  _check(name)
  kwargs = data_kwargs(name, dict(config.model.kwargs), config.get("data"))
  fields = {f.name for f in dataclasses.fields(_REGISTRY[name][0])}
  if "dtype" in fields:
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.compute_dtype={config.compute_dtype!r} is not one of "
                       "float32, bfloat16, float16")
    kwargs.setdefault("dtype", getattr(jnp, config.compute_dtype))
  from crate_jax.models import layers
  remat = layers.remat_name(config.remat)
  if "remat" in fields and remat != "none":
    kwargs.setdefault("remat", remat)
  if "scan_layers" in fields and config.model.scan_layers:
    kwargs.setdefault("scan_layers", True)
  if config.model.mssa_output != "free":
    if "mssa_output" not in fields:
      raise ValueError(f"config.model.mssa_output={config.model.mssa_output!r}: model {name!r} "
                       "has no MSSA output choice (CRATE has)")
    kwargs.setdefault("mssa_output", config.model.mssa_output)
  if config.model.drop_path_rate:
    if "drop_path_rate" not in fields:
      raise ValueError(f"config.model.drop_path_rate: model {name!r} has no stochastic depth")
    kwargs.setdefault("drop_path_rate", config.model.drop_path_rate)
  try:
    return get(name, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None
