"""Input pipeline: tfds + tf.data, per-process shards, deterministic resumable training batches.

  train_iterator(data_cfg, *, global_batch_size, seed, start_step=0, process_index=None,
                 process_count=None)               -> host batches {"image", "label", "labels"}
  eval_iterator(data_cfg, *, global_batch_size, split=None, process_index=None,
                process_count=None)   -> padded host batches, plus "valid" (1 real, 0 padding)
  to_global(batch, sharding), prefetch_to_device(iterator, sharding, size=2)  -> global jax.Arrays
  check_batch_size(global_batch_size, num_devices, process_count=None)
  num_examples(data_cfg, split)
  source(name)      what a dataset name stands for, images or text (crate_jax.data.sources)
  DataReadError: an unreadable file (corrupt, missing) or transient read errors that outlasted
                 config.data.read_retries; both iterators retry transient errors (data/retry.py)

TensorFlow is imported on first use of a pipeline function, not with this package.
"""
from __future__ import annotations

import importlib

from crate_jax.data.device import check_batch_size, prefetch_to_device, to_global
from crate_jax.data.retry import DataReadError

_LAZY = {
    "train_iterator": "pipeline",
    "eval_iterator": "pipeline",
    "num_examples": "datasets",
    "get_builder": "datasets",
    "class_names": "datasets",
    "check_class_names": "datasets",
    "CLASS_NAMES_FILE": "datasets",
    "DATASETS": "datasets",
    "DatasetNotPreparedError": "datasets",
    "datasets_spec": ("datasets", "spec"),
    "source": "sources",
    "EmbeddedMnist": "embedded",
}

__all__ = ["DataReadError", "check_batch_size", "prefetch_to_device", "to_global", *_LAZY]


def __getattr__(name):
  if name in _LAZY:
    module, attr = _LAZY[name] if isinstance(_LAZY[name], tuple) else (_LAZY[name], name)
    return getattr(importlib.import_module(f"crate_jax.data.{module}"), attr)
  raise AttributeError(f"module 'crate_jax.data' has no attribute {name!r}")
