"""CRATE-MAE's official PyTorch layout (`crate_ae`): a PyTorch reference of the architecture written
here, random weights saved as a training checkpoint, imported by `python -m crate_jax.convert`, and
the reconstructions compared with the same mask; exported back and loaded strictly."""
import argparse
import os

import jax
import numpy as np
import pytest

from crate_jax import convert, export, models
from crate_jax.models.crate_mae import CRATEMAE
from crate_jax.training import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
nn = torch.nn
from crate_jax.interop import torch_reference as ref_lib  # noqa: E402

ARCH = dict(patch_size=4, dim=24, depth=2, heads=2, dim_head=12)
IMAGE, RATIO, LAMBD = 16, 0.75, 0.5
GRID = IMAGE // ARCH["patch_size"]


def sincos_table(dim, grid):
  """(1 + grid^2, dim) float32, computed as the official MAE code does (float32 angles, the first
  half of the channels for the column, the second for the row, a zero row for the class token)."""
  omega = 1.0 / 10000 ** (np.arange(dim // 4, dtype=np.float32) / np.float32(dim / 4))
  col, row = np.meshgrid(np.arange(grid, dtype=np.float32), np.arange(grid, dtype=np.float32))
  halves = [np.concatenate([np.sin(np.outer(t.ravel(), omega)), np.cos(np.outer(t.ravel(), omega))],
                           axis=1) for t in (col, row)]
  return np.concatenate([np.zeros((1, dim)), np.concatenate(halves, axis=1)]).astype(np.float32)


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, stride=patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class Block(nn.Module):
  """`layers.0` = [PreNorm(first), PreNorm(second)], the official block's module tree."""

  def __init__(self, first, second, dim):
    super().__init__()
    self.layers = nn.ModuleList([nn.ModuleList([ref_lib.PreNorm(dim, first),
                                                ref_lib.PreNorm(dim, second)])])


class Dictionary(nn.Module):
  """The decoder's bias-free y = D x."""

  def __init__(self, dim):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)

  def forward(self, x):
    return x @ self.weight.T


class TorchCRATEMAE(nn.Module):
  """Masked completion: visible patch embeddings, mask tokens put back in place, class token,
  + decoder_pos_embed, CRATE encoder layers (z' = z + MSSA(LN z), z = ISTA(LN z')), LN; decoder
  layers y = D LN(x), x = y - MSSA(LN y); LN; linear prediction; class row dropped."""

  def __init__(self, *, patch_size, dim, depth, heads, dim_head):
    super().__init__()
    n = GRID * GRID
    self.patch_embed = PatchEmbed(patch_size, dim)
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(dim, GRID))[None],
                                  requires_grad=False)
    self.blocks = nn.ModuleList(
        Block(ref_lib.Attention(dim, heads, dim_head), ref_lib.FeedForward(dim, 0.1, LAMBD), dim)
        for _ in range(depth))
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.decoder_embed = nn.Linear(dim, dim)
    self.mask_token = nn.Parameter(torch.randn(1, 1, dim) * 0.02)
    self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_table(dim, GRID))[None],
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList(
        Block(Dictionary(dim), ref_lib.Attention(dim, heads, dim // heads), dim)
        for _ in range(depth))
    self.decoder_norm = nn.LayerNorm(dim, eps=1e-6)
    self.decoder_pred = nn.Linear(dim, patch_size ** 2 * 3)
    self.n = n

  def forward(self, img, noise):
    """(pred (B, N, p*p*3), mask (B, N), 1 = masked): the patches of smallest noise are kept."""
    x = self.patch_embed(img)
    b, n, d = x.shape
    keep = int(n * (1 - RATIO))
    shuffle = torch.argsort(noise, dim=1)
    restore = torch.argsort(shuffle, dim=1)
    visible = torch.gather(x, 1, shuffle[:, :keep, None].expand(-1, -1, d))
    x = torch.cat([visible, self.mask_token.expand(b, n - keep, d)], dim=1)
    x = torch.gather(x, 1, restore[..., None].expand(-1, -1, d))
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.decoder_pos_embed
    for blk in self.blocks:
      attn, ista = blk.layers[0]
      x = ista(attn(x) + x)
    x = self.norm(x)
    for blk in self.decoder_blocks:
      dictionary, attn = blk.layers[0]
      y = dictionary(x)
      x = y - attn(y)
    pred = self.decoder_pred(self.decoder_norm(x))[:, 1:]
    mask = torch.ones(b, n)
    mask[:, :keep] = 0
    return pred, torch.gather(mask, 1, restore)


def masked_loss(pred, img, mask):
  """Per-patch MSE on the masked patches, patches flattened (row, col, channel)."""
  p = ARCH["patch_size"]
  t = img.reshape(len(img), 3, GRID, p, GRID, p).permute(0, 2, 4, 3, 5, 1).reshape(len(img), -1,
                                                                                   p * p * 3)
  return (((pred - t) ** 2).mean(-1) * mask).sum() / mask.sum()


def _reference():
  torch.manual_seed(0)
  r = TorchCRATEMAE(**ARCH).eval()
  with torch.no_grad():
    for name, prm in r.named_parameters():  # no zero biases or unit scales: every tensor matters
      if "pos_embed" not in name:
        prm.add_(0.1 * torch.randn_like(prm))
  return r


@pytest.fixture(scope="module")
def converted(tmp_path_factory):
  """(root, JAX images, JAX outputs, torch reference outputs): the reference saved as an MAE
  training checkpoint (model + args + epoch), converted by the command users type."""
  models.register("crate_mae_test", CRATEMAE, **ARCH)
  r = _reference()
  root = tmp_path_factory.mktemp("mae")
  torch.save({"model": r.state_dict(), "epoch": 799,
              "args": argparse.Namespace(model="mae_crate_base", mask_ratio=RATIO)},
             root / "checkpoint-799.pth")
  assert convert.main(["--torch", str(root / "checkpoint-799.pth"), "--variant", "crate_mae_test",
                       "--out", str(root / "ckpt")]) == 0
  x = np.random.default_rng(0).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  got = _jax_outputs(root / "ckpt", x)
  return root, x, got, _torch_outputs(r, x, got["mask"])


def _jax_outputs(ckpt, x):
  params, meta = ckpt_lib.load_params(str(ckpt))
  model = models.get(meta["model"], **meta["model_kwargs"])
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": params}, x, rngs={"mask": jax.random.key(7)})
  return {k: np.asarray(v) for k, v in out.items()}


def _torch_outputs(r, x, mask):
  """The reference run with noise that masks exactly where the JAX model masked."""
  noise = mask + 0.5 * np.random.default_rng(1).random(mask.shape)
  img = torch.from_numpy(x.transpose(0, 3, 1, 2))
  with torch.no_grad():
    pred, tmask = r(img, torch.from_numpy(noise.astype(np.float32)))
    loss = masked_loss(pred, img, tmask)
  np.testing.assert_array_equal(tmask.numpy(), mask)
  return {"pred": pred.numpy(), "loss": float(loss)}


def _close(got, want, what):
  scale = np.abs(want).max()
  print(f"max |jax - torch reference| {what} difference:", np.abs(got - want).max(), "scale", scale)
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, scale), rtol=1e-5)


