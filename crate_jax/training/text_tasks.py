"""The text tasks of the train loop: "lm" (next-token prediction, CRATE-GPT) and "mlm" (BERT's
masked language modelling, CRATE-BERT). Pure functions the steps call; batches carry "tokens"
int32 (B, T) (eval batches also "valid" (B,), 0 for padding rows).

  lm:   loss = mean_{b, t < T-1} -log p(x_{t+1} | x_{<=t})
  mlm:  15% of the positions are chosen (Bernoulli per token); of those 80% become [MASK], 10% a
        random ordinary token, 10% stay; loss = mean over the chosen positions of
        -log p(x_t | corrupted x)
Metrics: loss (nats per predicted token), accuracy, perplexity = exp(loss) and
bits_per_byte = loss / (ln 2 * bytes per predicted token), the bytes counted by the tokenizer's
`token_bytes` (1 per byte for the byte tokenizer; an end-of-document token counts 0 bytes).
"""
from __future__ import annotations

import dataclasses
import math

import jax
import jax.numpy as jnp
import numpy as np
import optax

EVAL_METRICS = ("loss", "accuracy", "bytes_per_token")
MLM_EVAL_SEED = 0   # eval masks: one fixed key, so every evaluation masks the same positions


@dataclasses.dataclass(frozen=True)
class TextSpec:
  """What the steps need from the tokenizer: [MASK] id, how many ordinary tokens (the random
  replacements are drawn from 0 .. num_normal - 1), bytes per token, and the masking rate."""
  mask_id: int
  num_normal: int
  token_bytes: tuple
  mlm_probability: float = 0.15

  @classmethod
  def from_tokenizer(cls, tokenizer, mlm_probability: float = 0.15) -> "TextSpec":
    return cls(mask_id=int(tokenizer.mask_id), num_normal=int(tokenizer.num_normal),
               token_bytes=tuple(int(b) for b in tokenizer.token_bytes),
               mlm_probability=float(mlm_probability))


def mlm_corrupt(tokens: jax.Array, rng: jax.Array, spec: TextSpec):
  """BERT's corruption: (inputs, chosen) with chosen (B, T) bool the positions to predict."""
  k_choose, k_kind, k_random = jax.random.split(rng, 3)
  chosen = jax.random.bernoulli(k_choose, spec.mlm_probability, tokens.shape)
  kind = jax.random.uniform(k_kind, tokens.shape)
  random_tokens = jax.random.randint(k_random, tokens.shape, 0, spec.num_normal, tokens.dtype)
  inputs = jnp.where(chosen & (kind < 0.8), spec.mask_id,
                     jnp.where(chosen & (kind >= 0.8) & (kind < 0.9), random_tokens, tokens))
  return inputs, chosen


def token_outputs(model, params, tokens, rng, spec: TextSpec, *, causal: bool, train: bool):
  """Per predicted position: (nats (B, T'), correct (B, T'), bytes (B, T'), weight (B, T')):
  next-token prediction when `causal` (lm), else BERT's masked-token prediction (mlm)."""
  tokens = jnp.asarray(tokens, jnp.int32)
  k_mask, k_dropout = jax.random.split(rng)
  if causal:
    logits = model.apply({"params": params}, tokens, train=train, rngs={"dropout": k_dropout})
    logits, targets = logits[:, :-1], tokens[:, 1:]
    weight = jnp.ones(targets.shape, jnp.float32)
  else:
    inputs, chosen = mlm_corrupt(tokens, k_mask, spec)
    logits = model.apply({"params": params}, inputs, train=train, rngs={"dropout": k_dropout})
    targets, weight = tokens, chosen.astype(jnp.float32)
  nats = optax.softmax_cross_entropy_with_integer_labels(logits.astype(jnp.float32), targets)
  correct = (jnp.argmax(logits, -1) == targets).astype(jnp.float32)
  nbytes = jnp.asarray(np.asarray(spec.token_bytes, np.float32))[targets]
  return nats, correct, nbytes, weight


def train_loss_fn(model, spec: TextSpec, *, causal: bool):
  """(params, batch, rng) -> (loss, metrics): the token-weighted mean cross-entropy."""
  def loss_fn(params, batch, rng):
    nats, correct, _, weight = token_outputs(model, params, batch["tokens"], rng, spec,
                                             causal=causal, train=True)
    total = jnp.maximum(weight.sum(), 1.0)
    loss = (nats * weight).sum() / total
    return loss, {"loss": loss, "accuracy": (correct * weight).sum() / total,
                  "perplexity": jnp.exp(loss)}
  return loss_fn


def eval_outputs(model, params, batch, spec: TextSpec, *, causal: bool) -> dict:
  """The clu model outputs of one eval batch: per-token values and their mask (B, T'), so the
  metrics are averages over predicted tokens of real (unpadded) sequences."""
  nats, correct, nbytes, weight = token_outputs(
      model, params, batch["tokens"], jax.random.key(MLM_EVAL_SEED), spec, causal=causal,
      train=False)
  return dict(loss=nats, accuracy=correct, bytes_per_token=nbytes,
              mask=weight * batch["valid"][:, None])


def derived_metrics(metrics: dict) -> dict:
  """perplexity = exp(loss), bits_per_byte = loss / ln 2 / bytes per token."""
  out = {"perplexity": math.exp(min(metrics["loss"], 700.0))}
  if metrics.get("bytes_per_token", 0) > 0:
    out["bits_per_byte"] = metrics["loss"] / math.log(2) / metrics["bytes_per_token"]
  return out
