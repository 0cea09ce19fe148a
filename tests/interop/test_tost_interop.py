"""ToST <-> the official PyTorch layouts (crate_jax.interop.tost_keys): our params exported load
strictly into references of the official classes (crate_jax.interop.tost_reference) and give the
same logits; an official state dict imported by `python -m crate_jax.convert` gives the
reference's logits and exports back to the same tensors; a state dict of another family is one
error naming the keys."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert, export, models
from crate_jax.interop import converters, exporters, torch_keys, tost_keys
from crate_jax.training import checkpoint as ckpt_lib
from tests.models.test_tost import (IMAGES, LM, VISION, abstract_params, lm_reference,
                                    vision_model, vision_reference)

torch = pytest.importorskip("torch")
from crate_jax.interop import tost_reference as ref_lib  # noqa: E402

PATCH = 8
H, W = IMAGES[PATCH]


def _random_params(model, example, seed):
  """Our params tree for `model` with random values (no init run): positive leaves (temp,
  running variances) in [0.5, 2], LayerScale gammas in [0.1, 1], norm scales 1 + 0.2 N(0, 1),
  everything else 0.2 N(0, 1)."""
  rng = np.random.default_rng(seed)

  def leaf(path, a):
    name = str(getattr(path[-1], "key", path[-1]))
    if name in ("temp", "var"):
      return rng.uniform(0.5, 2.0, a.shape).astype(np.float32)
    if name.startswith("gamma"):
      return rng.uniform(0.1, 1.0, a.shape).astype(np.float32)
    return ((name == "scale") + 0.2 * rng.standard_normal(a.shape)).astype(np.float32)

  return jax.tree_util.tree_map_with_path(leaf, abstract_params(model, example))


def _images(n=3, seed=4):
  return np.random.default_rng(seed).normal(size=(n, H, W, 3)).astype(np.float32)


def _torch_logits(ref, x):
  with torch.no_grad():
    return ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2).copy())).numpy()


def _ours(model, params, x):
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(model.apply)(models.variables(params), x))


def _close(got, want, what):
  err = np.abs(got - want).max() / np.abs(want).max()
  print(f"{what}: max |ours - torch| / max |torch| = {err:.2e}")
  assert np.abs(want).max() > 0.1 and err < 1e-4


def _tensors(sd):
  return {k: torch.from_numpy(np.array(v)) for k, v in sd.items()}


def _fresh_vision():
  return ref_lib.tost_cab(patch_size=PATCH, embed_dim=VISION["dim"], depth=VISION["depth"],
                          num_heads=VISION["heads"], eta=1.0, num_classes=VISION["num_classes"])


def test_our_vision_params_export_strictly_with_the_same_logits_from_either_layer_layout():
  model = vision_model(PATCH)
  params = _random_params(model, jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32), 0)
  sd = exporters.torch_state_dict(model, params)
  counters = [k for k in sd if k.endswith("num_batches_tracked")]
  assert len(counters) == 3 and all(sd[k].dtype == np.int64 and sd[k].shape == () for k in counters)
  ref = _fresh_vision()
  ref.load_state_dict(_tensors(sd), strict=True)
  x = _images()
  _close(_ours(model, params, x), _torch_logits(ref, x), "exported ToST, eval logits")
  # A run with scan_layers saves the blocks stacked: the same state dict.
  stacked = exporters.torch_state_dict(model, models.scan_layout(params, True))
  assert sorted(stacked) == sorted(sd)
  for k in sd:
    np.testing.assert_array_equal(stacked[k], sd[k], err_msg=k)


def test_official_vision_checkpoint_converts_and_exports_back(tmp_path):
  """A perturbed reference after one train-mode step (its running statistics and counters
  moved), saved as the official main.py saves ({'model': ...}), through both commands."""
  models.register("tost_cab_test_p8", models.ToST, patch_size=PATCH, dim=VISION["dim"],
                  depth=VISION["depth"], heads=VISION["heads"], eta=1.0, image_size=H)
  ref = vision_reference(PATCH, seed=5)
  with torch.no_grad():
    ref.train()(torch.randn(4, 3, H, W))
  sd = ref.state_dict()
  assert int(sd["patch_embed.proj.0.1.num_batches_tracked"]) == 1
  torch.save({"model": sd, "epoch": 3}, tmp_path / "tost.pth")
  assert convert.main(["--torch", str(tmp_path / "tost.pth"), "--variant", "tost_cab_test_p8",
                       "--out", str(tmp_path / "ckpt")]) == 0
  params, meta = ckpt_lib.load_params(str(tmp_path / "ckpt"))
  assert meta["model_kwargs"] == {"num_classes": VISION["num_classes"]}
  model = models.get("tost_cab_test_p8", **meta["model_kwargs"])
  x = _images()
  want = _torch_logits(ref, x)
  _close(_ours(model, params, x), want, "converted official ToST, eval logits")
  assert export.main(["--checkpoint", str(tmp_path / "ckpt"), "--to", "torch",
                      "--out", str(tmp_path / "back.pth")]) == 0
  back = torch.load(tmp_path / "back.pth", weights_only=True)
  assert sorted(back) == sorted(sd)
  for k, v in sd.items():
    if k.endswith("num_batches_tracked"):
      assert back[k].dtype == torch.int64 and back[k].shape == () and int(back[k]) == 0
    else:
      np.testing.assert_array_equal(back[k].numpy(), v.numpy(), err_msg=k)
  fresh = _fresh_vision()
  fresh.load_state_dict(back, strict=True)
  _close(_torch_logits(fresh, x), want, "exported back, eval logits")


def _lm_logits(ref, tokens):
  with torch.no_grad():
    return ref.eval().logits(torch.from_numpy(tokens)).numpy()


def _lm_ours(model, params, tokens):
  with jax.default_matmul_precision("highest"):
    return np.asarray(jax.jit(model.apply)({"params": params}, tokens))


def test_causal_tost_exports_by_the_command_and_imports_back(tmp_path):
  """tost_gpt_tiny's params (tied head) -> export --to torch -> the official GPT loads them
  strictly (lm_head.weight = transformer.wte.weight) -> same logits -> convert -> the same
  params."""
  model = models.get("tost_gpt_tiny")
  params = _random_params(model, jax.ShapeDtypeStruct((1, 8), jnp.int32), 1)
  ckpt_lib.save_params(str(tmp_path / "ckpt"), params, {"model": "tost_gpt_tiny",
                                                        "model_kwargs": {}})
  assert export.main(["--checkpoint", str(tmp_path / "ckpt"), "--to", "torch",
                      "--out", str(tmp_path / "gpt.pth")]) == 0
  sd = torch.load(tmp_path / "gpt.pth", weights_only=True)
  assert torch.equal(sd["lm_head.weight"], sd["transformer.wte.weight"])
  ref = ref_lib.GPT(ref_lib.GPTConfig(block_size=model.max_len, vocab_size=model.vocab_size,
                                      n_layer=model.depth, n_head=model.heads, n_embd=model.dim,
                                      bias=False))   # the official training's layout
  ref.load_state_dict(sd, strict=True)
  tokens = np.random.default_rng(5).integers(0, model.vocab_size, size=(2, 20))
  want = _lm_logits(ref, tokens)
  _close(_lm_ours(model, params, tokens), want, "exported causal ToST, logits")
  back, kwargs = converters.convert_state_dict({"model": sd}, "tost_gpt_tiny")
  assert kwargs == {"vocab_size": model.vocab_size, "max_len": model.max_len, "use_bias": False}
  jax.tree.map(lambda a, b: np.testing.assert_array_equal(np.asarray(a), b), params, back)


def test_the_official_bias_free_compiled_lm_checkpoint_imports():
  """The official train.py's GPTConfig(bias=False) saved from a torch.compile'd model
  ('_orig_mod.' keys, nanoGPT's {'model': ..., 'model_args': ...}) imports as a bias-free
  model (use_bias inferred), or into one with biases (zero biases). Its denom_bias rows past
  wpe's (the official crop_block_size crops wpe only) are dropped."""
  ref = lm_reference(seed=7, bias=False)
  sd = {"_orig_mod." + k: (torch.cat([v, torch.randn(v.shape[0], 4, 1)], 1)
                           if k.endswith("denom_bias") else v)
        for k, v in ref.state_dict().items()}
  assert not any(k.endswith(".bias") for k in sd)
  tokens = np.random.default_rng(6).integers(0, LM["vocab_size"], size=(2, 11))
  for use_bias in (None, True):
    extra = {} if use_bias is None else {"use_bias": True}
    params, kwargs = converters.convert_state_dict(
        {"model": sd, "model_args": {"bias": False}}, "tost_gpt_tiny", dim=LM["dim"],
        depth=LM["depth"], heads=LM["heads"], dim_head=LM["dim_head"], **extra)
    assert kwargs["vocab_size"] == LM["vocab_size"] and kwargs["max_len"] == LM["max_len"]
    assert kwargs["use_bias"] is bool(use_bias)
    biases = params["layer_0"]["attn"]["qkv"].get("bias")
    assert biases is None if not use_bias else float(np.abs(biases).max()) == 0.0
    model = models.get("tost_gpt_tiny", **kwargs)
    _close(_lm_ours(model, params, tokens), _lm_logits(ref, tokens), "bias-free official LM")


def _one_line_error(fn, *needles):
  with pytest.raises(ValueError) as e:
    fn()
  message = str(e.value)
  assert len(message.splitlines()) == 1 and all(n in message for n in needles), message
  return message


def test_a_state_dict_of_another_family_is_one_error_naming_the_keys():
  crate = models.get("crate_tiny", image_size=32, dim=32, depth=1, heads=2, dim_head=16,
                     num_classes=5)
  crate_params = jax.tree.map(lambda a: np.zeros(a.shape, np.float32), abstract_params(
      crate, jax.ShapeDtypeStruct((1, 32, 32, 3), jnp.float32)))
  crate_sd = torch_keys.flax_to_torch(crate_params, depth=1, heads=2, dim_head=16)
  vision_sd = vision_reference(PATCH).state_dict()
  lm_sd = lm_reference().state_dict()
  for sd, variant, missing, unexpected in (
      (crate_sd, "tost_cab_tiny_12_p16", "'patch_embed.proj.0.0.weight'", "'pos_embedding'"),
      (vision_sd, "crate_tiny", "'pos_embedding'", "'patch_embed.proj.0.0.weight'"),
      (vision_sd, "tost_gpt_tiny", "'transformer.wte.weight'", "'cls_token'"),
      (lm_sd, "tost_cab_tiny_12_p8", "'cls_token'", "'transformer.wte.weight'")):
    message = _one_line_error(lambda: converters.convert_state_dict(sd, variant, depth=1),
                              "missing keys", "unexpected keys", missing, unexpected)
    print(f"{variant}: {message[:160]}...")


def test_bad_tost_tensors_are_named():
  small = dict(dim=VISION["dim"], depth=VISION["depth"], heads=VISION["heads"])
  sd = dict(vision_reference(PATCH).state_dict())
  sd["blocks.1.attn.temp"] = torch.ones(VISION["heads"], 2)     # the official is (h, 1)
  _one_line_error(lambda: converters.convert_state_dict(sd, "tost_cab_tiny_12_p8", **small),
                  "'blocks.1.attn.temp' has shape (4, 2) but block_1/attn/temp expects (4,)")
  _one_line_error(lambda: converters.convert_state_dict(
      vision_reference(PATCH).state_dict(), "tost_cab_tiny_12_p8", lambd=0.5, **small),
      "--lambd does not apply")
  lm_small = {k: LM[k] for k in ("dim", "depth", "heads", "dim_head")}
  lm_sd = dict(lm_reference().state_dict())
  lm_sd["lm_head.weight"] = lm_sd["lm_head.weight"] + 1.0
  _one_line_error(lambda: converters.convert_state_dict(lm_sd, "tost_gpt_tiny", **lm_small),
                  "'lm_head.weight' differs from 'transformer.wte.weight'")
  untied = models.get("tost_gpt_tiny", tie_embeddings=False)
  with pytest.raises(exporters.ExportError, match="tie_embeddings=False"):
    exporters.torch_state_dict(untied, {})


def test_expected_shapes_come_from_the_models():
  """The key maps cover every leaf of our params trees (nothing left at its init)."""
  model = vision_model(PATCH)
  expected = abstract_params(model, jax.ShapeDtypeStruct((1, H, W, 3), jnp.float32))
  key_map = tost_keys.vision_key_map(depth=VISION["depth"], heads=VISION["heads"],
                                     dim_head=VISION["dim"] // VISION["heads"], patch_size=PATCH)
  paths = {p for p, _, _ in key_map.values()}
  leaves = {tuple(str(getattr(k, "key", k)) for k in path)
            for path, _ in jax.tree_util.tree_leaves_with_path(expected)}
  assert paths == leaves
  for use_bias in (False, True):   # tost_gpt_*'s bias-free default, and GPTConfig(bias=True)
    lm = models.get("tost_gpt_tiny", use_bias=use_bias)
    expected = abstract_params(lm, jax.ShapeDtypeStruct((1, 8), jnp.int32))
    key_map = tost_keys.lm_key_map(depth=lm.depth, heads=lm.heads, dim_head=lm.dim // lm.heads,
                                   bias=use_bias)
    assert {p for p, _, _ in key_map.values()} == {
        tuple(str(getattr(k, "key", k)) for k in path)
        for path, _ in jax.tree_util.tree_leaves_with_path(expected)}
