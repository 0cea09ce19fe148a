"""tf.data train and eval pipelines over prepared tfds datasets, sharded per JAX process.

Training is deterministic per batch: with n examples in this process's shard and local batch b,
an epoch has S = n // b steps and batch k is batch k mod S of epoch e = k // S. Epoch e is
  records (config.data.cache: decoded once, kept in memory; else read from the files in an order
  tfds shuffles with seed(seed, process, e)) -> shuffle buffer seeded by (seed, process, e)
  -> first S * b records -> record i augmented with key fold_in(key(seed, process, e), i)
  -> batches -> mixup / cutmix keyed by the global step k.
Nothing depends on where iteration started, so train_iterator(start_step=k) starts at epoch k // S,
drops that epoch's first (k mod S) * b records before they are decoded or augmented, and yields
exactly the batches an uninterrupted iterator yields from step k on.

Both iterators retry transient read errors (crate_jax.data.retry; config.data.read_retries and
retry_backoff_s): the pipeline is rebuilt at the failed batch (train: start_step=k; eval: the pass
with its first k batches skipped), so the batches are the same as without the error. An unreadable
file (corrupt, missing, or retries used up) raises DataReadError naming it.
"""
from __future__ import annotations

import collections
import dataclasses
import functools
from typing import Iterator

import jax
import numpy as np
import tensorflow as tf
import tensorflow_datasets as tfds

from crate_jax.data import (datasets, mix, multicrop, preprocess, randaugment, retry, text,
                            text_datasets)
from crate_jax.data.device import check_batch_size, host_cpus, process_position as _process

AUTOTUNE = tf.data.AUTOTUNE
TRAIN_AUGMENTS = ("inception_crop", "resize")
_SHUFFLE, _FILES, _AUGMENT, _MIX = range(1, 5)  # seed stream tags
_EVAL_CACHE: collections.OrderedDict = collections.OrderedDict()


def _int_seed(*parts: int) -> int:
  """A 31-bit seed that is a pure function of the integers `parts`."""
  state = np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(1)
  return int(state[0] >> 1)


def _key(*parts: int) -> tf.Tensor:
  """A stateless-RNG key (2,) int64 from the integers `parts`."""
  state = np.random.SeedSequence([int(p) % 2**32 for p in parts]).generate_state(2)
  return tf.constant(state.astype(np.int64))


def _read(ds: tf.data.Dataset):
  """Iterate a pipeline as numpy: where its read errors surface (tests inject faults here)."""
  return ds.as_numpy_iterator()


def _resilient(cfg, open_at, start: int, split: str, pi: int, pc: int, position: str,
               drop_remainder: bool):
  """retry.resilient over open_at, with config.data's retry settings."""
  data_dir = datasets.resolve_data_dir(cfg)
  what = (f"{cfg.name}:{split}" + (f" of process {pi} of {pc}" if pc > 1 else "")
          + f", data_dir {data_dir or 'tfds default'}")

  def files():
    shard = tfds.even_splits(split, n=pc, drop_remainder=drop_remainder)[pi]
    instructions = datasets.get_builder(cfg).info.splits[shard].file_instructions
    return [str(f.filename) for f in instructions]
  return retry.resilient(open_at, start, retry.Source(what, position, files),
                         retries=int(cfg.read_retries),
                         backoff_s=float(cfg.retry_backoff_s))


def pool_size(threads: int) -> int:
  """tf.data's private thread pool for config.data.threads: 0 = twice the host's CPUs, < 0 = none
  (TF's shared pool).

  Twice, because with one thread per CPU the map's workers wait on the reading, batching and
  prefetching that share the pool: on a 2-CPU VM the plain recipe kept 1.83 CPUs busy, 1.97 with
  4 threads (6, 8 and 16 gave 1.99-2.00), about 9% more images/s (docs/benchmarks.md).
  """
  return 2 * host_cpus() if threads == 0 else threads


