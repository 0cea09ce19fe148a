"""Throughput (images/s) of the crate_jax training input pipeline on this machine's CPUs.

  python benchmarks/input_pipeline.py --steps 50
  python benchmarks/input_pipeline.py --steps 30 --cases embedded_224_ra mock_imagenet_224

Cases:
  embedded_28        configs/embedded.py: 28 px MNIST digits, resize mode, cached in memory
  embedded_224       the same digits upsampled to 224 px: inception crop + flip (ImageNet recipe)
  embedded_224_ra    embedded_224 plus RandAugment(2, 14) (the fine-tuning recipe)
  embedded_224_mix   embedded_224_ra plus mixup 0.8 / cutmix 1.0 on every batch
  mock_imagenet_224  tfds.testing.mock_data imagenet2012 (random JPEGs generated in Python, so a
                     lower bound dominated by the mock generator), inception crop + flip, no cache
Host-side numpy batches only (no device transfer). Nothing is downloaded.
"""
from __future__ import annotations

import argparse
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

from crate_jax import config_lib  # noqa: E402
from crate_jax import data  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
CASES = ("embedded_28", "embedded_224", "embedded_224_ra", "embedded_224_mix", "mock_imagenet_224")


def embedded_cfg(data_dir, size, **overrides):
  cfg = config_lib.load_config(os.path.join(ROOT, "configs", "embedded.py")).data
  cfg.data_dir = data_dir
  if size != 28:
    cfg.image_size, cfg.train_augment, cfg.flip = size, "inception_crop", True
    cfg.randaugment_layers, cfg.randaugment_magnitude = 2, 14
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def measure(cfg, batch_size, steps, warmup):
  """(images/s over `steps` batches after `warmup`, seconds to the first batch)."""
  start = time.perf_counter()
  it = data.train_iterator(cfg, global_batch_size=batch_size, seed=0)
  next(it)
  first = time.perf_counter() - start
  for _ in range(warmup):
    next(it)
  start = time.perf_counter()
  for _ in range(steps):
    batch = next(it)
  elapsed = time.perf_counter() - start
  assert batch["image"].shape == (batch_size, cfg.image_size, cfg.image_size, 3)
  return steps * batch_size / elapsed, first


def mock_imagenet(tmp, batch_size, steps, warmup):
  import tensorflow_datasets as tfds
  builder = tfds.builder("imagenet2012", data_dir=tmp, try_gcs=False)
  n = (steps + warmup + 1) * batch_size
  template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name="imagenet2012",
                                           split="train", filetype_suffix="tfrecord")
  builder.info.set_splits(tfds.core.SplitDict([
      tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                          filename_template=template.replace(split=s))
      for s in ("train", "validation")]))
  builder.data_path.mkdir(parents=True, exist_ok=True)
  builder.info.write_to_directory(builder.data_dir)
  cfg = config_lib.base_config().data
  cfg.shuffle_buffer = 1024
  with tfds.testing.mock_data(num_examples=n, data_dir=tmp):
    return measure(cfg, batch_size, steps, warmup)


def main(argv=None):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--steps", type=int, default=50, help="timed batches per case")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches after the first")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--cases", nargs="+", default=list(CASES), choices=CASES)
  parser.add_argument("--data-dir", default=None,
                      help="tfds dir for embedded_mnist (default: a fresh temporary dir)")
  args = parser.parse_args(argv)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, "tfds")
    print(f"cpus={os.cpu_count()} batch={args.batch_size} steps={args.steps}")
    for case in args.cases:
      if case == "mock_imagenet_224":
        rate, first = mock_imagenet(os.path.join(tmp, "mock"), args.batch_size, args.steps,
                                    args.warmup)
      else:
        size = 28 if case == "embedded_28" else 224
        extra = dict(mixup_alpha=0.8, cutmix_alpha=1.0) if case.endswith("mix") else {}
        if case == "embedded_224":
          extra = dict(randaugment_layers=0)
        rate, first = measure(embedded_cfg(data_dir, size, **extra), args.batch_size, args.steps,
                              args.warmup)
      print(f"{case:<20} {rate:10.0f} img/s   (first batch after {first:.1f} s)", flush=True)


if __name__ == "__main__":
  main()
