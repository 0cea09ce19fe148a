"""Generation: the key-value cache gives the logits of the full causal pass; sampling; the CLI."""
import json

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import config_lib, generate, models
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import programs_lowered

KW = dict(vocab_size=259, max_len=24, dim=32, depth=2, heads=4, dim_head=8)


@pytest.fixture(scope="module")
def gpt():
  model = models.TextModel(**KW, block="crate", causal=True)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 8), jnp.int32))["params"]
  # Make the weights less uniform than at init so every position's logits differ.
  params = jax.tree.map(lambda p: p * 3.0, params)
  return model, params


def test_cached_logits_equal_the_full_causal_pass(gpt):
  model, params = gpt
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  full = model.apply({"params": params}, tokens)
  dec = generate.decoding_model(model)
  step = jax.jit(lambda p, c, t: generate.cached_step(dec, p, c, t))
  with programs_lowered() as lowered:
    cache = generate.init_cache(dec, 2, 16)
  assert len(lowered) <= 3, lowered  # zero fills, not an eager model.init (dozens of ops)
  pieces = []
  for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 10), (10, 11), (11, 12)):  # prompt, then 1 or 3
    logits, cache = step(params, cache, tokens[:, lo:hi])
    pieces.append(logits)
  cached = jnp.concatenate(pieces, axis=1)
  scale = float(jnp.abs(full).max())
  np.testing.assert_allclose(cached, full, atol=1e-5 * scale, rtol=1e-5)
  assert int(cache["layer_0"]["mssa"]["index"]) == 12
  # The cache holds the subspace features U^T LN(z) of the 12 tokens, zeros after them.
  assert float(jnp.abs(cache["layer_1"]["mssa"]["features"][:, 12:]).max()) == 0.0


def test_greedy_generation_same_with_and_without_cache(gpt):
  model, params = gpt
  prompt = np.arange(65, 70)
  a = generate.generate(model, params, prompt, max_new_tokens=8, temperature=0.0)
  b = generate.generate(model, params, prompt, max_new_tokens=8, temperature=0.0,
                        use_cache=False)
  np.testing.assert_array_equal(a, b)
  np.testing.assert_array_equal(a[:5], prompt)
  # Past max_len = 24 positions: the cache restarts from the last 12 tokens and goes on.
  long = generate.generate(model, params, prompt, max_new_tokens=40, temperature=0.0)
  assert len(long) == 45 and long.max() < 259
  np.testing.assert_array_equal(long[:13], a)


@pytest.fixture(scope="module")
def tost():
  model = models.get("tost_gpt_tiny", vocab_size=259, max_len=24, dim=32, depth=2, heads=4)
  params = jax.jit(lambda t: models.init_params(model, jax.random.key(0), t))(
      jnp.zeros((1, 8), jnp.int32))
  keys = iter(jax.random.split(jax.random.key(9), 64))
  # LayerScale 0.5 (not 1e-5) and a non-zero denom_bias: every position's logits differ.
  def perturb(path, p):
    name = getattr(path[-1], "key", "")
    if name.startswith("gamma"):
      return jnp.full_like(p, 0.5)
    if name == "denom_bias":
      return 0.5 * jax.random.normal(next(keys), p.shape)
    return p * 3.0
  return model, jax.tree_util.tree_map_with_path(perturb, params)


def test_tost_decodes_from_running_sums_equal_to_the_full_causal_pass(tost):
  """The causal ToST's decoding state is TSSA's three running sums per layer: O(heads d) per
  sequence, never a cache of tokens; fed in pieces it gives the full pass's logits."""
  model, params = tost
  tokens = jax.random.randint(jax.random.key(1), (2, 12), 0, 256)
  full = model.apply({"params": params}, tokens)
  dec = generate.decoding_model(model)
  step = jax.jit(lambda p, c, t: generate.cached_step(dec, p, c, t))
  cache = generate.init_cache(dec, 2, 16)
  assert cache["layer_0"]["attn"]["energy"].shape == (2, 4, 8)       # (B, heads, d / heads)
  pieces = []
  for lo, hi in ((0, 5), (5, 6), (6, 7), (7, 10), (10, 11), (11, 12)):
    logits, cache = step(params, cache, tokens[:, lo:hi])
    pieces.append(logits)
  scale = float(jnp.abs(full).max())
  np.testing.assert_allclose(jnp.concatenate(pieces, axis=1), full, atol=1e-5 * scale, rtol=1e-5)
  assert int(cache["layer_1"]["attn"]["index"]) == 12
  prompt = np.arange(65, 70)
  a = generate.generate(model, params, prompt, max_new_tokens=8, temperature=0.0)
  b = generate.generate(model, params, prompt, max_new_tokens=8, temperature=0.0,
                        use_cache=False)
  np.testing.assert_array_equal(a, b)
  long = generate.generate(model, params, prompt, max_new_tokens=30, temperature=0.0)
  assert len(long) == 35 and long.max() < 259   # past max_len = 24: restarts from the last 12


def test_top_k_sampling_draws_only_the_k_largest():
  logits = jnp.tile(jnp.arange(10.0)[None], (2000, 1))
  draws = generate.sample(logits, jax.random.key(0), 1.0, 3)
  assert set(np.unique(draws)) == {7, 8, 9}
  np.testing.assert_array_equal(generate.sample(logits[:5] * jnp.arange(5.0)[:, None] ** 0,
                                                jax.random.key(1), 1.5, 1), 9)  # top-1 = argmax
  counts = np.bincount(np.asarray(draws), minlength=10)[7:] / 2000
  expected = np.exp([7.0, 8.0, 9.0]) / np.exp([7.0, 8.0, 9.0]).sum()
  np.testing.assert_allclose(counts, expected, atol=0.04)


def test_cli_prints_text_and_rejects_an_empty_prompt(gpt, tmp_path, capsys):
  model, params = gpt
  config = config_lib.text_config("crate_gpt_tiny")
  config.model.kwargs.update(**{k: v for k, v in KW.items() if k != "max_len"})
  config.data.seq_len = KW["max_len"]
  config.compute_dtype = "float32"
  meta = {"config": json.loads(config.to_json_best_effort())}
  ckpt_lib.save_params(str(tmp_path / "ckpt"), jax.device_get(params), meta)
  assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", ""]) == 2
  assert "error: --prompt is empty" in capsys.readouterr().err
  assert generate.main(["--checkpoint", str(tmp_path / "ckpt"), "--prompt", "To be",
                        "--max-new-tokens", "6", "--temperature", "0"]) == 0
  printed = capsys.readouterr().out
  expected = generate.generate(model, params, np.frombuffer(b"To be", np.uint8),
                               max_new_tokens=6, temperature=0.0)
  assert printed.startswith("To be")
  from crate_jax.data import tokenizers
  assert printed.rstrip("\n") == tokenizers.get("byte").decode(expected).rstrip("\n")