def _options(cfg) -> tf.data.Options:
  options = tf.data.Options()
  options.deterministic = True
  options.threading.max_intra_op_parallelism = 1
  threads = pool_size(int(cfg.threads))
  if threads > 0:
    options.threading.private_threadpool_size = threads
  return options


def _records(builder, split, shuffle_seed: int | None = None,
             masks: bool = False) -> tf.data.Dataset:
  """{"image": encoded bytes, "label": int32} (+ "real_label" for multi-label sets, + "seg_mask" the
  ground-truth segmentation feature with masks=True) in file order (files shuffled iff
  shuffle_seed)."""
  read_config = tfds.ReadConfig(shuffle_seed=shuffle_seed, try_autocache=False)
  # Every image-like feature stays encoded (e.g. the pets' segmentation masks are never decoded).
  decoders = {k: tfds.decode.SkipDecoding() for k, f in builder.info.features.items()
              if isinstance(f, tfds.features.Image)}
  ds = builder.as_dataset(split=split, shuffle_files=shuffle_seed is not None,
                          read_config=read_config, decoders=decoders)
  info = datasets.spec(builder.name)

  def select(ex):
    out = {"image": ex["image"], "label": tf.cast(ex[info.label_key], tf.int32)}
    if info.real_labels_key:
      out["real_label"] = tf.cast(ex[info.real_labels_key], tf.int32)
    if masks and info.mask_key not in (None, "image"):
      out["seg_mask"] = ex[info.mask_key]
    return out
  return ds.map(select)


def _decoded(ds: tf.data.Dataset) -> tf.data.Dataset:
  """Decode images to uint8 (H, W, 3) and cache them in memory (config.data.cache)."""
  return ds.map(lambda ex: {**ex, "image": preprocess.decode(ex["image"])},
                num_parallel_calls=AUTOTUNE).cache()


def _check_train_cfg(cfg):
  if cfg.train_augment not in TRAIN_AUGMENTS:
    raise ValueError(f"config.data.train_augment={cfg.train_augment!r}: use one of "
                     f"{TRAIN_AUGMENTS}")
  if len(cfg.mean) != 3 or len(cfg.std) != 3:
    raise ValueError("config.data.mean and .std need 3 values (RGB)")
  randaugment.parse_ops(cfg.randaugment_ops)
  if cfg.get("multicrop"):
    multicrop.check(cfg)


def _train_example_fn(cfg):
  """(epoch key, position in epoch, record) -> {"image", "label", "labels"}, stateless.

  A tf.function, traced once and reused by every epoch's pipeline. With config.data.multicrop
  (task="dino"): DINO's views instead (crate_jax.data.multicrop).
  """
  if cfg.get("multicrop"):
    return multicrop.example_fn(cfg)
  size, antialias = int(cfg.image_size), bool(cfg.resize_antialias)
  area = (float(cfg.crop_min_area), 1.0)
  layers = int(cfg.randaugment_layers)
  ra = dict(num_layers=layers, magnitude=float(cfg.randaugment_magnitude),
            num_bins=int(cfg.randaugment_num_bins),
            ops=randaugment.parse_ops(cfg.randaugment_ops))

  @tf.function
  def example(epoch_key, index, ex):
    key = tf.random.experimental.stateless_fold_in(epoch_key, index)
    k_crop, k_flip, k_ra = tf.unstack(tf.random.experimental.stateless_split(key, 3))
    if cfg.train_augment == "inception_crop":
      image = preprocess.resize(preprocess.random_crop(ex["image"], k_crop, area), size, antialias)
    else:
      image = preprocess.resize(preprocess.decode(ex["image"]), size, antialias)
    if cfg.flip:
      image = preprocess.random_flip(image, k_flip)
    if layers > 0:
      image = preprocess.to_uint8(tf.ensure_shape(image, [size, size, 3]))
      image = randaugment.randaugment(image, k_ra, **ra)
    image = tf.ensure_shape(preprocess.normalize(image, cfg.mean, cfg.std), [size, size, 3])
    return {"image": image, "label": ex["label"],
            "labels": tf.one_hot(ex["label"], cfg.num_classes, dtype=tf.float32)}
  return example


