"""CRATE-GPT / CRATE-BERT and the GPT baseline: causality, the masked attention core, the family
API and the position-table check."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.models import layers as L

SMALL = dict(vocab_size=40, max_len=16, dim=32, depth=2, heads=4, dim_head=8)


def _build(block, causal, **kw):
  model = models.TextModel(**{**SMALL, **kw}, block=block, causal=causal)
  params = jax.jit(model.init)(jax.random.key(0), jnp.zeros((1, 12), jnp.int32))["params"]
  return model, params


@pytest.fixture(scope="module")
def tokens():
  return jax.random.randint(jax.random.key(1), (2, 12), 0, SMALL["vocab_size"])


@pytest.mark.parametrize("block", ["crate", "transformer"])
def test_causal_models_do_not_look_ahead_bidirectional_ones_do(block, tokens):
  """Changing token 7 leaves logits 0..6 unchanged under the causal mask, not without it."""
  changed = tokens.at[:, 7].set((tokens[:, 7] + 1) % SMALL["vocab_size"])
  for causal in (True, False):
    model, params = _build(block, causal)
    apply = jax.jit(lambda p, t: model.apply({"params": p}, jnp.concatenate(t)))
    a, b = jnp.split(apply(params, (tokens, changed)), 2)
    early = float(jnp.max(jnp.abs(a[:, :7] - b[:, :7])))
    late = float(jnp.max(jnp.abs(a[:, 7:] - b[:, 7:])))
    assert late > 1e-4
    if causal:
      assert early == 0.0
    else:
      assert early > 1e-4


@pytest.mark.parametrize("n,pad_to", [(12, 1), (13, 16)])
def test_masked_attention_fused_and_weights_paths_agree(n, pad_to):
  """The causal / explicit-mask softmax of the weights path equals jax's fused kernel (xla),
  also through the padding that cuDNN needs; the weights are lower-triangular."""
  q, k, v = jax.random.normal(jax.random.key(2), (3, 2, n, 4, 8))
  ref, weights = L.attention(q, k, v, return_weights=True, causal=True)
  fused, _ = L.attention(q, k, v, implementation="xla", pad_to=pad_to, causal=True)
  np.testing.assert_allclose(fused, ref, rtol=1e-5, atol=1e-5)
  assert float(jnp.abs(jnp.triu(weights, 1)).max()) == 0.0
  # One query row in float64 by hand: softmax over keys 0..i only.
  i = 5
  q64, k64, v64 = (np.asarray(x, np.float64)[0, :, 0] for x in (q, k, v))
  logits = q64[i] @ k64[: i + 1].T / np.sqrt(8)
  p = np.exp(logits - logits.max())
  np.testing.assert_allclose(ref[0, i, 0], (p / p.sum()) @ v64[: i + 1], rtol=1e-5, atol=1e-6)
  mask = jnp.arange(n)[None, :] <= jnp.arange(n)[:, None]
  by_mask, _ = L.attention(q, k, v, return_weights=True, mask=mask)
  fused_mask, _ = L.attention(q, k, v, implementation="xla", pad_to=pad_to, mask=mask)
  np.testing.assert_allclose(by_mask, ref, rtol=1e-6, atol=1e-6)
  np.testing.assert_allclose(fused_mask, ref, rtol=1e-5, atol=1e-5)


def test_crate_gpt_fused_and_weights_paths_agree(tokens):
  model, params = _build("crate", True)
  fused = models.TextModel(**SMALL, block="crate", causal=True, attention_impl="xla")
  out = model.apply({"params": params}, tokens)
  np.testing.assert_allclose(fused.apply({"params": params}, tokens), out, rtol=1e-4, atol=1e-4)
  logits, inter = model.apply({"params": params}, tokens, return_intermediates=True)
  np.testing.assert_allclose(logits, out, rtol=1e-5, atol=1e-5)
  assert inter["attention"].shape == (2, 2, 4, 12, 12)
  assert float(jnp.abs(jnp.triu(inter["attention"], 1)).max()) == 0.0


def test_sequence_longer_than_position_table_is_one_clear_error():
  model, params = _build("crate", True)
  with pytest.raises(ValueError, match=r"17 tokens is longer than .*max_len=16"):
    model.apply({"params": params}, jnp.zeros((1, 17), jnp.int32))


def test_family_api_and_scan_layout(tokens):
  """head / layer ids / layer outputs / FLOPs, and a scanned model equal to the unrolled one."""
  model, params = _build("crate", True, tie_embeddings=False)
  assert models.head_params(model) == ("lm_head", "classifier")
  ids = models.layer_ids(model, params)
  assert ids["embedding"] == 0 and ids["pos_embedding"] == 0
  assert ids["layer_1"]["ista"]["D"] == 2 and ids["lm_head"]["kernel"] == 3
  assert ids["final_norm"]["scale"] == 3
  _, inter = model.apply({"params": params}, tokens, return_intermediates=True)
  assert models.layer_outputs(model, inter).shape == (2, 2, 12, 32)
  assert float(models.layer_outputs(model, inter).min()) >= 0.0  # ISTA codes are non-negative
  gpt, gpt_params = _build("transformer", True)
  _, gpt_inter = gpt.apply({"params": gpt_params}, tokens, return_intermediates=True)
  assert models.layer_outputs(gpt, gpt_inter).shape == (2, 2, 12, 32)
  # FLOPs: CRATE's layer has no MLP, so it is cheaper than the baseline of the same size.
  assert 0 < models.forward_flops(model) < models.forward_flops(gpt)
  scanned = models.TextModel(**SMALL, block="crate", causal=True, tie_embeddings=False,
                             scan_layers=True)
  scanned_params = models.scan_layout(params, True)
  assert "layer_scan" in scanned_params
  np.testing.assert_allclose(scanned.apply({"params": scanned_params}, tokens),
                             model.apply({"params": params}, tokens), rtol=1e-5, atol=1e-5)


def test_registry_sizes_match_the_baselines():
  """CRATE-GPT-small has GPT-2 small's width/depth/heads and about half its parameters."""
  count = lambda name: sum(x.size for x in jax.tree.leaves(jax.eval_shape(
      models.get(name).init, jax.random.key(0), jnp.zeros((1, 4), jnp.int32))["params"]))
  assert models.variant_kwargs("crate_gpt_small")["dim"] == 768
  gpt, crate = count("gpt_small"), count("crate_gpt_small")
  assert 124e6 < gpt < 125e6  # GPT-2 small (124M with a 50,257 vocabulary; ours pads to 50,304)
  assert 0.4 < crate / gpt < 0.6


