"""The input pipeline: mocked imagenet2012 / cifar10 (offline), the embedded MNIST dataset, exact
resume, per-process shards, mixup / cutmix, global arrays on 8 simulated devices, clear errors."""
import hashlib
import json
import socket
import subprocess
import sys
import threading

import jax
import numpy as np
import pytest
import tensorflow as tf
import tensorflow_datasets as tfds
from jax.sharding import AxisType, Mesh, NamedSharding, PartitionSpec as P

from crate_jax import config_lib
from crate_jax import data
from crate_jax.data import datasets, embedded, mix, pipeline, preprocess, randaugment
from crate_jax.training.tasks import classification

from tests.helpers import ROOT
MOCK_N = 24  # mock_data yields 24 examples for any split; the metadata says the same
MOCK_SIZES = {"imagenet2012": {"train": MOCK_N, "validation": MOCK_N},
              "cifar10": {"train": MOCK_N, "test": MOCK_N},
              "imagenet_v2": {"test": MOCK_N}, "imagenet2012_real": {"validation": MOCK_N}}


def data_cfg(name="imagenet2012", **overrides):
  cfg = config_lib.base_config().data
  spec = datasets.DATASETS[name]
  cfg.name, cfg.num_classes = name, spec.num_classes
  cfg.train_split, cfg.eval_split = spec.train_split, spec.eval_split
  for key, value in overrides.items():
    cfg[key] = value
  return cfg


def emb_cfg(data_dir, **overrides):
  base = dict(data_dir=str(data_dir), image_size=28, train_augment="resize", flip=False,
              eval_resize=28, mean=(0.1307,) * 3, std=(0.3081,) * 3, shuffle_buffer=4000,
              cache=True)
  base.update(overrides)
  return data_cfg("embedded_mnist", **base)


def take(iterator, n):
  return [next(iterator) for _ in range(n)]


def assert_same(a, b):
  assert len(a) == len(b)
  for x, y in zip(a, b):
    assert x.keys() == y.keys()
    for k in x:
      np.testing.assert_array_equal(x[k], y[k], err_msg=k)


def digest(image):
  return hashlib.sha1(np.ascontiguousarray(image).tobytes()).hexdigest()


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  """Metadata (no records) of "prepared" imagenet2012 / cifar10 with small split sizes."""
  return write_mock_metadata(tmp_path_factory.mktemp("mock_tfds"), MOCK_SIZES)


def write_mock_metadata(root, sizes_by_name):
  for name, sizes in sizes_by_name.items():
    builder = tfds.builder(name, data_dir=str(root), try_gcs=False)
    template = tfds.core.ShardedFileTemplate(data_dir=builder.data_path, dataset_name=name,
                                             split="train", filetype_suffix="tfrecord")
    builder.info.set_splits(tfds.core.SplitDict([
        tfds.core.SplitInfo(name=s, shard_lengths=[n], num_bytes=0,
                            filename_template=template.replace(split=s))
        for s, n in sizes.items()]))
    builder.data_path.mkdir(parents=True, exist_ok=True)
    builder.info.write_to_directory(builder.data_dir)
  return str(root)


@pytest.fixture
def mocked(mock_dir):
  with tfds.testing.mock_data(num_examples=MOCK_N, data_dir=mock_dir):
    yield


@pytest.fixture(scope="module")
def emb_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("emb_tfds")
  embedded.prepared_builder(str(root))
  return root


@pytest.fixture
def no_network(monkeypatch):
  def refuse(*args, **kwargs):
    raise AssertionError("network access attempted")
  monkeypatch.setattr(socket.socket, "connect", refuse)
  monkeypatch.setattr(socket, "create_connection", refuse)
  monkeypatch.setattr(socket, "getaddrinfo", refuse)


# ---------------------------------------------------------------- mocked tfds datasets

