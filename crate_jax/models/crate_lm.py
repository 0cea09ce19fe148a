"""CRATE for language: CRATE-GPT (causal), CRATE-BERT (bidirectional, masked LM) and the GPT /
BERT baselines of the same size, one module `TextModel` with a `block` switch.

  E = token embedding (V, d), P = learned positions (max_len, d)
  Z^0 = E[x] + P[:T]                                            (B, T, d)
  Z^{l+1} = f_l(Z^l)      block "crate":       ISTA(LN(Z + MSSA(LN Z)))  (crate.CRATELayer)
                          block "transformer": pre-norm MHSA + GELU MLP  (vit.ViTBlock)
  logits = N(Z^L) E^T     N = LN if final_norm else identity; untied: N(Z^L) W_head   (B, T, V)

With `causal` every attention lets token i see tokens j <= i only (GPT); the mask is applied in
`layers.attention`, the core every family uses, so the fused and the weights-returning paths agree.

Where each choice comes from.
  From the official CRATE-GPT (Ma-Lab-Berkeley/CRATE, model/crate_gpt.py: nanoGPT with CRATE
  blocks), followed by the crate_gpt_* models: pre-norm LayerNorms (eps 1e-5, with bias); MSSA
  with one bias-free d x d projection used as q = k = v, scaled by dim_head^-1/2, causal, and an
  output projection with bias; one ISTA step Z <- ReLU(Z + eta (D^T Z - D^T D Z) - eta lambda)
  with a d x d dictionary, eta = lambda = 0.1 and NO residual around it; token + learned
  position embeddings ~ N(0, 0.02); NO final LayerNorm (final_norm=False); a bias-free head tied
  to the token embedding; the init (mssa_init="gpt": U ~ N(0, 0.02), W_out ~ N(0, 0.02 /
  sqrt(2 L)), zero biases; D kaiming-uniform); the sizes (d, layers, heads) = (768, 12, 12)
  "crate" = crate_gpt_small, (1024, 24, 16) "crate-medium" = crate_gpt_medium, (1280, 36, 20)
  "crate-large" = crate_gpt_large, (1600, 48, 25) "crate-xl" = crate_gpt_xl (those of GPT-2,
  whose sizes the gpt_* baselines take); GPT-2's vocabulary 50,257 padded to 50,304 and 1,024
  positions; no dropout; AdamW with weight decay on matrices only (configs: decay_mask="kernels").
  From the long-form paper (arXiv 2311.13110): only that CRATE-BERT / CRATE-GPT are trained as
  masked / causal LMs and compared with BERT / GPT-2 of the same size; its language sections
  could not be read here (only the abstract is stored), so nothing here is checked against them.
  CRATE-BERT has NO official code: crate_bert_* reuse the CRATE-GPT layer without the causal
  mask (ours), with BERT's sizes (768, 12, 12) / (1024, 24, 16), 30,522 WordPiece vocabulary and
  512 positions, a final LayerNorm as BERT has, and nn.Linear-default MSSA init (ours).
  From GPT-2 / BERT: the baselines' final LayerNorm. Ours: the baselines' ViT-block init; the
  ISTA step computed as D^T (Z - D Z) (two matmuls, the same value); the "tiny" / "mini" sizes
  and the byte vocabulary (259) of tiny models; the classifier (mean over non-pad tokens, pad
  keys masked); the key-value cache for generation (one cache, q = k = v).
"""
from __future__ import annotations

from typing import Any, ClassVar

import flax.linen as nn
import jax
import jax.numpy as jnp

from crate_jax.models import family
from crate_jax.models import layers as L
from crate_jax.models.crate import CRATELayer, layer_macs
from crate_jax.models.tost import ToSTBlock
from crate_jax.models.vit import ViTBlock

