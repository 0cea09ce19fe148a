"""ToST on ImageNet-1K with the official recipe (RobinWu218/ToST, tost_vision/main.py defaults):
400 epochs, AdamW lr 5e-4 at batch 512 (DeiT's linear scaling), weight decay 0.05 on matrices
only (timm's filter: no decay on biases, norms, `temp`, the class token), 5 warm-up epochs then
cosine to 1e-5, label smoothing 0.1, mixup 0.8 / cutmix 1.0 (switch 0.5), RandAugment(2, 9),
drop path 0.1 in every TSSA block, a weight EMA (0.99996) evaluated.

  python -m crate_jax.train --config configs/tost.py:tiny_12_p16 --workdir gs://B/tost_t12
  python -m crate_jax.plan --config configs/tost.py:small_24_p8 --topology v5p-8

The size is tost_cab_<arg> (tiny_12, small_12, tiny_24, small_24, medium_24, large_24; _p16 or
_p8). Not reproduced here (the pipeline has no such options): repeated augmentation and random
erasing (reprob 0.25); the official warm-up starts at 1e-6, ours at 0.
"""
from crate_jax import config_lib
from crate_jax.models import tost

SIZES = tuple(f"{size}_p{patch}" for size in tost.TOST_SIZES for patch in (16, 8))


def get_config(arg: str = "tiny_12_p16"):
  if arg not in SIZES:
    raise ValueError(f"configs/tost.py:{arg} - the size must be one of {SIZES}")
  config = config_lib.imagenet_config(f"tost_cab_{arg}")
  config.model.kwargs.patch_size = 16 if arg.endswith("_p16") else 8   # base_config says 16
  config.batch_size = config.eval_batch_size = 512
  config.num_epochs = 400
  opt = config.optimizer
  opt.name, opt.lr, opt.b1, opt.b2 = "adamw", 5e-4, 0.9, 0.999
  opt.weight_decay, opt.decay_mask = 0.05, "kernels"
  opt.warmup_epochs = 5.0
  opt.final_lr_fraction = 1e-5 / opt.lr
  config.label_smoothing = 0.1
  config.data.mixup_alpha, config.data.cutmix_alpha = 0.8, 1.0
  config.data.randaugment_layers, config.data.randaugment_magnitude = 2, 9
  config.model.drop_path_rate = 0.1
  config.ema_decay = 0.99996
  return config
