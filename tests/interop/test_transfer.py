"""PyTorch checkpoint import, fine-tuning from it, evaluation, positional-embedding resizing."""
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import CRATE, convert, evaluate, models, train
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import tiny_config

torch = pytest.importorskip("torch")
from crate_jax.interop.torch_reference import CRATE as TorchCRATE  # noqa: E402

# A small model of the official architecture at the embedded dataset's 28 px.
ARCH = dict(image_size=28, patch_size=7, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)


def _save_torch(path, wrap=True, mutate=None):
  torch.manual_seed(0)
  ref = TorchCRATE(**ARCH).eval()
  sd = {("module." + k if wrap else k): v for k, v in ref.state_dict().items()}
  if mutate:
    mutate(sd)
  torch.save({"epoch": 3, "state_dict": sd} if wrap else sd, path)
  return ref


def _convert(tmp_path, **kw):
  out = tmp_path / "converted"
  rc = convert.main(["--torch", str(tmp_path / "ref.pth"), "--variant", "crate_tiny",
                     "--out", str(out)] + [f"--{k}={v}" for k, v in kw.items()])
  return rc, out


@pytest.mark.parametrize("wrap", [True, False], ids=["ddp-checkpoint", "bare-state-dict"])
def test_round_trip_gives_the_same_logits(tmp_path, wrap):
  ref = _save_torch(tmp_path / "ref.pth", wrap=wrap)
  overrides = {k: v for k, v in ARCH.items() if k not in ("image_size", "num_classes")}
  rc = convert.main(["--torch", str(tmp_path / "ref.pth"), "--variant", "crate_tiny",
                     "--out", str(tmp_path / "converted")])
  assert rc == 2  # crate_tiny's own depth/width do not fit this small file: a clear refusal
  models.register("crate_test_small", CRATE, **overrides)
  rc = convert.main(["--torch", str(tmp_path / "ref.pth"), "--variant", "crate_test_small",
                     "--out", str(tmp_path / "converted")])
  assert rc == 0
  params, meta = ckpt_lib.load_params(str(tmp_path / "converted"))
  assert meta["model"] == "crate_test_small" and meta["model_kwargs"]["num_classes"] == 10
  assert meta["model_kwargs"]["image_size"] == 28 and meta["model_kwargs"]["eta"] == 0.1
  x = np.random.default_rng(0).normal(size=(3, 3, 28, 28)).astype(np.float32)
  with torch.no_grad():
    want = ref(torch.from_numpy(x)).numpy()
  with jax.default_matmul_precision("highest"):
    got = models.get("crate_test_small", image_size=28, num_classes=10).apply(
        {"params": params}, x.transpose(0, 2, 3, 1))
  np.testing.assert_allclose(np.asarray(got), want, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("module.transformer.layers.1.0.fn.qkv.weight"),
     "missing keys ['transformer.layers.1.0.fn.qkv.weight']"),
    (lambda sd: sd.update({"module.transformer.layers.9.1.fn.weight": torch.zeros(32, 32)}),
     "unexpected keys ['transformer.layers.9.1.fn.weight']"),
    (lambda sd: sd.update({"module.transformer.layers.0.0.fn.to_out.0.weight": torch.zeros(32, 8)}),
     "'transformer.layers.0.0.fn.to_out.0.weight' has shape (32, 8)"),
])
def test_mismatched_state_dicts_fail_clearly_and_write_nothing(tmp_path, capsys, mutate, message):
  models.register("crate_test_small", CRATE,
                  **{k: v for k, v in ARCH.items() if k not in ("image_size", "num_classes")})
  _save_torch(tmp_path / "ref.pth", mutate=mutate)
  rc = convert.main(["--torch", str(tmp_path / "ref.pth"), "--variant", "crate_test_small",
                     "--out", str(tmp_path / "converted")])
  assert rc == 2
  assert message in capsys.readouterr().err
  assert not os.path.exists(tmp_path / "converted")


def test_corrupt_file_and_existing_output(tmp_path, capsys):
  (tmp_path / "ref.pth").write_bytes(b"not a checkpoint")
  assert _convert(tmp_path)[0] == 2
  assert "cannot read" in capsys.readouterr().err
  (tmp_path / "converted").mkdir()
  (tmp_path / "converted" / "keep.txt").write_text("precious")
  _save_torch(tmp_path / "ref.pth")
  assert _convert(tmp_path)[0] == 2
  assert "refusing to overwrite" in capsys.readouterr().err
  assert (tmp_path / "converted" / "keep.txt").read_text() == "precious"


def test_finetune_from_converted_checkpoint_improves(tmp_path):
  models.register("crate_test_small", CRATE,
                  **{k: v for k, v in ARCH.items() if k not in ("image_size", "num_classes")})
  _save_torch(tmp_path / "ref.pth")
  assert convert.main(["--torch", str(tmp_path / "ref.pth"), "--variant", "crate_test_small",
                       "--out", str(tmp_path / "converted")]) == 0
  cfg = tiny_config(tmp_path / "tfds", num_train_steps=40, eval_every_steps=40,
                    init_from=str(tmp_path / "converted"), **{"model.name": "crate_test_small",
                                                              "optimizer.lr": 3e-3})
  before = evaluate.evaluate_checkpoint(cfg, str(tmp_path / "converted"))
  after = train.train_and_evaluate(cfg, str(tmp_path / "ft"))
  assert after["top1"] > before["top1"] + 0.2, (before, after)  # seen: 0.09 -> 0.38
  assert after["loss"] < before["loss"]


def test_pos_embedding_resize():
  rng = np.random.default_rng(0)
  pos = rng.normal(size=(1, 1 + 14 * 14, 8)).astype(np.float32)
  np.testing.assert_array_equal(models.resize_pos_embedding(pos, 14), pos)
  big = np.asarray(models.resize_pos_embedding(pos, 24))  # 224 -> 384 at patch 16
  assert big.shape == (1, 1 + 24 * 24, 8)
  np.testing.assert_array_equal(big[:, 0], pos[:, 0])  # cls row kept
  assert np.isfinite(big).all()
  # Smooth: a linear ramp over the grid stays (nearly) a linear ramp after resizing.
  yy, xx = np.meshgrid(np.linspace(0, 1, 14), np.linspace(0, 1, 14), indexing="ij")
  ramp = np.concatenate([np.zeros((1, 1, 1)), (yy + 2 * xx).reshape(1, -1, 1)], 1)
  grid = np.asarray(models.resize_pos_embedding(ramp, 24))[0, 1:, 0].reshape(24, 24)
  inner = grid[3:-3, 3:-3]  # (the image borders are clamped, as for any image resize)
  assert np.abs(np.diff(inner, 2, axis=1)).max() < 1e-3
  assert np.abs(np.diff(inner, 2, axis=0)).max() < 1e-3
  assert (np.diff(grid, axis=1) > 0).all() and (np.diff(grid, axis=0) > 0).all()  # monotone


def test_model_runs_at_a_new_resolution_with_resized_params():
  small = CRATE(image_size=32, patch_size=8, num_classes=5, dim=32, depth=2, heads=2, dim_head=16)
  params = small.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  big = small.clone(image_size=64)
  resized = models.resize_params_pos_embedding(params, 64, 8)
  out = big.apply({"params": resized}, jnp.ones((2, 64, 64, 3)))
  assert out.shape == (2, 5) and np.isfinite(np.asarray(out)).all()
