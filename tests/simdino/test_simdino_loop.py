"""task="simdino" through the train loop (8 simulated CPU devices): a run interrupted by SIGTERM
resumes to exactly the uninterrupted student and teacher; the probes and analyze read the
teacher's backbone; every backbone family trains a step; bad input fails in one line before
compiling, and nothing saved is touched."""
import os

import jax
import numpy as np
import pytest

from crate_jax import analysis, config_lib, evaluate, models, setups, train
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import metrics, tasks
from tests.helpers import ROOT, TINY_ARCH, latest_state, preempt_at

SIMDINO = os.path.join(ROOT, "configs", "simdino_embedded.py")
DINO = os.path.join(ROOT, "configs", "crate_dino_embedded.py")


def simdino_tiny(data_dir, path=SIMDINO, **overrides):
  arch = dict(TINY_ARCH, patch_size=4, interpolate_pos=True, pool="mean")
  base = {"model.kwargs": arch, "data.data_dir": str(data_dir), "batch_size": 16,
          "eval_batch_size": 200, "num_train_steps": 3, "log_every_steps": 1,
          "eval_every_steps": 3, "checkpoint_every_steps": 2, "optimizer.warmup_epochs": 0.01,
          "simdino.z_dim": 8, "simdino.hidden_dim": 32,
          "data.multicrop.num_local": 1, "data.multicrop.local_size": 12}
  if path == DINO:
    base = {k: v for k, v in base.items() if not k.startswith("simdino")}
    base.update({"dino.out_dim": 16, "dino.hidden_dim": 32, "dino.bottleneck_dim": 8})
  base.update(overrides)
  return config_lib.load_config(path, **base)


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


@pytest.fixture(scope="module")
def whole_run(tmp_path_factory, data_dir):
  cfg = simdino_tiny(data_dir)
  whole = str(tmp_path_factory.mktemp("simdino") / "whole")
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
  assert set(a["task_state"]) == {"teacher"}                 # no centre
  assert "prototypes" not in a["params"]["dino_head"]         # no prototypes
  diff = max(float(np.abs(np.asarray(p) - np.asarray(q)).max()) for p, q in
             zip(jax.tree.leaves(a["params"]), jax.tree.leaves(a["task_state"]["teacher"])))
  assert diff > 0
  rows = [r for r in metrics.read_jsonl(os.path.join(whole, "metrics.jsonl")) if "train/loss" in r]
  last = rows[-1]
  np.testing.assert_allclose(last["train/loss"],
                             -last["train/compression"] - last["train/expansion"], rtol=1e-5)
  evals = [r for r in metrics.read_jsonl(os.path.join(whole, "metrics.jsonl"))
           if "eval/teacher_rate" in r]
  assert evals and evals[-1]["eval/teacher_rate"] > 0


def test_probes_and_analyze_read_the_teacher(whole_run):
  cfg, whole = whole_run
  state = latest_state(whole)
  model = models.from_config(cfg)
  abstract = jax.eval_shape(model.init, jax.random.key(0), np.zeros((1, 28, 28, 3)))["params"]
  params, _, weights = analysis.checkpoint_params(cfg, model, abstract, whole)
  assert weights == "teacher" and "dino_head" not in params
  teacher = {k: v for k, v in state["task_state"]["teacher"].items() if k != "dino_head"}
  jax.tree.map(np.testing.assert_array_equal, jax.device_get(params), teacher)
  got = evaluate.frozen_feature_eval(cfg, whole, "knn", pool="mean")
  assert 0.1 < got["top1"] <= 1.0 and got["num_test"] == 1000


@pytest.mark.parametrize("name, kwargs, local", [
    ("crate_alpha_t16", dict(TINY_ARCH, patch_size=4, depth=1, interpolate_pos=True), 12),
    ("vit_tiny", dict(TINY_ARCH, patch_size=4, depth=1, interpolate_pos=True), 12),
    ("tost_cab_tiny_12_p8", dict(patch_size=8, dim=32, depth=1, heads=2), 16)])