def check_batch(batch, cfg, b):
  s, k = cfg.image_size, cfg.num_classes
  assert batch["image"].shape == (b, s, s, 3) and batch["image"].dtype == np.float32
  assert batch["label"].shape == (b,) and batch["label"].dtype == np.int32
  assert batch["labels"].shape == (b, k) and batch["labels"].dtype == np.float32
  lo = (0 - np.array(cfg.mean)) / np.array(cfg.std)
  hi = (1 - np.array(cfg.mean)) / np.array(cfg.std)
  assert np.all(batch["image"] >= lo - 1e-5) and np.all(batch["image"] <= hi + 1e-5)
  assert batch["image"].std() > 0.1
  assert np.all((batch["label"] >= 0) & (batch["label"] < k))
  np.testing.assert_allclose(batch["labels"].sum(1), 1.0, rtol=1e-6)


@pytest.mark.parametrize("overrides", [
    dict(image_size=48),                                          # inception crop + flip
    dict(image_size=40, randaugment_layers=2, randaugment_magnitude=14),
])
def test_imagenet_mock_train_batches(mocked, overrides):
  cfg = data_cfg("imagenet2012", data_dir="/nonexistent", **overrides)
  for batch in take(data.train_iterator(cfg, global_batch_size=16, seed=0), 4):
    check_batch(batch, cfg, 16)
    np.testing.assert_array_equal(batch["labels"].argmax(1), batch["label"])


def test_cifar10_mock_resize_augment_and_eval(mocked):
  cfg = data_cfg("cifar10", image_size=32, train_augment="resize", eval_resize=32,
                 mean=(0.49, 0.48, 0.45), std=(0.25, 0.24, 0.26))
  for batch in take(data.train_iterator(cfg, global_batch_size=8, seed=1), 4):
    check_batch(batch, cfg, 8)
  batches = list(data.eval_iterator(cfg, global_batch_size=16))
  assert len(batches) == 2                                   # 24 examples -> 16 + 8 (padded)
  for batch in batches:
    check_batch({k: v[batch["valid"] > 0] for k, v in batch.items()}, cfg,
                int(batch["valid"].sum()))
  np.testing.assert_array_equal(batches[-1]["valid"], [1] * 8 + [0] * 8)
  assert np.all(batches[-1]["image"][8:] == 0) and np.all(batches[-1]["labels"][8:] == 0)


def test_imagenet_mock_eval_resize_center_crop(mocked):
  cfg = data_cfg("imagenet2012", image_size=32, eval_resize=36)
  batches = list(data.eval_iterator(cfg, global_batch_size=16))
  assert [b["valid"].sum() for b in batches] == [16, 8]
  assert batches[0]["image"].shape == (16, 32, 32, 3)
  # Deterministic: a second pass is identical.
  assert_same(batches, list(data.eval_iterator(cfg, global_batch_size=16)))


def test_imagenet_v2_and_real_as_extra_eval_sets(mocked):
  """ImageNet-V2 and -ReaL through the eval pipeline and step: ReaL top-1 counts a prediction in
  the example's label set, over the examples that have one; both are logged under their names."""
  import jax
  import jax.numpy as jnp
  from crate_jax.training import evaluation
  config = config_lib.imagenet_config("crate_tiny")
  config.data.image_size = 32
  config.data.eval_resize = 36
  config.eval_batch_size = 16
  sets = evaluation.extra_eval_sets(config)
  assert sorted(sets) == ["imagenet2012_real", "imagenet_v2"]
  assert (sets["imagenet_v2"].eval_split == "test"
          and sets["imagenet2012_real"].eval_split == "validation")
  batches = list(data.eval_iterator(sets["imagenet2012_real"], global_batch_size=16))
  real = np.concatenate([b["real"][b["valid"] > 0] for b in batches])
  assert real.shape == (MOCK_N, 1000) and set(np.unique(real)) <= {0.0, 1.0}
  assert "real" not in next(data.eval_iterator(sets["imagenet_v2"], global_batch_size=16))

  # A stand-in "model" whose prediction is fixed: class 3 for every image.
  class Fixed:
    def apply(self, variables, images, train=False):
      return jnp.tile(jax.nn.one_hot(3, 1000), (images.shape[0], 1))

  sharding = jax.sharding.SingleDeviceSharding(jax.devices()[0])
  to_one = lambda batch: {k: jax.device_put(v, sharding) for k, v in batch.items()}
  step = jax.jit(classification.classifier_eval(Fixed()))
  got = None
  for b in batches:
    m = step(None, to_one(b))
    got = m if got is None else got.merge(m)
  got = {k: float(v) for k, v in got.compute().items()}
  has_set = real.sum(1) > 0
  want = real[has_set, 3].mean() if has_set.any() else 0.0
  assert got["real_top1"] == pytest.approx(want)
  labels = np.concatenate([b["label"][b["valid"] > 0] for b in batches])
  assert got["top1"] == pytest.approx(np.mean(labels == 3))


