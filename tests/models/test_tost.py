"""ToST, whole models: the image classifier (eval and train mode, with the stem's batch-norm
statistics) and the causal language model equal PyTorch references of the official code
(crate_jax.interop.tost_reference: tost_vision/tost.py, tost_lang/model_TSSA.py), from random
weights on every tensor; float64 to ~1e-10 of the largest logit, float32 to rounding. And the two
size errors."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.interop import tost_keys

torch = pytest.importorskip("torch")
from crate_jax.interop import tost_reference as ref_lib  # noqa: E402

# Small models of the official architecture; the images are not square and, at patch 8, not a
# multiple of the patch (28 -> 14 -> 7 -> 4 tokens per side), so the stem's padding and the
# positions' y-then-x order both matter.
VISION = dict(dim=64, depth=2, heads=4, num_classes=5)
IMAGES = {16: (64, 48), 8: (28, 36)}
LM = dict(vocab_size=40, max_len=16, dim=32, depth=2, heads=4, dim_head=8)
TOKENS = 12   # < max_len: denom_bias and the positions are sliced


def perturb(module: "torch.nn.Module", seed: int) -> None:
  """Every parameter and floating buffer of a reference set away from its init: temp in
  [0.5, 2], LayerScale gammas in [0.1, 1], denom_bias ~ 0.3 N(0, 1), running means ~ 0.2 N,
  running variances in [0.5, 2], norm scales 1 + 0.2 N, biases 0.2 N, matrices (and the class
  token, the embeddings) N(0, 1 / fan_in)."""
  g = torch.Generator().manual_seed(seed)
  items = list(module.named_parameters()) + [
      (n, b) for n, b in module.named_buffers() if b.is_floating_point()]
  with torch.no_grad():
    for name, p in items:
      leaf = name.rsplit(".", 1)[-1]
      normal = torch.randn(p.shape, generator=g, dtype=p.dtype)
      uniform = torch.rand(p.shape, generator=g, dtype=p.dtype)
      if leaf in ("temp", "running_var"):
        p.copy_(0.5 + 1.5 * uniform)
      elif leaf.startswith("gamma"):
        p.copy_(0.1 + 0.9 * uniform)
      elif leaf == "denom_bias":
        p.copy_(0.3 * normal)
      elif leaf == "running_mean" or leaf == "bias":
        p.copy_(0.2 * normal)
      elif leaf == "weight" and p.ndim == 1:
        p.copy_(1.0 + 0.2 * normal)
      else:
        p.copy_(normal / np.sqrt(p[0].numel()))


def vision_reference(patch: int, seed: int = 0):
  """A perturbed reference in float32 (the official tost_cab_* construction at VISION's size)."""
  torch.manual_seed(seed)
  ref = ref_lib.tost_cab(patch_size=patch, embed_dim=VISION["dim"], depth=VISION["depth"],
                         num_heads=VISION["heads"], eta=1.0, num_classes=VISION["num_classes"])
  perturb(ref, seed + 1)
  return ref


def vision_model(patch: int, **kw):
  return models.get(f"tost_cab_tiny_12_p{patch}", **VISION, image_size=IMAGES[patch][0], **kw)


def lm_reference(seed: int = 0, bias: bool = True):
  torch.manual_seed(seed)
  ref = ref_lib.GPT(ref_lib.GPTConfig(block_size=LM["max_len"], vocab_size=LM["vocab_size"],
                                      n_layer=LM["depth"], n_head=LM["heads"], n_embd=LM["dim"],
                                      bias=bias))
  perturb(ref, seed + 1)
  return ref


def lm_model(**kw):
  return models.get("tost_gpt_tiny", **LM, **kw)


def abstract_params(model, example):
  return jax.eval_shape(functools.partial(models.init_params, model), jax.random.key(0),
                        example)


def _stats(sd, patch):
  """{bn_i: (running_mean, running_var)} of a reference's state dict."""
  return {f"bn_{i}": tuple(sd[f"patch_embed.proj.{2 * i}.1.running_{s}"].double().numpy()
                           for s in ("mean", "var"))
          for i in range(tost_keys.stem_stages(patch))}


@functools.lru_cache(maxsize=None)
def _vision_run(patch: int, dtype_name: str):
  """(torch, ours): each (eval logits, train logits, running statistics after the train-mode
  forward), both sides from the same float32 weights computed in `dtype_name`."""
  dtype = np.dtype(dtype_name)
  tdtype = torch.float64 if dtype == np.float64 else torch.float32
  ref = vision_reference(patch)
  model = vision_model(patch, dtype=jnp.dtype(dtype))
  h, w = IMAGES[patch]
  params = tost_keys.vision_to_flax(ref.state_dict(), abstract_params(
      vision_model(patch), jax.ShapeDtypeStruct((1, h, w, 3), jnp.float32)), model)
  x = np.random.default_rng(2).normal(size=(3, h, w, 3)).astype(dtype)
  ref = ref.to(tdtype)
  xt = torch.from_numpy(x.transpose(0, 3, 1, 2).copy())
  with torch.no_grad():
    want_eval = ref.eval()(xt).numpy()
    want_train = ref.train()(xt).numpy()
  want = (want_eval, want_train, _stats(ref.state_dict(), patch))

  def both(p, images):
    logits = model.apply(models.variables(p), images)
    train_logits, state = models.apply_train(model, p, images,
                                             rngs={"dropout": jax.random.key(0)})
    return logits, train_logits, state

  with jax.enable_x64(dtype == np.float64), jax.default_matmul_precision("highest"):
    p = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    logits, train_logits, state = jax.jit(both)(p, x)
    got = (np.asarray(logits), np.asarray(train_logits),
           {k: (np.asarray(v["mean"], np.float64), np.asarray(v["var"], np.float64))
            for k, v in state["patch_embed"].items()})
  assert got[0].dtype == dtype and got[1].dtype == dtype
  before = {k: (np.asarray(v["mean"]), np.asarray(v["var"]))
            for k, v in params["batch_stats"]["patch_embed"].items()}
  return want, got, before


def _rel(got, want):
  return float(np.abs(np.asarray(got) - want).max() / np.abs(want).max())


def _check_vision(patch, dtype_name, logit_tol, stat_tol):
  (want_eval, want_train, want_stats), (got_eval, got_train, got_stats), before = _vision_run(
      patch, dtype_name)
  assert np.abs(want_eval - want_train).max() > 0.05 * np.abs(want_eval).max()  # modes differ
  errors = {"eval": _rel(got_eval, want_eval), "train": _rel(got_train, want_train)}
  for name, (mean, var) in want_stats.items():
    assert np.abs(mean - before[name][0]).max() > 1e-3   # the train forward moved them
    errors[f"{name} mean"] = _rel(got_stats[name][0], mean)
    errors[f"{name} var"] = _rel(got_stats[name][1], var)
  print(f"patch {patch} {dtype_name}: max |ours - torch| / max |torch|:", errors)
  assert errors["eval"] < logit_tol and errors["train"] < logit_tol, errors
  assert max(v for k, v in errors.items() if k.startswith("bn")) < stat_tol, errors


@pytest.mark.parametrize("patch", [16, 8])
def test_vision_equals_the_official_in_float64_eval_and_train(patch):
  """Logits to 1e-10 in both modes. The updated running statistics agree to float32 rounding
  only: `tost.BatchNorm` rounds the batch's mean / variance to float32 before blending them
  into the state (PyTorch: running <- 0.9 running + 0.1 batch, the variance unbiased)."""
  _check_vision(patch, "float64", logit_tol=1e-10, stat_tol=1e-7)


@pytest.mark.parametrize("patch", [16, 8])
def test_vision_equals_the_official_in_float32_eval_and_train(patch):
  _check_vision(patch, "float32", logit_tol=1e-4, stat_tol=1e-5)


@pytest.mark.parametrize("dtype,tol,bias", [(np.float64, 1e-10, False), (np.float32, 1e-4, False),
                                            (np.float64, 1e-10, True)])
def test_causal_lm_equals_the_official(dtype, tol, bias):
  """The official training's bias-free layout (tost_gpt_*'s default), and GPTConfig(bias=True)."""
  ref = lm_reference(bias=bias)
  model = lm_model(dtype=jnp.dtype(dtype), use_bias=bias)
  params = tost_keys.lm_to_flax(ref.state_dict(), abstract_params(
      lm_model(use_bias=bias), jax.ShapeDtypeStruct((1, TOKENS), jnp.int32)), model)
  tokens = np.random.default_rng(3).integers(0, LM["vocab_size"], size=(3, TOKENS))
  ref = ref.to(torch.float64 if dtype == np.float64 else torch.float32).eval()
  with torch.no_grad():
    want = ref.logits(torch.from_numpy(tokens)).numpy()
    last, _ = ref(torch.from_numpy(tokens))
  np.testing.assert_allclose(last.numpy(), want[:, -1:], rtol=0, atol=tol * np.abs(want).max())
  with jax.enable_x64(dtype == np.float64), jax.default_matmul_precision("highest"):
    p = jax.tree.map(lambda a: np.asarray(a, dtype), params)
    got = np.asarray(jax.jit(model.apply)({"params": p}, tokens))
  assert got.dtype == dtype and got.shape == want.shape
  err = _rel(got, want)
  print(f"causal ToST {np.dtype(dtype).name}: max |ours - torch| / max |torch| = {err:.2e}, "
        f"max |logit| = {np.abs(want).max():.3f}")
  assert err < tol


def test_a_patch_size_other_than_8_or_16_is_one_error_naming_it():
  model = models.get("tost_cab_tiny_12_p16", patch_size=4, dim=32, depth=1, heads=2)
  with pytest.raises(ValueError, match=r"patch_size=4") as e:
    model.init(jax.random.key(0), jnp.zeros((1, 32, 32, 3)))
  assert len(str(e.value).splitlines()) == 1
  with pytest.raises(ValueError, match=r"patch_size=4"):
    ref_lib.tost_cab(patch_size=4, embed_dim=32, depth=1, num_heads=2, eta=1.0)


def test_a_sequence_longer_than_max_len_is_one_error():
  model = lm_model()
  params = jax.jit(functools.partial(models.init_params, model))(jax.random.key(0),
                                                                 jnp.zeros((1, 8), jnp.int32))
  with pytest.raises(ValueError, match=r"17 tokens is longer than .*max_len=16") as e:
    model.apply(models.variables(params), jnp.zeros((1, LM["max_len"] + 1), jnp.int32))
  assert len(str(e.value).splitlines()) == 1
