"""Sample text from a language-model checkpoint (CRATE-GPT, or the GPT baseline).

  python -m crate_jax.generate --checkpoint workdirs/embedded_lm --prompt "ROMEO:" \
      [--max-new-tokens 300] [--temperature 0.8] [--top-k 40] [--seed 0] [--no-cache]

The model, tokenizer and weights come from the checkpoint (its saved config). CRATE's MSSA ties
q = k = v, so one key-value cache of the subspace features U^T LN(z) per layer serves as both
keys and values (models.crate.cached_features): the prompt is run once, then each new token
costs one position. The causal ToST keeps no cache of tokens at all: its TSSA state is three
running sums per layer (O(heads d) per sequence, whatever the length; models.tost.TSSA.decode_step).
Sampling: softmax(logits / temperature) over the top_k most likely tokens (temperature 0: the
most likely token). The transformer baseline runs without a cache.
"""
from __future__ import annotations

import sys

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np

from crate_jax import cli, models


def check_prompt(prompt: str | None) -> None:
  if not prompt:
    raise ValueError("--prompt is empty: give the text to continue (at least one character)")


def sample(logits: jax.Array, rng: jax.Array, temperature: float, top_k: int) -> jax.Array:
  """One token per row of logits (B, V): argmax at temperature 0, else a draw from
  softmax(logits / temperature) restricted to the top_k largest logits (top_k <= 0: all)."""
  if temperature <= 0:
    return jnp.argmax(logits, -1)
  logits = logits / temperature
  if 0 < top_k < logits.shape[-1]:
    kth = jax.lax.top_k(logits, top_k)[0][..., -1:]
    logits = jnp.where(logits < kth, -jnp.inf, logits)
  return jax.random.categorical(rng, logits, axis=-1)


def decoding_model(model):
  """The same architecture with the key-value cache on (unrolled layers, no remat)."""
  return model.clone(decode=True, scan_layers=False, remat=False)


def init_cache(model, batch: int, length: int):
  """A zero cache for `length` positions (model built with decode=True): the cache variables'
  shapes from an abstract init (its key and input abstract too: nothing computed or compiled),
  filled with zeros."""
  shapes = jax.eval_shape(
      lambda: model.init(jax.random.key(0), jnp.zeros((batch, length), jnp.int32))["cache"])
  return jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), shapes)


def cached_step(model, params, cache, tokens):
  """Logits of new tokens (B, t) given everything already in the cache; returns (logits, cache)."""
  logits, updated = model.apply({"params": params, "cache": cache}, tokens, mutable=["cache"])
  return logits, updated["cache"]


def generate(model, params, prompt_ids, *, max_new_tokens: int, temperature: float = 1.0,
             top_k: int = 0, seed: int = 0, use_cache: bool = True) -> np.ndarray:
  """The prompt's ids followed by max_new_tokens sampled ones (int32 (n + max_new_tokens,)).

  The model sees at most its max_len positions. Without the cache each token is predicted from
  the last max_len tokens. With it, when the cache is full it restarts from the last
  max_len // 2 tokens (one prefill), so the two paths agree while the text fits in max_len.
  """
  prompt_ids = np.asarray(prompt_ids, np.int32).reshape(-1)
  if prompt_ids.size == 0:
    raise ValueError("--prompt is empty: give the text to continue (at least one character)")
  window = int(model.max_len)
  params = models.scan_layout(params, False)
  rng = jax.random.key(seed)
  pick = jax.jit(lambda logits, key: sample(logits, key, temperature, top_k))
  out = [int(i) for i in prompt_ids]
  if use_cache and getattr(model, "block", "crate") in ("crate", "tost"):
    dec = decoding_model(model)
    step = jax.jit(lambda p, c, t: cached_step(dec, p, c, t))

    def prefill(ids):
      cache = init_cache(dec, 1, window)
      logits, cache = step(params, cache, jnp.asarray(ids, jnp.int32)[None])
      return logits, cache, len(ids)

    logits, cache, filled = prefill(out[-window:] if len(out) <= window
                                    else out[-(window // 2):])
    for i in range(max_new_tokens):
      token = pick(logits[:, -1], jax.random.fold_in(rng, i))
      out.append(int(token[0]))
      if i + 1 == max_new_tokens:
        break
      if filled == window:
        logits, cache, filled = prefill(out[-(window // 2):])
      else:
        logits, cache = step(params, cache, token[:, None].astype(jnp.int32))
        filled += 1
    return np.asarray(out, np.int32)
  full = jax.jit(lambda p, t: model.apply({"params": p}, t))
  for i in range(max_new_tokens):
    context = out[-window:]
    buf = np.zeros((1, window), np.int32)  # one compiled shape; causal: the tail is not seen
    buf[0, :len(context)] = context
    logits = full(params, jnp.asarray(buf))[:, len(context) - 1]
    out.append(int(pick(logits, jax.random.fold_in(rng, i))[0]))
  return np.asarray(out, np.int32)


def load(checkpoint: str):
  """(model, params, config) of a text-model checkpoint written by the train loop: the weights
  that stand for its model (crate_jax.training.weights), refused in one line unless the run's
  model is a causal language model."""
  from crate_jax import setups
  from crate_jax.training import checkpoint as ckpt_lib
  from crate_jax.training import weights as weights_lib
  meta = ckpt_lib.read_meta(checkpoint)
  if "config" not in meta:
    raise ValueError(f"checkpoint {checkpoint} has no saved config (meta['config']); generate "
                     "reads the model and tokenizer from it")
  config = ml_collections.ConfigDict(meta["config"])
  model = models.from_config(config)
  if not models.contract(model).causal:
    setups.refuse(config, "generate", f"{config.model.name} is not a causal language model "
                  "(generation needs next-token prediction: task lm with a GPT-style model)")
  params, _, _ = weights_lib.load(checkpoint, config)
  from crate_jax.data import tokenizers
  config = tokenizers.for_checkpoint(config, checkpoint)
  if isinstance(model, models.TextModel) and model.final_norm != ("final_norm" in params):
    # crate_gpt_* checkpoints written before the official model (no final LayerNorm) have one.
    model = model.clone(final_norm="final_norm" in params)
  return model, params, config


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  parser.add_argument("--checkpoint", required=True, help="a workdir or checkpoint step folder")
  parser.add_argument("--prompt", required=True, help="text to continue (not empty)")
  parser.add_argument("--max-new-tokens", type=int, default=300)
  parser.add_argument("--temperature", type=float, default=0.8)
  parser.add_argument("--top-k", type=int, default=40, help="0: sample from every token")
  parser.add_argument("--seed", type=int, default=0)
  parser.add_argument("--no-cache", action="store_true", help="recompute the whole sequence "
                      "for every token (the reference the cache must equal)")
  args = parser.parse_args(argv)
  check_prompt(args.prompt)
  if args.max_new_tokens < 1:
    raise ValueError(f"--max-new-tokens must be >= 1, got {args.max_new_tokens}")
  from crate_jax.data import tokenizers
  model, params, config = load(args.checkpoint)
  tok = tokenizers.from_config(config.data)
  ids = generate(model, params, tok.encode(args.prompt), max_new_tokens=args.max_new_tokens,
                 temperature=args.temperature, top_k=args.top_k, seed=args.seed,
                 use_cache=not args.no_cache)
  print(tok.decode(ids), flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
