"""The official CRATE-MAE layout (`mae_crate_*`): a PyTorch reference of that architecture written
here, its random weights saved as the official class saves them, imported through the command
users type, and exported back (strict load); reconstructions compared at 1e-5 in float32."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert, export, models
from crate_jax.training import checkpoint as ckpt_lib

torch = pytest.importorskip("torch")
nn = torch.nn

DIM, DEPTH, HEADS, PATCH, IMAGE = 24, 2, 2, 4, 16
DEC_DEPTH, DEC_HEADS = 3, 3  # a decoder unlike the encoder, so no key is mapped by accident
ETA, LAMBD = 0.1, 0.5


def sincos_table(dim, side):
  """MAE's fixed table, written from its definition: zero row for the class token, then per patch
  (row i, column j) [sin(j w), cos(j w), sin(i w), cos(i w)], w_k = 10000^(-4k/dim)."""
  w = 1.0 / 10000 ** (np.arange(dim // 4) / (dim / 4))
  rows = []
  for i in range(side):
    for j in range(side):
      rows.append(np.concatenate([np.sin(j * w), np.cos(j * w), np.sin(i * w), np.cos(i * w)]))
  return np.concatenate([np.zeros((1, dim)), np.array(rows)]).astype(np.float32)[None]


class PreNorm(nn.Module):
  def __init__(self, dim, fn):
    super().__init__()
    self.norm, self.fn = nn.LayerNorm(dim), fn  # torch's eps 1e-5, as in the official blocks

  def forward(self, x):
    return self.fn(self.norm(x))


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads, self.scale = heads, (dim // heads) ** -0.5
    self.qkv = nn.Linear(dim, dim, bias=False)
    self.to_out = nn.Sequential(nn.Linear(dim, dim))

  def forward(self, x):
    b, n, _ = x.shape
    w = self.qkv(x).reshape(b, n, self.heads, -1).transpose(1, 2)
    attn = torch.softmax(w @ w.transpose(-1, -2) * self.scale, dim=-1)
    return self.to_out((attn @ w).transpose(1, 2).reshape(b, n, -1))


class Dictionary(nn.Module):
  """`weight` (d, d): ISTA step ReLU(x + eta (D^T x - D^T D x) - eta lambda) in the encoder
  (with `ista=True`), the plain map x D^T in the decoder."""

  def __init__(self, dim, ista):
    super().__init__()
    self.weight = nn.Parameter(torch.randn(dim, dim) / dim ** 0.5)
    self.ista = ista

  def forward(self, x):
    if not self.ista:
      return x @ self.weight.T
    grad = x @ self.weight - (x @ self.weight.T) @ self.weight
    return torch.relu(x + ETA * grad - ETA * LAMBD)


class Block(nn.Module):
  def __init__(self, dim, heads, decoder):
    super().__init__()
    self.decoder = decoder
    first, second = ((Dictionary(dim, False), Attention(dim, heads)) if decoder else
                     (Attention(dim, heads), Dictionary(dim, True)))
    self.layers = nn.ModuleList([nn.ModuleList([PreNorm(dim, first), PreNorm(dim, second)])])

  def forward(self, x):
    a, b = self.layers[0]
    if self.decoder:  # y = D LN(x);  x <- y - MSSA(LN y)
      y = a(x)
      return y - b(y)
    return b(a(x) + x)  # z <- ISTA(LN(z + MSSA(LN z)))


class PatchEmbed(nn.Module):
  def __init__(self):
    super().__init__()
    self.proj = nn.Conv2d(3, DIM, PATCH, stride=PATCH)


class TorchCRATEMAE(nn.Module):
  def __init__(self):
    super().__init__()
    n = (IMAGE // PATCH) ** 2
    self.patch_embed = PatchEmbed()
    self.cls_token = nn.Parameter(torch.randn(1, 1, DIM))
    self.pos_embed = nn.Parameter(torch.from_numpy(sincos_table(DIM, IMAGE // PATCH)),
                                  requires_grad=False)
    self.blocks = nn.ModuleList(Block(DIM, HEADS, False) for _ in range(DEPTH))
    self.norm = nn.LayerNorm(DIM, eps=1e-6)
    self.decoder_embed = nn.Linear(DIM, DIM)  # in the state dict, never called
    self.mask_token = nn.Parameter(torch.randn(1, 1, DIM))
    self.decoder_pos_embed = nn.Parameter(torch.from_numpy(sincos_table(DIM, IMAGE // PATCH)),
                                          requires_grad=False)
    self.decoder_blocks = nn.ModuleList(Block(DIM, DEC_HEADS, True) for _ in range(DEC_DEPTH))
    self.decoder_norm = nn.LayerNorm(DIM, eps=1e-6)
    self.decoder_pred = nn.Linear(DIM, PATCH * PATCH * 3)
    assert n + 1 == self.pos_embed.shape[1]

  def forward(self, img, mask):
    """img (B, 3, H, W); mask (B, N) bool, True = masked. The official order: keep the visible
    tokens, append the class token and mask tokens, unshuffle, add decoder_pos_embed."""
    x = self.patch_embed.proj(img).flatten(2).transpose(1, 2)
    b, n, d = x.shape
    order = torch.argsort(mask.to(torch.int64), dim=1, stable=True)  # visible first
    restore = torch.argsort(order, dim=1)
    keep = int((~mask[0]).sum())
    visible = torch.gather(x, 1, order[:, :keep, None].expand(-1, -1, d))
    full = torch.cat([visible, self.mask_token.expand(b, n - keep, -1)], dim=1)
    full = torch.gather(full, 1, restore[..., None].expand(-1, -1, d))
    x = torch.cat([self.cls_token.expand(b, -1, -1), full], dim=1) + self.decoder_pos_embed
    for blk in self.blocks:
      x = blk(x)
    x = self.norm(x)
    for blk in self.decoder_blocks:
      x = blk(x)
    return self.decoder_pred(self.decoder_norm(x))[:, 1:]


@pytest.fixture(scope="module")
def ref(tmp_path_factory):
  models.register("crate_mae_test", models.CRATEMAE, patch_size=PATCH, dim=DIM, depth=DEPTH,
                  heads=HEADS, dim_head=DIM // HEADS, decoder_heads=DEC_HEADS)
  torch.manual_seed(0)
  r = TorchCRATEMAE().eval()
  with torch.no_grad():
    for name, prm in r.named_parameters():  # no zero biases or unit scales: every tensor matters
      if prm.requires_grad:
        prm.add_(0.1 * torch.randn_like(prm))
  root = tmp_path_factory.mktemp("mae")
  torch.save({"model": r.state_dict()}, root / "official.pth")
  assert convert.main(["--torch", str(root / "official.pth"), "--variant", "crate_mae_test",
                       "--out", str(root / "converted")]) == 0
  x = np.random.default_rng(0).normal(size=(3, IMAGE, IMAGE, 3)).astype(np.float32)
  return root, r, x


def _jax_pred(ckpt, x):
  """(pred, mask) of the converted checkpoint on x, with a fixed mask key."""
  params, meta = ckpt_lib.load_params(str(ckpt))
  model = models.get(meta["model"], **meta["model_kwargs"])
  with jax.default_matmul_precision("highest"):
    out = model.apply({"params": params}, jnp.asarray(x), rngs={"mask": jax.random.key(3)})
  return np.asarray(out["pred"]), np.asarray(out["mask"]) > 0.5, meta


def _torch_pred(r, x, mask):
  with torch.no_grad():
    return r(torch.from_numpy(x.transpose(0, 3, 1, 2)), torch.from_numpy(mask)).numpy()


def _close(got, want):
  print("max |jax - torch reference| reconstruction difference:", np.abs(got - want).max())
  np.testing.assert_allclose(got, want, atol=1e-5 * max(1.0, np.abs(want).max()), rtol=1e-5)


def test_import_gives_the_reference_reconstruction(ref):
  root, r, x = ref
  pred, mask, meta = _jax_pred(root / "converted", x)
  kw = meta["model_kwargs"]
  assert (kw["image_size"], kw["patch_size"], kw["decoder_depth"]) == (IMAGE, PATCH, DEC_DEPTH)
  assert (kw["eta"], kw["lambd"]) == (ETA, LAMBD)  # the official encoder's defaults
  assert mask.sum() == 3 * 12  # 75% of 16 patches per image
  _close(pred, _torch_pred(r, x, mask))


def test_export_loads_strictly_and_reconstructs_the_same(ref):
  root, _, x = ref
  assert export.main(["--checkpoint", str(root / "converted"), "--to", "torch",
                      "--out", str(root / "back.pth")]) == 0
  fresh = TorchCRATEMAE().eval()
  fresh.load_state_dict(torch.load(root / "back.pth", weights_only=True), strict=True)
  pred, mask, _ = _jax_pred(root / "converted", x)
  _close(pred, _torch_pred(fresh, x, mask))
  sd = torch.load(root / "back.pth", weights_only=True)
  assert not sd["decoder_embed.weight"].any()  # the unused Linear is exported as zeros


def _broken(ref, name, edit):
  root, r, _ = ref
  sd = {k: v.clone() for k, v in r.state_dict().items()}
  edit(sd)
  path = root / f"{name}.pth"
  torch.save(sd, path)
  return path


@pytest.mark.parametrize("name,edit,needle", [
    ("missing", lambda sd: sd.pop("decoder_blocks.2.layers.0.0.fn.weight"),
     "missing keys ['decoder_blocks.2.layers.0.0.fn.weight']"),
    ("unused_shape", lambda sd: sd.update({"decoder_embed.bias": torch.zeros(7)}),
     "'decoder_embed.bias' has shape (7,)"),
    ("shape", lambda sd: sd.update({"blocks.0.layers.0.1.fn.weight": torch.zeros(DIM, 5)}),
     "'blocks.0.layers.0.1.fn.weight' has shape (24, 5)"),
    ("positions", lambda sd: sd["decoder_pos_embed"].mul_(2),
     "'decoder_pos_embed' is not the 2-D sin-cos table"),
])
def test_bad_files_one_line_nothing_written(ref, tmp_path, capsys, name, edit, needle):
  path = _broken(ref, name, edit)
  out = tmp_path / "out"
  assert convert.main(["--torch", str(path), "--variant", "crate_mae_test", "--out", str(out)]) == 2
  err = capsys.readouterr().err.strip()
  assert err.startswith("error:") and needle in err and "\n" not in err, err
  assert not out.exists()
