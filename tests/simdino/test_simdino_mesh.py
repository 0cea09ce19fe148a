"""SimDINO's objective is the same at any device count: the loss and the gradients of one global
batch through a tiny CRATE on 1, 2, 4 and 8 simulated devices, and under FSDP, agree to float32
tolerance, because the coding rate's Gram matrix sums the global batch. The official default
(`reduce_cov=0`: each device's covariance of its own samples, scaled as if global) fails the
same comparison: the test can fail."""
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from jax.sharding import PartitionSpec as P

from crate_jax import config_lib, models
from crate_jax.training import program, sharding, simdino
from crate_jax.training.tasks import simdino as simdino_task
from tests.helpers import ROOT, TINY_ARCH

BATCH = 16


@pytest.fixture(scope="module")
def setup():
  config = config_lib.load_config(
      os.path.join(ROOT, "configs", "simdino_embedded.py"),
      **{"model.kwargs": dict(TINY_ARCH, patch_size=4, depth=1, interpolate_pos=True,
                              pool="mean"),
         "simdino.z_dim": 8, "simdino.hidden_dim": 32, "batch_size": BATCH,
         "data.multicrop.num_local": 1, "data.multicrop.local_size": 12,
         "mesh.fsdp_min_size": 64})
  model = models.from_config(config)
  head = simdino_task.make_head(config)
  state = jax.jit(lambda: simdino_task.SimDINO().init_state(model, optax.sgd(0.0), config,
                                                            (28, 28, 3)))()
  params = jax.device_get(state.params)
  noise = jax.tree.map(lambda x: 0.05 * np.asarray(jax.random.normal(
      jax.random.key(1), x.shape)), params)
  teacher = jax.tree.map(lambda a, b: a + b, params, noise)
  k1, k2 = jax.random.split(jax.random.key(2))
  batch = {"global": np.asarray(jax.random.normal(k1, (BATCH, 2, 28, 28, 3))),
           "local": np.asarray(jax.random.normal(k2, (BATCH, 1, 12, 12, 3))),
           "label": np.zeros((BATCH,), np.int32)}
  return config, model, head, params, teacher, batch


def per_device_expansion(mesh, merged, eps):
  """The official default, reduce_cov=0: each of the N devices takes the rate of its own m
  samples with the scale p / (m N eps) and gamma (p + N m) / (p N m); data parallelism then
  averages the devices' objectives."""
  n_dev = mesh.size

  def local(z):
    m, p = z.shape[-2:]
    gram = jnp.einsum("gnp,gnq->gpq", z, z, precision="highest")
    r = 0.5 * jax.vmap(lambda g: jnp.linalg.slogdet(
        jnp.eye(p) + p / (m * n_dev * eps) * g)[1])(gram)
    r = (p + n_dev * m) / (p * n_dev * m) * jnp.mean(r)
    return jax.lax.pmean(r, sharding.BATCH_AXES)

  return jax.shard_map(local, mesh=mesh, in_specs=P(None, sharding.BATCH_AXES, None),
                       out_specs=P())(merged.astype(jnp.float32))


def loss_and_grads(setup, devices, fsdp=1, per_device=False, monkeypatch=None):
  config, model, head, params, teacher, batch = setup
  config = config.copy_and_resolve_references()
  config.mesh.fsdp = fsdp
  mesh = sharding.make_mesh(config.mesh, devices=jax.devices()[:devices])
  if per_device:
    monkeypatch.setattr(simdino, "expansion", functools.partial(per_device_expansion, mesh))
  fn = jax.value_and_grad(simdino_task.objective(model, head, config), has_aux=True)
  p_sh = sharding.state_shardings(params, mesh, config.mesh)
  if fsdp > 1:  # FSDP really splits some of the tiny model's weights
    assert any(s.spec != P() for s in jax.tree.leaves(p_sh))
  step = jax.jit(program.in_mesh(lambda p, t, b: fn(p, t, b, jax.random.key(0)), mesh),
                 in_shardings=(p_sh, p_sh, sharding.data_sharding(mesh)))
  (loss, (terms, _)), grads = step(params, teacher, batch)
  return float(loss), float(terms["expansion"]), jax.device_get(grads)


def _close_grads(a, b, rtol):
  scale = max(float(np.abs(x).max()) for x in jax.tree.leaves(a))
  jax.tree.map(lambda x, y: np.testing.assert_allclose(x, y, rtol=rtol, atol=rtol * scale), a, b)


def test_loss_and_gradients_do_not_depend_on_the_device_count(setup, monkeypatch):
  loss1, rate1, grads1 = loss_and_grads(setup, 1)
  for devices, fsdp in ((2, 1), (4, 1), (8, 1), (8, 2)):
    loss, rate, grads = loss_and_grads(setup, devices, fsdp)
    np.testing.assert_allclose(loss, loss1, rtol=1e-5, err_msg=f"{devices} devices, fsdp {fsdp}")
    np.testing.assert_allclose(rate, rate1, rtol=1e-5)
    _close_grads(grads1, grads, 1e-4)
  # The official per-device covariance, the same batch on 8 devices (2 samples each): another
  # objective, so the comparison above would fail. (On 1 device it is the global one.)
  same, _, _ = loss_and_grads(setup, 1, per_device=True, monkeypatch=monkeypatch)
  np.testing.assert_allclose(same, loss1, rtol=1e-5)
  loss8, rate8, grads8 = loss_and_grads(setup, 8, per_device=True, monkeypatch=monkeypatch)
  assert abs(rate8 - rate1) > 100 * 1e-5 * abs(rate1)
  assert abs(loss8 - loss1) > 100 * 1e-5 * abs(loss1)
  with pytest.raises(AssertionError):
    _close_grads(grads1, grads8, 1e-4)


def test_bfloat16_compute_keeps_the_loss_finite_and_close(setup):
  """The backbone in bfloat16 (compute_dtype): the head and the coding rate stay float32, the
  loss is finite and near the float32 one (the features differ by bf16 rounding only)."""
  config, _, head, params, teacher, batch = setup
  losses = {}
  for dtype in ("float32", "bfloat16"):
    cfg = config.copy_and_resolve_references()
    cfg.compute_dtype = dtype
    model = models.from_config(cfg)
    fn = jax.jit(lambda p, t, b, model=model, cfg=cfg: simdino_task.objective(model, head, cfg)(
        p, t, b, jax.random.key(0)))
    loss, (terms, _) = fn(params, teacher, batch)
    assert terms["expansion"].dtype == jnp.float32
    losses[dtype] = (float(loss), float(terms["expansion"]))
  assert all(np.isfinite(losses["bfloat16"]))
  np.testing.assert_allclose(losses["bfloat16"], losses["float32"], rtol=2e-2)
