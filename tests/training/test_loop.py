"""The train loop on the embedded dataset with 8 simulated CPU devices: learning, exact resume,
SIGTERM, NaN guard, bad configs, and a 2-process multi-host run on loopback."""
import json
import os
import socket
import subprocess
import sys

import jax
import numpy as np
import pytest

from crate_jax.training import checkpoint as ckpt_lib
from crate_jax import train
from tests.helpers import ROOT, final_params, losses, preempt_at, tiny_config, xla_flags

@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def test_learns_on_embedded_dataset(tmp_path, data_dir):
  """Learning, and the white-box hook every 40 steps: per-layer coding rate and sparsity and,
  the digits having ground truth (their own pixels), the segmentation IoU of every layer."""
  cfg = tiny_config(data_dir, num_train_steps=80, log_every_steps=10, eval_every_steps=80,
                    whitebox_every_steps=40, **{"optimizer.lr": 3e-3})
  result = train.train_and_evaluate(cfg, str(tmp_path))
  log = losses(str(tmp_path))
  assert log[80] < 0.6 * log[10], log
  assert result["top1"] > 0.5, result  # chance is 0.1
  assert result["top5"] > result["top1"]
  assert os.path.exists(tmp_path / "config.json")
  assert any(f.startswith("events.out.tfevents") for f in os.listdir(tmp_path))
  rows = [json.loads(l) for l in (tmp_path / "metrics.jsonl").read_text().splitlines()]
  hooked = {r["step"]: r for r in rows if "whitebox/seg_iou/layer_00" in r}
  assert sorted(hooked) == [40, 80], sorted(hooked)
  for row in hooked.values():
    ious = [row.get(f"whitebox/seg_iou/layer_{l:02d}") for l in range(2)]
    assert all(v is not None and 0.0 < v <= 1.0 for v in ious), row  # attention method
    assert "whitebox/seg_iou_pca/layer_01" in row and "whitebox/layer_01/sparsity" in row


def test_sigterm_saves_and_exits_cleanly_in_a_relative_workdir(tmp_path, data_dir, monkeypatch):
  monkeypatch.chdir(tmp_path)  # as in README: --workdir workdirs/embedded
  cfg = tiny_config(data_dir, checkpoint_every_steps=100)
  workdir = os.path.join("w", "run")

  train.train_and_evaluate(cfg, workdir, callbacks=[preempt_at(3)])
  assert ckpt_lib.Checkpoints("w/run").all_steps() == [3]
  assert ckpt_lib.load_params("w/run")[1]["step"] == 3
  train.train_and_evaluate(cfg, workdir)  # the same command resumes and finishes
  assert ckpt_lib.Checkpoints("w/run").latest_step() == 10


def test_nan_loss_stops_and_keeps_last_good_checkpoint(tmp_path, data_dir, monkeypatch):
  cfg = tiny_config(data_dir, checkpoint_every_steps=2)
  real = train.data_lib.train_iterator

  def poisoned(*args, **kwargs):
    for i, batch in enumerate(real(*args, **kwargs), start=kwargs.get("start_step", 0) + 1):
      if i == 5:
        batch = dict(batch, image=np.full_like(batch["image"], np.nan))
      yield batch

  monkeypatch.setattr(train.data_lib, "train_iterator", poisoned)
  with pytest.raises(FloatingPointError, match="at step 5.*last good checkpoint is step 4"):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert ckpt_lib.Checkpoints(str(tmp_path)).all_steps() == [2, 4]
  params, _ = ckpt_lib.load_params(str(tmp_path))
  assert all(np.isfinite(x).all() for x in jax.tree.leaves(params))


@pytest.mark.parametrize("key,value,message", [
    ("model.name", "crate_gigantic", "unknown model 'crate_gigantic'"),
    ("optimizer.name", "sgdx", "config.optimizer.name='sgdx'"),
    ("data.name", "not_a_dataset", "not_a_dataset"),
    ("batch_size", 100, "100"),
    ("grad_accum_steps", 3, "grad_accum_steps=3"),
    ("task", "segmentation", "config.task='segmentation'"),
    ("best_metric", "top10", "config.best_metric='top10': is not an eval metric"),
    ("data.image_size", 32, "model.kwargs.image_size=28: differs from config.data.image_size"),
])
def test_bad_config_fails_before_compiling(tmp_path, data_dir, key, value, message):
  cfg = tiny_config(data_dir, **{key: value})
  with pytest.raises(ValueError, match=message):
    train.train_and_evaluate(cfg, str(tmp_path))
  assert not os.path.exists(tmp_path / "checkpoints")


