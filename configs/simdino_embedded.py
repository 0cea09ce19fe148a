"""SimDINO self-distillation of a small CRATE on the embedded digits (offline, on CPU, minutes):
the DINO embedded default (configs/crate_dino_embedded.py) with its loss replaced by SimDINO's.

  python -m crate_jax.train --config configs/simdino_embedded.py --workdir workdirs/simdino_emb
  python -m crate_jax.evaluate --config configs/simdino_embedded.py \
      --checkpoint workdirs/simdino_emb --protocol knn --pool mean --vs_random_init

Same backbone (CRATE, patch 4, dim 96, depth 4, mean-pooled), budget (8 epochs at batch 128),
crops (2 x 28 px global, 4 x 16 px local), optimiser (AdamW lr 5e-4, constant wd 0.04, global
clip 3) and teacher momentum (0.99 -> 1) as the DINO default, so the two differ by their
objective alone. SimDINO's head: 256 -> z_dim 64 (DINO's bottleneck width), no prototypes.
eps 0.5 (main_dino.py's default; the README's 0.05 is for ImageNet at z_dim 256: see
docs/self-supervision.md for both here). The recipe's schedule-level choices (wd 0.04 -> 0.4,
per-parameter clipping, drop path 0.1) are in configs/simdino_base.py.
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.simdino_config(model="crate_tiny")
  config.model.kwargs.update(patch_size=4, dim=96, depth=4, heads=4, dim_head=24, pool="mean",
                             drop_path_rate=0.0)
  config.compute_dtype = "float32"

  config_lib.embedded_mnist_data(config.data)  # 28 px digits, offline
  config.data.multicrop.update(num_local=4, local_size=16, global_scale=(0.5, 1.0),
                               local_scale=(0.2, 0.5), jitter_p=0.0, grey_p=0.0)
  config.simdino.update(z_dim=64, hidden_dim=256, eps=0.5)
  config.ema_decay = 0.99

  config.batch_size = 128
  config.eval_batch_size = 200
  config.num_epochs = 8
  opt = config.optimizer
  opt.lr, opt.warmup_epochs, opt.final_lr_fraction = 5e-4, 1.0, 0.0
  opt.weight_decay, opt.weight_decay_final, opt.decay_mask = 0.04, -1.0, "all"
  opt.grad_clip_norm, opt.clip_per_param = 3.0, False

  config.log_every_steps = 25
  config.eval_every_steps = 125
  config.checkpoint_every_steps = 125
  config.keep_checkpoints = 2
  return config
