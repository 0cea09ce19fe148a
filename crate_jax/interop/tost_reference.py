"""PyTorch references of the official ToST models, written for the parity and interop tests.

Vision: `VisionTransformer` after RobinWu218/ToST tost_vision/tost.py (XCiT's class-attention
scaffold around TSSA). Language: `GPT` after tost_lang/model_TSSA.py (nanoGPT with TSSA,
`GPTConfig.TSSA=True`). The same module trees, hence the same state-dict keys, and the same
arithmetic as the official forwards; torch only (no timm, no einops). This module imports torch:
nothing in crate_jax imports it unless asked (the parity tests, interop), so the package itself
needs no torch.

Where this differs from the official files, and why:
  * nn.BatchNorm2d where the official stem has nn.SyncBatchNorm: the same parameters, buffers and
    state-dict keys; on one process the two compute the same thing.
  * ConvPatchEmbed honours `in_chans` (the official's first conv takes 3 channels whatever
    in_chans says; equal at the default 3) and refuses a patch size other than 8 / 16 with a
    ValueError (the official `raise("...")` raises a TypeError about raising a str).
  * The Fourier positions: the official computes its table in float32 whatever the model's dtype
    and feeds it to the 1x1 conv, which fails on a float64 model (dtype mismatch). Here a float32
    model computes it exactly as the official does; a float64 copy (the parity tests) computes
    the same formula in float64 and rounds the table to float32, the precision the official
    table has, before the float64 conv.
  * The vision forward returns the logits in train mode too (the official returns (x, x)).
  * GPT implements the TSSA attention only (the official's softmax `CausalSelfAttention` for
    TSSA=False is not ported); no parameter-count print, no optimizer / generate helpers.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from functools import partial

import torch
import torch.nn.functional as F
from torch import nn


# ------------------------------------------------------------------------------------ vision
def _drop_path(x, p: float, training: bool):
  """Stochastic depth per sample (timm's drop_path: survivors scaled by 1 / keep)."""
  if p == 0.0 or not training:
    return x
  keep = 1.0 - p
  mask = x.new_empty((x.shape[0],) + (1,) * (x.ndim - 1)).bernoulli_(keep)
  return x * mask / keep


class DropPath(nn.Module):
  def __init__(self, p: float = 0.0):
    super().__init__()
    self.p = p

  def forward(self, x):
    return _drop_path(x, self.p, self.training)


class Mlp(nn.Module):
  """timm's Mlp: fc1, activation, dropout, fc2, dropout (keys fc1.*, fc2.*)."""

  def __init__(self, in_features, hidden_features=None, out_features=None, act_layer=nn.GELU,
               drop=0.0):
    super().__init__()
    hidden_features = hidden_features or in_features
    out_features = out_features or in_features
    self.fc1 = nn.Linear(in_features, hidden_features)
    self.act = act_layer()
    self.drop1 = nn.Dropout(drop)
    self.fc2 = nn.Linear(hidden_features, out_features)
    self.drop2 = nn.Dropout(drop)

  def forward(self, x):
    return self.drop2(self.fc2(self.drop1(self.act(self.fc1(x)))))


class PositionalEncodingFourier(nn.Module):
  """DETR's sine encoding of the (H, W) grid, then a 1x1 conv 2 hidden_dim -> dim."""

  def __init__(self, hidden_dim=32, dim=768, temperature=10000):
    super().__init__()
    self.token_projection = nn.Conv2d(hidden_dim * 2, dim, kernel_size=1)
    self.scale = 2 * math.pi
    self.temperature = temperature
    self.hidden_dim = hidden_dim
    self.dim = dim

  def forward(self, B, H, W):
    weight = self.token_projection.weight
    work = torch.float64 if weight.dtype == torch.float64 else torch.float32
    mask = torch.zeros(B, H, W, dtype=torch.bool, device=weight.device)
    not_mask = ~mask
    y_embed = not_mask.cumsum(1, dtype=work)
    x_embed = not_mask.cumsum(2, dtype=work)
    eps = 1e-6
    y_embed = y_embed / (y_embed[:, -1:, :] + eps) * self.scale
    x_embed = x_embed / (x_embed[:, :, -1:] + eps) * self.scale
    dim_t = torch.arange(self.hidden_dim, dtype=work, device=weight.device)
    dim_t = self.temperature ** (2 * torch.div(dim_t, 2, rounding_mode="floor") / self.hidden_dim)
    pos_x = x_embed[:, :, :, None] / dim_t
    pos_y = y_embed[:, :, :, None] / dim_t
    pos_x = torch.stack((pos_x[:, :, :, 0::2].sin(), pos_x[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos_y = torch.stack((pos_y[:, :, :, 0::2].sin(), pos_y[:, :, :, 1::2].cos()), dim=4).flatten(3)
    pos = torch.cat((pos_y, pos_x), dim=3).permute(0, 3, 1, 2)
    pos = pos.to(torch.float32).to(weight.dtype)   # the official table is float32
    return self.token_projection(pos)


def conv3x3(in_planes, out_planes, stride=1):
  """3x3 convolution (padding 1, no bias) and batch norm: keys {0: conv, 1: bn}."""
  return nn.Sequential(
      nn.Conv2d(in_planes, out_planes, kernel_size=3, stride=stride, padding=1, bias=False),
      nn.BatchNorm2d(out_planes))


class ConvPatchEmbed(nn.Module):
  """Image -> tokens with 4 (patch 16) or 3 (patch 8) conv3x3 stride-2 stages, GELU between."""

  def __init__(self, img_size=224, patch_size=16, in_chans=3, embed_dim=768):
    super().__init__()
    self.img_size = (img_size, img_size)
    self.patch_size = (patch_size, patch_size)
    self.num_patches = (img_size // patch_size) ** 2
    if patch_size == 16:
      widths = (embed_dim // 8, embed_dim // 4, embed_dim // 2, embed_dim)
    elif patch_size == 8:
      widths = (embed_dim // 4, embed_dim // 2, embed_dim)
    else:
      raise ValueError(f"patch_size={patch_size}: for convolutional projection, patch size has "
                       "to be in [8, 16]")
    layers, cin = [], in_chans
    for i, w in enumerate(widths):
      if i:
        layers.append(nn.GELU())
      layers.append(conv3x3(cin, w, 2))
      cin = w
    self.proj = nn.Sequential(*layers)

  def forward(self, x, padding_size=None):
    x = self.proj(x)
    hp, wp = x.shape[2], x.shape[3]
    return x.flatten(2).transpose(1, 2), (hp, wp)


class ClassAttention(nn.Module):
  """CaiT's class attention: only the class token queries; the other tokens pass through."""

  def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
               proj_drop=0.0):
    super().__init__()
    self.num_heads = num_heads
    head_dim = dim // num_heads
    self.scale = qk_scale or head_dim ** -0.5
    self.qkv = nn.Linear(dim, dim * 3, bias=qkv_bias)
    self.attn_drop = nn.Dropout(attn_drop)
    self.proj = nn.Linear(dim, dim)
    self.proj_drop = nn.Dropout(proj_drop)

  def forward(self, x):
    B, N, C = x.shape
    qkv = self.qkv(x).reshape(B, N, 3, self.num_heads, C // self.num_heads).permute(2, 0, 3, 1, 4)
    q, k, v = qkv[0], qkv[1], qkv[2]
    qc = q[:, :, 0:1]
    attn_cls = ((qc * k).sum(dim=-1) * self.scale).softmax(dim=-1)
    attn_cls = self.attn_drop(attn_cls)
    cls_tkn = (attn_cls.unsqueeze(2) @ v).transpose(1, 2).reshape(B, 1, C)
    cls_tkn = self.proj(cls_tkn)
    return torch.cat([self.proj_drop(cls_tkn), x[:, 1:]], dim=1)


class ClassAttentionBlock(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
               attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
               eta=None, tokens_norm=False):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = ClassAttention(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                               attn_drop=attn_drop, proj_drop=drop)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                   drop=drop)
    if eta is not None:
      self.gamma1 = nn.Parameter(eta * torch.ones(dim))
      self.gamma2 = nn.Parameter(eta * torch.ones(dim))
    else:
      self.gamma1, self.gamma2 = 1.0, 1.0
    self.tokens_norm = tokens_norm

  def forward(self, x, H, W, mask=None):
    # The attention's patch tokens are norm1(x) (ClassAttention passes its input through).
    x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
    if self.tokens_norm:
      x = self.norm2(x)
    else:
      x = torch.cat([self.norm2(x[:, 0:1]), x[:, 1:]], dim=1)
    x_res = x
    cls_token = self.gamma2 * self.mlp(x[:, 0:1])
    x = torch.cat([cls_token, x[:, 1:]], dim=1)
    return x_res + self.drop_path(x)   # the patch tokens leave as x_res + x_res


class AttentionTSSA(nn.Module):
  """Token statistics self-attention (one biased projection, `temp` (heads, 1), to_out.0)."""

  def __init__(self, dim, num_heads=8, qkv_bias=False, qk_scale=None, attn_drop=0.0,
               proj_drop=0.0):
    super().__init__()
    self.heads = num_heads
    self.attend = nn.Softmax(dim=1)
    self.attn_drop = nn.Dropout(attn_drop)
    self.qkv = nn.Linear(dim, dim, bias=qkv_bias)
    self.temp = nn.Parameter(torch.ones(num_heads, 1))
    self.to_out = nn.Sequential(nn.Linear(dim, dim), nn.Dropout(proj_drop))

  def forward(self, x):
    b, n, c = x.shape
    w = self.qkv(x).reshape(b, n, self.heads, c // self.heads).transpose(1, 2)  # b h n d
    w_normed = F.normalize(w, dim=-2)
    w_sq = w_normed ** 2
    Pi = self.attend(torch.sum(w_sq, dim=-1) * self.temp)                        # b h n
    dots = torch.matmul((Pi / (Pi.sum(dim=-1, keepdim=True) + 1e-8)).unsqueeze(-2), w ** 2)
    attn = self.attn_drop(1.0 / (1 + dots))
    out = -torch.mul(w.mul(Pi.unsqueeze(-1)), attn)
    return self.to_out(out.transpose(1, 2).reshape(b, n, c))


class Block(nn.Module):
  def __init__(self, dim, num_heads, mlp_ratio=4.0, qkv_bias=False, qk_scale=None, drop=0.0,
               attn_drop=0.0, drop_path=0.0, act_layer=nn.GELU, norm_layer=nn.LayerNorm,
               attn_layer=AttentionTSSA, num_tokens=196, eta=None):
    super().__init__()
    self.norm1 = norm_layer(dim)
    self.attn = attn_layer(dim, num_heads=num_heads, qkv_bias=qkv_bias, qk_scale=qk_scale,
                           attn_drop=attn_drop, proj_drop=drop)
    self.drop_path = DropPath(drop_path) if drop_path > 0.0 else nn.Identity()
    self.norm2 = norm_layer(dim)
    self.mlp = Mlp(in_features=dim, hidden_features=int(dim * mlp_ratio), act_layer=act_layer,
                   drop=drop)
    self.gamma1 = nn.Parameter(eta * torch.ones(dim))
    self.gamma2 = nn.Parameter(eta * torch.ones(dim))

  def forward(self, x, H, W):
    x = x + self.drop_path(self.gamma1 * self.attn(self.norm1(x)))
    return x + self.drop_path(self.gamma2 * self.mlp(self.norm2(x)))


class VisionTransformer(nn.Module):
  """The official ToST / XCiT-CA classifier: conv stem + Fourier positions, `depth` TSSA blocks,
  a class token, `cls_attn_layers` class-attention blocks, LayerNorm, head."""

  def __init__(self, img_size=224, patch_size=16, in_chans=3, num_classes=1000, embed_dim=768,
               depth=12, num_heads=12, mlp_ratio=4.0, qkv_bias=True, qk_scale=None,
               drop_rate=0.0, attn_drop_rate=0.0, drop_path_rate=0.0, norm_layer=None,
               attn_layer=AttentionTSSA, cls_attn_layers=2, use_pos=True, patch_proj="linear",
               eta=None, tokens_norm=False):
    super().__init__()
    self.num_classes = num_classes
    self.num_features = self.embed_dim = embed_dim
    norm_layer = norm_layer or partial(nn.LayerNorm, eps=1e-6)
    self.patch_embed = ConvPatchEmbed(img_size=img_size, embed_dim=embed_dim,
                                      patch_size=patch_size, in_chans=in_chans)
    num_patches = self.patch_embed.num_patches
    self.cls_token = nn.Parameter(torch.zeros(1, 1, embed_dim))
    self.pos_drop = nn.Dropout(p=drop_rate)
    dpr = [drop_path_rate for _ in range(depth)]   # the official: the same rate in every block
    self.blocks = nn.ModuleList([
        Block(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio, qkv_bias=qkv_bias,
              qk_scale=qk_scale, drop=drop_rate, attn_drop=attn_drop_rate, drop_path=dpr[i],
              norm_layer=norm_layer, attn_layer=attn_layer, num_tokens=num_patches, eta=eta)
        for i in range(depth)])
    self.cls_attn_blocks = nn.ModuleList([
        ClassAttentionBlock(dim=embed_dim, num_heads=num_heads, mlp_ratio=mlp_ratio,
                            qkv_bias=qkv_bias, qk_scale=qk_scale, drop=drop_rate,
                            attn_drop=attn_drop_rate, norm_layer=norm_layer, eta=eta,
                            tokens_norm=tokens_norm)
        for _ in range(cls_attn_layers)])
    self.norm = norm_layer(embed_dim)
    self.head = nn.Linear(self.num_features, num_classes) if num_classes > 0 else nn.Identity()
    self.pos_embeder = PositionalEncodingFourier(dim=embed_dim)
    self.use_pos = use_pos
    nn.init.trunc_normal_(self.cls_token, std=0.02)
    self.apply(self._init_weights)

  def _init_weights(self, m):
    if isinstance(m, nn.Linear):
      nn.init.trunc_normal_(m.weight, std=0.02)
      if m.bias is not None:
        nn.init.constant_(m.bias, 0)
    elif isinstance(m, nn.LayerNorm):
      nn.init.constant_(m.bias, 0)
      nn.init.constant_(m.weight, 1.0)

  def forward_features(self, x):
    B = x.shape[0]
    x, (Hp, Wp) = self.patch_embed(x)
    if self.use_pos:
      pos = self.pos_embeder(B, Hp, Wp).reshape(B, -1, x.shape[1]).permute(0, 2, 1)
      x = x + pos
    x = self.pos_drop(x)
    for blk in self.blocks:
      x = blk(x, Hp, Wp)
    x = torch.cat((self.cls_token.expand(B, -1, -1), x), dim=1)
    for blk in self.cls_attn_blocks:
      x = blk(x, Hp, Wp)
    return self.norm(x)[:, 0]

  def forward(self, x):
    return self.head(self.forward_features(x))


def tost_cab(*, patch_size: int, embed_dim: int, depth: int, num_heads: int, eta: float,
             **kwargs) -> VisionTransformer:
  """A model as the official tost_cab_* factories build it (qkv_bias, LayerNorm eps 1e-6,
  tokens_norm=True, TSSA, mlp_ratio 4), at any size."""
  return VisionTransformer(patch_size=patch_size, embed_dim=embed_dim, depth=depth,
                           num_heads=num_heads, mlp_ratio=4, qkv_bias=True,
                           norm_layer=partial(nn.LayerNorm, eps=1e-6), eta=eta, tokens_norm=True,
                           attn_layer=AttentionTSSA, **kwargs)


# ---------------------------------------------------------------------------------- language
class LayerNorm(nn.Module):
  """LayerNorm with an optional bias, eps 1e-5."""

  def __init__(self, ndim, bias):
    super().__init__()
    self.weight = nn.Parameter(torch.ones(ndim))
    self.bias = nn.Parameter(torch.zeros(ndim)) if bias else None

  def forward(self, x):
    return F.layer_norm(x, self.weight.shape, self.weight, self.bias, 1e-5)


@dataclass
class GPTConfig:
  block_size: int = 1024
  vocab_size: int = 50304
  n_layer: int = 12
  n_head: int = 12
  n_embd: int = 768
  dropout: float = 0.0
  bias: bool = True     # GPTConfig's default; the official train.py's default is False


class CausalSelfAttention_TSSA(nn.Module):  # noqa: N801 - the official class name
  def __init__(self, config):
    super().__init__()
    assert config.n_embd % config.n_head == 0
    self.c_attn = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
    self.c_proj = nn.Linear(config.n_embd, config.n_embd, bias=config.bias)
    self.attn_dropout = nn.Dropout(config.dropout)
    self.resid_dropout = nn.Dropout(config.dropout)
    self.n_head = config.n_head
    self.n_embd = config.n_embd
    self.dropout = config.dropout
    self.temp = nn.Parameter(torch.ones(config.n_head, 1))
    self.denom_bias = nn.Parameter(torch.zeros(config.n_head, config.block_size, 1))

  def forward(self, x):
    B, T, C = x.size()
    w = self.c_attn(x).view(B, T, self.n_head, C // self.n_head).transpose(1, 2)  # B nh T hs
    w_sq = w ** 2
    denom = torch.cumsum(w_sq, dim=-2).clamp_min(1e-12)
    w_normed = (w_sq / denom) + self.denom_bias[:, :T, :]
    tmp = torch.sum(w_normed, dim=-1) * self.temp
    Pi = F.softmax(tmp, dim=1)                                                     # B nh T
    dots = torch.cumsum(w_sq * Pi.unsqueeze(-1), dim=-2) / (Pi.cumsum(dim=-1) + 1e-8).unsqueeze(-1)
    attn = self.attn_dropout(1.0 / (1 + dots))
    y = -torch.mul(w.mul(Pi.unsqueeze(-1)), attn)
    y = y.transpose(1, 2).contiguous().view(B, T, C)
    return self.resid_dropout(self.c_proj(y))


class MLP(nn.Module):
  def __init__(self, config):
    super().__init__()
    self.c_fc = nn.Linear(config.n_embd, 4 * config.n_embd, bias=config.bias)
    self.gelu = nn.GELU()
    self.c_proj = nn.Linear(4 * config.n_embd, config.n_embd, bias=config.bias)
    self.dropout = nn.Dropout(config.dropout)

  def forward(self, x):
    return self.dropout(self.c_proj(self.gelu(self.c_fc(x))))


class GPTBlock(nn.Module):
  """The official `Block` (keys ln_1, attn, ln_2, mlp, gamma1, gamma2; LayerScale 1e-5)."""

  def __init__(self, config):
    super().__init__()
    self.ln_1 = LayerNorm(config.n_embd, bias=config.bias)
    self.attn = CausalSelfAttention_TSSA(config)
    self.ln_2 = LayerNorm(config.n_embd, bias=config.bias)
    self.mlp = MLP(config)
    eta = 1e-5
    self.gamma1 = nn.Parameter(eta * torch.ones(config.n_embd))
    self.gamma2 = nn.Parameter(eta * torch.ones(config.n_embd))

  def forward(self, x):
    x = x + self.gamma1 * self.attn(self.ln_1(x))
    return x + self.gamma2 * self.mlp(self.ln_2(x))


class GPT(nn.Module):
  """The official causal ToST language model (lm_head tied to transformer.wte)."""

  def __init__(self, config: GPTConfig):
    super().__init__()
    self.config = config
    self.transformer = nn.ModuleDict(dict(
        wte=nn.Embedding(config.vocab_size, config.n_embd),
        wpe=nn.Embedding(config.block_size, config.n_embd),
        drop=nn.Dropout(config.dropout),
        h=nn.ModuleList([GPTBlock(config) for _ in range(config.n_layer)]),
        ln_f=LayerNorm(config.n_embd, bias=config.bias),
    ))
    self.lm_head = nn.Linear(config.n_embd, config.vocab_size, bias=False)
    self.transformer.wte.weight = self.lm_head.weight
    self.apply(self._init_weights)
    for pn, p in self.named_parameters():
      if pn.endswith("c_proj.weight"):
        nn.init.normal_(p, mean=0.0, std=0.02 / math.sqrt(2 * config.n_layer))

  def _init_weights(self, module):
    if isinstance(module, nn.Linear):
      nn.init.normal_(module.weight, mean=0.0, std=0.02)
      if module.bias is not None:
        nn.init.zeros_(module.bias)
    elif isinstance(module, nn.Embedding):
      nn.init.normal_(module.weight, mean=0.0, std=0.02)

  def hidden(self, idx):
    """ln_f of the last block's output, (b, t, n_embd)."""
    b, t = idx.size()
    assert t <= self.config.block_size, (
        f"Cannot forward sequence of length {t}, block size is only {self.config.block_size}")
    pos = torch.arange(0, t, dtype=torch.long, device=idx.device)
    x = self.transformer.drop(self.transformer.wte(idx) + self.transformer.wpe(pos))
    for block in self.transformer.h:
      x = block(x)
    return self.transformer.ln_f(x)

  def logits(self, idx):
    """Every position's logits (b, t, vocab) (the official computes these when given targets)."""
    return self.lm_head(self.hidden(idx))

  def forward(self, idx, targets=None):
    """As the official: (all logits, loss) with targets, else (last position's logits, None)."""
    x = self.hidden(idx)
    if targets is not None:
      logits = self.lm_head(x)
      loss = F.cross_entropy(logits.reshape(-1, logits.size(-1)), targets.reshape(-1),
                             ignore_index=-1)
      return logits, loss
    return self.lm_head(x[:, [-1], :]), None
