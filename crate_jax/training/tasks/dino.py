"""task="dino": DINO self-distillation (the pure pieces: crate_jax.training.dino).

State: `params` = the student, i.e. the backbone's own params plus the projection head under
"dino_head"; `task_state["teacher"]` = the teacher, same tree, t <- m_k t + (1 - m_k) s after
each optimiser step with m_k = dino.momentum_schedule (config.ema_decay -> dino.momentum_final,
cosine, as DINO); `task_state["centre"]` = the running centre (1, K). All of it is checkpointed and
resumed with the train state. The model of a DINO run, for evaluate --protocol knn|linear,
analyze, export and the white-box hook, is the teacher's backbone (config.eval_ema; else the
student's), the head left out.

Per step (DINO): student on the 2 global and N local crops, teacher on the 2 global crops, loss
over all pairs of different views, centre <- EMA of the teacher's batch mean.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp
import optax

from crate_jax.models import dino_head, family
from crate_jax.training import dino
from crate_jax.training.tasks import base

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


def student_teacher_state(model, head, tx, image_shape, seed: int):
  """Student = backbone init (the same key as every task) + head; task_state["teacher"] = a
  copy (DINO and SimDINO)."""
  from crate_jax.training import steps
  init_rng, state_rng = jax.random.split(jax.random.key(seed))
  params = dict(family.init_params(model, init_rng, jnp.zeros((1, *image_shape), jnp.float32)))
  params[HEAD] = head.init(jax.random.fold_in(init_rng, 1),
                           jnp.zeros((1, feature_dim(model, image_shape))))["params"]
  return steps.TrainState(step=jnp.zeros((), jnp.int32), params=params, opt_state=tx.init(params),
                          rng=jax.random.key_data(state_rng),
                          task_state={"teacher": jax.tree.map(jnp.copy, params)})


def create_state(model, head, tx, image_shape, seed: int):
  """`student_teacher_state` and DINO's centre, 0."""
  state = student_teacher_state(model, head, tx, image_shape, seed)
  return state.replace(task_state=dict(state.task_state,
                                       centre=jnp.zeros((1, head.out_dim), jnp.float32)))


def embed(model, head, params, views, *, train: bool, rng, with_state: bool = False):
  """(B, V, H, W, 3) views -> head logits (V, B, K): the V views go through as one batch. With
  with_state (train only): (logits, the backbone's updated model state or None)."""
  b, v = views.shape[:2]
  flat = jnp.swapaxes(views, 0, 1).reshape(v * b, *views.shape[2:])
  backbone = {k: x for k, x in params.items() if k != HEAD}
  kwargs = dict(return_intermediates=True, rngs={"dropout": rng})
  if train:
    (_, out), state = family.apply_train(model, backbone, flat, **kwargs)
  else:
    (_, out), state = model.apply(family.variables(backbone), flat, train=False, **kwargs), None
  logits = head.apply({"params": params[HEAD]}, out["pre_logits"]).reshape(v, b, -1)
  return (logits, state) if with_state else logits


def _freeze_prototypes(tree, frozen):
  """`tree` (grads or updates) with the head's prototype leaves zeroed where `frozen`."""
  head = dict(tree[HEAD])
  head["prototypes"] = jax.tree.map(lambda g: jnp.where(frozen, jnp.zeros_like(g), g),
                                    head["prototypes"])
  return {**tree, HEAD: head}


