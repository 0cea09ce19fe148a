"""SimDINO on ImageNet-1K with the official recipe (RobinWu218/SimDINO: the README's ViT-B/16
command, `main_dino.py --arch vit_base --patch_size 16 --local_crops_number 10 --eps 0.05` on 8
GPUs x 64): CRATE-B/16 by default, ViT-B/16 for the comparison the paper makes.

  python -m crate_jax.train --config configs/simdino_base.py --workdir gs://B/simdino_crate_b16
  python -m crate_jax.train --config configs/simdino_base.py:vit_base --workdir gs://B/simdino_vit
  python -m crate_jax.plan --config configs/simdino_base.py --topology v5p-8

Recipe (config_lib.simdino_config): batch 512, AdamW lr 1e-3 (5e-4 x 512 / 256), 10 warm-up
epochs, cosine to 1e-6, weight decay 0.04 -> 0.4 on matrices, each gradient tensor clipped to
norm 3, drop path 0.1 on the student, 100 epochs, teacher momentum 0.996 -> 1, 2 x 224 global +
10 x 96 local crops, head 768 -> 2048 -> 2048 -> 256, eps 0.05 (main_dino.py's default is 0.5:
the README's command, which reproduces its table, passes 0.05), coeff 1, expa_type 1; the
coding rate over the global batch of 512, in float32, with bfloat16 compute.
"""
from crate_jax import config_lib

BACKBONES = ("crate_base", "vit_base")


def get_config(arg: str = "crate_base"):
  if arg not in BACKBONES:
    raise ValueError(f"configs/simdino_base.py:{arg} - the backbone must be one of {BACKBONES}")
  config = config_lib.simdino_config(model=arg)
  config.eval_every_epochs = 10.0
  config.checkpoint_every_epochs = 1.0
  return config