def test_missing_extra_eval_set_is_one_clear_error_before_compiling(tmp_path):
  from crate_jax import train
  config = config_lib.imagenet_config("crate_tiny")
  config.data.data_dir = str(tmp_path)   # nothing prepared there
  with pytest.raises(FileNotFoundError, match="'imagenet2012' is not prepared"):
    train.plan(config)
  # ImageNet and V2 prepared, ReaL not: named, with how to train without it
  write_mock_metadata(tmp_path, {k: MOCK_SIZES[k] for k in ("imagenet2012", "imagenet_v2")})
  with pytest.raises(FileNotFoundError, match="'imagenet2012_real' is not prepared.*"
                                              r"--config.data.extra_eval=\"\(\)\""):
    train.plan(config)


def test_determinism_and_resume_across_epochs_with_mixing(mocked):
  """24 examples, batch 8: 3 steps per epoch; batches 4..8 from start_step=4 equal the originals."""
  cfg = data_cfg("cifar10", image_size=32, randaugment_layers=1, mixup_alpha=0.8,
                 cutmix_alpha=1.0, shuffle_buffer=16)
  run = take(data.train_iterator(cfg, global_batch_size=8, seed=3), 9)
  assert_same(run, take(data.train_iterator(cfg, global_batch_size=8, seed=3), 9))
  assert_same(run[4:], take(data.train_iterator(cfg, global_batch_size=8, seed=3, start_step=4), 5))
  other = take(data.train_iterator(cfg, global_batch_size=8, seed=4), 1)[0]
  assert not np.array_equal(other["image"], run[0]["image"])
  # Each epoch is a fresh permutation of the same 24 labels.
  assert sorted(np.concatenate([b["label"] for b in run[0:3]])) == sorted(
      np.concatenate([b["label"] for b in run[3:6]]))


def test_mixup_cutmix_targets_sum_to_one_and_mix(mocked):
  for alphas in [dict(mixup_alpha=1.0), dict(cutmix_alpha=1.0)]:
    cfg = data_cfg("cifar10", image_size=32, **alphas)
    batches = take(data.train_iterator(cfg, global_batch_size=8, seed=0), 6)
    labels = np.stack([b["labels"] for b in batches])
    np.testing.assert_allclose(labels.sum(-1), 1.0, rtol=1e-5)
    assert np.mean((labels > 1e-6).sum(-1) == 2) > 0.5     # most rows mix two classes
    plain = take(data.train_iterator(data_cfg("cifar10", image_size=32), global_batch_size=8,
                                     seed=0), 1)[0]
    assert not np.array_equal(plain["image"], batches[0]["image"])


def test_mix_batch_semantics():
  images = tf.reshape(tf.range(4 * 8 * 8 * 3, dtype=tf.float32), [4, 8, 8, 3])
  labels = tf.one_hot([0, 1, 2, 3], 4)
  key = tf.constant([1, 2], tf.int64)
  out = mix.mix_batch({"image": images, "labels": labels}, key, mixup_alpha=0.0, cutmix_alpha=1.0)
  pasted = np.mean(out["image"].numpy() != images.numpy(), axis=(1, 2, 3))
  lam = out["labels"].numpy()[0, 0]
  np.testing.assert_allclose(pasted[0], 1 - lam, atol=1e-6)      # lam = kept area
  np.testing.assert_allclose(out["labels"].numpy()[0, 3], 1 - lam, atol=1e-6)
  out = mix.mix_batch({"image": images, "labels": labels}, key, mixup_alpha=0.5, cutmix_alpha=0.0)
  lam = out["labels"].numpy()[0, 0]
  np.testing.assert_allclose(out["image"].numpy()[0],
                             lam * images[0].numpy() + (1 - lam) * images[3].numpy(), rtol=1e-5)