def test_every_backbone_family_gives_the_objective_and_its_gradients(data_dir, name, kwargs,
                                                                      local):
  """CRATE-alpha, ViT and ToST (CRATE: above) under SimDINO's objective, local crops included
  (a smaller grid: resized learned positions, or ToST's Fourier ones): a finite loss whose
  gradient reaches every part of the backbone and the projection head (not the unused
  classifier head)."""
  import jax.numpy as jnp
  from crate_jax.training.tasks import simdino as simdino_task
  cfg = simdino_tiny(data_dir, **{"model.name": name, "model.kwargs": kwargs, "batch_size": 8,
                                  "data.multicrop.local_size": local})
  setups.check(cfg, "train")
  model, task = models.from_config(cfg), tasks.of(cfg)
  state = jax.jit(lambda: task.init_state(model, __import__("optax").sgd(0.0), cfg,
                                          (28, 28, 3)))()
  k1, k2 = jax.random.split(jax.random.key(0))
  batch = {"global": jax.random.normal(k1, (8, 2, 28, 28, 3)),
           "local": jax.random.normal(k2, (8, 1, local, local, 3)),
           "label": jnp.zeros((8,), jnp.int32)}
  fn = simdino_task.objective(model, simdino_task.make_head(cfg), cfg)
  (loss, (terms, _)), grads = jax.jit(jax.value_and_grad(fn, has_aux=True))(
      state.params, state.task_state["teacher"], batch, jax.random.key(1))
  assert np.isfinite(float(loss)) and float(terms["expansion"]) > 0
  norms = {k: float(np.linalg.norm(np.concatenate([np.ravel(x) for x in jax.tree.leaves(v)])))
           for k, v in grads.items() if k not in ("batch_stats", "head")}  # head: the classifier
  assert all(np.isfinite(n) and n > 0 for n in norms.values()), norms


@pytest.mark.parametrize("overrides, message", [
    ({"simdino.eps": 0.0}, "config.simdino.eps=0.0: must be > 0"),
    ({"simdino.z_dim": 32}, "the coding rate of 16 features has rank at most 16"),
    ({"simdino.expa_type": 2}, "simdino.expa_type=2: must be one of"),
    ({"model.name": "crate_mae_tiny", "model.kwargs": dict(TINY_ARCH, patch_size=4)},
     "has no pooled image feature"),
])
def test_bad_simdino_config_fails_in_one_line(tmp_path, data_dir, overrides, message):
  cfg = simdino_tiny(data_dir, **overrides)
  with pytest.raises(ValueError, match=message) as e:
    setups.check(cfg, "train")
  assert "\n" not in str(e.value)
  assert not os.path.exists(tmp_path / "checkpoints")


def test_resuming_with_another_task_is_refused(tmp_path, whole_run, data_dir):
  """A SimDINO workdir resumed with the DINO task (and back): one line naming both tasks, and
  the checkpoints are left as they were."""
  _, whole = whole_run
  before = ckpt_lib.Checkpoints(whole).all_steps()
  with pytest.raises(ckpt_lib.CheckpointError, match="trained with task 'simdino' and the "
                                                    "config trains task 'dino'") as e:
    train.train_and_evaluate(simdino_tiny(data_dir, DINO, num_train_steps=5), whole)
  assert "\n" not in str(e.value)
  assert ckpt_lib.Checkpoints(whole).all_steps() == before
  assert tasks.of(simdino_tiny(data_dir)).name == "simdino"


def test_a_non_finite_coding_rate_stops_the_run_naming_it(tmp_path, data_dir):
  cfg = simdino_tiny(data_dir, **{"optimizer.lr": 1e30, "optimizer.grad_clip_norm": 0.0,
                                  "num_train_steps": 4, "checkpoint_every_steps": 100})
  with pytest.raises(train.NonFiniteLossError, match="non-finite coding rate .* at step"):
    train.train_and_evaluate(cfg, str(tmp_path))
