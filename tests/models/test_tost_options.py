"""ToST's options: scanned / unrolled / rematerialised layers compute the same, the constant
drop path acts in train mode only, bf16 stays near float32, and the batch-norm statistics under
a sharded batch are the global batch's (SyncBatchNorm)."""
import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from crate_jax import models
from crate_jax.training import sharding

ARCH = dict(num_classes=10, patch_size=8, dim=32, depth=2, heads=2)


def _setup(**kw):
  model = models.get("tost_cab_tiny_12_p8", **ARCH, **kw)
  x = jax.random.normal(jax.random.key(1), (8, 40, 40, 3))
  params = models.init_params(model, jax.random.key(0), x)
  return model, params, x


def test_scan_and_remat_equal_the_unrolled_layers_and_their_gradients():
  model, params, x = _setup()

  def loss(m, p):
    logits, _ = models.apply_train(m, p, x, rngs={"dropout": jax.random.key(2)})
    return jnp.sum(logits ** 2)

  want, grads = jax.jit(jax.value_and_grad(functools.partial(loss, model)))(params)
  scanned = models.get("tost_cab_tiny_12_p8", **ARCH, scan_layers=True, remat="full")
  p_scan = models.scan_layout(params, True)
  assert "block_scan" in p_scan
  got, g_scan = jax.jit(jax.value_and_grad(functools.partial(loss, scanned)))(p_scan)
  np.testing.assert_allclose(got, want, rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-4, atol=1e-6),
               models.scan_layout(g_scan, False), grads)


def test_drop_path_is_a_constant_rate_in_train_mode_only():
  model, params, x = _setup()
  dropped = models.get("tost_cab_tiny_12_p8", **ARCH, drop_path_rate=0.5)
  eval_out = dropped.apply(models.variables(params), x)
  np.testing.assert_allclose(eval_out, model.apply(models.variables(params), x), rtol=1e-6)
  a, _ = models.apply_train(dropped, params, x, rngs={"dropout": jax.random.key(3)})
  b, _ = models.apply_train(dropped, params, x, rngs={"dropout": jax.random.key(4)})
  assert not np.allclose(a, b)


def test_bfloat16_compute_stays_near_float32():
  model, params, x = _setup()
  half = models.get("tost_cab_tiny_12_p8", **ARCH, dtype=jnp.bfloat16)
  want = model.apply(models.variables(params), x)
  got = half.apply(models.variables(params), x)
  assert got.dtype == jnp.float32 and np.isfinite(got).all()
  np.testing.assert_allclose(got, want, atol=0.05 * float(np.abs(want).max()))


def test_batch_statistics_under_a_sharded_batch_are_the_global_batchs():
  model, params, x = _setup()
  _, want = models.apply_train(model, params, x, rngs={"dropout": jax.random.key(5)})
  mesh = sharding.make_mesh()
  assert mesh.size == 8
  xs = jax.device_put(x, NamedSharding(mesh, P(sharding.BATCH_AXES)))
  step = jax.jit(lambda p, x: models.apply_train(model, p, x, rngs={"dropout": jax.random.key(5)}))
  _, got = step(params, xs)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, rtol=1e-5, atol=1e-6), got, want)
  # and not any one device's: a shard of one example gives other statistics
  _, one = models.apply_train(model, params, x[:1], rngs={"dropout": jax.random.key(5)})
  assert not np.allclose(one["patch_embed"]["bn_0"]["mean"], want["patch_embed"]["bn_0"]["mean"])
