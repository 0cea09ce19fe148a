"""Throughput (images/s) of the crate_jax training input pipeline on this machine's CPUs.

  python benchmarks/input_pipeline.py                   # the JPEG set: 4 recipes, vs torchvision
  python benchmarks/input_pipeline.py --seconds 30 --num-images 5000 --out workdirs/input.json
  python benchmarks/input_pipeline.py --tiny --no-torchvision      # seconds: a smoke run
  python benchmarks/input_pipeline.py --steps 30 --cases embedded_224_ra mock_imagenet_224

JPEG cases (the default): real JPEG files from the ImageNet-like set below, read from the image
folder through crate_jax.data's real pipeline (data.train_iterator / data.eval_iterator with
config.data.name=image_folder), from the JPEG bytes to the host batch handed to the device:
  plain           RandomResizedCrop 224 + flip (the ImageNet recipe, config_lib.base_config)
  randaug_mix     plain + RandAugment(2, 9) + mixup 0.8 / cutmix 1.0 on every batch (fine-tuning;
                  configs/finetune.py uses M=14: the cost hardly depends on M)
  dino_multicrop  DINO / SimDINO multi-crop: 2 x 224 global + 10 x 96 local crops with jitter,
                  grey, blur, solarise (config_lib.dino_config, crate_jax.data.multicrop)
  eval            resize the shorter side to 256 + centre crop 224 (passes over the train split)
and the same transforms as a PyTorch user would write them with torchvision (PIL decode through
datasets.ImageFolder, transforms.v2, mixup/cutmix in the DataLoader's collate_fn, DataLoader with
num_workers = crate_jax's threads, 2 x cores by default), reading the same files and giving batches
of the same shapes (NCHW there, NHWC here). Both sides use bilinear resizing with antialiasing
(DINO's own code: bicubic crops). crate_jax reads the JPEG bytes from the tfds copy the image
folder is prepared into once (the bytes as they are, in TFRecord files); torchvision opens the
files. Warm-up batches (and the preparation, tracing and worker start-up before them) are not
timed.

The JPEG set: benchmarks/jpeg_set.py (--num-images, default 2,000, written once under
--cache-dir, default workdirs/bench_jpegs, and reused).

Synthetic cases (the earlier ones; crate_jax only, host-side numpy batches):
  embedded_28        configs/embedded.py: 28 px MNIST digits, resize mode, cached in memory
  embedded_224       the same digits upsampled to 224 px: inception crop + flip (ImageNet recipe)
  embedded_224_ra    embedded_224 plus RandAugment(2, 14) (the fine-tuning recipe)
  embedded_224_mix   embedded_224_ra plus mixup 0.8 / cutmix 1.0 on every batch
  mock_imagenet_224  tfds.testing.mock_data imagenet2012 (random JPEGs generated in Python, so a
                     lower bound dominated by the mock generator), inception crop + flip, no cache
Nothing is downloaded. Needs scikit-image for the set (pip install -e ".[bench]") and, for the
comparison, torchvision matching the installed torch (see TORCHVISION_HINT).
"""
from __future__ import annotations

import argparse
import gc
import json
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # its sibling modules

import jpeg_set  # noqa: E402
import torchvision_pipeline  # noqa: E402
from pipeline_timing import Setup, Timer, cpu_model  # noqa: E402
from crate_jax import config_lib  # noqa: E402
from crate_jax import data  # noqa: E402
from crate_jax.data import pipeline  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
JPEG_CASES = ("plain", "randaug_mix", "dino_multicrop", "eval")
SYNTHETIC_CASES = ("embedded_28", "embedded_224", "embedded_224_ra", "embedded_224_mix",
                   "mock_imagenet_224")
CASES = JPEG_CASES + SYNTHETIC_CASES
LABELS = {"plain": "plain (RRC + flip)", "randaug_mix": "RandAugment(2,9) + mixup/cutmix",
          "dino_multicrop": "DINO multi-crop 2x224 + {n}x96", "eval": "eval (resize + centre crop)"}
