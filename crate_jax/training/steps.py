"""Pure train/eval steps: loss -> grads -> optax update, jitted once by the loop.

The tasks share the step: "classification" (logits + label-smoothed cross-entropy), "mae"
(models returning {"loss": ...}, e.g. CRATE-MAE) and the text tasks "lm" / "mlm" (their pieces in
text_tasks; `text` carries what they need from the tokenizer). Batches are dicts of global
jax.Arrays.
(No `from __future__ import annotations` here: clu metric Collections read real annotations.)
"""

import functools
from typing import Any, Callable

import flax
import jax
import jax.numpy as jnp
import optax

from crate_jax.training import text_tasks


@flax.struct.dataclass
class TrainState:
  step: jax.Array
  params: Any
  opt_state: Any
  rng: jax.Array  # raw uint32 key data, so the state is a plain checkpointable pytree
  ema_params: Any = None  # weight EMA (config.ema_decay > 0), else None
  dino_centre: Any = None  # task="dino": the teacher's running centre (1, K) (training/dino_step)

  def eval_params(self, use_ema: bool):
    """The weights evaluation uses: the EMA when asked and kept, else the trained ones."""
    return self.ema_params if use_ema and self.ema_params is not None else self.params


def create_train_state(model, tx, image_shape, seed: int, ema: bool = False) -> TrainState:
  """Initialise params (fp32), optimiser state and (with ema) the EMA = params. jit this with
  out_shardings."""
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = model.init({"params": init_rng, "mask": init_rng},
                      jnp.zeros((1, *image_shape), jnp.float32))["params"]
  return TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                    rng=jax.random.key_data(state_rng),
                    ema_params=jax.tree.map(jnp.copy, params) if ema else None)


def ema_update(ema, params, decay: float):
  """ema <- decay * ema + (1 - decay) * params (after each optimiser step)."""
  return optax.incremental_update(params, ema, step_size=1.0 - decay)


def cross_entropy(logits: jax.Array, labels: jax.Array, smoothing: float = 0.0) -> jax.Array:
  """-sum_c y_c log softmax(logits)_c with y = (1 - s) labels + s / C (per example; optax)."""
  targets = optax.smooth_labels(labels, smoothing) if smoothing else labels
  return optax.softmax_cross_entropy(logits.astype(jnp.float32), targets)


def topk_correct(logits: jax.Array, label: jax.Array, k: int) -> jax.Array:
  """1.0 where the true label is among the k largest logits."""
  k = min(k, logits.shape[-1])
  _, idx = jax.lax.top_k(logits, k)
  return jnp.any(idx == label[:, None], axis=-1).astype(jnp.float32)


def model_input(batch):
  """What the model reads: "tokens" (text) or "image"."""
  return batch["tokens"] if "tokens" in batch else batch["image"]


def _loss_fn(model, task: str, smoothing: float, text=None):
  if task in text_tasks.TEXT_TASKS:
    return text_tasks.train_loss_fn(model, task, text)

  def loss_fn(params, batch, rng):
    if task == "mae":
      out = model.apply({"params": params}, batch["image"], train=True, rngs={"mask": rng})
      return out["loss"], {"loss": out["loss"]}
    logits = model.apply({"params": params}, model_input(batch), train=True,
                         rngs={"dropout": rng})
    loss = cross_entropy(logits, batch["labels"], smoothing).mean()
    return loss, {"loss": loss, "top1": topk_correct(logits, batch["label"], 1).mean()}
  return loss_fn


