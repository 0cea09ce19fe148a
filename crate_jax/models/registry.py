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


def from_config(config) -> nn.Module:
  """The model a train config describes: config.model.{name, kwargs, scan_layers},
  compute_dtype, remat (False/True or a policy name)."""
  import jax.numpy as jnp  # local: keep this module import-light
  name = config.model.name
  _check(name)
  kwargs = dict(config.model.get("kwargs", {}) or {})
  fields = {f.name for f in dataclasses.fields(_REGISTRY[name][0])}
  if "dtype" in fields and config.get("compute_dtype"):
    if config.compute_dtype not in ("float32", "bfloat16", "float16"):
      raise ValueError(f"config.compute_dtype={config.compute_dtype!r} is not one of "
                       "float32, bfloat16, float16")
    kwargs.setdefault("dtype", getattr(jnp, config.compute_dtype))
  if "remat" in fields and config.get("remat") not in (None, False, "", "none", "None", "False"):
    kwargs.setdefault("remat", True if config.remat in (True, "True", "true") else config.remat)
  if "scan_layers" in fields and config.model.get("scan_layers"):
    kwargs.setdefault("scan_layers", True)
  if config.model.get("drop_path_rate"):
    if "drop_path_rate" not in fields:
      raise ValueError(f"config.model.drop_path_rate: model {name!r} has no stochastic depth")
    kwargs.setdefault("drop_path_rate", config.model.drop_path_rate)
  try:
    return get(name, **kwargs)
  except ValueError as e:
    raise ValueError(f"config.model: {e}") from None