DEFAULT_CACHE = os.path.join(ROOT, "workdirs", "bench_jpegs")
TORCHVISION_HINT = ("torchvision must import beside the installed torch, here or in a venv of its "
                    "own given as --torchvision-python (on x86_64 Python 3.11: python -m venv "
                    ".tv && .tv/bin/pip install torch==2.14.1 torchvision==0.29.1 pillow)")


# ------------------------------------------------------------------------------- machine
# ------------------------------------------------------------------------------ crate_jax
def crate_data_cfg(case: str, root: str, classes: int, num_local: int | None = None,
                   threads: int = 0):
  """config.data of the recipe, pointed at the image folder (num_local: DINO's local crops, when
  not the recipe's 10; threads: config.data.threads)."""
  config = config_lib.dino_config() if case == "dino_multicrop" else config_lib.base_config()
  cfg = config.data
  cfg.name, cfg.data_dir, cfg.num_classes = "image_folder", root, classes
  cfg.threads = threads
  cfg.train_split, cfg.eval_split = "train", "val"
  if case == "dino_multicrop" and num_local is not None:
    cfg.multicrop.num_local = num_local
  if case == "randaug_mix":
    cfg.randaugment_layers, cfg.randaugment_magnitude = 2, 9
    cfg.mixup_alpha, cfg.cutmix_alpha = 0.8, 1.0
  return cfg


def _check_shapes(case: str, batch: dict, b: int, cfg) -> None:
  size = int(cfg.image_size)
  if case == "dino_multicrop":
    m = cfg.multicrop
    assert batch["global"].shape == (b, 2, size, size, 3), batch["global"].shape
    assert batch["local"].shape == (b, m.num_local, m.local_size, m.local_size, 3)
  else:
    assert batch["image"].shape == (b, size, size, 3), batch["image"].shape
    assert batch["labels"].shape == (b, cfg.num_classes)


