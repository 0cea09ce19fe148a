"""ToST on the embedded digits (offline, CPU, a few minutes): the white-box linear-time family
beside configs/embedded.py's CRATE, at a comparable size (width 96, 4 TSSA blocks of 4 heads,
then the 2 class-attention blocks) and the same recipe.

  python -m crate_jax.train --config configs/tost_embedded.py --workdir workdirs/tost_embedded
  python -m crate_jax.analyze --config configs/tost_embedded.py \
      --checkpoint workdirs/tost_embedded --out workdirs/tost_embedded/analysis
  python -m crate_jax.analyze --segment --config configs/tost_embedded.py \
      --checkpoint workdirs/tost_embedded --out workdirs/tost_embedded/segment

The convolutional stem exists for patch 8 and 16 only, so the 28 px digits are read at 56 px
(resized): a 7 x 7 grid of 49 tokens, as CRATE's patch 4 gives at 28 px.
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.base_config(model="tost_cab_tiny_12_p8")
  config.model.kwargs.update(patch_size=8, dim=96, depth=4, heads=4)
  config_lib.embedded_digits_recipe(config)  # configs/embedded.py's data and recipe
  config.data.image_size = config.data.eval_resize = 56
  config.optimizer.decay_mask = "kernels"   # ToST's: no decay on biases, norms, temp, gammas
  return config
