"""task="simdino": SimDINO, self-distillation regularised by the coding rate (the pure pieces:
crate_jax.training.simdino).

State as DINO's (crate_jax.training.tasks.dino): `params` = the student (backbone + the projection
head under "dino_head"), `task_state["teacher"]` = its EMA, t <- m_k t + (1 - m_k) s after each
step with m_k a cosine from config.ema_decay to simdino.momentum_final; no centre. The model of a
SimDINO run, for evaluate --protocol knn|linear, analyze, export and the white-box hook, is the
teacher's backbone (config.eval_ema; else the student's), the head left out.

Per step: the teacher on the 2 global crops, the student on all of them (2 global + N local);
loss = -coeff C - R (simdino.mcr_loss) over the GLOBAL batch: under jax.jit over the mesh the
coding rate's Gram matrix sums every device's samples, so the objective and its gradients do not
depend on the device count (tested on 1 to 8 devices and FSDP).
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from crate_jax.models import dino_head, family
from crate_jax.training import dino, simdino
from crate_jax.training.tasks import base
from crate_jax.training.tasks import dino as dino_task


def make_head(config) -> dino_head.SimDINOHead:
  s = config.simdino
  return dino_head.SimDINOHead(z_dim=int(s.z_dim), hidden_dim=int(s.hidden_dim),
                               num_layers=int(s.head_layers))


def objective(model, head, config):
  """(params, teacher_params, batch, rng) -> (loss, (metrics, the backbone's new model state)):
  SimDINO's loss of the student `params` against the teacher's global views."""
  s = config.simdino
  eps, coeff, expa_type = float(s.eps), float(s.coeff), int(s.expa_type)

  def loss_fn(params, teacher_params, batch, rng):
    teacher = jax.lax.stop_gradient(
        dino_task.embed(model, head, teacher_params, batch["global"], train=False, rng=rng))
    student, model_state = dino_task.embed(model, head, params, batch["global"], train=True,
                                           rng=rng, with_state=True)
    if batch["local"].shape[1] > 0:
      local = dino_task.embed(model, head, params, batch["local"], train=True,
                              rng=jax.random.fold_in(rng, 1))
      student = jnp.concatenate([student, local], axis=0)
    loss, terms = simdino.mcr_loss(student, teacher, eps=eps, coeff=coeff, expa_type=expa_type)
    return loss, (terms, model_state)

  return loss_fn


def make_train_step(model, head, tx, config, total_steps: int):
  """(state, {"global" (B,2,G,G,3), "local" (B,N,L,L,3), "label"}) -> (state, metrics)."""
  loss_fn = objective(model, head, config)
  final = float(config.simdino.momentum_final)

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    teacher_params = state.task_state["teacher"]
    (loss, (terms, model_state)), grads = jax.value_and_grad(loss_fn, has_aux=True)(
        state.params, teacher_params, batch, rng)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    params = family.with_state(optax.apply_updates(state.params, updates), model_state)
    momentum = dino.momentum_schedule(state.step, total_steps, float(config.ema_decay), final)
    teacher_params = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                                  teacher_params, params)
    metrics = dict(terms, loss=loss, teacher_momentum=momentum,
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         task_state={"teacher": teacher_params}), metrics

  return train_step


class SimDINO(dino_task.DINO):
  """DINO's views, teacher and weights; SimDINO's head, loss and checks."""
  name = "simdino"
  eval_metrics = ("teacher_rate",)
  best = ("teacher_rate", "max")   # the least collapsed teacher; k-NN scores it
  refuses = {"evaluate": "a SimDINO run has no supervised head to score: use --protocol knn or "
                         "--protocol linear (frozen teacher features)"}
  must_be_finite = {"expansion": "coding rate R of the merged global views (SimDINO's expansion "
                                "term, float32)",
                    "loss": "training loss"}

  def validate(self, config, need):
    """SimDINO's keys, the multi-crop views and the backbone, before anything compiles."""
    need("simdino" in config and "multicrop" in config.data, "task",
         "needs config.simdino and config.data.multicrop (start from config_lib.simdino_config)")
    s = config.simdino
    from crate_jax import models
    model = models.from_config(config)
    need(models.contract(model).classifier, "model.name",
         f"{type(model).__name__} has no pooled image feature for SimDINO's head (CRATE, "
         "CRATE-alpha, ViT and ToST do)")
    need(float(s.eps) > 0, "simdino.eps", "must be > 0 (the coding rate's distortion)")
    need(int(s.expa_type) in simdino.EXPA_TYPES, "simdino.expa_type",
         f"must be one of {simdino.EXPA_TYPES}")
    need(int(s.z_dim) >= 2 and int(s.head_layers) >= 1, "simdino.z_dim",
         "needs z_dim >= 2 and head_layers >= 1")
    need(int(s.z_dim) <= int(config.batch_size), "simdino.z_dim",
         f"is larger than the global batch per view (batch_size={config.batch_size}): the "
         f"coding rate of {config.batch_size} features has rank at most {config.batch_size}, "
         f"so the expansion term can spread them over at most {config.batch_size} of the "
         f"{s.z_dim} dimensions and the rest of z is never regularised; lower simdino.z_dim or "
         "raise batch_size")
    need(float(config.ema_decay) <= float(s.momentum_final) <= 1.0, "simdino.momentum_final",
         f"must be in [config.ema_decay={config.ema_decay}, 1]")
    self.validate_views(config, need, model)

  def init_state(self, model, tx, config, input_shape):
    return dino_task.student_teacher_state(model, make_head(config), tx, input_shape, config.seed)

  def train_step(self, model, tx, config, *, total_steps, steps_per_epoch):
    return make_train_step(model, make_head(config), tx, config, total_steps)

  def eval_step(self, model, config):
    """(teacher params with head, {"image", "valid"}) -> the teacher's coding rate R_eps of the
    unaugmented eval batch's features (the valid rows), given to each of its examples: a rate
    near 0 means the features collapsed."""
    from crate_jax.training import steps
    head, eps = make_head(config), float(config.simdino.eps)

    def eval_step(params, batch):
      cls = steps.eval_metrics_cls(self.eval_metrics, False)
      z = dino_task.embed(model, head, params, batch["image"][:, None], train=False,
                          rng=jax.random.key(0))
      r = simdino.rate(z, eps, valid=batch["valid"])[0]
      return cls.single_from_model_output(teacher_rate=jnp.full(batch["valid"].shape, r),
                                          mask=batch["valid"])
    return eval_step

  def check_logged(self, mean, step):
    """No prototypes, so no DINO collapse metrics."""


base.register(SimDINO())
