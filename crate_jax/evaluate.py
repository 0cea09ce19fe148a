"""Evaluate a checkpoint: top-1 / top-5 and loss on a dataset split.

  python -m crate_jax.evaluate --config configs/embedded.py --checkpoint workdirs/embedded
"""
from __future__ import annotations

import functools
import json

import jax
import jax.numpy as jnp

from crate_jax.training import checkpoint as ckpt_lib
from crate_jax import config_lib, models
from crate_jax.training import sharding, steps


def evaluate_checkpoint(config, checkpoint: str, split: str | None = None) -> dict[str, float]:
  """Eval metrics of a checkpoint on `split` (default config.data.eval_split); parameters are
  placed by the config's FSDP rule, as in training."""
  from crate_jax import data as data_lib
  from crate_jax.training import evaluation
  config_lib.validate(config)
  model = models.from_config(config)
  image_shape = (config.data.image_size, config.data.image_size, 3)
  data_lib.check_batch_size(config.eval_batch_size, jax.device_count(), jax.process_count())
  mesh = sharding.make_mesh(config.mesh)
  abstract = jax.eval_shape(model.init, jax.random.key(0), jnp.zeros((1, *image_shape)))["params"]
  shardings = sharding.param_shardings(abstract, mesh, config.mesh)
  abstract = jax.tree.map(lambda a, s: jax.ShapeDtypeStruct(a.shape, a.dtype, sharding=s),
                          abstract, shardings)
  params, _ = ckpt_lib.load_params_for(abstract, checkpoint,
                                      adapt=functools.partial(models.adapt_params, model),
                                      ema=config.ema_decay > 0 and config.eval_ema)
  eval_step = jax.jit(steps.make_eval_step(model, task=config.task))
  return evaluation.evaluate(eval_step, params, config, sharding.data_sharding(mesh), split=split)


def main(argv):
  del argv
  from absl import flags
  from crate_jax import cli
  cli.import_tensorflow()
  f = flags.FLAGS
  result = evaluate_checkpoint(f.config, f.checkpoint, f.split)
  print(json.dumps({"checkpoint": f.checkpoint, "split": f.split or f.config.data.eval_split,
                    **result}))


if __name__ == "__main__":
  from crate_jax import cli

  def define_flags():
    from absl import flags
    cli.define_config_flag()
    flags.DEFINE_string("checkpoint", None, "Workdir, checkpoints dir or step dir.", required=True)
    flags.DEFINE_string("split", None, "Split to evaluate (default config.data.eval_split).")
    flags.mark_flags_as_required(["config"])

  cli.run(main, define_flags)
