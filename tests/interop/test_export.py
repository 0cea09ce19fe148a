"""python -m crate_jax.export: a PyTorch state dict the official class loads strictly, and a
StableHLO artifact that a process without crate_jax runs at any batch size."""
import json
import os
import subprocess
import sys

import jax
import numpy as np
import pytest

from crate_jax import export, models
from crate_jax.training import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
from crate_jax.interop.torch_reference import CRATE as TorchCRATE  # noqa: E402

ARCH = dict(image_size=16, patch_size=4, num_classes=5, dim=24, depth=2, heads=2, dim_head=12)


def _noisy(params, seed):
  """Random weights everywhere (no zero biases / unit scales), so every tensor matters."""
  leaves, tree = jax.tree.flatten(params)
  rng = np.random.default_rng(seed)
  return jax.tree.unflatten(tree, [np.asarray(x) + 0.2 * rng.standard_normal(x.shape)
                                   .astype(np.float32) for x in leaves])


@pytest.fixture(scope="module")
def saved(tmp_path_factory):
  """(checkpoint dir, model, params): a CRATE saved as a converted checkpoint would be."""
  root = tmp_path_factory.mktemp("export")
  model = models.get("crate_tiny", **ARCH)
  params = _noisy(model.init(jax.random.key(0), np.zeros((1, 16, 16, 3)))["params"], 0)
  ckpt_lib.save_params(str(root / "ckpt"), params, {"model": "crate_tiny", "model_kwargs": ARCH})
  return root, model, params


def _images(n, seed=1):
  return np.random.default_rng(seed).normal(size=(n, 16, 16, 3)).astype(np.float32)


def _jax_logits(model, params, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply({"params": params}, x))


def test_torch_export_loads_strictly_and_gives_the_same_logits(saved):
  root, model, params = saved
  out = root / "crate.pth"
  assert export.main(["--checkpoint", str(root / "ckpt"), "--to", "torch", "--out", str(out)]) == 0
  ref = TorchCRATE(**ARCH).eval()
  ref.load_state_dict(torch.load(out, weights_only=True), strict=True)
  x = _images(4)
  with torch.no_grad():
    got = ref(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  want = _jax_logits(model, params, x)
  scale = np.abs(want).max()
  assert scale > 0.1
  print("max |torch - jax| logit difference:", np.abs(got - want).max(), "scale", scale)
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5)


_LOADER = """
import sys, jax, numpy as np
jax.config.update("jax_default_matmul_precision", "highest")
with open(sys.argv[1], "rb") as f:
  forward = jax.export.deserialize(bytearray(f.read()))
for n in (1, 5):
  x = np.load(sys.argv[2])[:n]
  np.save(sys.argv[3] + f"{n}.npy", np.asarray(forward.call(x)))
assert not any(m.startswith("crate_jax") for m in sys.modules), "crate_jax was imported"
"""


def test_stablehlo_runs_without_crate_jax_at_two_batch_sizes(saved):
  root, model, params = saved
  out = root / "hlo"
  assert export.main(["--checkpoint", str(root / "ckpt"), "--to", "stablehlo",
                      "--out", str(out)]) == 0
  assert sorted(os.listdir(out)) == ["README.md", "forward.stablehlo", "meta.json"]
  assert "jax.export.deserialize" in (out / "README.md").read_text()
  assert json.loads((out / "meta.json").read_text())["image_size"] == 16
  x = _images(5, seed=2)
  np.save(root / "x.npy", x)
  env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
  env["XLA_FLAGS"] = ""
  r = subprocess.run([sys.executable, "-c", _LOADER, str(out / "forward.stablehlo"),
                      str(root / "x.npy"), str(root / "logits")], cwd=str(root), env=env,
                     capture_output=True, text=True, timeout=120)
  assert r.returncode == 0, r.stderr[-2000:]
  for n in (1, 5):
    want = _jax_logits(model, params, x[:n])
    got = np.load(root / f"logits{n}.npy")
    assert got.shape == (n, 5)
    print(f"batch {n}: max |stablehlo - jax| logit difference:", np.abs(got - want).max())
    np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=1e-5)


def test_bad_inputs_one_line_and_nothing_written(saved, tmp_path, capsys):
  root, _, _ = saved
  empty = tmp_path / "empty_workdir"
  empty.mkdir()
  assert export.main(["--checkpoint", str(empty), "--to", "torch",
                      "--out", str(tmp_path / "a.pth")]) == 2
  assert "no checkpoint found" in capsys.readouterr().err
  assert not (tmp_path / "a.pth").exists()
  arch = dict(vocab_size=32, max_len=8, dim=16, depth=1, heads=2, dim_head=8)
  gpt = models.get("gpt_mini", **arch)
  ckpt_lib.save_params(str(tmp_path / "gpt"),
                       gpt.init(jax.random.key(0), np.zeros((1, 8), np.int32))["params"],
                       {"model": "gpt_mini", "model_kwargs": arch})
  assert export.main(["--checkpoint", str(tmp_path / "gpt"), "--to", "torch",
                      "--out", str(tmp_path / "b.pth")]) == 2
  err = capsys.readouterr().err
  assert "has no PyTorch layout" in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "b.pth").exists() and not (tmp_path / "b.pth.partial").exists()
  (tmp_path / "taken").mkdir()
  (tmp_path / "taken" / "keep.txt").write_text("mine")
  assert export.main(["--checkpoint", str(root / "ckpt"), "--to", "stablehlo",
                      "--out", str(tmp_path / "taken")]) == 2
  assert "exists" in capsys.readouterr().err
  assert os.listdir(tmp_path / "taken") == ["keep.txt"]
