"""crate_jax.nnx: the registered models as Flax NNX modules (flax.nnx.bridge.ToNNX). The NNX
module's logits and white-box intermediates equal the Linen model's for the same weights (CRATE,
CRATE-alpha, ViT, ToST, CRATE-GPT); a crate_jax checkpoint loads with the weights its run stands
for (the EMA) and round-trips; nnx.Optimizer + nnx.value_and_grad train it, ToST's batch-norm
statistics following the Linen train step's."""
import functools
import json

import jax
import jax.numpy as jnp
import numpy as np
import optax
import pytest
from flax import nnx

from crate_jax import models
from crate_jax import nnx as crate_nnx
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import TINY_ARCH, tiny_config

IMAGE = dict(image_size=28, patch_size=7, num_classes=10, dim=32, depth=2, heads=2, dim_head=16)
TOST = dict(image_size=28, patch_size=8, num_classes=10, dim=32, depth=2, heads=2)
TEXT = dict(vocab_size=40, max_len=16, dim=32, depth=2, heads=2, dim_head=16)
CASES = {"crate": ("crate_tiny", TINY_ARCH), "crate_alpha": ("crate_alpha_tiny", IMAGE),
         "vit": ("vit_tiny", IMAGE), "tost": ("tost_cab_tiny_12_p8", TOST),
         "crate_gpt": ("crate_gpt_tiny", TEXT)}


def random_params(linen, seed):
  """A params tree of `linen` (with its state) drawn with numpy: no init to compile. Matrices
  N(0, 1 / fan_in), vectors 0.1 N (norm scales 1 + 0.1 N, running variances in [0.5, 2])."""
  shapes = jax.eval_shape(functools.partial(models.init_params, linen), jax.random.key(0),
                          crate_nnx.example_input(linen))
  rng = np.random.default_rng(seed)

  def draw(path, a):
    name, normal = str(path[-1].key), rng.standard_normal(a.shape)
    if name == "var":
      return rng.uniform(0.5, 2.0, a.shape).astype(a.dtype)
    if name == "scale":
      return (1.0 + 0.1 * normal).astype(a.dtype)
    fan_in = int(np.prod(a.shape[:-1])) if len(a.shape) > 1 else 100
    return (normal / np.sqrt(fan_in)).astype(a.dtype)

  return jax.tree_util.tree_map_with_path(draw, shapes)


def inputs(linen, batch=2, seed=1):
  key = jax.random.key(seed)
  if models.contract(linen).inputs == "tokens":
    return jax.random.randint(key, (batch, linen.max_len), 0, linen.vocab_size)
  return jax.random.normal(key, (batch, linen.image_size, linen.image_size, 3))


@nnx.jit
def nnx_forward(module, x):
  return module(x), module(x, return_intermediates=True)


@functools.partial(jax.jit, static_argnums=0)
def linen_forward(linen, params, x):
  variables = models.variables(params)
  return linen.apply(variables, x), linen.apply(variables, x, return_intermediates=True)


def assert_same(got, want):
  """Equal trees at float32 rounding."""
  assert jax.tree.structure(got) == jax.tree.structure(want)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(np.asarray(a), np.asarray(b),
                                                       rtol=1e-5, atol=1e-6), got, want)


@pytest.mark.parametrize("case", list(CASES))
def test_nnx_module_equals_the_linen_model(case):
  name, kwargs = CASES[case]
  linen = models.get(name, **kwargs)
  params = random_params(linen, seed=0)
  module = crate_nnx.model(name, params=params, **kwargs)
  assert module.has_state == (case == "tost")
  assert isinstance(module.linen_model, type(linen))
  # the NNX state is the crate_jax params tree: Params, and ToST's statistics as BatchStats
  assert_same(crate_nnx.linen_params(module), params)
  x = inputs(linen)
  (logits, (logits_i, inter)), (want, (want_i, want_inter)) = (
      nnx_forward(module, x), linen_forward(linen, params, x))
  assert_same(crate_nnx.linen_params(module), params)   # eval mode: ToST's statistics read only
  assert_same(logits, want)
  assert_same(logits_i, want_i)
  assert_same(inter, want_inter)
  assert set(models.contract(linen).whitebox) <= set(inter)


def write_run(root, name, kwargs, params, ema_params, *, step=3):
  """A training run's checkpoint: params and weight EMA, meta with the run's config."""
  config = tiny_config(root / "tfds", **{"model.name": name, "model.kwargs": dict(kwargs),
                                         "ema_decay": 0.99})
  meta = {"step": step, "model": name, "config": json.loads(config.to_json_best_effort())}
  ckpt = ckpt_lib.Checkpoints(str(root / "run"), keep=1, best_metric=None, async_save=False)
  ckpt.save(step, {"params": params, "ema_params": ema_params}, meta)
  ckpt.close()
  return config


