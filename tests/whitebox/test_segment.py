"""Segmentation masks (attention mass, PCA, MaskCut) on synthetic images with a known object,
the Jaccard index on hand-computed cases, subspace incoherence and the tied MSSA output."""
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.whitebox import segment, segscore, subspaces

GRID = (8, 8)


def square(grid=GRID, top=2, left=3, side=3):
  m = np.zeros(grid, bool)
  m[top:top + side, left:left + side] = True
  return m


def features_of(mask, seed=0, dim=16, noise=0.3):
  """Patch features: one direction on the object, an orthogonal one off it, plus noise."""
  rng = np.random.default_rng(seed)
  a, b = np.eye(dim)[0], np.eye(dim)[1]
  flat = mask.reshape(-1)
  x = np.where(flat[:, None], a, b) * 3.0 + noise * rng.normal(size=(flat.size, dim))
  return jnp.asarray(x, jnp.float32)


def test_jaccard_hand_computed():
  a = np.zeros((1, 4, 4), bool)
  b = np.zeros((1, 4, 4), bool)
  a[0, :2, :2] = True              # 4 pixels
  b[0, 1:3, 1:3] = True            # 4 pixels, 1 shared -> 1 / 7
  np.testing.assert_allclose(segment.jaccard(a, b), [1 / 7])
  np.testing.assert_allclose(segment.jaccard(a, a), [1.0])
  np.testing.assert_allclose(segment.jaccard(a, ~a), [0.0])
  np.testing.assert_allclose(segment.jaccard(np.zeros((4, 4)), np.zeros((4, 4))), 1.0)
  full = np.ones((1, 4, 4), bool)
  np.testing.assert_allclose(segment.jaccard(full, b), [4 / 16])


def test_attention_mass_rule():
  a = jnp.array([0.1, 0.5, 0.05, 0.3, 0.05])
  np.testing.assert_array_equal(segment.attention_mass_mask(a, 0.6), [0, 1, 0, 1, 0])
  np.testing.assert_array_equal(segment.attention_mass_mask(a, 0.5), [0, 1, 0, 0, 0])
  np.testing.assert_array_equal(segment.attention_mass_mask(2 * a, 0.95), [1, 1, 1, 1, 0])


def test_attention_masks_find_the_square():
  truth = square()
  n = truth.size
  K = 3
  att = np.full((K, n + 1, n + 1), 1e-3)
  att[:, 0, 1:][:, truth.reshape(-1)] = 1.0   # the class token attends to the object
  att /= att.sum(-1, keepdims=True)
  heads, merged = segment.attention_masks(jnp.asarray(att), GRID, 0.99)
  assert heads.shape == (K, *GRID)
  np.testing.assert_allclose(segment.jaccard(merged, truth), 1.0)
  np.testing.assert_allclose(segment.jaccard(heads, truth[None]), [1.0] * K)
  heads, merged = segment.attention_masks(jnp.asarray(att), GRID, 0.6)
  # 60% of the mass on 9 equal patches: 6 of them (5 / 9 < 0.6 <= 6 / 9), all inside
  np.testing.assert_allclose(segment.jaccard(merged, truth), 6 / 9, rtol=1e-6)
  assert not np.any(np.asarray(merged) & ~truth)


@pytest.mark.parametrize("seed", [0, 1])
def test_pca_and_maskcut_find_the_square(seed):
  truth = square(top=1 + seed, left=2 + seed, side=3)
  x = features_of(truth, seed)
  np.testing.assert_allclose(segment.jaccard(segment.pca_mask(x, GRID), truth), 1.0)
  objects = segment.maskcut(x, GRID, tau=0.5, num_objects=1)
  np.testing.assert_allclose(segment.jaccard(objects[0], truth), 1.0)


def test_maskcut_second_object():
  """An isolated object, then one tied to the background by a bridge of two patches: the first
  cut takes the isolated one, the second (on the patches left) the other, bridge or not."""
  first, second = square(top=0, left=0, side=3), square(top=5, left=5, side=2)
  bridge = np.zeros(GRID, bool)
  bridge[5:7, 4] = True
  e = np.eye(16)
  x = np.tile(e[1], (64, 1))
  x[first.reshape(-1)] = e[0]
  x[second.reshape(-1)] = e[2]
  x[bridge.reshape(-1)] = (e[1] + e[2]) / np.sqrt(2)
  x = jnp.asarray(3 * x + 0.1 * np.random.default_rng(3).normal(size=x.shape), jnp.float32)
  objects = np.asarray(segment.maskcut(x, GRID, tau=0.5, num_objects=2))
  np.testing.assert_allclose(segment.jaccard(objects[0], first), 1.0)
  assert not np.any(objects[0] & objects[1])
  assert np.all(objects[1] <= (second | bridge)) and np.all(objects[1] >= second)


def test_upsampling_and_baselines():
  m = jnp.asarray(square(grid=(4, 4), top=1, left=1, side=2))
  up = segment.upsample_mask(m, (16, 16), "nearest")
  want = np.zeros((16, 16), bool)
  want[4:12, 4:12] = True
  np.testing.assert_array_equal(up, want)
  smooth = np.asarray(segment.upsample_mask(m, (16, 16), "bilinear"))
  assert smooth[5:11, 5:11].all() and not smooth[:3].any() and not smooth[:, 13:].any()
  assert smooth.sum() < want.sum()   # the block's corners are rounded off
  with pytest.raises(ValueError, match="upsampling 'cubic'"):
    segment.upsample_mask(m, (16, 16), "cubic")
  gt = np.stack([want, want])
  base = segscore.baselines(gt)
  np.testing.assert_allclose(base["centred_box"], 1.0)          # area 1/4: the same box
  np.testing.assert_allclose(base["all_foreground"], 0.25)


