"""A PyTorch reference of the official CRATE architecture, written for the parity tests.

Same module tree (hence the same state-dict keys) and the same arithmetic as the official
`model/crate.py`, including its three-matmul ISTA step. Used by the parity tests and
`crate_jax.bench --vs-torch`; needs torch (the [torch] extra).
"""
import torch
from torch import nn


class Patchify(nn.Module):
  """b c (h p1) (w p2) -> b (h w) (p1 p2 c), parameter-free (index 0 of to_patch_embedding)."""

  def __init__(self, p):
    super().__init__()
    self.p = p

  def forward(self, x):
    b, c, h, w = x.shape
    p = self.p
    x = x.reshape(b, c, h // p, p, w // p, p).permute(0, 2, 4, 3, 5, 1)
    return x.reshape(b, (h // p) * (w // p), p * p * c)


class PreNorm(nn.Module):
  def __init__(self, dim, fn):
    super().__init__()
    self.norm = nn.LayerNorm(dim)
    self.fn = fn

  def forward(self, x):
    return self.fn(self.norm(x))


class Attention(nn.Module):
  def __init__(self, dim, heads, dim_head):
    super().__init__()
    inner = heads * dim_head
    self.heads, self.scale = heads, dim_head ** -0.5
    self.qkv = nn.Linear(dim, inner, bias=False)
    self.to_out = nn.Sequential(nn.Linear(inner, dim), nn.Dropout(0.0))
    self.attn = None

  def forward(self, x):
    b, n, _ = x.shape
    w = self.qkv(x).reshape(b, n, self.heads, -1).transpose(1, 2)
    attn = torch.softmax(torch.matmul(w, w.transpose(-1, -2)) * self.scale, dim=-1)
    self.attn = attn
    out = torch.matmul(attn, w).transpose(1, 2).reshape(b, n, -1)
    return self.to_out(out)


class FeedForward(nn.Module):
  def __init__(self, dim, step_size=0.1, lambd=0.1):
    super().__init__()
    self.weight = nn.Parameter(torch.empty(dim, dim))
    nn.init.kaiming_uniform_(self.weight)
    self.step_size, self.lambd = step_size, lambd

  def forward(self, x):
    x1 = nn.functional.linear(x, self.weight, bias=None)
    grad_1 = nn.functional.linear(x1, self.weight.t(), bias=None)
    grad_2 = nn.functional.linear(x, self.weight.t(), bias=None)
    grad_update = self.step_size * (grad_2 - grad_1) - self.step_size * self.lambd
    return nn.functional.relu(x + grad_update)


class Transformer(nn.Module):
  def __init__(self, dim, depth, heads, dim_head, step_size):
    super().__init__()
    self.layers = nn.ModuleList([
        nn.ModuleList([PreNorm(dim, Attention(dim, heads, dim_head)),
                       PreNorm(dim, FeedForward(dim, step_size))]) for _ in range(depth)])

  def forward(self, x, collect=None):
    for attn, ff in self.layers:
      x = ff(attn(x) + x)
      if collect is not None:
        collect.append(x)
    return x


class CRATE(nn.Module):
  def __init__(self, *, image_size, patch_size, num_classes, dim, depth, heads, dim_head=64,
               channels=3, pool="cls", ista=0.1):
    super().__init__()
    n = (image_size // patch_size) ** 2
    patch_dim = channels * patch_size ** 2
    self.to_patch_embedding = nn.Sequential(Patchify(patch_size), nn.LayerNorm(patch_dim),
                                            nn.Linear(patch_dim, dim), nn.LayerNorm(dim))
    self.pos_embedding = nn.Parameter(torch.randn(1, n + 1, dim))
    self.cls_token = nn.Parameter(torch.randn(1, 1, dim))
    self.transformer = Transformer(dim, depth, heads, dim_head, ista)
    self.pool = pool
    self.mlp_head = nn.Sequential(nn.LayerNorm(dim), nn.Linear(dim, num_classes))

  def forward(self, img, collect=None):
    x = self.to_patch_embedding(img)
    b, n, _ = x.shape
    x = torch.cat([self.cls_token.expand(b, -1, -1), x], dim=1) + self.pos_embedding[:, :n + 1]
    x = self.transformer(x, collect)
    x = x.mean(dim=1) if self.pool == "mean" else x[:, 0]
    return self.mlp_head(x)
