"""The causal ToST on the embedded Shakespeare (offline, byte-level, a few minutes on 2 CPU
cores): configs/embedded_lm.py's recipe and budget (2,000 steps of 32 x 64 bytes) with TSSA
blocks (the official LayerScale 1e-5 on both branches, GPT-2's init) at the same width, depth
and heads as its CRATE-GPT and GPT baselines.

  python -m crate_jax.train --config configs/tost_embedded_lm.py --workdir workdirs/tost_lm
  python -m crate_jax.generate --checkpoint workdirs/tost_lm --prompt "ROMEO"
  python -m crate_jax.analyze --config configs/tost_embedded_lm.py \
      --checkpoint workdirs/tost_lm --out workdirs/tost_lm/analysis
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.text_config(model="tost_gpt_mini", task="lm")
  config.model.kwargs.update(dim=128, depth=4, heads=4)
  config_lib.embedded_text_recipe(config)  # configs/embedded_lm.py's data and recipe
  return config
