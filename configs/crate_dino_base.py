"""DINO self-distillation of CRATE-Base/16 on ImageNet-1K, as the long-form CRATE paper
(arXiv 2311.13110) trains it with DINO's recipe (crate_jax.config_lib.dino_config: 2 x 224 global
+ 10 x 96 local crops, K = 65536, teacher momentum 0.996 -> 1, AdamW, batch 1024, 100 epochs).

  python -m crate_jax.train --config configs/crate_dino_base.py --workdir workdirs/crate_dino_base
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.dino_config(model="crate_base")
  config.eval_every_epochs = 10.0
  config.checkpoint_every_epochs = 1.0
  return config