Dtype = Any
BLOCKS = ("crate", "transformer", "tost")
TOST_GPT_ETA = 1e-5        # the causal ToST's LayerScale init, both branches
TOST_WHITEBOX = frozenset({"normed", "features", "memberships"})
BYTE_VOCAB = 259          # 256 bytes + end-of-document, mask, pad (crate_jax.data.tokenizers)
GPT2_VOCAB = 50_304       # GPT-2's 50,257 BPE tokens padded to a multiple of 64 (ours)
BERT_VOCAB = 30_522       # BERT's WordPiece vocabulary
# size name -> (dim, depth, heads); dim_head = dim // heads. GPT: the official CRATE-GPT /
# GPT-2 sizes ("crate", "crate-medium", "crate-large", "crate-xl"); BERT: BERT's base / large.
GPT_SIZES = {"tiny": (64, 2, 4), "mini": (256, 4, 4), "small": (768, 12, 12),
             "medium": (1024, 24, 16), "large": (1280, 36, 20), "xl": (1600, 48, 25)}
# The causal ToST's official sizes (tost_lang/config/train_tost_{base,medium,large}_ls.py).
TOST_GPT_SIZES = {"tiny": (64, 2, 4), "mini": (256, 4, 4), "base": (768, 12, 12),
                  "medium": (1024, 24, 16), "large": (1280, 36, 20)}
BERT_SIZES = {"tiny": (64, 2, 4), "mini": (256, 4, 4), "base": (768, 12, 12),
              "large": (1024, 24, 16)}


def check_tokens(tokens: jax.Array, max_len: int) -> int:
  """Validate a (B, T) token batch against the position table; returns T."""
  if tokens.ndim != 2:
    raise ValueError(f"tokens must be (batch, length), got shape {tokens.shape}")
  n = tokens.shape[1]
  if n > max_len:
    raise ValueError(f"a sequence of {n} tokens is longer than the model's position table "
                     f"(max_len={max_len}); use sequences of at most {max_len} tokens or build "
                     "the model with a larger max_len")
  return n


def text_flops(*, block: str, seq_len: int, vocab_size: int, dim: int, depth: int, heads: int,
               dim_head: int, mlp_ratio: int = 4) -> float:
  """2 x MACs of one forward pass per sequence of seq_len tokens: layers (the full T x T
  attention product counted, as the vision families do) and the vocabulary head (T d V)."""
  inner = heads * dim_head
  if block == "crate":
    per_layer = layer_macs(seq_len, dim, inner)
  elif block == "tost":   # U and W_o, the MLP; TSSA itself is O(T d) elementwise work
    per_layer = seq_len * (2 * dim * inner + 2 * mlp_ratio * dim * dim)
  else:
    per_layer = seq_len * (4 * dim * inner + 2 * mlp_ratio * dim * dim) + 2 * seq_len ** 2 * inner
  return 2.0 * (depth * per_layer + seq_len * dim * vocab_size)


