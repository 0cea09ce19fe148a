"""Train on your own images: DIR/train/<class>/* and DIR/val/<class>/* (JPEG/PNG, any size,
grey or colour), a small CRATE as in configs/embedded.py.

  python -m crate_jax.train --config configs/image_folder.py --config.data.data_dir=DIR \
      --config.data.num_classes=N --workdir workdirs/mine

config.data.num_classes must equal the number of class folders (a mismatch is refused, naming the
count). The folder is prepared once into DIR/.tfds/ and reused (crate_jax/data/image_folder.py).
"""
import importlib.util
import os


def _embedded():
  path = os.path.join(os.path.dirname(os.path.abspath(__file__)), "embedded.py")
  spec = importlib.util.spec_from_file_location("_crate_embedded_config", path)
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  return module


def get_config():
  config = _embedded().get_config()
  config.data.name = "image_folder"
  config.data.train_split = "train"
  config.data.eval_split = "val"
  config.data.mean = (0.5,) * 3
  config.data.std = (0.25,) * 3
  config.data.shuffle_buffer = 10_000
  return config
