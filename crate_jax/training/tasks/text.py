"""The text objectives "lm" (next-token prediction, CRATE-GPT / GPT) and "mlm" (BERT's masked
language modelling, CRATE-BERT / BERT); their pure pieces are in crate_jax.training.text_tasks."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.training import text_tasks
from crate_jax.training.tasks import base


class _TextTask(base.Task):
  eval_metrics = text_tasks.EVAL_METRICS
  best = ("loss", "min")
  causal: bool

  def reads_tokens(self, config) -> bool:
    return True

  def validate(self, config, need):
    from crate_jax.data import sources
    corpora = [n for n in sources.names() if sources.source(n).kind == "text"
               and not sources.source(n).labelled]
    src = sources.source(config.data.name)
    need(src.kind == "text" and not src.labelled, "data.name",
         f"is not a text corpus for task {self.name!r} (corpora: {corpora}; GLUE tasks train "
         "with task classification)")
    need(0.0 < config.mlm_probability < 1.0, "mlm_probability", "must be in (0, 1)")

  def batch_spec(self, config, batch_size, *, train):
    spec = {"tokens": jax.ShapeDtypeStruct((batch_size, int(config.data.seq_len)), jnp.int32)}
    if not train:
      spec["valid"] = jax.ShapeDtypeStruct((batch_size,), jnp.float32)
    return spec

  def spec(self, config) -> text_tasks.TextSpec:
    from crate_jax.data import tokenizers
    return text_tasks.TextSpec.from_tokenizer(tokenizers.from_config(config.data),
                                              config.mlm_probability)

  def loss_fn(self, model, config):
    return text_tasks.train_loss_fn(model, self.spec(config), causal=self.causal)

  def eval_step(self, model, config):
    from crate_jax.training import steps
    text = self.spec(config)

    def eval_step(params, batch):
      cls = steps.eval_metrics_cls(self.eval_metrics, False)
      return cls.single_from_model_output(
          **text_tasks.eval_outputs(model, params, batch, text, causal=self.causal))
    return eval_step

  def derived_metrics(self, metrics):
    return text_tasks.derived_metrics(metrics)


class LM(_TextTask):
  name = "lm"
  causal = True


class MLM(_TextTask):
  name = "mlm"
  causal = False


base.register(LM())
base.register(MLM())