def train_iterator(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local batches {"image" f32 (b,H,W,3), "label" i32 (b,), "labels" f32 (b,K)}.

  b = global_batch_size // process_count. Batch k is a function of (dataset, config, seed, k,
  process_index, process_count) only, so start_step=k resumes exactly (and a transient read error
  at step k is retried by rebuilding at start_step=k).
  """
  if text_datasets.is_text(data_cfg.name):
    return text.train_iterator(data_cfg, global_batch_size=global_batch_size, seed=seed,
                               start_step=start_step, process_index=process_index,
                               process_count=process_count)
  pi, pc = _process(process_index, process_count)
  open_at = functools.partial(_open_train, data_cfg, global_batch_size, int(seed), pi=pi, pc=pc)
  return _resilient(data_cfg, open_at, int(start_step), data_cfg.train_split, pi, pc,
                    "train step", drop_remainder=True)


def _open_train(data_cfg, global_batch_size: int, seed: int, start_step: int, *, pi: int,
                pc: int):
  """The train batches from start_step (checks the config and reads the metadata now)."""
  local = check_batch_size(global_batch_size, jax.device_count(), pc)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  _check_train_cfg(data_cfg)
  builder = datasets.get_builder(data_cfg)
  shard = tfds.even_splits(data_cfg.train_split, n=pc, drop_remainder=True)[pi]
  expected = datasets.split_size(builder, shard)
  cached = _decoded(_records(builder, shard)) if data_cfg.cache else None
  n = int((cached if cached is not None else _records(builder, shard, 0)).cardinality())
  n = n if n >= 0 else expected
  if n < local:
    raise ValueError(f"process {pi} holds {n} examples of {data_cfg.name}:{data_cfg.train_split}"
                     f", fewer than one local batch of {local}")
  plan = _TrainPlan(data_cfg, builder, shard, n, local, seed, pi, pc)
  if cached is not None:
    return _cached_batches(plan, cached, int(start_step))
  return _streamed_batches(plan, int(start_step))


@dataclasses.dataclass(frozen=True)
class _TrainPlan:
  cfg: object
  builder: object
  shard: object
  n: int          # examples in this process's shard
  local: int      # local batch size
  seed: int
  pi: int
  pc: int

  @property
  def steps(self) -> int:
    """Steps per epoch."""
    return self.n // self.local

  def key(self, tag: int) -> tf.Tensor:
    return _key(self.seed, self.pi, self.pc, tag)


def _epoch_records(records, plan: _TrainPlan, epoch) -> tf.data.Dataset:
  """One epoch: shuffled, cut to steps * b, as (augmentation key, position, record) triples."""
  epoch = tf.cast(epoch, tf.int64)
  buffer = min(int(plan.cfg.shuffle_buffer), plan.n)
  if buffer > 1:
    shuffle_seed = tf.random.stateless_uniform(
        [], seed=tf.random.experimental.stateless_fold_in(plan.key(_SHUFFLE), epoch),
        minval=None, maxval=None, dtype=tf.int64)
    records = records.shuffle(buffer, seed=shuffle_seed, reshuffle_each_iteration=False)
  epoch_key = tf.random.experimental.stateless_fold_in(plan.key(_AUGMENT), epoch)
  records = records.take(plan.steps * plan.local).enumerate()
  return records.map(lambda i, ex: (epoch_key, i, ex))


def _batches(triples, plan: _TrainPlan, first_step: int, example_fn) -> tf.data.Dataset:
  """Augment, batch and mix; the first batch is global step first_step."""
  ds = triples.map(example_fn, num_parallel_calls=AUTOTUNE)
  ds = ds.batch(plan.local, drop_remainder=True)
  cfg = plan.cfg
  mixup_alpha, cutmix_alpha = float(cfg.mixup_alpha), float(cfg.cutmix_alpha)
  if mixup_alpha > 0 or cutmix_alpha > 0:
    mix_key = plan.key(_MIX)
    kwargs = dict(mixup_alpha=mixup_alpha, cutmix_alpha=cutmix_alpha,
                  prob=float(cfg.mix_prob),
                  switch_prob=float(cfg.mix_switch_prob))
    ds = ds.enumerate(start=first_step).map(
        lambda step, b: mix.mix_batch(
            b, tf.random.experimental.stateless_fold_in(mix_key, step), **kwargs),
        num_parallel_calls=AUTOTUNE)
  return ds.prefetch(AUTOTUNE).with_options(_options(cfg))


def _cached_batches(plan: _TrainPlan, cached, start_step: int):
  """Decoded examples in memory: one tf.data pipeline over all epochs (epoch = a tensor)."""
  epoch, skip = divmod(start_step, plan.steps)
  epochs = tf.data.Dataset.range(epoch, 2**62)
  triples = epochs.flat_map(lambda e: _epoch_records(cached, plan, e)).skip(skip * plan.local)
  yield from _read(_batches(triples, plan, start_step, _train_example_fn(plan.cfg)))


def _streamed_batches(plan: _TrainPlan, start_step: int):
  """Encoded records from files: one pipeline per epoch, files shuffled per epoch by tfds.

  A resumed epoch skips its consumed records after the shuffle and before any decoding.
  """
  epoch, skip = divmod(start_step, plan.steps)
  example_fn = _train_example_fn(plan.cfg)
  while True:
    records = _records(plan.builder, plan.shard,
                       shuffle_seed=_int_seed(plan.seed, plan.pi, plan.pc, epoch, _FILES))
    triples = _epoch_records(records, plan, epoch).skip(skip * plan.local)
    count = 0
    ds = _batches(triples, plan, epoch * plan.steps + skip, example_fn)
    for batch in _read(ds):
      count += 1
      yield batch
    if count == 0:
      raise RuntimeError(f"epoch {epoch} of {plan.cfg.name} produced no batches")
    epoch, skip = epoch + 1, 0


def _eval_records(builder, shard, cfg, pi, pc, fresh: bool = False,
                  masks: bool = False) -> tf.data.Dataset:
  """Records in file order; with config.data.cache decoded once and kept across eval passes.

  fresh: drop the kept records (a retry must not reuse a cache that a failed pass was filling).
  """
  if not cfg.cache:
    return _records(builder, shard, masks=masks)
  key = (str(builder.data_dir), str(shard), pi, pc, masks)
  if fresh:
    _EVAL_CACHE.pop(key, None)
  if key not in _EVAL_CACHE:
    _EVAL_CACHE[key] = _decoded(_records(builder, shard, masks=masks))
    while len(_EVAL_CACHE) > 4:
      _EVAL_CACHE.popitem(last=False)
  return _EVAL_CACHE[key]


def eval_iterator(data_cfg, *, global_batch_size: int, split: str | None = None,
                  process_index: int | None = None, process_count: int | None = None,
                  masks: bool = False) -> Iterator[dict[str, np.ndarray]]:
  """One pass over `split` (default config.data.eval_split): full batches plus "valid" f32 (b,),
  1 for real examples and 0 for padding.

  Every process yields ceil(largest shard / b) batches; padding rows are zeros with valid 0.
  A transient read error at batch k is retried by rebuilding the pass with k batches skipped.
  masks=True adds "foreground" uint8 (b, H, W), the ground-truth segmentation (1 = foreground)
  through the image's geometry (datasets.DatasetSpec.mask_key; NoMasksError without one).
  """
  if text_datasets.is_text(data_cfg.name):
    return text.eval_iterator(data_cfg, global_batch_size=global_batch_size, split=split,
                              process_index=process_index, process_count=process_count)
  pi, pc = _process(process_index, process_count)
  local = check_batch_size(global_batch_size, jax.device_count(), pc)
  split = split or data_cfg.eval_split
  if masks:
    datasets.check_masks(data_cfg)
  opened = []

  def open_at(start):
    opened.append(start)
    return _open_eval(data_cfg, local, split, pi, pc, start, fresh=len(opened) > 1, masks=masks)
  return _resilient(data_cfg, open_at, 0, split, pi, pc, "eval batch", drop_remainder=False)


def _foreground(ex, image, info, size: int, resize_to: int) -> tf.Tensor:
  """uint8 (size, size) ground truth: the image itself above half intensity (mask_key "image"),
  else the mask feature's pixels among info.mask_foreground."""
  if info.mask_key == "image":
    return tf.cast(tf.reduce_mean(image, axis=-1) > 127.5, tf.uint8)
  labels = tf.cast(preprocess.eval_mask(ex["seg_mask"], size, resize_to), tf.int32)
  hit = tf.reduce_any(labels[..., None] == tf.constant(info.mask_foreground, tf.int32), axis=-1)
  return tf.cast(hit, tf.uint8)