# ---------------------------------------------------------------- image ops

def test_inception_crop_boxes():
  for i in range(30):
    h, w = 50 + 7 * i, 300 - 5 * i
    top, left, ch, cw = [int(v) for v in preprocess.sample_crop(h, w, tf.constant([i, 7]))]
    assert 0 <= top and top + ch <= h and 0 <= left and left + cw <= w
    assert 0.08 * h * w * 0.9 <= ch * cw <= h * w
    assert 3 / 4 - 0.05 <= cw / ch <= 4 / 3 + 0.05
  # A grey PNG is cropped, resized and converted to 3 channels.
  png = tf.io.encode_png(tf.fill([20, 30, 1], tf.constant(200, tf.uint8)))
  out = preprocess.resize(preprocess.random_crop(png, tf.constant([1, 2]), (0.08, 1.0)), 16)
  assert out.shape == (16, 16, 3) and np.allclose(out.numpy(), 200, atol=0.5)


def test_eval_image_resize_shorter_then_center_crop():
  image = tf.zeros([300, 400, 3], tf.uint8)
  assert preprocess.resize_shorter(image, 256).shape == (256, 341, 3)   # torchvision Resize(256)
  assert preprocess.eval_image(image, 224, 256).shape == (224, 224, 3)
  assert preprocess.eval_image(image, 32, 32).shape == (32, 32, 3)


def test_randaugment_ops():
  rng = np.random.default_rng(0)
  image = tf.constant(rng.integers(0, 256, (24, 20, 3), dtype=np.uint8))
  for name in randaugment.DEFAULT_OPS:
    full = randaugment._ops(image, 1.0, 1.0)[name]()
    zero = randaugment._ops(image, 0.0, 1.0)[name]()
    assert full.dtype == tf.uint8 and full.shape == image.shape, name
    if name in ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
                "Color", "Contrast", "Sharpness", "Posterize"):
      np.testing.assert_array_equal(zero.numpy(), image.numpy(), err_msg=name)  # level 0 = no-op
    if name not in ("Identity", "AutoContrast"):
      assert not np.array_equal(full.numpy(), image.numpy()), name
  out = randaugment.randaugment(image, tf.constant([3, 4]), 2, 14, ops="Rotate,Equalize")
  assert out.shape == image.shape
  with pytest.raises(ValueError, match="unknown RandAugment ops"):
    randaugment.parse_ops("Rotate,Blur")


# ---------------------------------------------------------------- embedded dataset

def test_embedded_dataset_is_real_mnist(emb_dir):
  builder = embedded.prepared_builder(str(emb_dir))
  assert builder.info.splits["train"].num_examples == 4000
  assert builder.info.splits["test"].num_examples == 1000
  cfg = emb_cfg(emb_dir)
  assert data.num_examples(cfg, "train") == 4000 and data.num_examples(cfg, "test") == 1000
  for split, per_class in [("train", 400), ("test", 100)]:
    ex = tfds.as_numpy(builder.as_dataset(split=split, batch_size=-1))
    assert ex["image"].shape == (4000 if split == "train" else 1000, 28, 28, 1)
    np.testing.assert_array_equal(np.bincount(ex["label"], minlength=10), [per_class] * 10)
    pixels = ex["image"] / 255.0
    assert 0.10 < pixels.mean() < 0.16               # MNIST's mean intensity is 0.1307
    assert 0.7 < np.mean(pixels == 0) < 0.85          # mostly black background
    assert pixels[:, 10:18, 10:18].mean() > 3 * pixels[:, :4].mean()  # ink in the centre
  # Eval through the pipeline: 1000 real examples, 5 full batches.
  batches = list(data.eval_iterator(cfg, global_batch_size=200))
  assert len(batches) == 5 and sum(b["valid"].sum() for b in batches) == 1000
  assert np.bincount(np.concatenate([b["label"] for b in batches]), minlength=10).min() == 100


