"""A family's model state (ToST's batch-norm statistics) through the loop: updated by every
train step as PyTorch's BatchNorm would, checkpointed with the params, resumed bit-exactly,
and used by evaluation."""
import jax
import numpy as np
import pytest

from crate_jax import evaluate, models, train
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import tiny_config

TOST = dict(image_size=28, patch_size=8, num_classes=10, dim=32, depth=2, heads=2)


def tost_cfg(data_dir, **kw):
  return tiny_config(data_dir, **{"model.name": "tost_cab_tiny_12_p8", "model.kwargs": TOST,
                                  "num_train_steps": 4, "checkpoint_every_steps": 2,
                                  "eval_every_steps": 4, "batch_size": 32, **kw})


def test_batch_norm_statistics_follow_each_step_resume_exactly_and_are_evaluated(tmp_path):
  data_dir = tmp_path / "tfds"
  seen = []
  train.train_and_evaluate(tost_cfg(data_dir), str(tmp_path / "straight"),
                           callbacks=[lambda s, st: seen.append(jax.device_get(st.params))])
  stats = [p[models.family.STATE]["patch_embed"]["bn_0"] for p in seen]
  # the running mean moves every step, by m = 0.1 of the batch's: it never jumps to the batch
  moves = [np.abs(b["mean"] - a["mean"]).max() for a, b in zip(stats, stats[1:])]
  assert all(m > 0 for m in moves), moves
  assert np.all(stats[-1]["var"] > 0)

  def stop(step, state):
    if step == 3:
      raise KeyboardInterrupt("stop after step 3 (checkpoint at 2)")

  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(tost_cfg(data_dir), str(tmp_path / "resumed"), callbacks=[stop])
  train.train_and_evaluate(tost_cfg(data_dir), str(tmp_path / "resumed"))
  straight, _ = ckpt_lib.load_params(str(tmp_path / "straight"))
  resumed, _ = ckpt_lib.load_params(str(tmp_path / "resumed"))
  assert models.family.STATE in resumed
  jax.tree.map(np.testing.assert_array_equal, resumed, seen[-1])
  jax.tree.map(np.testing.assert_array_equal, straight, seen[-1])

  # evaluation normalises with the checkpoint's running statistics (eval mode): the same
  # weights with other statistics give another loss
  cfg = tost_cfg(data_dir)
  meta = {"model": "tost_cab_tiny_12_p8", "model_kwargs": TOST}
  moved = jax.tree.map(np.array, straight)
  moved[models.family.STATE]["patch_embed"]["bn_0"]["mean"] += 1.0
  for name, params in (("same", straight), ("moved", moved)):
    ckpt_lib.save_params(str(tmp_path / name), params, meta)
  same = evaluate.evaluate_checkpoint(cfg, str(tmp_path / "same"))
  other = evaluate.evaluate_checkpoint(cfg, str(tmp_path / "moved"))
  assert np.isfinite(same["loss"]) and abs(other["loss"] - same["loss"]) > 1e-3
