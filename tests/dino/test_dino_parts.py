"""DINO pieces against hand-computed values (float64 via numpy where exactness matters)."""
import math

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax.models import dino_head
from crate_jax.training import dino


def _softmax(x):
  e = np.exp(x - x.max(-1, keepdims=True))
  return e / e.sum(-1, keepdims=True)


def test_momentum_schedule_cosine_from_base_to_one():
  m = [float(dino.momentum_schedule(s, 100)) for s in (0, 50, 100, 200)]
  assert m[0] == pytest.approx(0.996, abs=1e-7)
  assert m[1] == pytest.approx(0.998, abs=1e-7)  # halfway: cos = 0 -> mean of base and 1
  assert m[2] == pytest.approx(1.0, abs=1e-7) and m[3] == pytest.approx(1.0, abs=1e-7)


def test_teacher_temperature_warmup_linear_then_constant():
  assert float(dino.teacher_temperature(0, 10, 0.04, 0.07)) == pytest.approx(0.04)
  assert float(dino.teacher_temperature(5, 10, 0.04, 0.07)) == pytest.approx(0.055)
  assert float(dino.teacher_temperature(30, 10, 0.04, 0.07)) == pytest.approx(0.07)
  assert float(dino.teacher_temperature(3, 0, 0.04, 0.07)) == pytest.approx(0.07)


def test_centre_update_is_ema_of_batch_mean():
  c = jnp.array([[1.0, -1.0]])
  t = jnp.array([[[0.0, 2.0], [2.0, 0.0]], [[4.0, 2.0], [2.0, 0.0]]])  # (G=2, B=2, K=2) mean 2, 1
  out = np.asarray(dino.update_centre(c, t, 0.9))
  np.testing.assert_allclose(out, [[0.9 * 1 + 0.1 * 2, 0.9 * -1 + 0.1 * 1]], rtol=1e-6)


def test_dino_loss_pairs_of_different_views_by_hand():
  rng = np.random.default_rng(0)
  v, g, b, k = 4, 2, 3, 5
  s, t = rng.normal(size=(v, b, k)), rng.normal(size=(g, b, k))
  c = rng.normal(size=(1, k)) * 0.1
  ts, tt = 0.1, 0.04
  total, n = 0.0, 0
  for i in range(g):
    for j in range(v):
      if i == j:
        continue
      p_t = _softmax((t[i] - c) / tt)
      log_p_s = np.log(_softmax(s[j] / ts))
      total += float(np.mean(-np.sum(p_t * log_p_s, -1)))
      n += 1
  assert n == 6  # 2 teacher views x 3 other student views
  with jax.enable_x64(True):
    got = float(dino.dino_loss(jnp.asarray(s), jnp.asarray(t), jnp.asarray(c), student_temp=ts,
                               teacher_temp=tt))
  assert got == pytest.approx(total / n, rel=1e-9)


def test_dino_loss_no_gradient_into_teacher_or_centre():
  s, t, c = jnp.ones((3, 2, 4)), jnp.arange(16.0).reshape(2, 2, 4), jnp.zeros((1, 4))
  gt = jax.grad(lambda t: dino.dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04))(t)
  gs = jax.grad(lambda s: dino.dino_loss(s, t, c, student_temp=0.1, teacher_temp=0.04))(s)
  assert float(jnp.abs(gt).max()) == 0.0 and float(jnp.abs(gs).max()) > 0.0


def test_collapse_metrics_and_warning():
  k = 8
  uniform = jnp.full((4, k), 1.0 / k)
  same = jax.nn.one_hot(jnp.zeros(4, jnp.int32), k)
  spread = jax.nn.one_hot(jnp.arange(4) * 2, k)
  mu, ms, md = (dino.collapse_metrics(x) for x in (uniform, same, spread))
  assert float(mu["teacher_entropy"]) == pytest.approx(math.log(k), rel=1e-6)
  assert float(mu["teacher_kl_uniform"]) == pytest.approx(0.0, abs=1e-6)
  assert float(ms["teacher_entropy"]) == pytest.approx(0.0, abs=1e-6)
  assert float(ms["teacher_kl_uniform"]) == pytest.approx(math.log(k), rel=1e-6)
  # four distinct prototypes of eight: H(mean) = log 4, KL = log 8 - log 4
  assert float(md["teacher_kl_uniform"]) == pytest.approx(math.log(2), rel=1e-6)
  as_float = lambda m: {key: float(v) for key, v in m.items()}
  assert "uniform" in dino.collapse_warning(as_float(mu))
  assert "same prototype" in dino.collapse_warning(as_float(ms))
  assert dino.collapse_warning(as_float(md)) is None


