"""CRATE-alpha (UCSC-VLAA/CRATE-alpha) recipes: ImageNet-21K pre-training, ImageNet-1K fine-tuning.

  python -m crate_jax.train --config configs/crate_alpha.py:in21k --workdir gs://B/alpha_b16_in21k
  python -m crate_jax.train --config configs/crate_alpha.py:in1k \\
      --config.init_from=gs://B/alpha_b16_in21k --workdir gs://B/alpha_b16_in1k

The authors' big_vision configs: 91 epochs, batch 4,096; Adam b1 0.9, b2 0.95 (first moment in
bfloat16), global-norm clipping 1.0, 10 warm-up epochs then cosine to 1e-6, decoupled weight decay
0.1 on parameters named `kernel` only (not D, D1, cls, positions, LayerNorms, biases). Pre-training
(lr 8e-4): Inception crop (min area 8%) + flip, mixup 0.8 / cutmix 1.0 (switch 0.5), softmax
cross-entropy over 19,167 classes. Fine-tuning (lr 1.6e-4): + RandAugment(2, 9), label smoothing
0.1, eval resize 256 + centre crop 224, a fresh head; when the pre-training patch differs
(e.g. crate_alpha_b32 -> crate_alpha_b16), the patch-embedding kernel is resized on the warm start.
Pick the size with --config.model.name (crate_alpha_b16, crate_alpha_l14, ...).
"""
from crate_jax import config_lib

STAGES = ("in21k", "in1k")


def get_config(arg: str = "in21k"):
  if arg not in STAGES:
    raise ValueError(f"configs/crate_alpha.py:{arg} - the stage must be one of {STAGES}")
  config = config_lib.base_config(model="crate_alpha_b16")
  config.batch_size = 4096
  config.eval_batch_size = 4096
  config.num_epochs = 91
  opt = config.optimizer
  opt.name, opt.b1, opt.b2, opt.mu_dtype = "adamw", 0.9, 0.95, "bfloat16"
  opt.grad_clip_norm = 1.0
  opt.weight_decay = 0.1
  opt.decay_mask = "named_kernels"
  opt.warmup_epochs = 10.0
  data = config.data
  data.crop_min_area = 0.08
  data.flip = True
  if arg == "in21k":
    opt.lr = 8e-4
    opt.final_lr_fraction = 1e-6 / opt.lr
    data.name = "imagenet21k"
    data.num_classes = 19_167
    data.mixup_alpha, data.cutmix_alpha = 0.8, 1.0
    data.mix_switch_prob = 0.5
    config.label_smoothing = 0.0
  else:
    config.data.extra_eval = ("imagenet_v2", "imagenet2012_real")
    opt.lr = 1.6e-4
    opt.final_lr_fraction = 1e-6 / opt.lr
    data.randaugment_layers, data.randaugment_magnitude = 2, 9
    data.eval_resize = 256
    config.label_smoothing = 0.1
    config.init_head = True
  return config
