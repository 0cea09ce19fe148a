"""Which weights stand for a run's model, for every command that reads a checkpoint (evaluate,
analyze, export, generate, the warm start's source) and for the train loop's hooks: one rule,
the run's task's (`Task.weights`: the weight EMA where evaluated, DINO's teacher backbone, ...).

  load(checkpoint, config=None, abstract_params=None, model=None) -> (params, meta, what)

`config` defaults to the one the checkpoint saved; a converted checkpoint (no training config)
holds the model's params alone. With `abstract_params` the params are fitted to the model
(layer layout, the family's adapt_params, shapes checked) and placed on its shardings.
"""
from __future__ import annotations

import contextlib
import functools
import os

import ml_collections

from crate_jax import models
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import tasks


def saved_config(meta: dict):
  """The training config a checkpoint's meta holds (a ConfigDict), or None (converted weights)."""
  return ml_collections.ConfigDict(meta["config"]) if "config" in meta else None


def pick(config, tree, *, for_eval_step: bool = False):
  """(params, what) of a state tree under the config's task; a tree without a training config
  (converted or imported weights) is its params."""
  if config is None:
    return tree["params"], "params"
  return tasks.of(config).weights(config, tasks.state_dict(tree), for_eval_step=for_eval_step)


def load(checkpoint: str, config=None, *, abstract_params=None, model=None,
         for_eval_step: bool = False):
  """(params, meta, what): see the module docstring. `what` names the weights: "params",
  "ema", "teacher", "student"."""
  path = os.fspath(checkpoint)
  tree, meta = ckpt_lib.load_state(path)
  config = saved_config(meta) if config is None else config
  params, what = pick(config, tree, for_eval_step=for_eval_step)
  if abstract_params is not None:
    adapt = functools.partial(models.adapt_params, model) if model is not None else None
    with other_family(meta, model, path):
      params = ckpt_lib.fit_params(abstract_params, params, what=f"checkpoint {path}",
                                   adapt=adapt)
  return params, meta, what


def saved_model_name(meta: dict) -> str | None:
  """The registered model a checkpoint holds: its training config's, or a converted one's."""
  if "config" in meta:
    return meta["config"].get("model", {}).get("name")
  return meta.get("model")


@contextlib.contextmanager
def other_family(meta: dict, model, path: str):
  """A checkpoint that does not fit `model` because it holds another family (a ToST run read
  with a CRATE config): its CheckpointError names both families in one line instead of
  listing the missing leaves."""
  try:
    yield
  except ckpt_lib.CheckpointError:
    name = saved_model_name(meta)
    if model is None or name not in models.names():
      raise
    saved = type(models.get(name)).__name__
    if saved == type(model).__name__:
      raise
    raise ckpt_lib.CheckpointError(
        f"checkpoint {path} holds a {saved} model ({name!r}) and the config builds a "
        f"{type(model).__name__}: pass the run's own config (--config), or one of the same "
        "family") from None