def test_incoherence_and_dictionary_orthogonality():
  d, K, p = 12, 3, 4
  Q = np.linalg.qr(np.random.default_rng(0).normal(size=(d, d)))[0]
  U = Q.reshape(d, K, p)
  assert subspaces.incoherence(U)[0] < 1e-12                 # orthogonal subspaces
  assert subspaces.dictionary_orthogonality(Q) < 1e-12
  V = U.copy()
  V[:, 1, 0] = U[:, 0, 0]                                    # heads 0 and 1 share a direction
  np.testing.assert_allclose(subspaces.incoherence(V)[0], 1.0, rtol=1e-12)
  np.testing.assert_allclose(subspaces.principal_cosines(2 * V)[0], 1.0, rtol=1e-9)
  np.testing.assert_allclose(subspaces.incoherence(2 * V)[0], 4.0, rtol=1e-12)
  np.testing.assert_allclose(subspaces.dictionary_orthogonality(2 * np.eye(5)), 3.0)


def test_tied_mssa_output_and_layer_stats():
  kw = dict(image_size=16, patch_size=4, num_classes=3, dim=16, depth=2, heads=2, dim_head=8)
  x = jax.random.normal(jax.random.key(1), (2, 16, 16, 3))
  free = models.get("crate_tiny", **kw)
  tied = models.get("crate_tiny", **kw, mssa_output="tied")
  pf = free.init(jax.random.key(0), x)["params"]
  pt = tied.init(jax.random.key(0), x)["params"]
  assert "out_kernel" in pf["layer_0"]["mssa"] and set(pt["layer_0"]["mssa"]) == {"U"}
  # tied == free with W_out = U^T and b_out = 0
  pf2 = jax.tree.map(lambda a: a, pf)
  for l in range(2):
    U = pt[f"layer_{l}"]["mssa"]["U"]
    pf2[f"layer_{l}"] = dict(pt[f"layer_{l}"], mssa={"U": U, "out_kernel": jnp.moveaxis(U, 0, -1),
                                                     "out_bias": jnp.zeros(16)})
  pf2 = {**pt, **{k: pf2[k] for k in pt if k.startswith("layer_")}}
  np.testing.assert_allclose(free.apply({"params": pf2}, x), tied.apply({"params": pt}, x),
                             rtol=1e-5, atol=1e-5)
  with pytest.raises(ValueError, match="mssa_output"):
    models.get("crate_tiny", **kw, mssa_output="transposed").init(jax.random.key(0), x)
  stats = subspaces.layer_subspace_stats(pt)
  assert stats["incoherence_max"].shape == (2,)
  assert np.all(stats["incoherence_max"] >= stats["incoherence_mean"])
  assert np.all(np.isfinite(stats["dictionary_orthogonality"]))
  assert not models.has_class_token(models.get("crate_mae_tiny", image_size=16, patch_size=4))
  assert models.has_class_token(free)


def test_segment_bad_inputs_fail_before_compiling(tmp_path, monkeypatch):
  from crate_jax import analyze, analyze_segment, config_lib
  from tests.helpers import EMBEDDED, ROOT
  import os
  monkeypatch.setattr(analyze.jax, "jit", lambda *_, **__: pytest.fail("compiled"))
  arch = dict(patch_size=4, dim=16, depth=2, heads=2, dim_head=8)
  out = str(tmp_path / "out")
  embedded = config_lib.load_config(EMBEDDED, **{"model.kwargs": dict(arch)})
  with pytest.raises(analyze.AnalyzeError, match="--layer 5 is out of range for a 2-layer"):
    analyze_segment.segment_analysis(embedded, str(tmp_path), out, layer=5)
  no_masks = config_lib.load_config(EMBEDDED, **{"model.kwargs": dict(arch)})
  with no_masks.unlocked():
    no_masks.data.name = "cifar10"
  with pytest.raises(analyze.AnalyzeError, match="'cifar10' .* has no segmentation masks"):
    analyze_segment.segment_analysis(no_masks, str(tmp_path), out)
  mae = config_lib.load_config(os.path.join(ROOT, "configs", "crate_mae_base.py"),
                               **{"model.kwargs": dict(arch, image_size=224)})
  with pytest.raises(analyze.AnalyzeError, match="CRATEMAE has no class token"):
    analyze_segment.segment_analysis(mae, str(tmp_path), out, methods=("attention",))
  assert not os.path.exists(out)


def test_mssa_output_from_the_config():
  """--config.model.mssa_output=tied reaches CRATE; a family without the choice is refused."""
  from crate_jax import config_lib
  config = config_lib.base_config(model="crate_tiny")
  config.model.mssa_output = "tied"
  assert models.from_config(config).mssa_output == "tied"
  config.model.name = "vit_tiny"
  with pytest.raises(ValueError, match="config.model.mssa_output='tied'"):
    models.from_config(config)