@pytest.mark.parametrize("block", ["crate", "transformer"])
@pytest.mark.parametrize("scan", [False, True])
def test_classifier_logits_do_not_depend_on_padding(block, scan):
  """A sequence classifier never attends to pad tokens: the same text padded to 16 or to 40
  tokens gives the same logits (without the key mask they differ by ~1e-2)."""
  kw = dict(vocab_size=259, max_len=64, dim=32, depth=2, heads=4, dim_head=8, block=block,
            causal=False, num_classes=3, scan_layers=scan, drop_path_rate=0.1)
  model = models.TextModel(**kw)
  rng = np.random.default_rng(0)
  text = rng.integers(0, 256, (2, 11))
  pad = model.pad_id

  def padded(n):
    return jnp.asarray(np.pad(text, ((0, 0), (0, n - text.shape[1])), constant_values=pad))
  params = model.init(jax.random.key(0), padded(16))["params"]
  short, long = (np.asarray(model.apply({"params": params}, padded(n))) for n in (16, 40))
  np.testing.assert_allclose(short, long, atol=1e-5, rtol=1e-5)
  attended = np.asarray(model.apply({"params": params}, padded(40).at[:, -1].set(7)))
  assert np.abs(attended - long).max() > 1e-4  # a real token there does change them


def _official_gpt_forward(params, tokens, heads, eta=0.1, lambd=0.1):
  """The official CRATE-GPT forward, written from its equations in float64: pre-norm LayerNorms,
  causal MSSA with q = k = v = U^T z, W_out + b_out, then ISTA without residual, no final LN, a
  head tied to the token embedding."""
  p = jax.tree.map(lambda a: np.asarray(a, np.float64), params)

  def ln(x, q):
    mu = x.mean(-1, keepdims=True)
    var = ((x - mu) ** 2).mean(-1, keepdims=True)
    return (x - mu) / np.sqrt(var + 1e-5) * q["scale"] + q["bias"]

  t = tokens.shape[1]
  z = p["embedding"][np.asarray(tokens)] + p["pos_embedding"][:t]
  later = np.triu(np.ones((t, t), bool), 1)
  for i in range(len([k for k in p if k.startswith("layer_")])):
    q = p[f"layer_{i}"]
    w = np.einsum("bnd,dhp->bhnp", ln(z, q["norm_mssa"]), q["mssa"]["U"])
    s = np.where(later, -np.inf, w @ np.swapaxes(w, -1, -2) / np.sqrt(w.shape[-1]))
    a = np.exp(s - s.max(-1, keepdims=True))
    heads_out = (a / a.sum(-1, keepdims=True)) @ w
    z = z + np.einsum("bhnp,hpd->bnd", heads_out, q["mssa"]["out_kernel"]) + q["mssa"]["out_bias"]
    x, D = ln(z, q["norm_ista"]), q["ista"]["D"]
    z = np.maximum(x + eta * (x @ D - (x @ D.T) @ D) - eta * lambd, 0.0)
  assert heads == q["mssa"]["U"].shape[1]
  return z @ p["embedding"].T