def test_embedded_prepare_is_offline_and_concurrency_safe(tmp_path, no_network):
  results, errors = [], []

  def prepare():
    try:
      results.append(embedded.prepared_builder(str(tmp_path)).info.splits["test"].num_examples)
    except Exception as e:  # pragma: no cover - reported below
      errors.append(e)
  threads = [threading.Thread(target=prepare) for _ in range(2)]
  for t in threads:
    t.start()
  for t in threads:
    t.join()
  assert not errors and results == [1000, 1000]
  assert embedded.prepared_builder(str(tmp_path)).is_prepared()


def test_embedded_resume_across_epoch_with_cache(emb_dir):
  """4000 / 128 = 31 steps per epoch; resume at 29 crosses into epoch 1."""
  cfg = emb_cfg(emb_dir, flip=True)
  run = take(data.train_iterator(cfg, global_batch_size=128, seed=0), 34)
  assert_same(run[29:], take(data.train_iterator(cfg, global_batch_size=128, seed=0,
                                                 start_step=29), 5))
  epoch0 = {digest(x) for b in run[:31] for x in b["image"]}
  assert len(epoch0) > 3900                            # one epoch = distinct examples


RESUME_SCRIPT = """
import hashlib, json, sys
from crate_jax import data
from tests.data.test_pipeline import emb_cfg
out = {}
for cache in (True, False):
  it = data.train_iterator(emb_cfg(sys.argv[1], cache=cache, flip=True), global_batch_size=128,
                           seed=5, start_step=30)
  out[str(cache)] = [hashlib.sha1(b"".join(v.tobytes() for v in next(it).values())).hexdigest()
                     for _ in range(3)]
print(json.dumps(out))
"""


def test_resume_in_a_fresh_process_is_exact(emb_dir):
  """A restarted job (new process, start_step=30, across the epoch end at 31) gets the same
  batches, with the in-memory cache (one pipeline over all epochs) and without (per-epoch files)."""
  proc = subprocess.run([sys.executable, "-c", RESUME_SCRIPT, str(emb_dir)], cwd=ROOT,
                        capture_output=True, text=True, timeout=120)
  assert proc.returncode == 0, proc.stderr[-3000:]
  fresh = json.loads(proc.stdout.strip().splitlines()[-1])
  for cache in (True, False):
    run = take(data.train_iterator(emb_cfg(emb_dir, cache=cache, flip=True), global_batch_size=128,
                                   seed=5), 33)
    expected = [hashlib.sha1(b"".join(v.tobytes() for v in b.values())).hexdigest()
                for b in run[30:]]
    assert fresh[str(cache)] == expected, cache


def test_two_processes_read_disjoint_shards(emb_dir):
  cfg = emb_cfg(emb_dir)
  seen = []
  for pi in range(2):
    it = data.train_iterator(cfg, global_batch_size=400, seed=0, process_index=pi, process_count=2)
    epoch = take(it, 10)                              # 2000 / 200 = 10 local steps per epoch
    assert epoch[0]["image"].shape == (200, 28, 28, 3)
    seen.append({digest(x) for b in epoch for x in b["image"]})
  assert len(seen[0]) == len(seen[1]) == 2000
  assert not seen[0] & seen[1]
  # Eval: every process runs the same number of padded batches; together they cover the split.
  counts, labels = [], []
  for pi in range(2):
    batches = list(data.eval_iterator(cfg, global_batch_size=400, process_index=pi,
                                      process_count=2))
    counts.append(len(batches))
    labels.append(sum(int(b["valid"].sum()) for b in batches))
  assert counts == [3, 3] and labels == [500, 500]


# ---------------------------------------------------------------- global arrays