def test_import_gives_the_reference_reconstructions(converted):
  root, _, got, want = converted
  meta = ckpt_lib.load_params(str(root / "ckpt"))[1]
  assert meta["model_kwargs"]["image_size"] == IMAGE and meta["model_kwargs"]["lambd"] == LAMBD
  assert got["mask"].sum() == 3 * 12  # round(0.75 * 16) per image, as the reference keeps 4
  assert np.abs(want["pred"]).max() > 0.1
  _close(got["pred"], want["pred"], "reconstruction")
  _close(np.asarray(got["loss"]), np.asarray(want["loss"]), "loss")


def test_export_loads_strictly_and_gives_the_same_reconstructions(converted):
  root, x, got, _ = converted
  assert export.main(["--checkpoint", str(root / "ckpt"), "--to", "torch",
                      "--out", str(root / "back.pth")]) == 0
  sd = torch.load(root / "back.pth", weights_only=True)
  back = TorchCRATEMAE(**ARCH).eval()
  back.load_state_dict(sd, strict=True)
  table = sincos_table(ARCH["dim"], GRID)[None]
  for key in ("pos_embed", "decoder_pos_embed"):  # the documented fixed values
    np.testing.assert_allclose(sd[key].numpy(), table, atol=1e-6)
  np.testing.assert_array_equal(sd["decoder_embed.weight"].numpy(), np.eye(ARCH["dim"]))
  np.testing.assert_array_equal(sd["decoder_embed.bias"].numpy(), np.zeros(ARCH["dim"]))
  out = _torch_outputs(back, x, got["mask"])
  _close(out["pred"], got["pred"], "exported reconstruction")