def test_crate_gpt_registry_models_follow_the_official_model():
  """crate_gpt_*: no final LayerNorm (the baselines and CRATE-BERT keep theirs), GPT-2's init
  (U ~ N(0, 0.02), W_out ~ N(0, 0.02 / sqrt(2 L)), zero b_out, kaiming-uniform D, N(0, 0.02)
  embeddings), and logits equal to the official forward computed in float64."""
  model = models.get("crate_gpt_tiny", max_len=16)
  tokens = jax.random.randint(jax.random.key(3), (2, 12), 0, model.vocab_size)
  params = jax.jit(model.init)(jax.random.key(0), tokens)["params"]
  assert "final_norm" not in params
  for name in ("gpt_tiny", "crate_bert_tiny", "bert_tiny"):
    shapes = jax.eval_shape(models.get(name).init, jax.random.key(0), tokens)["params"]
    assert "final_norm" in shapes, name
  d, depth = model.dim, model.depth
  mssa = params["layer_0"]["mssa"]
  np.testing.assert_allclose(np.std(mssa["U"]), 0.02, rtol=0.1)
  np.testing.assert_allclose(np.std(mssa["out_kernel"]), 0.02 / np.sqrt(2 * depth), rtol=0.1)
  assert float(jnp.abs(mssa["out_bias"]).max()) == 0.0
  bound = np.sqrt(6.0 / d)
  D = np.asarray(params["layer_1"]["ista"]["D"])
  assert np.abs(D).max() <= bound and np.std(D) > 0.9 * bound / np.sqrt(3)
  np.testing.assert_allclose(np.std(params["embedding"]), 0.02, rtol=0.1)
  logits = np.asarray(model.apply({"params": params}, tokens), np.float64)
  ref = _official_gpt_forward(params, tokens, model.heads)
  np.testing.assert_allclose(logits, ref, rtol=1e-4, atol=1e-4 * np.abs(ref).max())


def test_official_crate_gpt_sizes_in_the_registry():
  """crate / crate-medium / crate-large / crate-xl = crate_gpt_{small,medium,large,xl}."""
  for name, (dim, depth, heads) in {"small": (768, 12, 12), "medium": (1024, 24, 16),
                                    "large": (1280, 36, 20), "xl": (1600, 48, 25)}.items():
    kw = models.variant_kwargs(f"crate_gpt_{name}")
    assert (kw["dim"], kw["depth"], kw["heads"], kw["dim_head"]) == (dim, depth, heads, 64)
    assert (kw["vocab_size"], kw["max_len"]) == (50_304, 1024)
    assert models.variant_kwargs(f"gpt_{name}")["dim"] == dim
  assert models.variant_kwargs("crate_bert_large")["dim"] == 1024


def test_final_norm_parameters_without_final_norm_are_one_clear_error():
  """Parameters with a final LayerNorm (crate_gpt_* before the official model) are refused by a
  model built without one, instead of silently skipping it."""
  with_norm, params = _build("crate", True)
  assert "final_norm" in params
  without = models.TextModel(**SMALL, block="crate", causal=True, final_norm=False)
  with pytest.raises(ValueError, match="final_norm=True"):
    without.apply({"params": params}, jnp.zeros((1, 4), jnp.int32))