def _open_eval(data_cfg, local: int, split: str, pi: int, pc: int, start: int, fresh: bool,
               masks: bool = False):
  """The eval pass from batch `start` on (reads the metadata now)."""
  builder = datasets.get_builder(data_cfg)
  shards = tfds.even_splits(split, n=pc, drop_remainder=False)
  num_batches = -(-max(datasets.split_size(builder, s) for s in shards) // local)
  size, resize_to = int(data_cfg.image_size), int(data_cfg.eval_resize)
  antialias = bool(data_cfg.resize_antialias)
  info, classes = datasets.spec(data_cfg.name), data_cfg.num_classes

  def fn(ex):
    image = preprocess.eval_image(ex["image"], size, resize_to, antialias)
    out = {"image": preprocess.normalize(image, data_cfg.mean, data_cfg.std), "label": ex["label"],
           "labels": tf.one_hot(ex["label"], classes, dtype=tf.float32)}
    if info.real_labels_key:  # multi-hot set of acceptable labels; all zeros = no valid label
      real = tf.one_hot(ex["real_label"], classes, dtype=tf.float32)
      out["real"] = tf.reduce_max(tf.concat([real, tf.zeros((1, classes))], 0), axis=0)
    if masks:
      out["foreground"] = _foreground(ex, image, info, size, resize_to)
    return out

  records = _eval_records(builder, shards[pi], data_cfg, pi, pc, fresh, masks)
  if start:
    records = records.skip(start * local)  # before decoding: record order is fixed
  ds = records.map(fn, num_parallel_calls=AUTOTUNE).batch(local)
  ds = ds.prefetch(AUTOTUNE).with_options(_options(data_cfg))
  empty = {"image": np.zeros((local, size, size, 3), np.float32),
           "label": np.zeros((local,), np.int32),
           "labels": np.zeros((local, classes), np.float32)}
  if info.real_labels_key:
    empty["real"] = np.zeros((local, classes), np.float32)
  if masks:
    empty["foreground"] = np.zeros((local, size, size), np.uint8)
  return _padded(ds, empty, num_batches, start)


def _padded(ds, empty, num_batches, start: int = 0):
  """Batches start, start + 1, ... of the pass, padded to full batches with valid 0 rows."""
  local = len(empty["label"])
  count = start
  for batch in _read(ds):
    n = len(batch["label"])
    out = {k: np.concatenate([v, empty[k][n:]]) if n < local else v for k, v in batch.items()}
    out["valid"] = (np.arange(local) < n).astype(np.float32)
    count += 1
    yield out
  for _ in range(count, num_batches):
    yield dict(empty, valid=np.zeros((local,), np.float32))
