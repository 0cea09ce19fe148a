"""CRATE-alpha's published layouts: the PyTorch port and the big_vision .npz, imported and compared
with a PyTorch reference of the architecture written here; exported back to the port's layout."""
import os

import jax
import numpy as np
import pytest

from crate_jax import convert, export, models
from crate_jax.training import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
nn = torch.nn

ARCH = dict(patch_size=4, dim=24, depth=2, heads=2, dim_head=12)
IMAGE, CLASSES = 16, 5
ETA = LAMBD = 0.1


class Attention(nn.Module):
  """MSSA as in the port: one bias-free projection used as q, k and v; bias-free output."""

  def __init__(self, dim, heads, dim_head):
    super().__init__()
    self.heads, self.scale = heads, dim_head ** -0.5
    self.qkv = nn.Linear(dim, heads * dim_head, bias=False)
    self.to_out = nn.Sequential(nn.Linear(heads * dim_head, dim, bias=False))

  def forward(self, x):
    b, n, _ = x.shape
    w = self.qkv(x).reshape(b, n, self.heads, -1).transpose(1, 2)
    attn = torch.softmax(w @ w.transpose(-1, -2) * self.scale, dim=-1)
    return self.to_out((attn @ w).transpose(1, 2).reshape(b, n, -1))


class OvercompleteISTA(nn.Module):
  """Two ISTA steps on D from z0 = 0, decoded by D1 (both (d, 4d))."""

  def __init__(self, dim):
    super().__init__()
    self.D = nn.Parameter(torch.randn(dim, 4 * dim) / dim ** 0.5)
    self.D1 = nn.Parameter(torch.randn(dim, 4 * dim) / dim ** 0.5)

  def forward(self, x):
    z = torch.relu(ETA * x @ self.D - ETA * LAMBD)
    z = torch.relu(z - ETA * (z @ self.D.T - x) @ self.D - ETA * LAMBD)
    return z @ self.D1.T


class PreNorm(nn.Module):
  def __init__(self, dim, fn):
    super().__init__()
    self.norm, self.fn = nn.LayerNorm(dim, eps=1e-6), fn

  def forward(self, x):
    return self.fn(self.norm(x))


class TorchCRATEAlpha(nn.Module):
  def __init__(self, *, patch_size, dim, depth, heads, dim_head, image=IMAGE, classes=CLASSES):
    super().__init__()
    self.conv1 = nn.Conv2d(3, dim, patch_size, stride=patch_size)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    self.pos_embedding = nn.Parameter(torch.randn(1, (image // patch_size) ** 2 + 1, dim))
    self.transformer = nn.Module()
    self.transformer.layers = nn.ModuleList(
        nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)),
                       PreNorm(dim, OvercompleteISTA(dim))]) for _ in range(depth))
    self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, classes))  # eps 1e-5 (port)

  def forward(self, img):
    x = self.conv1(img).flatten(2).transpose(1, 2)
    x = torch.cat([self.cls_token.expand(len(x), -1, -1), x], 1) + self.pos_embedding
    for attn, ista in self.transformer.layers:
      x = x + attn(x)
      x = x + ista(x)
    return self.mlp_head(x[:, 0])


