"""Every registered model as a Flax NNX module (through `flax.nnx.bridge.ToNNX`).

  from flax import nnx
  from crate_jax import nnx as crate_nnx
  model = crate_nnx.model("crate_tiny", num_classes=10)      # random init (models.init_params)
  model = crate_nnx.from_checkpoint("workdirs/run")           # a crate_jax checkpoint's weights
  logits = model(images)                                      # eval mode
  logits, out = model(images, return_intermediates=True)      # the white-box quantities
  logits = model(images, train=True)                          # dropout / drop-path from model.rngs
  optimizer = nnx.Optimizer(model, optax.adamw(1e-4), wrt=nnx.Param)

The NNX module holds the Linen model's variables: its parameters as `nnx.Param` (in the same
tree as crate_jax's params: `nnx.state(model, nnx.Param)` reads bridge/<linen path>) and a
family's non-trainable state (ToST's batch-norm running statistics, crate_jax's "batch_stats")
as `nnx.BatchStat`: read in eval mode, updated by a train-mode call (as crate_jax's train step
does), never an optimizer's target with wrt=nnx.Param. `linen_params(model)` gives the params
tree back in crate_jax's layout (for `models.*`, `ckpt_lib.save_params`, `save_checkpoint`).
See docs/nnx.md.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from flax import nnx

from crate_jax import models
from crate_jax.models import family
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import weights as weights_lib

# The rng streams the families draw from: "params" (init), "dropout" (dropout and stochastic
# depth in train mode), "mask" (CRATE-MAE's random masking).
STREAMS = ("params", "dropout", "mask")
STATE = family.STATE


class Model(nnx.Module):
  """A crate_jax Linen model as an NNX module; build it with `model` or `from_checkpoint`.

  `model(x, train=False, **kwargs)` is the Linen model's `apply(variables, x, train=train,
  **kwargs)` (so `return_intermediates=True` returns (logits, intermediates)); in train mode the
  family's state (ToST's batch-norm statistics) is updated in the module. `method=` runs another
  method of the Linen model (e.g. "encode" of CRATE-MAE; `train` is then passed only when True).
  The rngs come from `model.rngs` unless `rngs=` is given (an nnx.Rngs with the STREAMS).
  """

  def __init__(self, linen_model, params, *, example=None, rngs=None, name: str | None = None):
    """`params`: a crate_jax params tree of `linen_model` (models.init_params's, a checkpoint's;
    fitted as checkpoints are: layer layout, the family's adapt_params, shapes checked), or
    None for models.init_params's random init from `rngs`' params stream. `example`: one input
    batch (array or jax.ShapeDtypeStruct); default `example_input(linen_model)`."""
    if getattr(linen_model, "decode", False):
      raise ValueError("decode=True (the generation cache) is not supported through NNX: build "
                       "the model without it and generate with crate_jax.generate")
    example = example_input(linen_model) if example is None else example
    self.rngs = as_rngs(rngs)
    self.model_name = name
    # The Linen variables' shapes only (no compute): the values come from `params` below.
    self.bridge = nnx.eval_shape(functools.partial(_bridge, linen_model), example)
    others = nnx.state(self.bridge, nnx.Not(nnx.Any(nnx.Param, nnx.BatchStat)))
    if jax.tree.leaves(others):
      raise ValueError(f"{type(linen_model).__name__} keeps variables other than params and "
                       f"{STATE!r} ({sorted(nnx.to_pure_dict(others))}): not supported "
                       "through NNX")
    self.has_state = bool(jax.tree.leaves(nnx.state(self.bridge, nnx.BatchStat)))
    if params is None:
      params = _init(linen_model, self.rngs.params(), jnp.zeros(example.shape, example.dtype))
    load_params(self, params)

  @property
  def linen_model(self):
    """The wrapped Linen module (for models.contract, models.head_params, ...)."""
    return self.bridge.to_nnx__module

  def __call__(self, *args, train: bool = False, method=None, rngs=None, **kwargs):
    if method is None or train:
      kwargs["train"] = train
    mutable = [STATE] if train and self.has_state else False
    return self.bridge(*args, rngs=self.rngs if rngs is None else rngs, method=method,
                       mutable=mutable, **kwargs)


# models.init_params compiled once per (hashable) Linen model.
_init = jax.jit(models.init_params, static_argnums=0)


def _bridge(linen_model, example):
  # Inside nnx.eval_shape: the rngs only shape the variables (any key does).
  bridge = nnx.bridge.ToNNX(linen_model)
  return bridge.lazy_init(example, rngs=nnx.Rngs(**{s: 0 for s in STREAMS}))


def as_rngs(rngs=None) -> nnx.Rngs:
  """An nnx.Rngs with every stream of STREAMS: from an int seed or a jax key (None: 0), or an
  nnx.Rngs (as is when it has them all; else one key drawn from it seeds them)."""
  if isinstance(rngs, nnx.Rngs):
    if all(s in rngs for s in STREAMS):
      return rngs
    rngs = rngs()
  if isinstance(rngs, jax.Array) and jnp.issubdtype(rngs.dtype, jax.dtypes.prng_key):
    key = rngs
  elif rngs is None or np.ndim(rngs) == 0:
    key = jax.random.key(int(rngs or 0))
  else:
    key = jax.random.wrap_key_data(jnp.asarray(rngs))   # a raw uint32 key (jax.random.PRNGKey)
  return nnx.Rngs(**dict(zip(STREAMS, jax.random.split(key, len(STREAMS)))))


def example_input(linen_model, seq_len: int | None = None) -> jax.ShapeDtypeStruct:
  """One example batch of what the model reads: (1, H, W, C) float32 images (H = W = its
  image_size) or (1, T) int32 token ids (T = seq_len, else its max_len)."""
  if models.contract(linen_model).inputs == "tokens":
    return jax.ShapeDtypeStruct((1, int(seq_len or linen_model.max_len)), jnp.int32)
  size = getattr(linen_model, "image_size", None)
  if not size:
    raise ValueError(f"{type(linen_model).__name__} has no image_size: pass example=")
  channels = getattr(linen_model, "channels", 3)
  return jax.ShapeDtypeStruct((1, size, size, channels), jnp.float32)


def model(name: str, *, rngs=None, example=None, params=None, **kwargs) -> Model:
  """The registered model `name` (`models.get(name, **kwargs)`) as an NNX Model: random init
  from `rngs` (an int seed, a jax key or an nnx.Rngs; default 0), or the crate_jax `params`."""
  return Model(models.get(name, **kwargs), params, example=example, rngs=rngs, name=name)


def linen_params(module: Model):
  """The module's weights as a crate_jax params tree: the Linen params, with the family's state
  under family.STATE where it keeps one (what models.init_params and checkpoints hold)."""
  params = nnx.to_pure_dict(nnx.state(module.bridge, nnx.Param))
  if module.has_state:
    params[STATE] = nnx.to_pure_dict(nnx.state(module.bridge, nnx.BatchStat))
  return params


def load_params(module: Model, params, *, what: str = "params") -> Model:
  """Put a crate_jax params tree (with the family's state where it keeps one) into `module`:
  fitted as a checkpoint is (scanned/unrolled layers, the family's adapt_params, e.g. a
  positional table resized), cast to the module's dtypes; a tree that does not fit raises
  ckpt_lib.CheckpointError naming the leaves. Returns the module."""
  linen = module.linen_model
  abstract = jax.tree.map(lambda a: jax.ShapeDtypeStruct(a.shape, a.dtype),
                          linen_params(module))
  fitted = ckpt_lib.fit_params(abstract, params, what=what,
                               adapt=functools.partial(models.adapt_params, linen))
  tree = family.variables(fitted)
  for collection, kind in (("params", nnx.Param), (STATE, nnx.BatchStat)):
    if collection in tree:
      state = nnx.state(module.bridge, kind)
      nnx.replace_by_pure_dict(state, tree[collection])
      nnx.update(module.bridge, state)
  return module


def from_checkpoint(path: str, config=None, *, rngs=None, example=None, new_head: bool = False,
                    **overrides) -> Model:
  """The model a crate_jax checkpoint holds (a workdir, its checkpoints/ folder or a step
  folder: the latest step unless named), with the weights that stand for the run's model
  (crate_jax.training.weights: the EMA where evaluated, a DINO run's teacher backbone, ...).

  The model is the one `config` (default: the checkpoint's own training config; a converted
  checkpoint's saved model name and kwargs) describes, float32 and unrolled; `overrides` change
  its constructor arguments (e.g. drop_path_rate=0.1 to fine-tune). With new_head, the
  family's head (models.head_params) is freshly initialised from `rngs` instead of loaded
  (e.g. overrides num_classes=5 on a 1000-class checkpoint)."""
  meta = ckpt_lib.read_meta(path)
  if config is not None and not isinstance(config, ml_collections.ConfigDict):
    config = ml_collections.ConfigDict(config)
  cfg = config.to_dict() if config is not None else meta.get("config")
  linen, name = _model_from(cfg, meta, path)
  if overrides:
    linen = linen.clone(**overrides)
  if example is None:
    seq_len = ((cfg or {}).get("data") or {}).get("seq_len")
    example = example_input(linen, seq_len)
  rngs = as_rngs(rngs)
  example = jax.ShapeDtypeStruct(example.shape, example.dtype)
  abstract = jax.eval_shape(functools.partial(models.init_params, linen), jax.random.key(0),
                            example)
  if not new_head:
    params, _, what = weights_lib.load(path, config, abstract_params=abstract, model=linen)
  else:
    params, _, what = weights_lib.load(path, config)
    heads = [k for k in models.head_params(linen) if k in abstract]
    fresh = _init(linen, rngs.params(), jnp.zeros(example.shape, example.dtype))
    params = ckpt_lib.fit_params(abstract, params, what=f"checkpoint {path}",
                                 adapt=functools.partial(models.adapt_params, linen),
                                 keep_fresh={k: fresh[k] for k in heads})
  logging.info("NNX %s from %s: its %s", type(linen).__name__, path, what)
  return Model(linen, params, example=example, rngs=rngs, name=name)


def _model_from(cfg, meta: dict, path: str):
  """(Linen model, registered name) of a training config, or of a converted checkpoint's meta."""
  from crate_jax.models import registry
  if cfg is not None:
    name = cfg["model"]["name"]
    kwargs = registry.data_kwargs(name, dict(cfg["model"]["kwargs"]), cfg.get("data"))
  elif "model" in meta:
    name, kwargs = meta["model"], dict(meta.get("model_kwargs", {}))
  else:
    raise ckpt_lib.CheckpointError(
        f"checkpoint {path} names no model (neither a training config nor a converted "
        "model's name): pass config=")
  return models.get(name, **registry.without_data_only_kwargs(name, kwargs)), name


def save_checkpoint(module: Model, directory: str, *, step: int = 0, meta: dict | None = None):
  """Write the module's weights as a crate_jax params-only checkpoint (what `crate_jax
  evaluate / analyze / export` and `from_checkpoint` read), its meta naming the registered
  model and the constructor arguments that differ from the variant's. Returns the step
  folder."""
  name = module.model_name
  if name is None:
    raise ValueError("the module was built from a Linen model, not a registered name: use "
                     "ckpt_lib.save_params(directory, linen_params(module), meta)")
  linen, default = module.linen_model, models.get(name)
  kwargs = {f.name: getattr(linen, f.name) for f in dataclasses.fields(linen)
            if f.name not in ("parent", "name") and getattr(linen, f.name) != getattr(
                default, f.name)}
  try:
    json.dumps(kwargs)
  except TypeError as e:
    raise ValueError(f"model arguments {kwargs} cannot be saved in the checkpoint's meta "
                     f"({e}); use ckpt_lib.save_params with your own meta") from None
  meta = {"model": name, "model_kwargs": kwargs, **(meta or {})}
  params = jax.device_get(linen_params(module))
  return ckpt_lib.save_params(os.fspath(directory), params, meta, step=step)
