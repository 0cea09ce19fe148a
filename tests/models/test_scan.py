"""Scanned layers (nn.scan) against the unrolled stack, the layout converter, remat policies and
stochastic depth, for every family."""
import flax.linen as nn
import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import models
from crate_jax.models import layers as L

SMALL = dict(image_size=32, patch_size=8, depth=3)
FAMILIES = {
    "crate_tiny": dict(dim=48, heads=4, dim_head=12, num_classes=7),
    "crate_alpha_t16": dict(dim=48, heads=4, dim_head=12, num_classes=7),
    "vit_tiny": dict(dim=48, heads=4, dim_head=12, num_classes=7),
    "crate_mae_classifier_tiny": dict(dim=48, heads=4, dim_head=12, num_classes=7),
    "crate_mae_tiny": dict(dim=48, heads=4, dim_head=12),
}
X = jax.random.normal(jax.random.key(1), (2, 32, 32, 3))


def build(name, **kw):
  return models.get(name, **SMALL, **FAMILIES[name], **kw)


def run(model, params, **kw):
  rngs = {"mask": jax.random.key(5)}
  with jax.default_matmul_precision("highest"):
    return model.apply({"params": params}, X, rngs=rngs, **kw)


@pytest.mark.parametrize("name", sorted(FAMILIES))
def test_scanned_equals_unrolled_from_the_same_weights(name):
  unrolled, scanned = build(name), build(name, scan_layers=True)
  params = jax.jit(unrolled.init)({"params": jax.random.key(0), "mask": jax.random.key(0)},
                                  X)["params"]
  stacked = models.scan_layout(params, True)
  # the converted tree is exactly the scanned model's tree
  want = jax.eval_shape(scanned.init, {"params": jax.random.key(0), "mask": jax.random.key(0)},
                        X)["params"]
  assert jax.tree.map(lambda a: a.shape, stacked) == jax.tree.map(lambda a: a.shape, want)
  jax.tree.map(np.testing.assert_array_equal, models.scan_layout(stacked, False), params)
  if name == "crate_mae_tiny":
    a, b = run(unrolled, params), run(scanned, stacked)
    np.testing.assert_allclose(b["pred"], a["pred"], atol=2e-5)
    return
  (la, oa), (lb, ob) = (run(unrolled, params, return_intermediates=True),
                        run(scanned, stacked, return_intermediates=True))
  np.testing.assert_allclose(lb, la, atol=2e-5)
  for k in oa:  # intermediates keep their (layer, ...) layout
    np.testing.assert_allclose(ob[k], oa[k], atol=2e-5, err_msg=k)
  # loading an unrolled checkpoint into the scanned model (and back) goes through adapt_params
  np.testing.assert_allclose(run(scanned, models.adapt_params(scanned, params, want)), la,
                             atol=2e-5)
  back = models.adapt_params(unrolled, stacked, params)
  jax.tree.map(np.testing.assert_array_equal, back, params)


@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_remat_policies_give_the_same_gradients(scan):
  model = build("crate_tiny", scan_layers=scan)
  params = model.init(jax.random.key(0), X)["params"]

  def grads(remat):
    loss = lambda p: build("crate_tiny", scan_layers=scan, remat=remat).apply(
        {"params": p}, X).sum()
    return jax.jit(jax.grad(loss))(params)

  ref = grads("none")
  for policy in ("full", "dots_saveable", "dots_with_no_batch_dims_saveable", True):
    jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), grads(policy), ref)
  with pytest.raises(ValueError, match="remat='sometimes' is not one of"):
    L.remat_policy("sometimes")


def test_drop_path_is_per_example_and_unbiased():
  class Probe(nn.Module):
    @nn.compact
    def __call__(self, x):
      return L.drop_path(self, x, 0.25)

  x = jnp.ones((4000, 3, 2))
  y = Probe().apply({}, x, rngs={"dropout": jax.random.key(0)})
  per_example = np.asarray(y).reshape(4000, -1)
  np.testing.assert_allclose(np.unique(per_example), [0.0, 1.0 / 0.75], rtol=1e-6)
  assert (per_example == per_example[:, :1]).all()            # whole examples are dropped
  assert abs((per_example[:, 0] == 0).mean() - 0.25) < 0.03
  assert abs(per_example.mean() - 1.0) < 0.05                 # E[drop_path(x)] = x
  np.testing.assert_allclose(L.drop_path_rates(0.1, 5), [0, 0.025, 0.05, 0.075, 0.1], rtol=1e-6)


@pytest.mark.parametrize("name", ["crate_tiny", "crate_alpha_t16", "vit_tiny"])
@pytest.mark.parametrize("scan", [False, True], ids=["unrolled", "scanned"])
def test_stochastic_depth_acts_only_in_training(name, scan):
  plain, drop = build(name, scan_layers=scan), build(name, scan_layers=scan, drop_path_rate=0.5)
  params = plain.init(jax.random.key(0), X)["params"]
  base = plain.apply({"params": params}, X)
  np.testing.assert_array_equal(drop.apply({"params": params}, X), base)  # eval: off
  outs = [drop.apply({"params": params}, X, train=True, rngs={"dropout": jax.random.key(s)})
          for s in range(3)]
  assert all(float(jnp.abs(o - base).max()) > 1e-4 for o in outs)
  assert float(jnp.abs(outs[0] - outs[1]).max()) > 1e-4     # fresh masks per step


def test_layer_decay_ids_for_a_scanned_stack():
  model = build("crate_tiny", scan_layers=True)
  params = jax.eval_shape(model.init, jax.random.key(0), X)["params"]
  ids = models.layer_ids(model, params)
  np.testing.assert_array_equal(ids["layer_scan"]["ista"]["D"].reshape(-1), [1, 2, 3])
  assert ids["layer_scan"]["ista"]["D"].shape == (3, 1, 1)
  assert ids["head"]["kernel"] == 4 and ids["pos_embedding"] == 0


@pytest.mark.parametrize("name", ["crate_tiny", "crate_alpha_t16", "vit_tiny"])
def test_stochastic_depth_keeps_a_bfloat16_stream_in_bfloat16(name):
  """A traced float32 drop rate (scanned per layer) must not promote a bf16 residual stream:
  a scanned ViT-B in bf16 with drop path 0.1 failed to trace (the scan's carry changed dtype),
  and unrolled the blocks silently ran in float32."""
  for scan in (False, True):
    model = build(name, scan_layers=scan, drop_path_rate=0.2, dtype=jnp.bfloat16)
    params = model.init(jax.random.key(0), X)["params"]
    _, out = jax.eval_shape(lambda p: model.apply({"params": p}, X, train=True,
                                                  return_intermediates=True,
                                                  rngs={"dropout": jax.random.key(1)}), params)
    assert out["tokens"].dtype == jnp.bfloat16, (name, scan)