class TextModel(nn.Module, kw_only=True):
  """A language model: `apply(variables, tokens)` -> logits (B, T, vocab_size), float32.

  tokens: int (B, T), T <= max_len (anything else: one ValueError before compiling). With
  `return_intermediates=True` it returns (logits, out): out has each layer's intermediates
  stacked over layers (for "crate": normed, features, attention, mssa, codes as `CRATE`; for
  "transformer": attention, blocks), tokens (B, T, d) = last layer output and pre_logits =
  the final LayerNorm of it (Z^L itself when final_norm=False). decode=True runs CRATE's MSSA
  through a key-value cache (init it with a (B, cache_len) batch, then feed new tokens;
  `crate_jax.generate`).
  """
  vocab_size: int = BYTE_VOCAB
  max_len: int = 1024
  dim: int = 768
  depth: int = 12
  heads: int = 12
  dim_head: int = 64
  block: str = "crate"
  causal: bool = True             # GPT: causal; BERT: bidirectional
  mlp_ratio: int = 4              # "transformer" blocks only
  eta: float = 0.1                # "crate" blocks: ISTA step size (official vision default)
  lambd: float = 0.1              # "crate" blocks: ISTA sparsity penalty (same)
  tie_embeddings: bool = True     # head = token embedding^T (official CRATE-GPT, GPT-2, BERT)
  final_norm: bool = True         # LN before the head (GPT-2 / BERT); the official CRATE-GPT: none
  mssa_init: str = "torch"        # "crate" blocks: MSSA.init ("gpt": the official CRATE-GPT's)
  use_bias: bool = True           # "tost" blocks: Linear and LayerNorm biases (the official
                                  # ToST training's GPTConfig(bias=False): tost_gpt_* have none)
  dtype: Dtype = jnp.float32
  remat: bool | str = False
  scan_layers: bool = False
  attention_impl: str | None = None
  drop_path_rate: float = 0.0
  dropout: float = 0.0
  emb_dropout: float = 0.0
  decode: bool = False
  num_classes: int = 0            # > 0: a sequence classifier (fine-tuning CRATE-BERT)
  pad_id: int = BYTE_VOCAB - 1    # classifier pooling skips these tokens (byte tokenizer's pad)

  head_params: ClassVar[tuple[str, ...]] = ("lm_head", "classifier")
  class_token: ClassVar[bool] = False  # no class token: pool the tokens' mean

  @property
  def contract(self) -> family.Contract:
    """Tokens in; CRATE blocks carry every white-box quantity of CRATE, ToST blocks their
    features and memberships, transformer blocks attention."""
    whitebox = {"crate": family.CRATE_WHITEBOX, "tost": TOST_WHITEBOX}.get(
        self.block, frozenset({"attention"}))
    return family.Contract(inputs="tokens", causal=self.causal and self.num_classes == 0,
                           whitebox=whitebox, torch_layout=self.block == "tost")

  @property
  def layer_output_key(self) -> str:
    """CRATE's layer output is its ISTA code; a transformer block's is the block output."""
    return "codes" if self.block == "crate" else "blocks"

  def embed(self, tokens):
    """E[x] + P[offset : offset + T] (offset = tokens already in the cache when decoding)."""
    n = check_tokens(tokens, self.max_len)
    emb = self.param("embedding", nn.initializers.normal(0.02), (self.vocab_size, self.dim),
                     jnp.float32)
    pos = self.param("pos_embedding", nn.initializers.normal(0.02), (self.max_len, self.dim),
                     jnp.float32)
    if self.decode:
      ready = self.has_variable("cache", "position")
      position = self.variable("cache", "position", lambda: jnp.zeros((), jnp.int32))
      start = position.value if ready else 0
      if ready:
        position.value = position.value + n
      pos = jax.lax.dynamic_slice(pos, (start, 0), (n, self.dim))
    else:
      pos = pos[:n]
    x = jnp.take(emb, tokens, axis=0) + pos[None]
    return x.astype(self.dtype), emb

  def run_layers(self, z, *, train: bool, collect: bool, key_mask=None):
    common = dict(depth=self.depth, name="layer_{i}", remat=self.remat, scan=self.scan_layers,
                  collect=collect, drop_path_rate=self.drop_path_rate, dtype=self.dtype,
                  key_mask=key_mask,
                  attention_impl=self.attention_impl, return_weights=collect,
                  dropout=self.dropout, deterministic=not train, causal=self.causal)
    if self.block == "crate":
      return L.layer_stack(CRATELayer, z, dim=self.dim, heads=self.heads,
                           dim_head=self.dim_head, eta=self.eta, lambd=self.lambd,
                           decode=self.decode, mssa_init=self.mssa_init,
                           mssa_init_depth=self.depth, **common)
    if self.block == "tost":   # decode: TSSA's running sums (no key-value cache)
      if not self.causal or key_mask is not None:
        raise ValueError("ToST blocks are causal language-model blocks (task lm): no "
                         "bidirectional or padded (classifier) use")
      common.update(attention_impl=None, return_weights=False)
      return L.layer_stack(ToSTBlock, z, heads=self.heads, mlp_ratio=self.mlp_ratio,
                           eta=TOST_GPT_ETA, ln_eps=L.TORCH_LN_EPS, max_len=self.max_len,
                           init_scheme="gpt", init_depth=self.depth, decode=self.decode,
                           use_bias=self.use_bias, **common)
    if self.decode:
      raise ValueError("decode=True (a cache) is implemented for CRATE and ToST blocks; "
                       f"generate with the {self.block} model without the cache")
    return L.layer_stack(ViTBlock, z, heads=self.heads, dim_head=self.dim_head,
                         mlp_ratio=self.mlp_ratio, **common)

  @nn.compact
  def __call__(self, tokens, *, train: bool = False, return_intermediates: bool = False):
    if self.block not in BLOCKS:
      raise ValueError(f"block must be one of {BLOCKS}, got {self.block!r}")
    if not self.use_bias and self.block != "tost":
      raise ValueError(f"use_bias=False: only ToST blocks drop their biases, not {self.block!r}")
    if not self.final_norm and "final_norm" in self.variables.get("params", {}):
      raise ValueError("the parameters hold a final LayerNorm 'final_norm' but the model was "
                       "built with final_norm=False (a crate_gpt_* checkpoint from before the "
                       "official model): build it with final_norm=True")
    tokens = jnp.asarray(tokens).astype(jnp.int32)
    z, emb = self.embed(tokens)
    if self.emb_dropout > 0:
      z = nn.Dropout(rate=self.emb_dropout)(z, deterministic=not train)
    # A sequence classifier reads padded batches: no token attends to a pad (ours; the LM
    # tasks read packed sequences without padding).
    key_mask = tokens != self.pad_id if self.num_classes > 0 else None
    z, out = self.run_layers(z, train=train, collect=return_intermediates, key_mask=key_mask)
    normed = (L.layer_norm("final_norm", self.dtype, use_bias=self.use_bias)(z)
              if self.final_norm else z)
    if self.num_classes > 0:
      return self.classify(normed, key_mask, out if return_intermediates else None, z)
    if self.tie_embeddings:
      logits = jnp.einsum("btd,vd->btv", normed, emb.astype(self.dtype))
    else:
      logits = nn.Dense(features=self.vocab_size, use_bias=False, dtype=self.dtype,
                        param_dtype=jnp.float32, kernel_init=nn.initializers.normal(0.02),
                        name="lm_head")(normed)
    logits = logits.astype(L.at_least_f32(self.dtype))
    if not return_intermediates:
      return logits
    return logits, dict(out, tokens=z, pre_logits=normed)

  def classify(self, normed, key_mask, out, z):
    """Sequence classification (ours): the mean of N(Z^L) over the non-pad tokens, then a
    linear classifier "classifier" -> (B, num_classes). The warm start from a CRATE-BERT
    checkpoint loads everything else (`init_from`); no token attends to a pad token, so the
    logits do not depend on how much padding follows the text."""
    keep = key_mask.astype(normed.dtype)[..., None]
    pooled = (normed * keep).sum(1) / jnp.maximum(keep.sum(1), 1.0)
    logits = nn.Dense(features=self.num_classes, dtype=self.dtype, param_dtype=jnp.float32,
                      kernel_init=nn.initializers.normal(0.02), name="classifier")(pooled)
    logits = logits.astype(L.at_least_f32(self.dtype))
    if out is None:
      return logits
    return logits, dict(out, tokens=z, pre_logits=pooled)

  @nn.nowrap
  def forward_flops(self) -> float:
    """Matmul FLOPs of one forward pass per sequence of max_len tokens (`text_flops`)."""
    return text_flops(block=self.block, seq_len=self.max_len,
                      vocab_size=self.num_classes or self.vocab_size,
                      dim=self.dim, depth=self.depth, heads=self.heads, dim_head=self.dim_head,
                      mlp_ratio=self.mlp_ratio)


def lm_kwargs(size: str, *, block: str, causal: bool) -> dict:
  """Registry defaults of a size: GPT-like (causal) models get GPT-2's context and vocabulary,
  BERT-like ones BERT's; tiny ones the byte vocabulary and 128 positions (ours). CRATE-GPT
  follows the official model: no final LayerNorm, GPT-2's MSSA init. The causal ToST follows
  the official training (tost_lang/train.py's GPTConfig(bias=False)): no biases."""
  dim, depth, heads = (TOST_GPT_SIZES if block == "tost" else
                       GPT_SIZES if causal else BERT_SIZES)[size]
  official_gpt = block == "crate" and causal
  if size == "tiny":
    vocab, max_len = BYTE_VOCAB, 128
  else:
    vocab, max_len = (GPT2_VOCAB, 1024) if causal else (BERT_VOCAB, 512)
  return dict(vocab_size=vocab, max_len=max_len, dim=dim, depth=depth, heads=heads,
              dim_head=dim // heads, block=block, causal=causal, final_norm=not official_gpt,
              **(dict(mssa_init="gpt") if official_gpt else {}),
              **(dict(use_bias=False) if block == "tost" else {}))
