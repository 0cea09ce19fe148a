"""CRATE-MAE-Base pre-training on ImageNet-1K (masked autoencoding, mask ratio 0.75).

  python -m crate_jax.train --config configs/crate_mae_base.py --workdir gs://BUCKET/crate_mae_base

MAE-style recipe: AdamW (b2 0.95, wd 0.05), lr 1.5e-4 x batch / 256, 40 warm-up epochs, 800 epochs,
random-resized crop (area 0.2-1) + flip, loss = MSE on the masked patches. Fine-tune the encoder
into a classifier afterwards (layer-wise lr decay 0.65, RandAugment, mixup/cutmix):

  python -m crate_jax.train --config configs/crate_mae_base.py:finetune \\
      --config.init_from=gs://BUCKET/crate_mae_base --workdir gs://BUCKET/crate_mae_base_ft
"""
import ml_collections

from crate_jax import config_lib


def get_config(arg: str = "pretrain"):
  if arg not in ("pretrain", "finetune"):
    raise ValueError(f"configs/crate_mae_base.py:{arg} - use :pretrain or :finetune")
  config = config_lib.base_config()
  config.optimizer.name = "adamw"
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.05
  config.label_smoothing = 0.1
  if arg == "pretrain":
    config.task = "mae"
    config.model.name = "crate_mae_base"
    config.model.kwargs = ml_collections.ConfigDict(  # no classes: the MAE has no head
        {"patch_size": 16, "image_size": config.data.get_ref("image_size")})
    config.batch_size = 4096
    config.num_epochs = 800
    config.optimizer.lr = 1.5e-4 * config.batch_size / 256
    config.optimizer.warmup_epochs = 40.0
    config.data.crop_min_area = 0.2
    config.eval_every_steps = 10_000
  else:  # the classifier on the pre-trained encoder; its head (fc_norm, head) starts fresh
    config.model.name = "crate_mae_classifier_base"
    config.batch_size = 1024
    config.num_epochs = 100
    config.optimizer.lr = 5e-4 * config.batch_size / 256
    config.optimizer.b2 = 0.999
    config.optimizer.warmup_epochs = 5.0
    config.data.randaugment_layers = 2
    config.data.randaugment_magnitude = 9
    config.data.mixup_alpha = 0.8
    config.data.cutmix_alpha = 1.0
    config.optimizer.layer_decay = 0.65   # MAE's fine-tuning recipe (ViT-B)
    config.init_head = True
  return config
