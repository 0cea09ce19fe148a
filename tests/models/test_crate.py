"""The CRATE model: exact parity with the official PyTorch architecture, counts, shapes, errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import CRATE, models
from crate_jax.interop import torch_keys

torch = pytest.importorskip("torch")
from crate_jax.interop.torch_reference import CRATE as TorchCRATE  # noqa: E402

SMALL = dict(image_size=32, patch_size=8, num_classes=7, dim=48, depth=3, heads=4, dim_head=16)
TINY_T = dict(image_size=224, patch_size=16, num_classes=1000, dim=384, depth=12, heads=6,
              dim_head=64)


def _pair(cfg, seed=0, pool="cls"):
  torch.manual_seed(seed)
  ref = TorchCRATE(**cfg, pool=pool).eval()
  # Perturb LayerNorms and biases too, so every tensor matters to the comparison.
  with torch.no_grad():
    for name, p in ref.named_parameters():
      if "norm" in name or name.endswith("bias") or name.startswith("mlp_head.0"):
        p.add_(0.1 * torch.randn_like(p))
  flax_model = CRATE(**cfg, pool=pool)
  expected = jax.eval_shape(flax_model.init, jax.random.key(0),
                            jnp.zeros((1, cfg["image_size"], cfg["image_size"], 3)))["params"]
  params = torch_keys.torch_to_flax(ref.state_dict(), expected, depth=cfg["depth"],
                                    heads=cfg["heads"], dim_head=cfg["dim_head"])
  return ref, flax_model, params


def _images(cfg, b=2, seed=1):
  return np.random.default_rng(seed).normal(size=(b, 3, cfg["image_size"], cfg["image_size"])
                                            ).astype(np.float32)


def _run_pair(cfg, pool, dtype):
  """Logits, per-layer outputs and last attention of both models, computed in `dtype` (computed
  once per case: the float64 run serves both the parity and the float32 rounding test)."""
  return _run_pair_once(tuple(sorted(cfg.items())), pool, dtype)


@functools.lru_cache(maxsize=None)
def _run_pair_once(cfg_items, pool, dtype):
  cfg = dict(cfg_items)
  ref, model, params = _pair(cfg, pool=pool)
  x = _images(cfg)
  tdtype = torch.float64 if dtype == np.float64 else torch.float32
  ref = ref.to(tdtype)
  collected = []
  with torch.no_grad():
    want = ref(torch.from_numpy(x).to(tdtype), collected).numpy()
  want_layers = [t.numpy() for t in collected]
  want_attn = ref.transformer.layers[-1][0].fn.attn.numpy()
  params = jax.tree.map(lambda a: np.asarray(a, dtype), params)
  with jax.enable_x64(dtype == np.float64), jax.default_matmul_precision("highest"):
    logits, out = CRATE(**cfg, pool=pool, dtype=jnp.dtype(dtype)).apply(
        {"params": params}, x.transpose(0, 2, 3, 1).astype(dtype), return_intermediates=True)
    got = (np.asarray(logits), [np.asarray(c) for c in out["codes"]],
           np.asarray(out["attention"][-1]))
  assert got[0].dtype == dtype
  return (want, want_layers, want_attn), got


CASES = pytest.mark.parametrize("cfg,pool", [(SMALL, "cls"), (SMALL, "mean"), (TINY_T, "cls")],
                                ids=["small-cls", "small-mean", "crate_tiny"])


@CASES
def test_parity_with_official_architecture_in_float64(cfg, pool):
  """In float64 on both sides the two implementations agree to ~1e-10: same maths, any CPU."""
  (want, want_layers, want_attn), (logits, layers, attn) = _run_pair(cfg, pool, np.float64)
  np.testing.assert_allclose(logits, want, atol=1e-10, rtol=1e-10)
  for i, (a, b) in enumerate(zip(layers, want_layers)):  # every layer's output Z^{l+1}
    np.testing.assert_allclose(a, b, atol=1e-10, rtol=1e-10, err_msg=f"layer {i}")
  np.testing.assert_allclose(attn, want_attn, atol=1e-12)


@CASES
def test_float32_rounding_stays_at_the_size_of_the_official_models_own(cfg, pool):
  """In float32 the error against the float64 reference is bounded relative to each layer's
  magnitude. The official model's own float32-vs-float64 error is ~2e-5 of the max after 12
  layers (CPU-dependent: kernels and summation order differ between instruction sets), so the
  bound, 2e-4 of the max, holds on any CPU while a wrong op (errors of order 1) cannot pass."""
  (ref64, ref64_layers, attn64), _ = _run_pair(cfg, pool, np.float64)
  (ref32, ref32_layers, _), (logits, layers, attn) = _run_pair(cfg, pool, np.float32)
  rel = lambda a, b: float(np.abs(a - b).max() / np.abs(b).max())
  assert rel(ref32, ref64) < 2e-4  # the reference's own rounding, for scale
  assert rel(logits, ref64) < 2e-4, rel(logits, ref64)
  for i, (a, b) in enumerate(zip(layers, ref64_layers)):
    assert rel(a, b) < 2e-4, (i, rel(a, b), rel(ref32_layers[i], b))
  assert float(np.abs(attn - attn64).max()) < 1e-5


def test_round_trip_of_key_map():
  ref, _, params = _pair(SMALL)
  back = torch_keys.flax_to_torch(params, depth=3, heads=4, dim_head=16)
  sd = ref.state_dict()
  assert set(back) == set(sd)
  for k, v in sd.items():
    np.testing.assert_array_equal(back[k], v.numpy(), err_msg=k)


@pytest.mark.parametrize("name,count", [("crate_tiny", 6_090_856), ("crate_small", 13_116_328),
                                        ("crate_base", 22_796_008), ("crate_large", 77_641_192)])
def test_param_counts(name, count):
  model = models.get(name)
  shapes = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
  assert sum(x.size for x in jax.tree.leaves(shapes)) == count


def test_torch_reference_param_counts_agree():
  ref = TorchCRATE(**TINY_T)
  assert sum(p.numel() for p in ref.parameters()) == 6_090_856


def test_shapes_nonnegativity_and_init_statistics():
  model = CRATE(**SMALL)
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))  # batch 2, depth 3: axes told apart
  variables = model.init(jax.random.key(0), x)
  logits, out = model.apply(variables, x, return_intermediates=True)
  n = (32 // 8) ** 2 + 1
  assert logits.shape == (2, 7) and logits.dtype == jnp.float32
  assert out["features"].shape == (3, 2, n, 4, 16)
  assert out["attention"].shape == (3, 2, 4, n, n)
  assert out["codes"].shape == out["mssa"].shape == out["normed"].shape == (3, 2, n, 48)
  assert out["tokens"].shape == (2, n, 48) and out["pre_logits"].shape == (2, 48)
  # No residual around ISTA: every layer output is a ReLU, hence >= 0, and some entries are 0.
  assert float(out["codes"].min()) >= 0.0
  assert float((out["codes"] == 0).mean()) > 0.0
  np.testing.assert_allclose(np.asarray(out["attention"].sum(-1)), 1.0, atol=1e-5)
  p = variables["params"]
  # torch.randn init for cls/pos, kaiming-uniform D bound sqrt(6/d).
  assert 0.8 < float(jnp.std(p["pos_embedding"])) < 1.2
  assert float(jnp.abs(p["layer_0"]["ista"]["D"]).max()) <= np.sqrt(6 / 48)


def test_bf16_compute_keeps_fp32_params():
  model = CRATE(**SMALL, dtype=jnp.bfloat16)
  x = jnp.ones((2, 32, 32, 3))
  variables = model.init(jax.random.key(0), x)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(variables))
  logits, out = model.apply(variables, x, return_intermediates=True)
  assert logits.dtype == jnp.float32 and out["codes"].dtype == jnp.bfloat16
  ref = CRATE(**SMALL).apply(variables, x)
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15)


def test_remat_gives_same_gradients():
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = CRATE(**SMALL).init(jax.random.key(0), x)
  two = {k: v for k, v in variables["params"].items() if k != "layer_2"}  # depth 2 is enough

  def grads(remat):
    loss = lambda p: CRATE(**{**SMALL, "depth": 2}, remat=remat).apply({"params": p}, x).sum()
    return jax.jit(jax.grad(loss))(two)

  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads(False), grads(True))


def test_fused_attention_path_matches_einsum(monkeypatch):
  """CRATE's fused path goes through the cuDNN token padding (forced here for "xla", as cuDNN
  needs a GPU): 17 tokens -> 32, the padded keys masked, the same logits."""
  from crate_jax.models import layers
  x = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))
  variables = CRATE(**SMALL).init(jax.random.key(0), x)
  calls, fused = [], jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    calls.append((q.shape, kw["key_value_seq_lengths"].shape))
    return fused(q, k, v, **kw)

  monkeypatch.setattr(layers, "PAD_TOKENS_TO", {"xla": 16})
  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  with jax.default_matmul_precision("highest"):
    a = CRATE(**SMALL).apply(variables, x)
    b = CRATE(**SMALL, attention_impl="xla").apply(variables, x)
  assert calls == [((2, 32, 4, 16), (2,))] * SMALL["depth"]
  np.testing.assert_allclose(np.asarray(a), np.asarray(b), atol=1e-5)


@pytest.mark.parametrize("shape,msg", [((1, 30, 32, 3), "not divisible by patch_size=8"),
                                       ((1, 32, 32, 1), "1 channels"),
                                       ((1, 64, 64, 3), "image_size=32"),
                                       ((32, 32, 3), "batch, height, width, channels")])
def test_bad_inputs_raise_clear_errors(shape, msg):
  model = CRATE(**SMALL)
  with pytest.raises(ValueError, match=msg):
    jax.eval_shape(model.init, jax.random.key(0), jnp.zeros(shape))


def test_unknown_variant_and_argument():
  with pytest.raises(ValueError, match="unknown model 'crate_huge'.*crate_base"):
    models.get("crate_huge")
  with pytest.raises(ValueError, match="no argument.*'depht'"):
    models.get("crate_tiny", depht=3)


def test_converter_rejects_mismatched_state_dicts():
  ref, model, _ = _pair(SMALL)
  expected = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, 32, 32, 3)))["params"]
  sd = {"module." + k: v for k, v in ref.state_dict().items()}
  torch_keys.torch_to_flax(sd, expected, depth=3, heads=4, dim_head=16)  # prefix accepted
  bad = dict(sd)
  del bad["module.transformer.layers.1.1.fn.weight"]
  with pytest.raises(ValueError, match=r"missing keys \['transformer.layers.1.1.fn.weight'\]"):
    torch_keys.torch_to_flax(bad, expected, depth=3, heads=4, dim_head=16)
  bad = dict(sd, **{"module.transformer.layers.0.1.fn.weight": torch.zeros(48, 40)})
  with pytest.raises(ValueError, match=r"'transformer.layers.0.1.fn.weight' has shape \(48, 40\)"):
    torch_keys.torch_to_flax(bad, expected, depth=3, heads=4, dim_head=16)


def test_padded_fused_attention_equals_unpadded():
  """The token padding used for cuDNN (197 -> 208, padded keys masked) changes nothing."""
  from crate_jax.models import layers
  w = jax.random.normal(jax.random.key(0), (2, 197, 3, 16))
  q, k, v = (jax.random.normal(jax.random.key(i), (2, 197, 3, 16)) for i in (1, 2, 3))
  with jax.default_matmul_precision("highest"):
    for args in ((w, w, w), (q, k, v)):  # the tied (MSSA) and the untied (ViT) case
      want, weights = layers.attention(*args, return_weights=True)
      np.testing.assert_allclose(np.asarray(weights.sum(-1)), 1.0, atol=1e-5)
      for pad_to in (1, 16):  # unpadded fused kernel, and the cuDNN padding
        got, none = layers.attention(*args, implementation="xla", pad_to=pad_to)
        assert none is None
        np.testing.assert_allclose(np.asarray(got), np.asarray(want), atol=1e-5)
  assert layers.PAD_TOKENS_TO["cudnn"] == 16