def make_train_step(model, head, tx, config, total_steps: int, steps_per_epoch: int):
  """(state, {"global" (B,2,G,G,3), "local" (B,N,L,L,3), "label"}) -> (state, metrics)."""
  d = config.dino
  warmup = int(round(float(d.teacher_temp_warmup_epochs) * steps_per_epoch))
  freeze_steps = int(round(float(d.freeze_last_layer_epochs) * steps_per_epoch))

  def train_step(state, batch):
    rng = jax.random.fold_in(jax.random.wrap_key_data(state.rng), state.step)
    temp = dino.teacher_temperature(state.step, warmup, float(d.warmup_teacher_temp),
                                    float(d.teacher_temp))
    teacher_params, centre = state.task_state["teacher"], state.task_state["centre"]
    teacher = jax.lax.stop_gradient(
        embed(model, head, teacher_params, batch["global"], train=False, rng=rng))

    def loss_fn(params):
      # A backbone with batch norm keeps the running statistics of the global views' pass.
      student, model_state = embed(model, head, params, batch["global"], train=True, rng=rng,
                                   with_state=True)
      if batch["local"].shape[1] > 0:
        local = embed(model, head, params, batch["local"], train=True,
                      rng=jax.random.fold_in(rng, 1))
        student = jnp.concatenate([student, local], axis=0)
      return dino.dino_loss(student, teacher, centre, student_temp=float(d.student_temp),
                            teacher_temp=temp), model_state

    (loss, model_state), grads = jax.value_and_grad(loss_fn, has_aux=True)(state.params)
    frozen = state.step < freeze_steps  # DINO: the prototypes stay fixed for the first epoch
    grads = _freeze_prototypes(grads, frozen)
    updates, opt_state = tx.update(grads, state.opt_state, state.params)
    updates = _freeze_prototypes(updates, frozen)
    params = family.with_state(optax.apply_updates(state.params, updates), model_state)
    momentum = dino.momentum_schedule(state.step, total_steps, float(config.ema_decay),
                                      float(d.momentum_final))
    teacher_params = jax.tree.map(lambda t, s: momentum * t + (1.0 - momentum) * s,
                                  teacher_params, params)
    metrics = dict(dino.collapse_metrics(dino.teacher_targets(teacher, centre, temp)),
                   loss=loss, teacher_temp=temp, teacher_momentum=momentum,
                   grad_norm=optax.tree.norm(grads), param_norm=optax.tree.norm(params))
    task_state = {"teacher": teacher_params,
                  "centre": dino.update_centre(centre, teacher, float(d.centre_momentum))}
    return state.replace(step=state.step + 1, params=params, opt_state=opt_state,
                         task_state=task_state), metrics

  return train_step


