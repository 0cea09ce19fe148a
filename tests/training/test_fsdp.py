"""FSDP on 8 simulated CPU devices: the placement rule, the same training at every fsdp size, and
checkpoints that resume across a changed fsdp (Orbax restores onto the new shardings)."""
import jax
import numpy as np
import pytest
from jax.sharding import PartitionSpec as P

from crate_jax import models, train
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import sharding
from tests.helpers import final_params, losses, tiny_config


def test_fsdp_rule_shards_the_largest_divisible_dimension():
  assert sharding.fsdp_spec((768, 12, 64), 4) == P("fsdp")
  assert sharding.fsdp_spec((1, 197, 768), 8) == P(None, None, "fsdp")
  assert sharding.fsdp_spec((197, 330), 4, min_size=1) == P()      # 197 and 330 not divisible
  assert sharding.fsdp_spec((197, 332), 4, min_size=1) == P(None, "fsdp")
  assert sharding.fsdp_spec((768,), 8) == P()                         # small: replicated
  assert sharding.fsdp_spec((768, 768), 1) == P()                     # no fsdp axis
  assert sharding.fsdp_spec((), 8, min_size=0) == P()


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def cfg(data_dir, fsdp, **kw):
  return tiny_config(data_dir, num_train_steps=8, checkpoint_every_steps=4, log_every_steps=1,
                     **{"mesh.fsdp": fsdp, "mesh.fsdp_min_size": 1, "optimizer.name": "adamw"},
                     **kw)


@pytest.fixture(scope="module")
def replicated_run(tmp_path_factory, data_dir):
  workdir = str(tmp_path_factory.mktemp("fsdp1"))
  train.train_and_evaluate(cfg(data_dir, 1), workdir)
  return losses(workdir), final_params(workdir)


def assert_same(workdir, reference):
  ref_losses, ref_params = reference
  got = losses(workdir)
  assert sorted(got) == sorted(ref_losses) == list(range(1, 9))
  np.testing.assert_allclose([got[s] for s in sorted(got)],
                             [ref_losses[s] for s in sorted(ref_losses)], rtol=1e-5)
  jax.tree.map(lambda a, b: np.testing.assert_allclose(a, b, atol=1e-5), final_params(workdir),
               ref_params)


def test_fsdp8_trains_as_the_replicated_run_with_sharded_state(tmp_path, data_dir, replicated_run):
  seen = {}

  def record(step, state):
    if step == 1:
      seen["U"] = state.params["layer_0"]["mssa"]["U"].sharding.spec
      seen["mu"] = state.opt_state[0].mu["layer_0"]["mssa"]["U"].sharding.spec
      seen["U_shard"] = state.params["layer_0"]["mssa"]["U"].addressable_shards[0].data.shape
      seen["bias"] = state.params["head"]["bias"].sharding.spec

  train.train_and_evaluate(cfg(data_dir, 8), str(tmp_path), callbacks=[record])
  assert seen["U"] == P("fsdp") and seen["mu"] == P("fsdp")   # U (32, 2, 16) over 8 devices
  assert seen["U_shard"] == (4, 2, 16)
  assert seen["bias"] == P()                                   # 10 classes: not divisible by 8
  assert_same(str(tmp_path), replicated_run)


@pytest.mark.parametrize("before,after", [(4, 1), (1, 2)])
def test_resume_across_a_changed_fsdp(tmp_path, data_dir, replicated_run, before, after):
  def stop(step, state):
    if step == 5:
      raise KeyboardInterrupt("stop after step 5 (checkpoint at 4)")

  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(cfg(data_dir, before), str(tmp_path), callbacks=[stop])
  assert ckpt_lib.Checkpoints(str(tmp_path)).latest_step() == 4
  train.train_and_evaluate(cfg(data_dir, after), str(tmp_path))
  assert_same(str(tmp_path), replicated_run)


@pytest.mark.parametrize("name, kwargs, per_layer", [
    ("crate_tiny", {}, 2), ("crate_alpha_t16", {}, 2), ("vit_tiny", {}, 2)])
def test_activations_stay_batch_split_under_fsdp(name, kwargs, per_layer):
  """Every layer pins its residual stream to the batch axes (models.layers.batch_split) inside
  the train step. Without it the TPU compiler split CRATE-B's activations along the sharded
  parameters' axis under fsdp = 8 and needed 31.7 GiB per chip instead of 7.2 (v5litepod-8,
  64 images per chip; the CPU compiler and small models do not show it, so the wiring is what
  is checked here). Lowering only, nothing compiled."""
  from crate_jax import config_lib
  from crate_jax.training import program
  config = config_lib.base_config(model=name)
  config.data.image_size, config.data.num_classes = 32, 10
  config.model.kwargs.update(patch_size=16, depth=2, **kwargs)
  config.mesh.fsdp, config.batch_size = 8, 16
  mesh = sharding.make_mesh(config.mesh)
  model = models.from_config(config)
  prog = program.build(config, model, mesh, total_steps=10, steps_per_epoch=10)
  text = prog.train_step.lower(prog.abstract_state,
                               prog.abstract_batch(config, 16, train=True)).as_text()
  constraints = [line for line in text.splitlines() if "sharding_constraint" in line]
  assert len(constraints) >= per_layer * 2  # forward of both layers (the backward adds more)
  assert all('"data", "fsdp"' in line or "{\"data\", \"fsdp\"}" in line for line in constraints)
  # outside the train program (plain model.apply: tests, analysis) it is a no-op
  x = jax.numpy.ones((4, 3, 8))
  assert models.layers.batch_split(x) is x
