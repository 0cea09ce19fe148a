"""DINO self-distillation of CRATE-Base/16 on ImageNet-1K with DINO's own ViT recipe
(crate_jax.config_lib.dino_config: 2 x 224 global + 10 x 96 local crops, K = 65536, teacher
momentum 0.996 -> 1, AdamW, batch 1024, 100 epochs). The long-form CRATE paper (arXiv
2311.13110) reports CRATE trained with DINO, but its model size and hyper-parameters could not
be read here: CRATE-B/16 and keeping DINO's recipe unchanged are our choices, not the paper's.

  python -m crate_jax.train --config configs/crate_dino_base.py --workdir workdirs/crate_dino_base
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.dino_config(model="crate_base")
  config.eval_every_epochs = 10.0
  config.checkpoint_every_epochs = 1.0
  return config
