"""What a setup (a config's task x model family x dataset) can do, checked before anything
compiles: `validate(config)` for the config itself, `check(config, command, ...)` for a command
on it. Each refusal is one line naming the setup and the reason (an UnsupportedError or a
ValueError naming the config key; the commands print it as `error: ...` and exit 2).

  commands: train (and resume), plan, evaluate (supervised), knn, linear, analyze, segment,
            export (target "torch" / "stablehlo"), generate, whitebox (the train-time hook)

What a task refuses is its module's (`Task.refuses`); what a family offers is its declared
`models.Contract`. This module only combines them.
"""
from __future__ import annotations

from crate_jax import config_lib

COMPUTE_DTYPES = ("float32", "bfloat16", "float16")
WHITEBOX_NEEDS = frozenset({"features"})   # the layer-wise rates (and sparsity where codes are)


class UnsupportedError(ValueError):
  """A command this setup cannot serve."""


def describe(config) -> str:
  return f"task {config.task!r} with model {config.model.name!r} on {config.data.name!r}"


def refuse(config, command: str, reason: str, setup: str | None = None):
  """Raise the one-line UnsupportedError of `command` on this setup."""
  raise UnsupportedError(f"{command} cannot serve {setup or describe(config)}: {reason}")


def check(config, command: str, *, target: str | None = None, pool: str | None = None) -> None:
  """validate(config), then whether `command` can serve it (one UnsupportedError if not)."""
  from crate_jax import models
  from crate_jax.training import tasks
  validate(config)
  task = tasks.of(config)
  model = models.from_config(config)
  c = models.contract(model)
  if command in task.refuses:
    refuse(config, command, task.refuses[command])
  if command == "whitebox" or (command in ("train", "plan") and config.whitebox_every_steps > 0):
    if not WHITEBOX_NEEDS <= c.whitebox:
      refuse(config, "the white-box hook (config.whitebox_every_steps)",
             f"{type(model).__name__} carries no {sorted(WHITEBOX_NEEDS - c.whitebox)} "
             "(the CRATE and ToST families do); set whitebox_every_steps=0")
  elif command in ("knn", "linear"):
    _check_probe(config, command, task, model, pool)
  elif command == "analyze" and not WHITEBOX_NEEDS <= c.whitebox:
    refuse(config, command, f"{type(model).__name__} carries no white-box quantities "
            f"{sorted(WHITEBOX_NEEDS - c.whitebox)} (the CRATE and ToST families do)")
  elif command == "segment":
    _check_segment(config, model, c)
  elif command == "export":
    check_export(model, target, setup=describe(config))
  elif command == "generate" and not c.causal:
    refuse(config, command, f"{config.model.name} is not a causal language model (generation "
           "needs next-token prediction: task lm with a GPT-style model)")


def _check_probe(config, command, task, model, pool):
  from crate_jax import models
  from crate_jax.data import sources
  if not sources.source(config.data.name).labelled:
    refuse(config, f"--protocol {command}", f"{config.data.name} has no labels to probe "
            "(a k-NN or linear probe needs labelled examples: an image dataset or a GLUE task)")
  if pool == "cls" and not models.has_class_token(model):
    refuse(config, f"--protocol {command}", f"{type(model).__name__} reads no class token: "
            "use --pool mean")


def _check_segment(config, model, c):
  from crate_jax.data import datasets
  if c.inputs != "images":
    refuse(config, "analyze --segment", "segmentation needs images")
  if not ({"attention", "features", "memberships"} & c.whitebox):
    refuse(config, "analyze --segment", f"{type(model).__name__} returns neither attention "
            "maps, memberships nor features")
  datasets.check_masks(config.data)


def check_export(model, target: str, *, setup: str) -> None:
  """Whether `model` can be exported to `target` ("torch" or "stablehlo")."""
  from crate_jax import models
  c = models.contract(model)
  if target == "torch" and not c.torch_layout:
    refuse(None, "export --to torch", f"{type(model).__name__} has no PyTorch layout to "
           "export to (CRATE, CRATE-alpha, CRATE-MAE, ViT (timm's), ToST and the causal "
           "ToST have one); --to "
           "stablehlo works", setup)
  if target == "stablehlo" and not c.classifier:
    refuse(None, "export --to stablehlo", f"{type(model).__name__} (pre-training) has no "
            "classifier forward pass; fine-tune a classifier first (e.g. "
            "crate_mae_classifier_*), or export its weights --to torch", setup)