def make_train_step(model, tx, *, task: str = "classification", label_smoothing: float = 0.0,
                    grad_accum_steps: int = 1, ema_decay: float = 0.0,
                    text: text_tasks.TextSpec | None = None) -> Callable:
  """(state, batch) -> (state, metrics). With grad_accum_steps = k the batch is split into k
  micro-batches whose gradients are averaged (same update, less activation memory); with
  ema_decay > 0 the state's EMA of the weights follows each update. `text`: the tokenizer's
  TextSpec, for the text tasks."""
  grad_fn = jax.value_and_grad(_loss_fn(model, task, label_smoothing, text), has_aux=True)

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
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = optax.apply_updates(state.params, updates)
    metrics = dict(metrics, grad_norm=optax.tree.norm(grads),
                   param_norm=optax.tree.norm(params))
    ema = state.ema_params
    if ema_decay > 0:
      ema = ema_update(ema, params, ema_decay)
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=ema), metrics

  return train_step


# The eval metrics of each task, and for each the default best-checkpoint metric and its mode.
EVAL_METRICS = {"classification": ("loss", "top1", "top5"), "mae": ("loss",),
                "lm": text_tasks.EVAL_METRICS, "mlm": text_tasks.EVAL_METRICS,
                "dino": ("teacher_entropy",)}
BEST_METRIC = {"classification": ("top1", "max"), "mae": ("loss", "min"), "lm": ("loss", "min"),
               "mlm": ("loss", "min"),
               "dino": ("teacher_entropy", "min")}  # dino: the sharpest teacher; kNN scores it


def derived_metrics(task: str, metrics: dict) -> dict:
  """Metrics computed from the averaged eval metrics (text: perplexity, bits per byte)."""
  return text_tasks.derived_metrics(metrics) if task in text_tasks.TEXT_TASKS else {}


def _real_examples(real_top1, real_mask, **_):
  return {"real_top1": real_top1, "mask": real_mask}


@functools.lru_cache(maxsize=None)
def eval_metrics_cls(task: str = "classification", real: bool = False):
  """clu metrics Collection of the task's eval metrics, each averaged over real examples (clu
  imported only when evaluating); with `real`, also ReaL top-1 over the examples that have a
  label set."""
  from clu import metrics as clu_metrics
  fields = {name: clu_metrics.Average.from_output(name) for name in EVAL_METRICS[task]}
  if real:
    fields["real_top1"] = clu_metrics.Average.from_output("real_top1").from_fun(_real_examples)
  cls = type(f"EvalMetrics_{task}{'_real' if real else ''}", (clu_metrics.Collection,),
             {"__annotations__": fields})
  return flax.struct.dataclass(cls)


def make_eval_step(model, *, task: str = "classification",
                   text: text_tasks.TextSpec | None = None) -> Callable:
  """(params, batch) -> EvalMetrics over the batch's real (mask = 1) examples. A batch with
  "real" (ImageNet-ReaL's multi-hot label sets) also gets real_top1: the top prediction is in
  the set, over the examples whose set is not empty."""

  def eval_step(params, batch):
    mask = batch["mask"]
    EvalMetrics = eval_metrics_cls(task, "real" in batch)
    if task in text_tasks.TEXT_TASKS:
      return EvalMetrics.single_from_model_output(
          **text_tasks.eval_outputs(model, params, batch, task, text))
    if task == "mae":
      out = model.apply({"params": params}, batch["image"], train=False,
                        rngs={"mask": jax.random.key(0)})
      loss = jnp.broadcast_to(out["loss"], mask.shape)
      return EvalMetrics.single_from_model_output(loss=loss, mask=mask)
    logits = model.apply({"params": params}, model_input(batch), train=False)
    extra = {}
    if "real" in batch:
      real = batch["real"]
      extra = {"real_top1": jnp.take_along_axis(real, jnp.argmax(logits, -1)[:, None], 1)[:, 0],
               "real_mask": mask * (real.sum(-1) > 0)}
    return EvalMetrics.single_from_model_output(
        loss=cross_entropy(logits, jax.nn.one_hot(batch["label"], logits.shape[-1])),
        top1=topk_correct(logits, batch["label"], 1),
        top5=topk_correct(logits, batch["label"], 5), mask=mask, **extra)

  return eval_step
