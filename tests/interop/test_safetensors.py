"""safetensors both ways: `export --to safetensors` writes the tensors `--to torch` writes (the
official PyTorch classes load them strictly from safetensors.torch.load_file and give our
logits), flat Flax names for the language models; `convert --safetensors` reads either back
bit for bit; a truncated or mismatched file is one error line with nothing written."""
import json
import os
import struct
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import convert, export, models
from crate_jax.interop import converters, exporters, safetensors_io
from crate_jax.training import checkpoint as ckpt_lib

pytest.importorskip("safetensors")
torch = pytest.importorskip("torch")
from safetensors.torch import load_file as torch_load_file  # noqa: E402

from crate_jax.interop import tost_reference as ref_lib  # noqa: E402
from crate_jax.interop.torch_reference import CRATE as TorchCRATE  # noqa: E402
from tests.interop.test_tost_interop import (  # noqa: E402
    _close, _fresh_vision, _lm_logits, _ours, _random_params, _torch_logits)
from tests.models.test_tost import IMAGES, VISION  # noqa: E402

CRATE_ARCH = dict(image_size=16, patch_size=4, num_classes=5, dim=24, depth=2, heads=2,
                  dim_head=12)
TEXT_ARCH = dict(vocab_size=32, max_len=8, dim=16, depth=2, heads=2, dim_head=8)
PATCH = 8


def _saved(root, name, kwargs, example):
  """(checkpoint dir, model, params): random params of `name(**kwargs)` saved as a converted
  checkpoint is."""
  model = models.get(name, **kwargs)
  params = _random_params(model, example, 0)
  path = str(root / "ckpt")
  ckpt_lib.save_params(path, params, {"model": name, "model_kwargs": kwargs})
  return path, model, params


def _export(ckpt, out):
  assert export.main(["--checkpoint", ckpt, "--to", "safetensors", "--out", str(out)]) == 0
  return out


def _import(src, variant, out, *extra, flag="--safetensors"):
  assert convert.main([flag, str(src), "--variant", variant, "--out", str(out), *extra]) == 0
  return ckpt_lib.load_params(str(out))


def _assert_same(got, want):
  """Trees with the same leaves, bit for bit (dtype included)."""
  got, want = safetensors_io.flatten(got), safetensors_io.flatten(want)
  assert sorted(got) == sorted(want)
  for k in want:
    assert got[k].dtype == want[k].dtype, k
    np.testing.assert_array_equal(got[k], want[k], err_msg=k)


def _header(path):
  """The file's JSON header (safetensors: 8-byte little-endian length, then JSON; no pickle)."""
  with open(path, "rb") as f:
    n, = struct.unpack("<Q", f.read(8))
    return json.loads(f.read(n))


def _images(n=3, size=16, seed=4):
  return np.random.default_rng(seed).normal(size=(n, size, size, 3)).astype(np.float32)