def test_global_arrays_are_sharded_on_the_data_axis(emb_dir):
  mesh = Mesh(np.array(jax.devices()), ("data",), axis_types=(AxisType.Auto,))
  sharding = NamedSharding(mesh, P("data"))
  assert jax.device_count() == 8
  cfg = emb_cfg(emb_dir)
  batch = data.to_global(next(data.train_iterator(cfg, global_batch_size=64, seed=0)), sharding)
  assert batch["image"].shape == (64, 28, 28, 3) and batch["image"].sharding == sharding
  assert [s.data.shape for s in batch["image"].addressable_shards] == [(8, 28, 28, 3)] * 8
  assert [s.data.shape for s in batch["labels"].addressable_shards] == [(8, 10)] * 8
  it = data.prefetch_to_device(data.train_iterator(cfg, global_batch_size=64, seed=0), sharding)
  first = next(it)
  np.testing.assert_array_equal(np.asarray(first["image"]), np.asarray(batch["image"]))
  assert next(it)["label"].sharding == sharding
  it.close()  # joins the thread and closes the source: no thread left inside tf.data at exit
  assert not it._thread.is_alive()
  evals = list(data.prefetch_to_device(data.eval_iterator(cfg, global_batch_size=400), sharding))
  assert len(evals) == 3 and float(sum(e["valid"].sum() for e in evals)) == 1000

  def failing():
    yield {"x": np.zeros((8,), np.float32)}
    raise KeyError("source failed")
  it = data.prefetch_to_device(failing(), sharding)
  assert next(it)["x"].shape == (8,)
  with pytest.raises(KeyError, match="source failed"):   # errors surface in the consumer
    next(it)


# ---------------------------------------------------------------- errors

@pytest.mark.parametrize("name, hint", [("imagenet2012", "--manual_dir"),
                                        ("cifar10", "tfds build cifar10")])
def test_missing_data_is_one_clear_error_without_network(tmp_path, no_network, name, hint):
  cfg = data_cfg(name, data_dir=str(tmp_path / "empty"))
  for call in [lambda: data.train_iterator(cfg, global_batch_size=8, seed=0),
               lambda: data.eval_iterator(cfg, global_batch_size=8),
               lambda: data.num_examples(cfg, "train")]:
    with pytest.raises(data.DatasetNotPreparedError) as e:
      call()
    message = str(e.value)
    assert name in message and str(tmp_path / "empty") in message and hint in message
  assert isinstance(e.value, FileNotFoundError)


def test_batch_size_and_name_errors(emb_dir):
  with pytest.raises(ValueError, match="not divisible by the 8 devices"):
    data.check_batch_size(12, 8, 1)
  with pytest.raises(ValueError, match="not divisible by the 3 processes"):
    data.check_batch_size(16, 4, 3)
  assert data.check_batch_size(64, 8, 2) == 32
  with pytest.raises(ValueError, match="8 devices"):
    data.train_iterator(emb_cfg(emb_dir), global_batch_size=12, seed=0)
  unknown = data_cfg("cifar10")
  unknown.name = "mnist"
  with pytest.raises(ValueError, match="supported.*cifar10.*embedded_mnist.*imagenet2012"):
    data.train_iterator(unknown, global_batch_size=8, seed=0)
  with pytest.raises(ValueError, match="num_classes"):
    data.num_examples(emb_cfg(emb_dir, num_classes=100), "train")
  with pytest.raises(ValueError, match="no split 'validation'"):
    data.num_examples(emb_cfg(emb_dir), "validation")
  with pytest.raises(ValueError, match="train_augment"):
    data.train_iterator(emb_cfg(emb_dir, train_augment="crop"), global_batch_size=8, seed=0)


def test_thread_pool_default_is_twice_the_cpus():
  """config.data.threads: 0 sizes tf.data's private pool at 2 x the CPUs this process may use,
  n > 0 at n, < 0 leaves TF's shared pool."""
  cfg = config_lib.base_config().data
  assert cfg.threads == 0
  assert pipeline._options(cfg).threading.private_threadpool_size == 2 * pipeline.host_cpus()
  cfg.threads = 3
  assert pipeline._options(cfg).threading.private_threadpool_size == 3
  cfg.threads = -1
  assert pipeline._options(cfg).threading.private_threadpool_size is None