def crate_rate(case: str, setup: Setup) -> dict:
  """crate_jax figures (Timer.run) of one JPEG case."""
  cfg = crate_data_cfg(case, setup.root, setup.classes, setup.num_local, setup.threads)
  batch_size, its = setup.batch_size, []
  per_epoch = max(1, setup.images // batch_size)   # train batches per epoch (drop_remainder)
  count = [0]   # batches of the current iterator

  def open_iter():
    count[0] = 0
    if case == "eval":
      return data.eval_iterator(cfg, global_batch_size=batch_size, split="train")
    return data.train_iterator(cfg, global_batch_size=batch_size, seed=0)

  def next_batch():
    while True:
      if not its:
        its.append(open_iter())
      try:
        batch = next(its[-1])
      except StopIteration:   # an eval pass ended: the next one
        its.pop().close()
        continue
      _check_shapes(case, batch, batch_size, cfg)
      first = count[0] == 0 if case == "eval" else count[0] % per_epoch == 0
      count[0] += 1
      return (int(batch["valid"].sum()) if "valid" in batch else batch_size), first

  try:
    return setup.timer.run(next_batch, setup.warmup)
  finally:
    for it in its:     # stop tf.data's threads before the other side runs
      it.close()
    gc.collect()


# ---------------------------------------------------------------------------- torchvision
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
  it.close()
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


def synthetic_rate(case, tmp, data_dir, batch_size, steps, warmup):
  if case == "mock_imagenet_224":
    return mock_imagenet(os.path.join(tmp, "mock"), batch_size, steps, warmup)
  size = 28 if case == "embedded_28" else 224
  extra = dict(mixup_alpha=0.8, cutmix_alpha=1.0) if case.endswith("mix") else {}
  if case == "embedded_224":
    extra = dict(randaugment_layers=0)
  return measure(embedded_cfg(data_dir, size, **extra), batch_size, steps, warmup)


# ----------------------------------------------------------------------------------- main
def _restart(figures: dict | None) -> str:
  r = figures and figures.get("restart_s")
  return "-" if r is None else f"{r:.2f}"


def format_table(rows: list[dict], cores: int) -> str:
  """pipeline | crate_jax img/s, per core | torchvision img/s, per core | ratio | restarts."""
  head = (f"{'pipeline':<32} {'crate_jax img/s':>15} {'per core':>9} {'torchvision img/s':>17} "
          f"{'per core':>9} {'ratio':>6}  {'epoch restart s':>15}")
  lines = [head, "-" * len(head)]
  for r in rows:
    cj, tv = r["crate_jax"], r.get("torchvision")
    tv_cols = (f"{tv['img_s']:17.0f} {tv['img_s'] / cores:9.1f} {r['ratio']:6.2f}" if tv else
               f"{'-':>17} {'-':>9} {'-':>6}")
    restart = f"{_restart(cj)} / {_restart(tv)}"
    label = LABELS.get(r["case"], r["case"]).format(n=r.get("num_local"))
    lines.append(f"{label:<32} {cj['img_s']:15.0f} {cj['img_s'] / cores:9.1f} {tv_cols}  "
                 f"{restart:>15}")
  if any("restart_s" in r["crate_jax"] for r in rows):
    lines.append("img/s: steady state, batches that start an epoch (or eval pass) left out; "
                 "epoch restart s: what such a batch takes beyond a steady one (crate_jax / "
                 "torchvision); core = logical CPU (a vCPU on a cloud VM)")
  return "\n".join(lines)


def parse_args(argv):
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--cases", nargs="+", default=None, choices=CASES,
                      help=f"default: the JPEG cases {' '.join(JPEG_CASES)}")
  parser.add_argument("--batches", "--steps", dest="batches", type=int, default=30,
                      help="timed batches per pipeline (default 30)")
  parser.add_argument("--seconds", type=float, default=None,
                      help="time each pipeline for this long instead of --batches")
  parser.add_argument("--warmup", type=int, default=5, help="untimed batches after the first")
  parser.add_argument("--repeats", type=int, default=1,
                      help="time each side this many times, alternating, and report the run with "
                           "the median img/s (a shared machine's load drifts)")
  parser.add_argument("--batch-size", type=int, default=128)
  parser.add_argument("--num-images", type=int, default=2000, help="JPEGs in the set")
  parser.add_argument("--classes", type=int, default=1000,
                      help="class folders (default ImageNet's 1000; at most --num-images)")
  parser.add_argument("--cache-dir", default=DEFAULT_CACHE,
                      help="where the JPEG set is written once and reused")
  parser.add_argument("--threads", type=int, default=0,
                      help="crate_jax's config.data.threads (tf.data's private pool; default 0: "
                           "2 x the cores)")
  parser.add_argument("--workers", type=int, default=None,
                      help="torchvision DataLoader workers (default: as many as crate_jax's "
                           "threads, so both sides run the same number of workers)")
  parser.add_argument("--no-torchvision", dest="torchvision", action="store_false",
                      help="crate_jax only")
  parser.add_argument("--torchvision-python", default=None, metavar="PY",
                      help="run the torchvision side with this interpreter (a venv with torch, "
                           "torchvision and Pillow) instead of in this process")
  parser.add_argument("--tiny", action="store_true",
                      help="a smoke run: 40 images, 10 classes, batch 8, 2 timed batches, "
                           "DINO with 2 local crops")
  parser.add_argument("--out", default=None, help="also write the results as JSON here")
  parser.add_argument("--data-dir", default=None,
                      help="tfds dir for embedded_mnist (default: a fresh temporary dir)")
  args = parser.parse_args(argv)
  if args.repeats < 1:
    parser.error(f"--repeats {args.repeats} must be >= 1")
  if args.tiny:
    args.num_images, args.classes, args.batch_size = 40, 10, 8
    args.batches, args.warmup, args.seconds = 2, 1, None
  args.classes = min(args.classes, args.num_images)
  args.cases = args.cases or list(JPEG_CASES)
  return args


