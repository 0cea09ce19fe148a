"""CRATE-Tiny on ImageNet-1K with the official recipe (Lion, lr 2e-4, wd 0.05, batch 512,
200 epochs).

  python -m crate_jax.train --config configs/crate_tiny.py --workdir gs://BUCKET/crate_tiny
Needs ImageNet prepared with tfds (see README); override fields with --config.KEY=VALUE.
"""
from crate_jax import config_lib


def get_config():
  return config_lib.imagenet_config("crate_tiny")