def test_crate_exports_the_torch_tensors_loads_strictly_and_imports_back(tmp_path):
  ckpt, model, params = _saved(tmp_path, "crate_tiny", CRATE_ARCH,
                               jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  out = _export(ckpt, tmp_path / "crate.safetensors")
  meta = _header(out)["__metadata__"]
  assert meta["format"] == "crate_jax" and meta["layout"] == "torch"
  assert meta["model"] == "crate_tiny" and json.loads(meta["model_kwargs"]) == CRATE_ARCH
  sd = torch_load_file(str(out))
  want = exporters.torch_state_dict(model, params)   # what --to torch writes
  assert sorted(sd) == sorted(want)
  for k, v in want.items():
    np.testing.assert_array_equal(sd[k].numpy(), v, err_msg=k)
  ref = TorchCRATE(**CRATE_ARCH).eval()
  ref.load_state_dict(sd, strict=True)
  x = _images()
  _close(_ours(model, params, x), _torch_logits(ref, x), "CRATE from safetensors")
  back, info = _import(out, "crate_tiny", tmp_path / "back", flag="--torch")
  _assert_same(back, params)
  assert info["model_kwargs"] == {**CRATE_ARCH, "eta": 0.1, "lambd": 0.1}
  np.testing.assert_array_equal(_ours(model, back, x), _ours(model, params, x))


def test_tost_vision_and_causal_export_load_strictly_and_import_back(tmp_path):
  kwargs = {**VISION, "image_size": IMAGES[PATCH][0]}
  ckpt, model, params = _saved(tmp_path / "v", f"tost_cab_tiny_12_p{PATCH}", kwargs,
                               jax.ShapeDtypeStruct((1, *IMAGES[PATCH], 3), jnp.float32))
  out = _export(ckpt, tmp_path / "tost.safetensors")
  sd = torch_load_file(str(out))
  assert sd["patch_embed.proj.0.1.num_batches_tracked"].dtype == torch.int64
  ref = _fresh_vision()
  ref.load_state_dict(sd, strict=True)
  x = np.random.default_rng(4).normal(size=(3, *IMAGES[PATCH], 3)).astype(np.float32)
  _close(_ours(model, params, x), _torch_logits(ref, x), "ToST from safetensors")
  back, info = _import(out, f"tost_cab_tiny_12_p{PATCH}", tmp_path / "back")
  _assert_same(back, params)   # the batch statistics included
  assert info["model_kwargs"] == kwargs
  # The causal ToST (tied head: lm_head.weight written as a copy of transformer.wte.weight).
  lm_ckpt, lm, lm_params = _saved(tmp_path / "lm", "tost_gpt_tiny", {},
                                  jax.ShapeDtypeStruct((1, 8), jnp.int32))
  lm_out = _export(lm_ckpt, tmp_path / "gpt.safetensors")
  gpt = ref_lib.GPT(ref_lib.GPTConfig(block_size=lm.max_len, vocab_size=lm.vocab_size,
                                      n_layer=lm.depth, n_head=lm.heads, n_embd=lm.dim,
                                      bias=False))
  gpt.load_state_dict(torch_load_file(str(lm_out)), strict=True)
  tokens = np.random.default_rng(5).integers(0, lm.vocab_size, size=(2, 12))
  _close(_ours(lm, lm_params, tokens), _lm_logits(gpt, tokens), "causal ToST from safetensors")
  lm_back, _ = _import(lm_out, "tost_gpt_tiny", tmp_path / "lm_back")
  _assert_same(lm_back, lm_params)


@pytest.mark.parametrize("name,extra", [("crate_gpt_mini", {"eta": 0.2, "lambd": 0.3}),
                                        ("crate_bert_mini", {}), ("gpt_mini", {}),
                                        ("bert_mini", {})])
def test_language_models_round_trip_through_flat_names(tmp_path, name, extra):
  kwargs = {**TEXT_ARCH, **extra}
  ckpt, model, params = _saved(tmp_path, name, kwargs, jax.ShapeDtypeStruct((1, 8), jnp.int32))
  out = _export(ckpt, tmp_path / f"{name}.safetensors")
  tensors, meta = safetensors_io.read(str(out))
  assert meta["layout"] == "flax" and meta["model_class"] == "TextModel"
  assert json.loads(meta["model_kwargs"]) == kwargs
  assert sorted(tensors) == sorted(safetensors_io.flatten(params))
  assert any(k.startswith("layer_1/") for k in tensors)   # unscanned, "/"-joined Flax paths
  back, info = _import(out, name, tmp_path / "back")
  _assert_same(back, params)
  assert info["model_kwargs"] == kwargs   # eta / lambda from the file's metadata
  tokens = np.random.default_rng(6).integers(0, TEXT_ARCH["vocab_size"], size=(2, 8))
  np.testing.assert_array_equal(_ours(model, back, tokens), _ours(model, params, tokens))
  if name == "crate_gpt_mini":   # a run with scan_layers saves the layers stacked: same file
    ckpt_lib.save_params(str(tmp_path / "stacked"), models.scan_layout(params, True),
                         {"model": name, "model_kwargs": kwargs})
    stacked = _export(str(tmp_path / "stacked"), tmp_path / "stacked.safetensors")
    again, again_meta = safetensors_io.read(str(stacked))
    assert again_meta == meta
    _assert_same(safetensors_io.unflatten(again), safetensors_io.unflatten(tensors))


@pytest.mark.parametrize("name", ["crate_alpha_tiny", "crate_mae_tiny"])
def test_alpha_and_mae_official_names_import_back(tmp_path, name):
  """The other families with a PyTorch layout: the file holds --to torch's tensors, and the
  converter reads it back without torch to the same params (no checkpoint: the functions)."""
  kwargs = dict(image_size=16, patch_size=4, dim=24, depth=2, heads=2, dim_head=12)
  kwargs.update({"num_classes": 5} if "alpha" in name else {})
  model = models.get(name, **kwargs)
  params = _random_params(model, jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32), 2)
  layout, tensors = exporters.safetensors_tensors(model, params)
  assert layout == "torch"
  path = safetensors_io.write(str(tmp_path / "f.safetensors"), tensors, safetensors_io.metadata(
      layout, name, kwargs, type(model).__name__))
  sd = torch_load_file(path)
  want = exporters.torch_state_dict(model, params)
  assert sorted(sd) == sorted(want)
  back, got = converters.convert_safetensors(path, name)
  _assert_same(back, params)
  assert {k: got[k] for k in kwargs} == kwargs


