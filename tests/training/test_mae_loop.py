"""CRATE-MAE through the one train loop: pre-train on the embedded digits, then fine-tune the
encoder into the classifier with init_from (the decoder is left out, the head starts fresh)."""
import os

import jax
import numpy as np

from crate_jax.training import checkpoint as ckpt_lib
from crate_jax import config_lib, train
from crate_jax.training import metrics
from tests.helpers import EMBEDDED, ROOT

ARCH = dict(image_size=28, patch_size=7, dim=32, depth=2, heads=2, dim_head=16)


def test_mae_pretrain_then_finetune(tmp_path):
  common = {"data.data_dir": str(tmp_path / "tfds"), "batch_size": 64, "eval_batch_size": 200,
            "log_every_steps": 5}
  pre = config_lib.load_config(EMBEDDED, **common, **{
      "task": "mae", "model.name": "crate_mae_tiny", "model.kwargs": dict(ARCH),
      "num_train_steps": 60, "eval_every_steps": 20, "checkpoint_every_steps": 20,
      "keep_checkpoints": 1, "optimizer.lr": 3e-3, "optimizer.warmup_epochs": 0.1})
  result = train.train_and_evaluate(pre, str(tmp_path / "pre"))
  records = metrics.read_jsonl(str(tmp_path / "pre" / "metrics.jsonl"))
  log = [r["train/loss"] for r in records if "train/loss" in r]
  assert log[-1] < 0.8 * log[0], log           # masked-patch reconstruction error drops
  assert 0 < result["loss"] < log[0]
  assert set(result) == {"loss"}                # no meaningless top-1 for a reconstruction task
  # Kept: the latest step and the one with the lowest eval reconstruction loss.
  evals = {r["step"]: r["eval/loss"] for r in records if "eval/loss" in r}
  kept = set(os.listdir(tmp_path / "pre" / "checkpoints")) - {"tmp"}
  assert kept == {"60", str(min(evals, key=evals.get))}, (kept, evals)

  ft = config_lib.load_config(EMBEDDED, **common, **{
      "model.name": "crate_mae_classifier_tiny", "model.kwargs": dict(ARCH, num_classes=10),
      "num_train_steps": 60, "eval_every_steps": 60, "checkpoint_every_steps": 1000,
      "optimizer.lr": 3e-3, "init_from": str(tmp_path / "pre"), "optimizer.warmup_epochs": 0.1})
  pretrained = ckpt_lib.load_params(str(tmp_path / "pre"))[0]["encoder"]
  first = {}

  def after_first_step(step, state):
    if step == 1:
      first.update(jax.device_get(state.params))

  result = train.train_and_evaluate(ft, str(tmp_path / "ft"), callbacks=[after_first_step])
  assert "decoder" in pretrained_all(tmp_path) and "decoder" not in first
  # One AdamW step moves each weight by about lr at most: the encoder was loaded, not re-drawn.
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1.5 * 3e-3),
               first["encoder"], pretrained)
  assert result["top1"] > 0.2, result          # chance is 0.1 (seen: 0.25 after 60 steps)
  assert os.path.isdir(tmp_path / "ft" / "checkpoints" / "60")


def pretrained_all(tmp_path):
  return ckpt_lib.load_params(str(tmp_path / "pre"))[0]


def test_mae_pretrain_config_builds():
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "crate_mae_base.py"))
  assert cfg.task == "mae" and cfg.optimizer.lr == 1.5e-4 * 4096 / 256
  from crate_jax import models
  assert type(models.from_config(cfg)).__name__ == "CRATEMAE"
