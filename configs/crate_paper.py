"""The NeurIPS 2023 paper's ImageNet-1K recipe, beside the repository README's (configs/crate_*.py).

  python -m crate_jax.train --config configs/crate_paper.py:crate_base --workdir DIR

The two disagree: the README command trains with Lion, lr 2e-4, weight decay 0.05, batch 512,
200 epochs and 20 warm-up epochs (configs/crate_{tiny,small,base,large}.py); the paper's training
details give Lion with lr 2.4e-4, weight decay 0.5, batch 2,048, 150 epochs with 5 linear
warm-up epochs, then cosine decay, and only random crops and flips. The argument picks the model
(crate_tiny | crate_small | crate_base | crate_large, default crate_base).
"""
from crate_jax import config_lib

MODELS = ("crate_tiny", "crate_small", "crate_base", "crate_large")


def get_config(arg: str = "crate_base"):
  if arg not in MODELS:
    raise ValueError(f"configs/crate_paper.py:{arg} - the model must be one of {MODELS}")
  config = config_lib.imagenet_config(arg)
  config.batch_size = 2048
  config.eval_batch_size = 2048
  config.num_epochs = 150
  config.optimizer.name = "lion"
  config.optimizer.lr = 2.4e-4
  config.optimizer.weight_decay = 0.5
  config.optimizer.warmup_epochs = 5.0
  return config
