"""ViT <-> timm's VisionTransformer layout: an exported checkpoint loads strictly into a PyTorch
reference written here after timm's `VisionTransformer` (class token, learned positions, pre-norm
blocks with a fused qkv Linear, exact-GELU MLP, LayerNorm eps 1e-6, head on the class token) and
gives the same logits; the import is the exact inverse."""
import jax
import numpy as np
import pytest

from crate_jax import models
from crate_jax.interop import vit_keys

torch = pytest.importorskip("torch")
nn = torch.nn

ARCH = dict(image_size=16, patch_size=4, num_classes=5, dim=32, depth=2, heads=4, dim_head=8)


class Attention(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.heads = heads
    self.qkv = nn.Linear(dim, 3 * dim)
    self.proj = nn.Linear(dim, dim)

  def forward(self, x):
    b, n, d = x.shape
    qkv = self.qkv(x).reshape(b, n, 3, self.heads, d // self.heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    attn = (q @ k.transpose(-2, -1) * (d // self.heads) ** -0.5).softmax(-1)
    return self.proj((attn @ v).transpose(1, 2).reshape(b, n, d))


class Mlp(nn.Module):
  def __init__(self, dim):
    super().__init__()
    self.fc1, self.fc2 = nn.Linear(dim, 4 * dim), nn.Linear(4 * dim, dim)

  def forward(self, x):
    return self.fc2(nn.functional.gelu(self.fc1(x)))


class Block(nn.Module):
  def __init__(self, dim, heads):
    super().__init__()
    self.norm1, self.norm2 = nn.LayerNorm(dim, eps=1e-6), nn.LayerNorm(dim, eps=1e-6)
    self.attn, self.mlp = Attention(dim, heads), Mlp(dim)

  def forward(self, x):
    x = x + self.attn(self.norm1(x))
    return x + self.mlp(self.norm2(x))


class PatchEmbed(nn.Module):
  def __init__(self, patch, dim):
    super().__init__()
    self.proj = nn.Conv2d(3, dim, patch, patch)

  def forward(self, x):
    return self.proj(x).flatten(2).transpose(1, 2)


class VisionTransformer(nn.Module):
  def __init__(self, image_size, patch_size, num_classes, dim, depth, heads, **_):
    super().__init__()
    n = (image_size // patch_size) ** 2
    self.patch_embed = PatchEmbed(patch_size, dim)
    self.cls_token = nn.Parameter(torch.zeros(1, 1, dim))
    self.pos_embed = nn.Parameter(torch.zeros(1, n + 1, dim))
    self.blocks = nn.ModuleList([Block(dim, heads) for _ in range(depth)])
    self.norm = nn.LayerNorm(dim, eps=1e-6)
    self.head = nn.Linear(dim, num_classes)

  def forward(self, images):
    x = self.patch_embed(images)
    x = torch.cat([self.cls_token.expand(x.shape[0], -1, -1), x], 1) + self.pos_embed
    for block in self.blocks:
      x = block(x)
    return self.head(self.norm(x)[:, 0])


def test_export_to_timm_layout_gives_the_same_logits_and_imports_back():
  model = models.get("vit_tiny", **ARCH)
  x = np.random.default_rng(0).normal(size=(3, 16, 16, 3)).astype(np.float32)
  params = model.init(jax.random.key(1), x)["params"]
  # non-trivial biases and norms (the init leaves them 0 / 1)
  params = jax.tree.map(lambda a: a + 0.05 * np.random.default_rng(a.size).normal(
      size=a.shape).astype(np.float32), params)
  shape = dict(depth=ARCH["depth"], heads=ARCH["heads"], dim_head=ARCH["dim_head"])
  sd = vit_keys.flax_to_torch(params, **shape)
  ref = VisionTransformer(**ARCH)
  ref.load_state_dict({k: torch.from_numpy(np.array(v)) for k, v in sd.items()}, strict=True)
  with torch.no_grad():
    want = ref(torch.from_numpy(x).permute(0, 3, 1, 2)).numpy()
  got = np.asarray(model.apply({"params": params}, x))
  np.testing.assert_allclose(got, want, rtol=1e-4, atol=1e-4 * np.abs(want).max())
  back = vit_keys.torch_to_flax(ref.state_dict(), params, **shape)
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)
  sd.pop("head.bias")
  with pytest.raises(ValueError, match=r"missing keys \['head.bias'\]"):
    vit_keys.torch_to_flax(sd, params, **shape)