def _fails(argv, capsys, *needles):
  assert convert.main(argv) == 2
  err = capsys.readouterr().err.strip()
  assert len(err.splitlines()) == 1 and err.startswith("error: "), err
  assert all(n in err for n in needles), err
  print(err[:200], file=sys.__stdout__)


def test_bad_files_are_one_line_and_nothing_is_written(tmp_path, capsys):
  crate_ckpt, _, _ = _saved(tmp_path / "c", "crate_tiny", CRATE_ARCH,
                            jax.ShapeDtypeStruct((1, 16, 16, 3), jnp.float32))
  crate = _export(crate_ckpt, tmp_path / "crate.safetensors")
  gpt_ckpt, _, _ = _saved(tmp_path / "g", "crate_gpt_mini", TEXT_ARCH,
                          jax.ShapeDtypeStruct((1, 8), jnp.int32))
  gpt = _export(gpt_ckpt, tmp_path / "gpt.safetensors")
  out = tmp_path / "out"
  cut = tmp_path / "cut.safetensors"
  cut.write_bytes(crate.read_bytes()[:-7])
  junk = tmp_path / "junk.safetensors"
  junk.write_bytes(b"not a safetensors file")
  for path in (cut, junk):
    _fails(["--safetensors", str(path), "--variant", "crate_tiny", "--out", str(out)], capsys,
           "cannot read", ".safetensors")
  _fails(["--safetensors", str(crate), "--variant", "tost_cab_tiny_12_p8", "--out", str(out)],
         capsys, "missing keys", "exported from model 'crate_tiny'")
  _fails(["--safetensors", str(crate), "--variant", "gpt_mini", "--out", str(out)], capsys,
         "no PyTorch layout")
  _fails(["--safetensors", str(gpt), "--variant", "gpt_mini", "--out", str(out)], capsys,
         "missing keys", "exported from model 'crate_gpt_mini'")
  tensors, meta = safetensors_io.read(str(gpt))
  tensors["layer_0/mssa/U"] = tensors["layer_0/mssa/U"][:, :1]
  bad = safetensors_io.write(str(tmp_path / "bad.safetensors"), tensors, meta)
  _fails(["--safetensors", bad, "--variant", "crate_gpt_mini", "--out", str(out)], capsys,
         "'layer_0/mssa/U' has shape (16, 1, 8)")
  with pytest.raises(SystemExit, match="2"):   # a usage error
    convert.main(["--safetensors", str(tmp_path / "crate.pth"), "--variant", "crate_tiny",
                  "--out", str(out)])
  assert "expected a .safetensors file" in capsys.readouterr().err
  assert not out.exists()
  # export: an existing output is refused and kept; a failed write leaves nothing behind
  before = gpt.read_bytes()
  assert export.main(["--checkpoint", crate_ckpt, "--to", "safetensors", "--out", str(gpt)]) == 2
  assert "exists" in capsys.readouterr().err and gpt.read_bytes() == before
  with pytest.raises(Exception):
    safetensors_io.write(str(tmp_path / "x.safetensors"), {"a": np.array([object()])}, {})
  assert not [p for p in os.listdir(tmp_path) if p.startswith("x.safetensors")]