def median_run(runs: list[dict]) -> dict:
  """The run with the median img/s (the lower middle one of an even count), with every run's
  img/s as "img_s_runs"."""
  ranked = sorted(runs, key=lambda r: r["img_s"])
  return dict(ranked[(len(ranked) - 1) // 2], img_s_runs=[r["img_s"] for r in runs])


def torchvision_side(python: str | None):
  """({"torch", "torchvision", "rate": torch_rate-like}, None) or (None, why): in this process,
  or run by another interpreter."""
  if python:
    found, why = torchvision_pipeline.versions_in(python)
    if found is None:
      return None, why
    return dict(found, rate=lambda *a: torchvision_pipeline.torch_rate_in(python, *a)), None
  tv, why = torchvision_pipeline.import_torchvision()
  if tv is None:
    return None, why
  return {"torch": tv[0].__version__, "torchvision": tv[1].__version__,
          "rate": torchvision_pipeline.torch_rate}, None


def main(argv=None) -> dict:
  """Run the cases; returns {"machine", "set", "rows"} (also printed, and written to --out)."""
  args = parse_args(argv)
  cores = pipeline.host_cpus()
  threads = pipeline.pool_size(args.threads)
  workers = (threads if threads > 0 else cores) if args.workers is None else args.workers
  timer = Timer(args.batches, args.seconds)
  what = f"{args.seconds:g} s" if args.seconds else f"{args.batches} batches"
  machine = {"cpu": cpu_model(), "cores": cores, "batch_size": args.batch_size,
             "timed": what, "warmup_batches": args.warmup}
  machine["crate_jax_threads"] = threads if threads > 0 else "TF's shared pool"
  print(f"cpu: {machine['cpu']}, {cores} cores (logical CPUs this process may use); batch "
        f"{args.batch_size}; timed {what} per pipeline after {args.warmup} warm-up batches; "
        f"crate_jax threads: {machine['crate_jax_threads']}", flush=True)
  out = {"machine": machine, "set": None, "rows": []}
  jpeg = [c for c in args.cases if c in JPEG_CASES]
  tv = None
  if jpeg:
    root, stats = jpeg_set.jpeg_set(args.cache_dir, args.num_images, args.classes)
    out["set"] = dict(stats, root=root)
    print(jpeg_set.describe_set(root, stats), flush=True)
    if args.torchvision:
      tv, why = torchvision_side(args.torchvision_python)
      if tv is None:
        print(f"torchvision side skipped ({why}); {TORCHVISION_HINT}", flush=True)
      else:
        machine.update(torch=tv["torch"], torchvision=tv["torchvision"])
        where = f" run by {args.torchvision_python}" if args.torchvision_python else ""
        print(f"torchvision {tv['torchvision']} (torch {tv['torch']}){where}, DataLoader with "
              f"{workers} workers", flush=True)
  with tempfile.TemporaryDirectory() as tmp:
    data_dir = args.data_dir or os.path.join(tmp, "tfds")
    for case in args.cases:
      row = {"case": case, "torchvision": None}
      if case in JPEG_CASES:
        setup = Setup(root, args.num_images, args.classes, args.batch_size, timer, args.warmup,
                      workers, num_local=2 if args.tiny else None, threads=args.threads)
        runs = {"crate_jax": [], "torchvision": []}
        for _ in range(args.repeats):   # the two sides in turn, so drifting load hits both
          runs["crate_jax"].append(crate_rate(case, setup))
          if tv is not None:
            runs["torchvision"].append(tv["rate"](
                case, setup, crate_data_cfg(case, setup.root, setup.classes, setup.num_local)))
        row["crate_jax"] = median_run(runs["crate_jax"])
        if case == "dino_multicrop":
          row["num_local"] = setup.num_local or 10
        if tv is not None:
          row["torchvision"] = median_run(runs["torchvision"])
          row["ratio"] = row["crate_jax"]["img_s"] / row["torchvision"]["img_s"]
      else:
        rate, first = synthetic_rate(case, tmp, data_dir, args.batch_size, args.batches,
                                     args.warmup)
        row["crate_jax"] = {"img_s": rate, "first_s": first}
      for side in ("crate_jax", "torchvision"):
        if row[side]:
          row[side]["img_s_per_core"] = row[side]["img_s"] / cores
      out["rows"].append(row)
      line = f"  {case}: crate_jax {row['crate_jax']['img_s']:.0f} img/s"
      if row["torchvision"]:
        line += f", torchvision {row['torchvision']['img_s']:.0f} img/s"
      print(line, flush=True)
  print(format_table(out["rows"], cores))
  if args.out:
    os.makedirs(os.path.dirname(os.path.abspath(args.out)), exist_ok=True)
    with open(args.out, "w") as f:
      json.dump(out, f, indent=1)
  return out


if __name__ == "__main__":
  main()