def test_export_of_a_training_run_with_scanned_layers(converted):
  """A run's checkpoint (meta = its config; scan_layers stacks the layers) exports the same."""
  root, x, got, _ = converted
  params, meta = ckpt_lib.load_params(str(root / "ckpt"))
  kwargs = dict(meta["model_kwargs"], scan_layers=True)
  ckpt_lib.save_params(str(root / "run"), models.scan_layout(params, True),
                       {"config": {"model": {"name": "crate_mae_test", "kwargs": kwargs}}})
  assert export.main(["--checkpoint", str(root / "run"), "--to", "torch",
                      "--out", str(root / "run.pth")]) == 0
  back = TorchCRATEMAE(**ARCH).eval()
  back.load_state_dict(torch.load(root / "run.pth", weights_only=True), strict=True)
  _close(_torch_outputs(back, x, got["mask"])["pred"], got["pred"], "exported (scanned run)")


@pytest.mark.parametrize("mutate,message", [
    (lambda sd: sd.pop("decoder_blocks.1.layers.0.1.fn.qkv.weight"),
     "missing keys ['decoder_blocks.1.layers.0.1.fn.qkv.weight']"),
    (lambda sd: sd.update({"decoder_blocks.2.layers.0.0.fn.weight": torch.zeros(24, 24)}),
     "unexpected keys ['decoder_blocks.2.layers.0.0.fn.weight']"),
    (lambda sd: sd.update({"decoder_blocks.0.layers.0.0.fn.weight": torch.zeros(24, 20)}),
     "'decoder_blocks.0.layers.0.0.fn.weight' has shape (24, 20) but decoder/layer_0/D expects "
     "(24, 24)"),
    (lambda sd: sd.update({"decoder_embed.weight": torch.zeros(12, 24)}),
     "'decoder_embed.weight' has shape (12, 24) but the CRATE-MAE layout expects (24, 24)"),
    (lambda sd: sd["decoder_pos_embed"].mul_(2.0),
     "'decoder_pos_embed' differs from the fixed 2-D sin-cos table"),
])
def test_bad_checkpoint_is_named_and_nothing_written(converted, tmp_path, capsys, mutate, message):
  sd = _reference().state_dict()
  mutate(sd)
  torch.save({"model": sd}, tmp_path / "bad.pth")
  assert convert.main(["--torch", str(tmp_path / "bad.pth"), "--variant", "crate_mae_test",
                       "--out", str(tmp_path / "out")]) == 2
  err = capsys.readouterr().err
  assert message in err and len(err.strip().splitlines()) == 1
  assert not (tmp_path / "out").exists() or not os.listdir(tmp_path / "out")


def test_existing_output_is_refused(converted, capsys):
  root = converted[0]
  before = sorted(os.listdir(root / "ckpt"))
  assert convert.main(["--torch", str(root / "checkpoint-799.pth"), "--variant", "crate_mae_test",
                       "--out", str(root / "ckpt")]) == 2
  assert "refusing to overwrite" in capsys.readouterr().err
  assert sorted(os.listdir(root / "ckpt")) == before
  assert export.main(["--checkpoint", str(root / "ckpt"), "--to", "torch",
                      "--out", str(root / "checkpoint-799.pth")]) == 2
  assert "exists" in capsys.readouterr().err
