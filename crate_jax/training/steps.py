"""The generic train state and train step: loss -> grads -> optax update, jitted once by the loop.

What a loss is, which batches it reads and what it evaluates belong to the objective
(crate_jax.training.tasks); this module knows none of them. Batches are dicts of global jax.Arrays.
(No `from __future__ import annotations` here: clu metric Collections read real annotations.)
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from crate_jax.models import family


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so the state is a plain checkpointable pytree
  ema_params: Any = None  # weight EMA (config.ema_decay > 0), else None
  task_state: Any = None  # what the objective keeps beside (e.g. DINO's teacher and centre)


def create_train_state(model, tx, input_shape, seed: int, ema: bool = False) -> TrainState:
  """Initialise params (fp32), optimiser state and (with ema) the EMA = params. jit this with
  out_shardings."""
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = family.init_params(model, init_rng, jnp.zeros((1, *input_shape), jnp.float32))
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(state_rng),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (after each optimiser step)."""
  return optax.incremental_update(params, ema, step_size=1.0 - decay)


def make_train_step(loss_fn: Callable, tx, *, grad_accum_steps: int = 1,
                    ema_decay: float = 0.0) -> Callable:
  """(state, batch) -> (state, metrics) for loss_fn(params, batch, rng) -> (loss, metrics).
  With grad_accum_steps = k the batch is split into k micro-batches whose gradients are
  averaged (same update, less activation memory); with ema_decay > 0 the state's EMA of the
  weights follows each update. A family's model state (batch-norm statistics) comes back in
  metrics[family.STATE] (`models.apply_train`) and replaces the params' after the update (with
  micro-batches: their mean)."""
  grad_fn = jax.value_and_grad(loss_fn, has_aux=True)

  def train_step(state: TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    if grad_accum_steps == 1:
      (_, metrics), grads = grad_fn(state.params, batch, rng)
    else:
      micro = jax.tree.map(
          lambda x: x.reshape(grad_accum_steps, x.shape[0] // grad_accum_steps, *x.shape[1:]),
          batch)

      def accumulate(carry, xs):
        i, mb = xs
        (_, m), g = grad_fn(state.params, mb, jax.random.fold_in(rng, i))
        return jax.tree.map(jnp.add, carry, (g, m)), None

      shapes = jax.eval_shape(grad_fn, state.params, jax.tree.map(lambda x: x[0], micro), rng)
      zeros = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), (shapes[1], shapes[0][1]))
      (grads, metrics), _ = jax.lax.scan(accumulate, zeros,
                                         (jnp.arange(grad_accum_steps), micro))
      grads, metrics = jax.tree.map(lambda x: x / grad_accum_steps, (grads, metrics))
    metrics = dict(metrics)
    model_state = metrics.pop(family.STATE, None)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = family.with_state(optax.apply_updates(state.params, updates), model_state)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    ema = state.ema_params
    if ema_decay > 0:
      ema = ema_update(ema, params, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return train_step


def _real_examples(real_top1, real_mask, **_):
  return {"real_top1": real_top1, "mask": real_mask}


@functools.lru_cache(maxsize=None)
def eval_metrics_cls(names: tuple, real: bool = False):
  """clu metrics Collection averaging each of `names` over real examples (clu imported only when
  evaluating); with `real`, also ReaL top-1 over the examples that have a label set."""
  from clu import metrics as clu_metrics
  fields = {name: clu_metrics.Average.from_output(name) for name in names}
  if real:
    fields["real_top1"] = clu_metrics.Average.from_output("real_top1").from_fun(_real_examples)
  cls = type(f"EvalMetrics_{'_'.join(names)}{'_real' if real else ''}", (clu_metrics.Collection,),
             {"__annotations__": fields})
  return flax.struct.dataclass(cls)
