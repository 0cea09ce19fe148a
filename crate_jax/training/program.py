"""The jitted programs a config trains with: init, train step and eval step, with their shardings.

`build` is the one place that decides them, so the train loop, `evaluate --protocol supervised`
and the TPU planner (`crate_jax.plan`) compile exactly the same programs: same model, optimizer,
mesh, parameter and optimizer-state shardings (FSDP rules in `sharding`), global batch, dtypes
and donation. What the steps compute comes from the config's task (crate_jax.training.tasks).
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
from crate_jax.training import optim, sharding, steps, tasks


@dataclasses.dataclass
class Program:
  """What `build` returns. `abstract_state` carries the target shardings (for restores)."""
  task: Any
  tx: optax.GradientTransformation
  schedule: optax.Schedule
  state_sharding: Any
  data_sharding: jax.sharding.NamedSharding
  abstract_state: Any
  init: Callable[[], steps.TrainState]
  train_step: Callable
  eval_step: Callable

  def abstract_batch(self, config, global_batch: int, *, train: bool = True
                     ) -> dict[str, jax.ShapeDtypeStruct]:
    """The task's batch spec (what the pipeline yields) with the data sharding, for lowering."""
    return {k: jax.ShapeDtypeStruct(v.shape, v.dtype, sharding=self.data_sharding)
            for k, v in self.task.batch_spec(config, global_batch, train=train).items()}


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


def build(config, model, mesh, *, total_steps: int, steps_per_epoch: int) -> Program:
  """Optimizer and schedule from config.optimizer; state sharded by config.mesh's FSDP rule; the
  state, train and eval steps from the config's task (crate_jax.training.tasks)."""
  task = tasks.of(config)
  input_shape = task.input_shape(config)
  schedule = optim.learning_rate_schedule(config.optimizer, total_steps, steps_per_epoch)
  layer_ids = None
  if config.optimizer.layer_decay < 1.0:
    shapes = jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                            jnp.zeros((1, *input_shape)))
    layer_ids = models.layer_ids(model, shapes)
  tx = optim.make_optimizer(config.optimizer, schedule, layer_ids=layer_ids,
                            depth=getattr(model, "depth", None), total_steps=total_steps)
  init = lambda: task.init_state(model, tx, config, input_shape)
  abstract = jax.eval_shape(init)
  state_sh = sharding.state_shardings(abstract, mesh, config.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, state_sh)
  data_sh, repl = sharding.data_sharding(mesh), sharding.replicated(mesh)
  train_fn = task.train_step(model, tx, config, total_steps=total_steps,
                             steps_per_epoch=steps_per_epoch)
  eval_fn = task.eval_step(model, config)
  eval_params_sh, _ = task.weights(config, tasks.state_dict(state_sh), for_eval_step=True)
  train_step = jax.jit(in_mesh(train_fn, mesh), in_shardings=(state_sh, data_sh),
                       out_shardings=(state_sh, repl), donate_argnums=0)
  eval_step = jax.jit(in_mesh(eval_fn, mesh), in_shardings=(eval_params_sh, data_sh))
  return Program(task=task, tx=tx, schedule=schedule, state_sharding=state_sh,
                 data_sharding=data_sh, abstract_state=abstract,
                 init=jax.jit(init, out_shardings=state_sh), train_step=train_step,
                 eval_step=eval_step)


def eval_params(program: Program, config, state):
  """The params the program's eval step takes, from a live train state."""
  return program.task.weights(config, tasks.state_dict(state), for_eval_step=True)[0]
