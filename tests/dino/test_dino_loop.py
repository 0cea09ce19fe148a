"""task="dino" end to end on the embedded digits (8 simulated CPU devices): multi-crop views
(shapes, determinism, exact resume), local crops through CRATE's interpolated positions, bad
configs rejected before compiling, and a run interrupted by SIGTERM that resumes to exactly the
uninterrupted student, teacher and centre."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest
import tensorflow as tf

from crate_jax import config_lib, data, models, train
from crate_jax.data import multicrop
from crate_jax.models import posemb
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training.tasks import dino as dino_task
from tests.helpers import ROOT, TINY_ARCH, latest_state, preempt_at

DINO_EMBEDDED = os.path.join(ROOT, "configs", "crate_dino_embedded.py")


def dino_tiny(data_dir, **overrides):
  arch = dict(TINY_ARCH, patch_size=4, interpolate_pos=True)
  base = {"model.kwargs": arch, "data.data_dir": str(data_dir), "batch_size": 16,
          "eval_batch_size": 200, "num_train_steps": 3, "log_every_steps": 1,
          "eval_every_steps": 1000, "checkpoint_every_steps": 2, "optimizer.warmup_epochs": 0.01,
          "dino.out_dim": 16, "dino.hidden_dim": 32, "dino.bottleneck_dim": 8,
          "data.multicrop.num_local": 1, "data.multicrop.local_size": 12}
  base.update(overrides)
  return config_lib.load_config(DINO_EMBEDDED, **base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_multicrop_batches_deterministic_and_resumable(data_dir):
  cfg = dino_tiny(data_dir).data
  take = lambda it, n: [next(it) for _ in range(n)]
  run = take(data.train_iterator(cfg, global_batch_size=16, seed=3), 4)
  b = run[0]
  assert b["global"].shape == (16, 2, 28, 28, 3) and b["local"].shape == (16, 1, 12, 12, 3)
  assert b["label"].shape == (16,)
  assert not np.allclose(b["global"][:, 0], b["global"][:, 1])  # two different crops
  resumed = take(data.train_iterator(cfg, global_batch_size=16, seed=3, start_step=2), 2)
  for want, got in zip(run[2:], resumed):
    for key in ("global", "local", "label"):
      np.testing.assert_array_equal(want[key], got[key])


def test_blur_and_solarize_by_hand():
  flat = tf.fill([9, 9, 3], 0.3)
  np.testing.assert_allclose(multicrop.gaussian_blur(flat, 1.5, 3).numpy(), 0.3, rtol=1e-6)
  impulse = np.zeros((9, 9, 3), np.float32)
  impulse[4, 4] = 1.0
  out = multicrop.gaussian_blur(tf.constant(impulse), 1.0, 3).numpy()[:, :, 0]
  g = np.exp(-0.5 * np.arange(-3, 4) ** 2)
  g /= g.sum()
  np.testing.assert_allclose(out[1:8, 1:8], np.outer(g, g), rtol=1e-5, atol=1e-7)
  x = tf.constant([[[0.2, 0.5, 0.9]]])
  np.testing.assert_allclose(multicrop.solarize(x).numpy(), [[[0.2, 0.5, 0.1]]], rtol=1e-6)


def test_local_crops_use_interpolated_positions():
  big = models.get("crate_tiny", **dict(TINY_ARCH, patch_size=4, interpolate_pos=True))
  params = big.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  x = jax.random.normal(jax.random.key(1), (2, 12, 12, 3))
  got = jax.jit(big.apply)({"params": params}, x)
  small = models.get("crate_tiny", **dict(TINY_ARCH, patch_size=4, image_size=12))
  resized = posemb.resize_params_pos_embedding(params, 12, 4)
  want = jax.jit(small.apply)({"params": resized}, x)
  np.testing.assert_allclose(got, want, rtol=1e-5, atol=1e-6)
  strict = models.get("crate_tiny", **dict(TINY_ARCH, patch_size=4))
  with pytest.raises(ValueError, match="built for image_size=28"):
    strict.apply({"params": params}, x)


@pytest.mark.parametrize("key,value,message", [
    ("data.multicrop.local_size", 32, "local_size=32 is larger than the global crops"),
    ("ema_decay", 1.0, "config.ema_decay=1.0: must be in \\[0, 1\\)"),
    ("dino.out_dim", 1, "out_dim=1: DINO needs at least 2 prototypes"),
])
def test_bad_dino_config_fails_before_compiling(tmp_path, data_dir, key, value, message):
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(dino_tiny(data_dir, **{key: value}), str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, data_dir):
  """(config, workdir) of one uninterrupted tiny DINO run, shared by the tests below."""
  cfg = dino_tiny(data_dir)
  whole = str(tmp_path_factory.mktemp("dino") / "whole")
  train.train_and_evaluate(cfg, whole)
  return cfg, whole


def test_sigterm_then_resume_equals_uninterrupted_run(tmp_path, whole_run):
  cfg, whole = whole_run

  split = str(tmp_path / "split")
  train.train_and_evaluate(cfg, split, callbacks=[preempt_at(1)])
  assert ckpt_lib.Checkpoints(split).all_steps() == [1]
  train.train_and_evaluate(cfg, split)
  a, b = latest_state(whole), latest_state(split)
  for key in ("params", "task_state", "opt_state"):
    jax.tree.map(np.testing.assert_array_equal, a[key], b[key])
  teacher, centre = a["task_state"]["teacher"], a["task_state"]["centre"]
  assert "dino_head" in a["params"] and "dino_head" in teacher
  # the teacher moved (momentum < 1) but is not the student; the centre left 0
  diff = lambda x, y: max(float(np.abs(np.asarray(p) - np.asarray(q)).max())
                          for p, q in zip(jax.tree.leaves(x), jax.tree.leaves(y)))
  assert diff(a["params"], teacher) > 0
  assert np.abs(centre).max() > 0
  # DINO freezes the prototypes for the first epoch (here all 3 steps); the MLP moves
  head = dino_task.make_head(cfg)
  init_rng = jax.random.split(jax.random.key(cfg.seed))[0]
  fresh = head.init(jax.random.fold_in(init_rng, 1), jnp.zeros((1, TINY_ARCH["dim"])))["params"]
  # (the run inits in one compiled program, this op by op: equal to float32 rounding, while one
  # update at lr 5e-4 would move them by ~1e-4)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=1e-6, atol=1e-8),
               a["params"]["dino_head"]["prototypes"], jax.device_get(fresh["prototypes"]))
  assert diff(a["params"]["dino_head"]["mlp_0"], teacher["dino_head"]["mlp_0"]) > 0
  rows = [r for r in __import__("crate_jax.training.metrics", fromlist=["x"]).read_jsonl(
      os.path.join(whole, "metrics.jsonl")) if "train/loss" in r]
  assert {"train/teacher_entropy", "train/teacher_kl_uniform",
          "train/teacher_collapsed"} <= set(rows[-1])


def test_segmentation_scores_the_teacher(tmp_path, whole_run):
  """analyze --segment on a DINO checkpoint loads the teacher's backbone (not the student, not
  the projection head) and scores it per layer and method beside random init and baselines."""
  from crate_jax import analyze, analyze_segment
  cfg, whole = whole_run
  state = latest_state(whole)
  model = analyze.build_model(cfg, 28)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  params, _, weights = analyze.checkpoint_params(cfg, model, abstract, whole)
  assert weights == "teacher" and "dino_head" not in params
  teacher = {k: v for k, v in state["task_state"]["teacher"].items() if k != "dino_head"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), teacher)
  student = {k: v for k, v in state["params"].items() if k != "dino_head"}
  assert any(not np.array_equal(a, b) for a, b in zip(jax.tree.leaves(student),
                                                      jax.tree.leaves(teacher)))
  cfg_student = cfg.copy_and_resolve_references()
  cfg_student.eval_ema = False  # then the student, as evaluate --protocol knn picks it
  got, _, weights = analyze.checkpoint_params(cfg_student, model, abstract, whole)
  assert weights == "student" and "dino_head" not in got
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(got), student)
  out = str(tmp_path / "seg")
  report = analyze_segment.segment_analysis(cfg, whole, out, num_images=8)["report"]
  assert report["weights"] == "teacher" and report["step"] == 3
  assert len(report["layers"]) == TINY_ARCH["depth"]
  for entry in report["layers"]:
    for m in ("attention", "pca", "maskcut"):
      assert 0.0 <= entry[m] <= 1.0 and 0.0 <= entry[f"{m}_random_init"] <= 1.0
  assert {"centred_box", "all_foreground"} <= set(report["baselines"])
  assert os.path.exists(os.path.join(out, "segmentation.csv"))