def test_checkpoint_loads_the_runs_weights_and_round_trips(tmp_path):
  name, kwargs = CASES["crate"]
  linen = models.get(name, **kwargs)
  params, ema = random_params(linen, 0), random_params(linen, 1)
  config = write_run(tmp_path, name, kwargs, params, ema)
  # the run's own config: its weight EMA stands for the model, as in evaluate / export
  module = crate_nnx.from_checkpoint(str(tmp_path / "run"))
  assert module.model_name == name
  assert_same(crate_nnx.linen_params(module), ema)
  x = inputs(linen)
  assert_same(nnx_forward(module, x), linen_forward(linen, ema, x))
  # another config (no EMA): the trained params
  config.ema_decay = 0.0
  plain = crate_nnx.from_checkpoint(str(tmp_path / "run" / "checkpoints" / "3"), config)
  assert_same(crate_nnx.linen_params(plain), params)

  # written back from NNX: a converted-style checkpoint naming the model and its arguments
  step = crate_nnx.save_checkpoint(module, tmp_path / "nnx")
  meta = ckpt_lib.read_meta(step)
  assert meta["model"] == name and meta["model_kwargs"] == kwargs
  assert_same(crate_nnx.linen_params(crate_nnx.from_checkpoint(str(tmp_path / "nnx"))), ema)

  # a new head (5 classes): everything else loaded, the head freshly initialised
  fresh = crate_nnx.from_checkpoint(str(tmp_path / "run"), num_classes=5, new_head=True)
  got = crate_nnx.linen_params(fresh)
  assert got["head"]["kernel"].shape == (kwargs["dim"], 5)
  heads = models.head_params(linen)
  assert_same({k: v for k, v in got.items() if k not in heads},
              {k: v for k, v in ema.items() if k not in heads})
  # models.init_params's random init (compiled once per model: the head's above)
  five = dict(kwargs, num_classes=5)
  seeded = [crate_nnx.linen_params(crate_nnx.model(name, rngs=s, **five)) for s in (0, 0, 1)]
  assert_same(seeded[0], seeded[1])
  assert not np.allclose(seeded[0]["head"]["kernel"], seeded[2]["head"]["kernel"])
  with pytest.raises(ckpt_lib.CheckpointError, match="does not fit"):
    crate_nnx.from_checkpoint(str(tmp_path / "run"), dim=48, dim_head=24)


def test_nnx_optimizer_trains_and_batch_statistics_follow_the_linen_step():
  name, kwargs = "tost_cab_tiny_12_p8", dict(TOST, depth=1, cls_layers=1)
  linen = models.get(name, **kwargs)
  module = crate_nnx.model(name, params=random_params(linen, 0), **kwargs)
  x = inputs(linen, batch=8, seed=2)
  labels = jnp.arange(8) % kwargs["num_classes"]
  optimizer = nnx.Optimizer(module, optax.adamw(1e-2), wrt=nnx.Param)

  @nnx.jit
  def step(module, optimizer, x, labels):
    def loss_fn(module):
      logits = module(x, train=True)
      return optax.softmax_cross_entropy_with_integer_labels(logits, labels).mean()
    loss, grads = nnx.value_and_grad(loss_fn)(module)
    optimizer.update(module, grads)
    return loss

  before = crate_nnx.linen_params(module)
  out, state = jax.jit(lambda p, x: models.apply_train(linen, p, x))(before, x)
  want = optax.softmax_cross_entropy_with_integer_labels(out, labels).mean()
  losses = [float(step(module, optimizer, x, labels))]
  np.testing.assert_allclose(losses[0], float(want), rtol=1e-5)
  # the statistics are not trained: a train-mode call moves them as the Linen train step does
  assert_same(crate_nnx.linen_params(module)[models.family.STATE], state)
  losses += [float(step(module, optimizer, x, labels)) for _ in range(5)]
  assert losses[-1] < 0.8 * losses[0], losses
  assert not jax.tree.leaves(nnx.state(optimizer, nnx.BatchStat))


def test_rngs_and_refusals():
  rngs = crate_nnx.as_rngs(nnx.Rngs(3))
  assert all(s in rngs for s in crate_nnx.STREAMS)
  for seed in (jax.random.PRNGKey(1), jax.random.key(1), np.int64(1)):
    assert all(s in crate_nnx.as_rngs(seed) for s in crate_nnx.STREAMS)
  with pytest.raises(ValueError, match="decode=True"):
    crate_nnx.model("crate_gpt_tiny", decode=True, **TEXT)
  with pytest.raises(ValueError, match="image_size"):
    crate_nnx.model("crate_mae_tiny", image_size=None)


def test_train_mode_draws_dropout_from_the_modules_rngs():
  kwargs = dict(TINY_ARCH, emb_dropout=0.5)
  linen = models.get("crate_tiny", **kwargs)
  module = crate_nnx.model("crate_tiny", params=random_params(linen, 0), rngs=7, **kwargs)
  x = inputs(linen)
  forward = nnx.jit(lambda m, x: m(x, train=True))
  a, b = forward(module, x), forward(module, x)
  assert np.all(np.isfinite(a)) and not np.allclose(a, b)   # the dropout stream moved on
