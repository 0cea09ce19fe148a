"""task="classification": supervised classes of images or text sequences (GLUE).

  loss = mean_b CE(logits_b, y_b),  y = (1 - s) labels + s / C   (label smoothing s; mixup /
  cutmix batches carry soft "labels"); eval: loss, top-1, top-5 (+ ReaL top-1 on ImageNet-ReaL).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from crate_jax.models import family as models
from crate_jax.training.tasks import base


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
  """What a classifier reads: "tokens" (text) or "image"."""
  return batch["tokens"] if "tokens" in batch else batch["image"]


def classifier_loss(model, smoothing: float):
  """(params, batch, rng) -> (loss, {"loss", "top1"})."""
  def loss_fn(params, batch, rng):
    logits, state = models.apply_train(model, params, model_input(batch), rngs={"dropout": rng})
    loss = cross_entropy(logits, batch["labels"], smoothing).mean()
    metrics = {"loss": loss, "top1": topk_correct(logits, batch["label"], 1).mean()}
    return loss, metrics if state is None else dict(metrics, **{models.STATE: state})
  return loss_fn


def classifier_eval(model, metrics_cls=None):
  """(params, batch) -> clu metrics over the batch's real (mask = 1) examples; a batch with
  "real" (ImageNet-ReaL's multi-hot label sets) also gets real_top1: the top prediction is in
  the set, over the examples whose set is not empty."""
  from crate_jax.training import steps

  def eval_step(params, batch):
    mask = batch["valid"]
    cls = steps.eval_metrics_cls(Classification.eval_metrics, "real" in batch)
    logits = model.apply(models.variables(params), model_input(batch), train=False)
    extra = {}
    if "real" in batch:
      real = batch["real"]
      extra = {"real_top1": jnp.take_along_axis(real, jnp.argmax(logits, -1)[:, None], 1)[:, 0],
               "real_mask": mask * (real.sum(-1) > 0)}
    return cls.single_from_model_output(
        loss=cross_entropy(logits, jax.nn.one_hot(batch["label"], logits.shape[-1])),
        top1=topk_correct(logits, batch["label"], 1),
        top5=topk_correct(logits, batch["label"], 5), mask=mask, **extra)
  return eval_step


class Classification(base.Task):
  name = "classification"
  eval_metrics = ("loss", "top1", "top5")
  best = ("top1", "max")

  def validate(self, config, need):
    from crate_jax import models
    model = models.from_config(config)
    need(models.contract(model).classifier, "model.name",
         f"{type(model).__name__} is not a classifier (task classification needs logits; "
         "train it with its own objective)")
    if self.reads_tokens(config):
      from crate_jax.data import sources
      need(sources.source(config.data.name).labelled, "data.name",
           "has no labels: task classification on text reads a GLUE task (corpora train with "
           "task lm or mlm)")

  def batch_spec(self, config, batch_size, *, train):
    if not self.reads_tokens(config):
      return base.image_batch(config, batch_size, train=train)
    spec = base.image_batch(config, batch_size, train=train)
    del spec["image"]
    spec["tokens"] = jax.ShapeDtypeStruct((batch_size, int(config.data.seq_len)), jnp.int32)
    return spec

  def loss_fn(self, model, config):
    return classifier_loss(model, float(config["label_smoothing"]))

  def eval_step(self, model, config):
    return classifier_eval(model)


base.register(Classification())