class DINO(base.Task):
  name = "dino"
  eval_metrics = ("teacher_entropy",)
  best = ("teacher_entropy", "min")  # the sharpest teacher; k-NN scores it
  refuses = {"evaluate": "a DINO run has no supervised head to score: use --protocol knn or "
                         "--protocol linear (frozen teacher features)"}

  def validate(self, config, need):
    """DINO's keys, the multi-crop views (crate_jax.data.multicrop.check) and what the backbone
    must do with the local crops; before anything compiles."""
    need("dino" in config and "multicrop" in config.data, "task",
         "needs config.dino and config.data.multicrop (start from config_lib.dino_config)")
    d = config.dino
    need(float(config.ema_decay) <= float(d.momentum_final) <= 1.0, "dino.momentum_final",
         f"must be in [config.ema_decay={config.ema_decay}, 1]")
    need(int(d.out_dim) >= 2, "dino.out_dim", "DINO needs at least 2 prototypes")
    for key in ("student_temp", "teacher_temp", "warmup_teacher_temp"):
      need(float(d[key]) > 0, f"dino.{key}", "must be > 0")
    need(0.0 <= float(d.centre_momentum) < 1.0, "dino.centre_momentum", "must be in [0, 1)")
    from crate_jax import models
    self.validate_views(config, need, models.from_config(config))

  def validate_views(self, config, need, model):
    """The multi-crop views (crate_jax.data.multicrop.check) and what the backbone must do
    with the local crops (DINO and SimDINO)."""
    m = config.data.multicrop
    from crate_jax.data import multicrop
    multicrop.check(config.data)
    patch = int(config.model.kwargs.get("patch_size", 1))
    need(int(m.local_size) % patch == 0, "data.multicrop.local_size",
         f"is not divisible by config.model.kwargs.patch_size={patch}")
    need(int(m.num_local) == 0 or int(m.local_size) == int(config.data.image_size)
         or getattr(model, "interpolate_pos", False), "model.kwargs.interpolate_pos",
         "must be True for local crops smaller than the global ones")
    need(config.grad_accum_steps == 1, "grad_accum_steps", f"task {self.name!r} takes 1")

  def batch_spec(self, config, batch_size, *, train):
    if not train:  # the unaugmented eval images: a collapse check on held-out data
      return base.image_batch(config, batch_size, train=False)
    g, m = int(config.data.image_size), config.data.multicrop
    l = int(m.local_size)
    return {"global": jax.ShapeDtypeStruct((batch_size, 2, g, g, 3), jnp.float32),
            "local": jax.ShapeDtypeStruct((batch_size, int(m.num_local), l, l, 3), jnp.float32),
            "label": jax.ShapeDtypeStruct((batch_size,), jnp.int32)}

  def train_flops_per_example(self, model, config):
    """Per example: the student's forward + backward of the 2 global and N local views and the
    teacher's forward of the 2 global ones, 3 (2 F_g + N F_l) + 2 F_g, with F the backbone's
    forward count at the view's size (the projection head not counted). DINO and SimDINO."""
    m = config.data.multicrop
    n_local = int(m.num_local)
    f_global = family.forward_flops(model)
    f_local = family.forward_flops(model.clone(image_size=int(m.local_size))) if n_local else 0.0
    if f_global is None or f_local is None:
      return None
    return 3.0 * (2 * f_global + n_local * f_local) + 2 * f_global

  def init_state(self, model, tx, config, input_shape):
    return create_state(model, make_head(config), tx, input_shape, config.seed)

  def train_step(self, model, tx, config, *, total_steps, steps_per_epoch):
    return make_train_step(model, make_head(config), tx, config, total_steps, steps_per_epoch)

  def eval_step(self, model, config):
    """(teacher params with head, {"image", "valid"}) -> per-example teacher entropy (centre 0,
    final temperature) on the unaugmented eval images."""
    from crate_jax.training import steps
    head, t = make_head(config), float(config.dino.teacher_temp)

    def eval_step(params, batch):
      cls = steps.eval_metrics_cls(self.eval_metrics, False)
      logits = embed(model, head, params, batch["image"][:, None], train=False,
                     rng=jax.random.key(0))[0]
      return cls.single_from_model_output(
          teacher_entropy=dino.entropy(jax.nn.softmax(logits / t, axis=-1)), mask=batch["valid"])
    return eval_step

  def check_logged(self, mean, step):
    """train/teacher_collapsed (1/0), and a warning when the teacher has collapsed."""
    import logging
    warning = dino.collapse_warning({k[len("train/"):]: v for k, v in mean.items()})
    mean["train/teacher_collapsed"] = float(warning is not None)
    if warning:
      logging.warning("step %d: %s", step, warning)

  def weights(self, config, state, *, for_eval_step=False):
    """The teacher (config.eval_ema) or the student; the backbone alone unless for_eval_step
    (whose teacher-entropy check runs the head). Checkpoints written before the task registry
    kept the teacher in ema_params (and the centre in dino_centre): read as such."""
    teacher = (state.get("task_state") or {}).get("teacher", state.get("ema_params"))
    use_teacher = bool(config.get("eval_ema", True)) and teacher is not None
    params, what = (teacher, "teacher") if use_teacher else (state["params"], "student")
    if not for_eval_step:
      params = {k: v for k, v in params.items() if k != HEAD}
    return params, what

  def with_params(self, state, params):
    """A warm start: the teacher starts as a copy of the new student, as at init."""
    return state.replace(params=params, task_state=dict(
        state.task_state, teacher=jax.tree.map(jnp.copy, params)))



base.register(DINO())
