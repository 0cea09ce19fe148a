"""The jitted programs a config trains with: init, train step and eval step, with their shardings.

`build` is the one place that decides them, so the train loop, `evaluate` and the TPU planner
(`crate_jax.plan`) compile exactly the same thing: same model, optimizer, mesh, parameter and
optimizer-state shardings (FSDP rules in `sharding`), global batch, dtypes and donation.
"""
from __future__ import annotations

import dataclasses
import functools
from typing import Any, Callable

import jax
import jax.numpy as jnp
import optax

from crate_jax import models
from crate_jax.models import layers
from crate_jax.training import optim, sharding, steps, text_tasks


@dataclasses.dataclass
class Program:
  """What `build` returns. `abstract_state` carries the target shardings (for restores)."""
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  data_sharding: jax.sharding.NamedSharding
  abstract_state: Any
  init: Callable[[], steps.TrainState]
  train_step: Callable
  eval_step: Callable

  def abstract_batch(self, global_batch: int, image_shape: tuple, num_classes: int | None,
                     eval_: bool = False) -> dict[str, jax.ShapeDtypeStruct]:
    """ShapeDtypeStructs of one global batch as the pipeline yields it (for lowering); a
    one-dimensional shape (seq_len,) is a text batch of "tokens"."""
    sh = self.data_sharding
    if len(image_shape) == 1:
      spec = {"tokens": jax.ShapeDtypeStruct((global_batch, *image_shape), jnp.int32,
                                             sharding=sh)}
      if eval_:
        spec["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=sh)
      return spec
    spec = {"image": jax.ShapeDtypeStruct((global_batch, *image_shape), jnp.float32, sharding=sh),
            "label": jax.ShapeDtypeStruct((global_batch,), jnp.int32, sharding=sh)}
    if num_classes and not eval_:
      spec["labels"] = jax.ShapeDtypeStruct((global_batch, num_classes), jnp.float32, sharding=sh)
    if eval_:
      spec["mask"] = jax.ShapeDtypeStruct((global_batch,), jnp.float32, sharding=sh)
    return spec


def in_mesh(fn: Callable, mesh) -> Callable:
  """fn traced with `mesh` in context and the logical batch axis (models.layers.batch_split)
  mapped to the mesh's batch axes, so activations stay batch-split under FSDP."""
  import flax.linen as nn
  rules = ((layers.BATCH_AXIS, sharding.BATCH_AXES),)

  @functools.wraps(fn)
  def wrapped(*args, **kwargs):
    with jax.sharding.use_abstract_mesh(mesh.abstract_mesh), nn.logical_axis_rules(rules):
      return fn(*args, **kwargs)
  return wrapped


def build(config, model, mesh, *, task: str, total_steps: int, steps_per_epoch: int,
          image_shape: tuple) -> Program:
  """Optimizer and schedule from config.optimizer; state sharded by config.mesh's FSDP rule."""
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps, steps_per_epoch)
  layer_ids = None
  if config.optimizer.layer_decay < 1.0:
    shapes = jax.eval_shape(model.init, {"params": jax.random.key(0), "mask": jax.random.key(0)},
                            jnp.zeros((1, *image_shape)))["params"]
    layer_ids = models.layer_ids(model, shapes)
  tx = optim.make_optimizer(config.optimizer, schedule, layer_ids=layer_ids,
                            depth=getattr(model, "depth", None))
  init = lambda: steps.create_train_state(model, tx, image_shape, config.seed,
                                          ema=config.ema_decay > 0)
  if task == "dino":  # student/teacher/centre state and steps: crate_jax.training.dino_step
    from crate_jax.training import dino_step
    head = dino_step.make_head(config)
    init = lambda: dino_step.create_state(model, head, tx, image_shape, config.seed)
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, config.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  text = text_tasks.spec_from_config(config)
  if task == "dino":
    train_fn = dino_step.make_train_step(model, head, tx, config, total_steps, steps_per_epoch)
    eval_fn = dino_step.make_eval_step(model, head, config)
  else:
    train_fn = steps.make_train_step(model, tx, task=task, label_smoothing=config.label_smoothing,
                                     grad_accum_steps=config.grad_accum_steps,
                                     ema_decay=config.ema_decay, text=text)
    eval_fn = steps.make_eval_step(model, task=task, text=text)
  train_step = jax.jit(in_mesh(train_fn, mesh), in_shardings=(state_sh, data_sh),
                       out_shardings=(state_sh, repl), donate_argnums=0)
  eval_step = jax.jit(in_mesh(eval_fn, mesh), in_shardings=(state_sh.params, data_sh))
  return Program(tx=tx, schedule=schedule, state_sharding=state_sh, data_sharding=data_sh,
                 abstract_state=abstract, init=jax.jit(init, out_shardings=state_sh),
                 train_step=train_step, eval_step=eval_step)