def big_vision_arrays(ref):
  """The reference's weights written the way the authors' JAX checkpoints name and lay them out."""
  sd = {k: v.detach().numpy() for k, v in ref.state_dict().items()}
  h, p = ARCH["heads"], ARCH["dim_head"]
  out = {"embedding/kernel": sd["conv1.weight"].transpose(2, 3, 1, 0),
         "embedding/bias": sd["conv1.bias"], "cls": sd["cls_token"],
         "pos_embedding": sd["pos_embedding"],
         "encoder_norm/scale": sd["mlp_head.0.weight"], "encoder_norm/bias": sd["mlp_head.0.bias"],
         "head/kernel": sd["mlp_head.1.weight"].T, "head/bias": sd["mlp_head.1.bias"]}
  for i in range(ARCH["depth"]):
    t, f = f"transformer.layers.{i}", f"Transformer/encoderblock_{i}"
    a, s = f"{f}/MultiHeadDotProductSubspaceAttention_0", f"{f}/OvercompleteISTABlock_0"
    out.update({f"{f}/LayerNorm_0/scale": sd[f"{t}.0.norm.weight"],
                f"{f}/LayerNorm_0/bias": sd[f"{t}.0.norm.bias"],
                f"{f}/LayerNorm_1/scale": sd[f"{t}.1.norm.weight"],
                f"{f}/LayerNorm_1/bias": sd[f"{t}.1.norm.bias"],
                f"{a}/proj/kernel": sd[f"{t}.0.fn.qkv.weight"].T.reshape(-1, h, p),
                f"{a}/out/kernel": sd[f"{t}.0.fn.to_out.0.weight"].T.reshape(h, p, -1),
                f"{s}/D": sd[f"{t}.1.fn.D"], f"{s}/D1": sd[f"{t}.1.fn.D1"]})
  return out


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  models.register("crate_alpha_test", models.CRATEAlpha, **ARCH)
  torch.manual_seed(0)
  r = TorchCRATEAlpha(**ARCH).eval()
  with torch.no_grad():
    for prm in r.parameters():  # no zero biases or unit scales: every tensor matters
      prm.add_(0.1 * torch.randn_like(prm))
  root = tmp_path_factory.mktemp("alpha")
  torch.save({"model": r.state_dict()}, root / "port.pth")
  np.savez(root / "bv.npz", **big_vision_arrays(r))
  x = np.random.default_rng(0).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  with torch.no_grad():
    want = r(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  return root, r, x, want


def _logits(ckpt, x):
  params, meta = ckpt_lib.load_params(str(ckpt))
  model = models.get(meta["model"], **meta["model_kwargs"])
  with jax.default_matmul_precision("highest"):
    return np.asarray(model.apply({"params": params}, x))


def _close(got, want):
  print("max |jax - torch reference| logit difference:", np.abs(got - want).max())
  # the port's head LayerNorm has eps 1e-5, ours (the JAX model's) 1e-6: a change ~1e-6 relative
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=1e-5)


@pytest.mark.parametrize("source", ["torch", "npz"])
def test_import_gives_the_reference_logits(ref, source):
  root, _, x, want = ref
  src = root / ("port.pth" if source == "torch" else "bv.npz")
  out = root / f"from_{source}"
  assert convert.main([f"--{source}", str(src), "--variant", "crate_alpha_test",
                       "--out", str(out)]) == 0
  meta = ckpt_lib.load_params(str(out))[1]
  assert meta["model_kwargs"]["num_classes"] == CLASSES and meta["model_kwargs"]["image_size"] == 16
  _close(_logits(out, x), want)


def test_export_to_the_port_loads_strictly(ref):
  root, _, x, want = ref
  if not (root / "from_npz").exists():
    assert convert.main(["--npz", str(root / "bv.npz"), "--variant", "crate_alpha_test",
                         "--out", str(root / "from_npz")]) == 0
  assert export.main(["--checkpoint", str(root / "from_npz"), "--to", "torch",
                      "--out", str(root / "back.pth")]) == 0
  back = TorchCRATEAlpha(**ARCH).eval()
  back.load_state_dict(torch.load(root / "back.pth", weights_only=True), strict=True)
  with torch.no_grad():
    got = back(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  np.testing.assert_allclose(got, want, atol=1e-6 * max(1.0, np.abs(want).max()), rtol=1e-6)


@pytest.mark.parametrize("mutate,message", [
    (lambda a: a.pop("Transformer/encoderblock_1/OvercompleteISTABlock_0/D1"),
     "missing keys ['Transformer/encoderblock_1/OvercompleteISTABlock_0/D1']"),
    (lambda a: a.update(extra=np.zeros(3)), "unexpected keys ['extra']"),
    (lambda a: a.update({"Transformer/encoderblock_0/OvercompleteISTABlock_0/D":
                         np.zeros((24, 72))}),
     "has shape (24, 72) but Transformer/encoderblock_0/OvercompleteISTABlock_0/D expects "
     "(24, 96)"),
])
def test_bad_npz_is_named_and_nothing_written(ref, tmp_path, capsys, mutate, message):
  root, r, _, _ = ref
  arrays = big_vision_arrays(r)
  mutate(arrays)
  np.savez(tmp_path / "bad.npz", **arrays)
  assert convert.main(["--npz", str(tmp_path / "bad.npz"), "--variant", "crate_alpha_test",
                       "--out", str(tmp_path / "out")]) == 2
  assert message in capsys.readouterr().err
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")