def test_head_shapes_and_weight_normalised_prototypes():
  head = dino_head.DINOHead(out_dim=7, hidden_dim=16, bottleneck_dim=4)
  x = jax.random.normal(jax.random.key(0), (5, 12))
  params = head.init(jax.random.key(1), x)["params"]
  assert set(params) == {"mlp_0", "mlp_1", "mlp_2", "prototypes"}
  assert params["mlp_2"]["kernel"].shape == (16, 4)
  out = head.apply({"params": params}, x)
  assert out.shape == (5, 7)
  # logits are cosines between the normalised bottleneck and unit prototypes: scale-invariant
  # in each prototype and bounded by 1; recomputed here by hand in float64.
  scaled = dict(params, prototypes={"kernel": params["prototypes"]["kernel"] * 3.0})
  np.testing.assert_allclose(head.apply({"params": scaled}, x), out, rtol=1e-5, atol=1e-6)
  h = np.asarray(x, np.float64)
  erf = np.vectorize(math.erf)
  gelu = lambda a: 0.5 * a * (1 + erf(a / math.sqrt(2)))
  for i in range(2):
    p = params[f"mlp_{i}"]
    h = gelu(h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64))
  p = params["mlp_2"]
  z = h @ np.asarray(p["kernel"], np.float64) + np.asarray(p["bias"], np.float64)
  z /= np.linalg.norm(z, axis=-1, keepdims=True)
  v = np.asarray(params["prototypes"]["kernel"], np.float64)
  want = z @ (v / np.linalg.norm(v, axis=0, keepdims=True))
  np.testing.assert_allclose(out, want, atol=1e-5)
  assert np.abs(want).max() <= 1.0 + 1e-9


def test_dino_weights_are_the_teacher_backbone_also_in_old_checkpoints():
  """Which weights stand for a DINO run: the teacher's backbone (eval_ema), else the student's,
  never the head; checkpoints from before the task registry kept the teacher in ema_params."""
  import ml_collections
  from crate_jax.training import tasks
  task = tasks.get("dino")
  student = {"layer_0": np.zeros(2), "dino_head": np.zeros(3)}
  teacher = {"layer_0": np.ones(2), "dino_head": np.ones(3)}
  cfg = ml_collections.ConfigDict({"task": "dino", "eval_ema": True, "ema_decay": 0.99})
  new = {"params": student, "ema_params": None, "task_state": {"teacher": teacher}}
  old = {"params": student, "ema_params": teacher, "dino_centre": np.zeros((1, 3))}
  for state in (new, old):
    params, what = task.weights(cfg, state)
    assert what == "teacher" and set(params) == {"layer_0"} and params["layer_0"][0] == 1
    full, _ = task.weights(cfg, state, for_eval_step=True)
    assert "dino_head" in full
  cfg.eval_ema = False
  params, what = task.weights(cfg, new)
  assert what == "student" and set(params) == {"layer_0"} and params["layer_0"][0] == 0


def test_train_flops_count_every_view():
  """The multi-crop tasks' FLOPs per example (throughput MFU, the planner's analytic count): the
  student's forward + backward of every view and the teacher's forward of the global ones. It
  stays near the compiled train step's count (CPU cost analysis; elementwise work is not in the
  analytic one), where one image's forward + backward is 3x short."""
  import os
  from crate_jax import config_lib, models
  from crate_jax.training import program, sharding, tasks
  from tests.helpers import ROOT, TINY_ARCH
  cfg = config_lib.load_config(
      os.path.join(ROOT, "configs", "crate_dino_embedded.py"),
      **{"model.kwargs": dict(TINY_ARCH, patch_size=4, interpolate_pos=True, pool="mean",
                              dim=64, dim_head=32),
         "dino.out_dim": 16, "dino.hidden_dim": 32, "dino.bottleneck_dim": 8, "batch_size": 8,
         "data.multicrop.num_local": 2, "data.multicrop.local_size": 16})
  model = models.from_config(cfg)
  mesh = sharding.make_mesh(cfg.mesh, devices=jax.devices()[:1])
  prog = program.build(cfg, model, mesh, total_steps=10, steps_per_epoch=10)
  compiled = prog.train_step.lower(prog.abstract_state, prog.abstract_batch(cfg, 8)).compile()
  per_example = compiled.cost_analysis()["flops"] / 8
  counted = tasks.of(cfg).train_flops_per_example(model, cfg)
  assert 0.9 < per_example / counted < 1.3, (per_example, counted)
  assert per_example / (3 * models.forward_flops(model)) > 2.5
