"""task="dino": the student/teacher train step, init and eval step the loop jits (via
crate_jax.training.program), built from the pure pieces in crate_jax.training.dino.

State (ours): `params` = the student, i.e. the backbone's own params plus the projection head under
"dino_head"; `ema_params` = the teacher, same tree, t <- m_k t + (1 - m_k) s after each optimiser
step with m_k = dino.momentum_schedule (config.ema_decay -> config.dino.momentum_final, cosine, as
DINO); `dino_centre` = the running centre (1, K). All three are checkpointed and resumed by the
loop's generic state checkpointing. Evaluation (`evaluate --protocol knn|linear`) loads the teacher
backbone (config.eval_ema) and drops "dino_head" (the model has no such params).

Per step (DINO): student on the 2 global and N local crops, teacher on the 2 global crops, loss
over all pairs of different views, centre <- EMA of the teacher's batch mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from crate_jax.models import dino_head
from crate_jax.training import dino, steps

HEAD = "dino_head"


def make_head(config) -> dino_head.DINOHead:
  d = config.dino
  return dino_head.DINOHead(out_dim=int(d.out_dim), hidden_dim=int(d.hidden_dim),
                            bottleneck_dim=int(d.bottleneck_dim), num_layers=int(d.head_layers))


def feature_dim(model, image_shape) -> int:
  """Width of the backbone's pooled feature (`pre_logits`)."""
  out = jax.eval_shape(lambda x: model.init_with_output(
      {"params": jax.random.key(0), "mask": jax.random.key(0)}, x,
      return_intermediates=True)[0][1]["pre_logits"], jnp.zeros((1, *image_shape)))
  return int(out.shape[-1])


def create_state(model, head, tx, image_shape, seed: int) -> steps.TrainState:
  """Student = backbone init (the same key as every task) + head; teacher = a copy; centre 0."""
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = dict(model.init({"params": init_rng, "mask": init_rng},
                           jnp.zeros((1, *image_shape), jnp.float32))["params"])
  params[HEAD] = head.init(jax.random.fold_in(init_rng, 1),
                           jnp.zeros((1, feature_dim(model, image_shape))))["params"]
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(state_rng),
                          ema_params=jax.tree.map(jnp.copy, params),
                          dino_centre=jnp.zeros((1, head.out_dim), jnp.float32))


def _embed(model, head, params, views, *, train: bool, rng):
  """(B, V, H, W, 3) views -> head logits (V, B, K): the V views go through as one batch."""
  b, v = views.shape[:2]
  flat = jnp.swapaxes(views, 0, 1).reshape(v * b, *views.shape[2:])
  backbone = {k: x for k, x in params.items() if k != HEAD}
  _, out = model.apply({"params": backbone}, flat, train=train, return_intermediates=True,
                       rngs={"dropout": rng})
  logits = head.apply({"params": params[HEAD]}, out["pre_logits"])
  return logits.reshape(v, b, -1)


def _freeze_prototypes(tree, frozen):
  """`tree` (grads or updates) with the head's prototype leaves zeroed where `frozen`."""
  head = dict(tree[HEAD])
  head["prototypes"] = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g),
                                    head["prototypes"])
  return {**tree, HEAD: head}


def make_train_step(model, head, tx, config, total_steps: int, steps_per_epoch: int):
  """(state, {"global" (B,2,G,G,3), "local" (B,N,L,L,3)}) -> (state, metrics)."""
  d = config.dino
  warmup = int(round(float(d.teacher_temp_warmup_epochs) * steps_per_epoch))
  freeze_steps = int(round(float(d.freeze_last_layer_epochs) * steps_per_epoch))

  def train_step(state: steps.TrainState, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    temp = dino.teacher_temperature(state.step, warmup, float(d.warmup_teacher_temp),
                                    float(d.teacher_temp))
    teacher = jax.lax.stop_gradient(
        _embed(model, head, state.ema_params, batch["global"], train=False, rng=rng))

    def loss_fn(params):
      student = _embed(model, head, params, batch["global"], train=True, rng=rng)
      if batch["local"].shape[1] > 0:
        local = _embed(model, head, params, batch["local"], train=True,
                       rng=jax.random.fold_in(rng, 1))
        student = jnp.concatenate([student, local], axis=0)
      return dino.dino_loss(student, teacher, state.dino_centre,
                            student_temp=float(d.student_temp), teacher_temp=temp)

    loss, grads = jax.value_and_grad(loss_fn)(state.params)
    frozen = state.step < freeze_steps  # DINO: the prototypes stay fixed for the first epoch
    grads = _freeze_prototypes(grads, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = _freeze_prototypes(updates, frozen)
    params = optax.apply_updates(state.params, updates)
    momentum = dino.momentum_schedule(state.step, total_steps, float(config.ema_decay),
                                      float(d.momentum_final))
    teacher_params = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                                  state.ema_params, params)
    centre = dino.update_centre(state.dino_centre, teacher, float(d.centre_momentum))
    metrics = dict(dino.collapse_metrics(dino.teacher_targets(teacher, state.dino_centre, temp)),
                   loss=loss, teacher_temp=temp, teacher_momentum=momentum,
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         ema_params=teacher_params, dino_centre=centre), metrics

  return train_step


def make_eval_step(model, head, config):
  """(teacher params, {"image", "mask"}) -> per-example teacher entropy (centre 0, final
  temperature) on the unaugmented eval images: a collapse check on held-out data."""
  t = float(config.dino.teacher_temp)

  def eval_step(params, batch):
    cls = steps.eval_metrics_cls("dino", False)
    logits = _embed(model, head, params, batch["image"][:, None], train=False,
                    rng=jax.random.key(0))[0]
    return cls.single_from_model_output(
        teacher_entropy=dino.entropy(jax.nn.softmax(logits / t, axis=-1)), mask=batch["mask"])

  return eval_step
