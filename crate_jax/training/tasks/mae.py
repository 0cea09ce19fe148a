"""task="mae": masked autoencoding (CRATE-MAE): the model returns {"loss": ...}, the mean
squared error of the reconstructed masked patches; eval: that loss on the eval split (a fixed
mask key, so every evaluation masks the same patches)."""
from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.training.tasks import base

EVAL_MASK_SEED = 0


class MAE(base.Task):
  name = "mae"
  eval_metrics = ("loss",)
  best = ("loss", "min")

  def validate(self, config, need):
    from crate_jax import models
    model = models.from_config(config)
    need(hasattr(model, "encode"), "model.name",
         "is not a masked autoencoder (task mae trains crate_mae_* models, which return a "
         "reconstruction loss)")

  def batch_spec(self, config, batch_size, *, train):
    return base.image_batch(config, batch_size, train=train)

  def loss_fn(self, model, config):
    def loss_fn(params, batch, rng):
      out = model.apply({"params": params}, batch["image"], train=True, rngs={"mask": rng})
      return out["loss"], {"loss": out["loss"]}
    return loss_fn

  def eval_step(self, model, config):
    from crate_jax.training import steps

    def eval_step(params, batch):
      mask = batch["valid"]
      out = model.apply({"params": params}, batch["image"], train=False,
                        rngs={"mask": jax.random.key(EVAL_MASK_SEED)})
      cls = steps.eval_metrics_cls(self.eval_metrics, False)
      return cls.single_from_model_output(loss=jnp.broadcast_to(out["loss"], mask.shape),
                                          mask=mask)
    return eval_step


base.register(MAE())
