"""What every training objective provides, and the one registry of them.

A `Task` owns everything only its objective knows: its config checks, the batches its steps read
(`batch_spec`, so the loop, evaluation and the planner never guess a batch's layout), its train
state beyond the generic one (`init_state`), its loss and per-step updates (`train_step`), its
eval metrics and best-checkpoint rule, its log-time checks, which weights stand for "the model"
when a command evaluates, analyses, exports or generates (`weights`), and which commands it
serves. The train loop, `program.build`, evaluation, the planner and checkpointing call these and
never test the objective's name.
"""
from __future__ import annotations

import dataclasses
from typing import Any, Callable, ClassVar, Mapping

import jax
import jax.numpy as jnp

# The commands a setup may serve (crate_jax.setups checks them before anything compiles).
COMMANDS = ("train", "evaluate", "knn", "linear", "analyze", "segment", "export", "generate",
            "plan", "whitebox")


class Task:
  """One objective. Subclasses set the ClassVars and override what differs from the default."""
  name: ClassVar[str]
  eval_metrics: ClassVar[tuple[str, ...]]
  best: ClassVar[tuple[str, str]]          # (metric, "max" | "min") of the best checkpoint
  # Commands that make no sense for the objective itself, with the reason (one line each).
  refuses: ClassVar[Mapping[str, str]] = {}
  # Train metrics that stop the run when non-finite, in the order checked, with what to call
  # them in the one-line error.
  must_be_finite: ClassVar[Mapping[str, str]] = {"loss": "training loss"}

  # ------------------------------------------------------------------------------- config
  def validate(self, config, need: Callable) -> None:
    """Objective-specific config checks; `need(ok, key, what)` raises the one-line error."""

  def reads_tokens(self, config) -> bool:
    """Whether the model reads token ids (else images)."""
    from crate_jax.data import sources
    return sources.source(config.data.name).kind == "text"

  def input_shape(self, config) -> tuple:
    """One example's model input: (seq_len,) tokens or (H, W, 3) images."""
    if self.reads_tokens(config):
      return (int(config.data.seq_len),)
    return (int(config.data.image_size), int(config.data.image_size), 3)

  def batch_spec(self, config, batch_size: int, *, train: bool) -> dict[str, jax.ShapeDtypeStruct]:
    """The global batch the pipeline hands the train (or eval) step: names, shapes, dtypes."""
    raise NotImplementedError

  # -------------------------------------------------------------------------------- steps
  def init_state(self, model, tx, config, input_shape: tuple):
    """The initial TrainState (jit it with out_shardings); the generic one by default."""
    from crate_jax.training import steps
    return steps.create_train_state(model, tx, input_shape, config.seed,
                                    ema=config.ema_decay > 0)

  def train_step(self, model, tx, config, *, total_steps: int, steps_per_epoch: int) -> Callable:
    """(state, batch) -> (state, metrics)."""
    from crate_jax.training import steps
    return steps.make_train_step(self.loss_fn(model, config), tx,
                                 grad_accum_steps=config.grad_accum_steps,
                                 ema_decay=config.ema_decay)

  def loss_fn(self, model, config) -> Callable:
    """(params, batch, rng) -> (loss, metrics) for the generic train step."""
    raise NotImplementedError

  def eval_step(self, model, config) -> Callable:
    """(params as `weights(..., for_eval_step=True)` gives them, batch) -> clu metrics."""
    raise NotImplementedError

  def train_flops_per_example(self, model, config) -> float | None:
    """FLOPs of one example's train step (the throughput's TFLOP/s and MFU, the planner's
    analytic count): the model's forward + backward, 3x its forward count; None if the family
    cannot tell."""
    from crate_jax.training import flops
    return flops.train_flops_per_example(model)

  def derived_metrics(self, metrics: dict) -> dict:
    """Metrics computed from the averaged eval metrics (e.g. perplexity)."""
    return {}

  def check_logged(self, mean: dict, step: int) -> None:
    """Log-time checks on the averaged train metrics ("train/..."); may add entries."""

  # ------------------------------------------------------------------------------ weights
  def weights(self, config, state: Mapping[str, Any], *, for_eval_step: bool = False):
    """(params, what) of a train state (live or restored as a dict with "params",
    "ema_params", "task_state"): the weights that stand for the model. The weight EMA when the
    config keeps one and evaluates it (config.eval_ema), else the trained params."""
    ema = state.get("ema_params")
    if _uses_ema(config) and ema is not None:
      return ema, "ema"
    return state["params"], "params"

  def with_params(self, state, params):
    """The state with new params (a warm start): copies of them wherever the state keeps
    weights that follow the params (the weight EMA)."""
    ema = None if state.ema_params is None else jax.tree.map(jnp.copy, params)
    return state.replace(params=params, ema_params=ema)


def _uses_ema(config) -> bool:
  return config is not None and float(config.get("ema_decay", 0)) > 0 and bool(
      config.get("eval_ema", True))


def state_dict(state) -> dict[str, Any]:
  """A TrainState (or a restored state tree) as the dict `Task.weights` reads."""
  if isinstance(state, Mapping):
    return dict(state)
  return {f.name: getattr(state, f.name) for f in dataclasses.fields(state)}


def image_batch(config, batch_size: int, *, train: bool, key: str = "image"):
  """{"image" f32 (B, H, W, 3), "label" i32 (B,), "labels" f32 (B, K)} (+ "valid" f32 (B,) for
  eval): what the image pipeline yields, train and eval alike."""
  size = int(config.data.image_size)
  spec = {key: jax.ShapeDtypeStruct((batch_size, size, size, 3), jnp.float32),
          "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32),
          "labels": jax.ShapeDtypeStruct((batch_size, max(int(config.data.num_classes), 1)),
                                         jnp.float32)}
  if not train:
    spec["valid"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
  return spec


# ---------------------------------------------------------------------------- registry
_TASKS: dict[str, Task] = {}


def register(task: Task) -> Task:
  _TASKS[task.name] = task
  return task


def names() -> tuple[str, ...]:
  return tuple(_TASKS)


def get(name: str) -> Task:
  if name not in _TASKS:
    raise ValueError(f"config.task={name!r} is not one of {names()}")
  return _TASKS[name]


def of(config) -> Task:
  """The task a config trains (a saved config that names none: classification, the default)."""
  return get(config.get("task", "classification"))