# ------------------------------------------------------------------------ the config itself
def validate(config) -> None:
  """Every check a config allows without devices or data: one ValueError naming the key."""
  from crate_jax.training import tasks

  def need(ok, key, what):
    if not ok:
      raise ValueError(f"config.{key}={config_lib._value(config, key)!r}: {what}")

  need(config.task in tasks.names(), "task", f"is not one of {tasks.names()}")
  task = tasks.of(config)
  need(config.compute_dtype in COMPUTE_DTYPES, "compute_dtype", f"is not one of {COMPUTE_DTYPES}")
  for key in ("batch_size", "eval_batch_size", "log_every_steps", "eval_every_steps",
              "checkpoint_every_steps", "keep_checkpoints", "grad_accum_steps"):
    need(isinstance(config[key], int) and config[key] >= 1, key, "must be a positive integer")
  for key in ("eval_every_epochs", "checkpoint_every_epochs", "whitebox_every_steps",
              "profile_steps", "hang_timeout_s", "preemption_grace_s"):
    need(config[key] >= 0, key, "must be >= 0")
  need(config.num_train_steps > 0 or config.num_epochs > 0, "num_epochs",
       "must be > 0 when num_train_steps is not set")
  need(0.0 <= config.label_smoothing < 1.0, "label_smoothing", "must be in [0, 1)")
  need(0.0 <= config.ema_decay < 1.0, "ema_decay", "must be in [0, 1) (0 = off)")
  need(0.0 < config.optimizer.layer_decay <= 1.0, "optimizer.layer_decay",
       "must be in (0, 1] (1 = off)")
  need(0.0 <= config.model.drop_path_rate < 1.0, "model.drop_path_rate", "must be in [0, 1)")
  for key in ("dropout", "emb_dropout"):
    if key in config.model.kwargs:
      need(0.0 <= config.model.kwargs[key] < 1.0, f"model.kwargs.{key}", "must be in [0, 1)")
  for key in ("image_size", "num_classes"):
    model_value = config.model.kwargs.get(key, config.data[key])
    need(model_value == config.data[key], f"model.kwargs.{key}",
         f"differs from config.data.{key}={config.data[key]} (set it once, in config.data)")
  from crate_jax import models  # local: configs load without the model stack
  from crate_jax.models import layers
  try:
    layers.remat_name(config.remat)
  except ValueError:
    need(False, "remat", f"is not one of {layers.REMAT_POLICIES} (or True/False)")
  need(config.best_metric in ("", *task.eval_metrics), "best_metric",
       f"is not an eval metric of task {config.task!r}: {task.eval_metrics}")
  need(config.best_mode in ("", "max", "min"), "best_mode", "must be 'max' or 'min'")
  model = models.from_config(config)   # unknown model / argument: "config.model: ..."
  reads_tokens = models.contract(model).inputs == "tokens"
  need(reads_tokens == task.reads_tokens(config), "model.name",
       f"reads {'token ids' if reads_tokens else 'images'}, but task {config.task!r} on "
       f"{config.data.name!r} feeds it {'token ids' if task.reads_tokens(config) else 'images'}")
  if reads_tokens:
    _validate_text(config, need, task, model)
  task.validate(config, need)
  from crate_jax.training import optim
  optim.make_optimizer(config.optimizer, 0.0)  # unknown optimizer / decay mask


def _validate_text(config, need, task, model) -> None:
  """Text: a known tokenizer whose ids fit the model's vocabulary, sequences that fit its
  position table, a GLUE task's class count and pad id (the task modules say which datasets
  their objective reads)."""
  from crate_jax.data import sources, tokenizers
  tokenizers.check(config.data.tokenizer)
  classifying = sources.source(config.data.name).labelled
  if classifying:
    classes = sources.source(config.data.name).num_classes
    need(config.data.num_classes == classes, "data.num_classes",
         f"{config.data.name} has {classes} classes")
  need(config.data.seq_len >= 2, "data.seq_len", "must be >= 2")
  if config.data.tokenizer == "bpe":
    need(config.data.bpe_vocab_size >= tokenizers.BYTE_SYMBOLS, "data.bpe_vocab_size",
         f"must be >= {tokenizers.BYTE_SYMBOLS} (the byte symbols every byte-level BPE starts "
         "from)")
  vocab = tokenizers.vocab_size(config.data)
  need(getattr(model, "vocab_size", 0) >= vocab, "model.kwargs.vocab_size",
       f"must be >= the {config.data.tokenizer} tokenizer's {vocab} ids (a text model)")
  if classifying:
    need(model.pad_id == tokenizers.pad_id(config.data), "model.kwargs.pad_id",
         f"must be the {config.data.tokenizer} tokenizer's pad id "
         f"{tokenizers.pad_id(config.data)} (the classifier masks and skips those tokens)")
  need(config.data.seq_len <= model.max_len, "data.seq_len",
       f"is longer than the model's position table max_len={model.max_len}")


def best_checkpoint(config) -> tuple[str, str]:
  """(metric, mode) of the best-checkpoint rule: the config's, else the task's default."""
  from crate_jax.training import tasks
  metric, mode = tasks.of(config).best
  if config.best_metric:
    metric, mode = config.best_metric, "min" if config.best_metric == "loss" else "max"
  return metric, config.best_mode or mode