def test_grad_accumulation_matches_full_batch(tmp_path, data_dir):
  one = tiny_config(data_dir, num_train_steps=3, **{"optimizer.name": "adamw"})
  two = tiny_config(data_dir, num_train_steps=3, grad_accum_steps=2, **{"optimizer.name": "adamw"})
  train.train_and_evaluate(one, str(tmp_path / "one"))
  train.train_and_evaluate(two, str(tmp_path / "two"))
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=2e-5),
               final_params(str(tmp_path / "one")), final_params(str(tmp_path / "two")))


def _free_port():
  with socket.socket() as s:
    s.bind(("127.0.0.1", 0))
    return s.getsockname()[1]


def _two_processes(workdir, overrides):
  """Run the train loop as 2 processes x 4 CPU devices (jax.distributed on loopback)."""
  port = _free_port()
  procs = []
  for pid in range(2):
    env = dict(os.environ, JAX_COORDINATOR_ADDRESS=f"127.0.0.1:{port}", JAX_NUM_PROCESSES="2",
               JAX_PROCESS_ID=str(pid), JAX_PLATFORMS="cpu",
               XLA_FLAGS=xla_flags(4), PYTHONPATH=ROOT)
    procs.append(subprocess.Popen(
        [sys.executable, os.path.join(ROOT, "tests", "training", "multihost_worker.py"),
         str(workdir), json.dumps(overrides)],
        env=env, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True))
  outs = [p.communicate(timeout=240)[0] for p in procs]
  for p, out in zip(procs, outs):
    assert p.returncode == 0, out[-3000:]


def test_two_processes_match_single_process(tmp_path, data_dir, monkeypatch):
  """2 processes x 4 CPU devices (jax.distributed on loopback) == 1 process x 8 devices; then a
  warm start from that run with FSDP spanning both processes (every parameter sharded over the
  8 devices of 2 hosts) loads exactly its weights."""
  overrides = {"num_train_steps": 4, "checkpoint_every_steps": 4, "data.data_dir": str(data_dir)}
  _two_processes(tmp_path / "multi", overrides)

  # Reference: one process, 8 devices, global batch = [process 0 shard; process 1 shard].
  real = train.data_lib.train_iterator

  def both_shards(data_cfg, **kw):
    kw.pop("process_index", None), kw.pop("process_count", None)
    its = [real(data_cfg, process_index=i, process_count=2, **kw) for i in range(2)]
    for parts in zip(*its):
      yield {k: np.concatenate([p[k] for p in parts]) for k in parts[0]}

  monkeypatch.setattr(train.data_lib, "train_iterator", both_shards)
  cfg = tiny_config(data_dir, **{k: v for k, v in overrides.items()})
  train.train_and_evaluate(cfg, str(tmp_path / "single"))
  a, b = losses(str(tmp_path / "multi")), losses(str(tmp_path / "single"))
  np.testing.assert_allclose([a[s] for s in sorted(a)], [b[s] for s in sorted(b)], rtol=1e-5)
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, atol=1e-5),
               final_params(str(tmp_path / "multi")), final_params(str(tmp_path / "single")))

  # lr 0: the one step changes nothing, so the warm-started run's params are what it loaded
  warm = {**overrides, "num_train_steps": 1, "checkpoint_every_steps": 1, "eval_every_steps": 1,
          "init_from": str(tmp_path / "multi"), "init_head": False, "optimizer.lr": 0.0,
          "optimizer.weight_decay": 0.0, "mesh.fsdp": 8, "mesh.fsdp_min_size": 1}
  _two_processes(tmp_path / "warm", warm)
  jax.tree.map(np.testing.assert_array_equal, final_params(str(tmp_path / "warm")),
               final_params(str(tmp_path / "multi")))
