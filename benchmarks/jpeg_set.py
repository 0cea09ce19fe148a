"""The input benchmark's JPEG set (benchmarks/input_pipeline.py): ImageNet-like JPEG files made
offline from photographs that ship inside scikit-image.

The set (--num-images, default 2,000, written once under --cache-dir, default
workdirs/bench_jpegs, and reused): the photographs that ship inside scikit-image (skimage.data:
the colour ones; 3% of the images from its grey ones, repeated to RGB), made into distinct images
by a random crop, a rescale to a drawn size, a flip, a per-channel gain and Gaussian grain, saved
as JPEG (4:2:0) at a quality drawn from 88-96 (mean 92). Sizes (`draw_size`): aspect w:h 4:3
(50%), 3:4 (12%), 3:2 (12%), 2:3 (4%), 1:1 (8%), else log-uniform in [1/2, 2]; the longer side
500 px with probability 0.55 (the Flickr size most ImageNet photos come in: 500 x 375, 500 x 333,
375 x 500), log-normal (median 280 px, sigma 0.5, clipped to 64-1000) with 0.43 (the smaller
photos that bring ImageNet's mean below 500 x 375) and log-uniform in 1000-2500 px with 0.02 (the
tail of full-size camera photos): mean about 416 x 362 px, ~187 k pixels. The crop is no smaller
than the output where the source allows (little upscaling). The grain (sigma ~ U(8, 24) of 255)
stands in for the fine detail and sensor noise of real photos, which the smoother bundled samples
lack: with it the mean file comes to ~100-110 KB. ImageNet ILSVRC-2012 train, approximately:
1.28 M JPEGs in ~140 GB, i.e. ~110 KB each; an average resolution of roughly 400 x 350 (other
counts over the train set give up to ~470 x 390); 500 x 375 the most common size. Each run prints
the set's measured figures next to these.
"""
from __future__ import annotations

import json
import math
import multiprocessing
import os
import shutil
import tempfile
import time

from crate_jax.data.device import host_cpus


# ImageNet ILSVRC-2012 train, approximately (for the printed comparison).
IMAGENET = {"images": 1_281_167, "mean_kb": 110, "mean_size": "~400 x 350"}

# --------------------------------------------------------------------------------- the set
SET_VERSION = 2
COLOUR_SOURCES = ("astronaut", "chelsea", "coffee", "hubble_deep_field", "immunohistochemistry",
                  "retina", "rocket", "stereo_motorcycle")   # stereo: its left and right views
GREY_SOURCES = ("camera", "coins", "moon", "grass", "gravel", "brick")
GREY_SHARE = 0.03
ASPECTS = ((4 / 3, 0.50), (3 / 4, 0.12), (3 / 2, 0.12), (2 / 3, 0.04), (1.0, 0.08))
P_500, MID_MEDIAN, MID_SIGMA, P_LARGE = 0.55, 280.0, 0.5, 0.02
JPEG_QUALITY = (88, 96)   # uniform integers: mean 92
GRAIN = (8.0, 24.0)
_SOURCES: dict = {}


def _sources() -> dict:
  """{"colour": [uint8 (H, W, 3)], "grey": [...]}: skimage.data's bundled photographs (once per
  process)."""
  if not _SOURCES:
    import numpy as np
    try:
      from skimage import data as samples
    except ImportError:
      raise SystemExit('the benchmark JPEG set needs scikit-image: pip install -e ".[bench]" '
                       "(or pip install scikit-image)") from None
    colour = []
    for name in COLOUR_SOURCES:
      image = getattr(samples, name)()
      views = image[:2] if isinstance(image, tuple) else (image,)
      colour += [np.ascontiguousarray(v[..., :3]) for v in views]
    grey = [np.repeat(getattr(samples, n)()[..., None], 3, axis=-1) for n in GREY_SOURCES]
    _SOURCES.update(colour=colour, grey=grey)
  return _SOURCES


def draw_size(rng) -> tuple[int, int]:
  """(width, height) of one image: the distribution in the module docstring."""
  u, aspect = rng.random(), None
  for ratio, p in ASPECTS:
    if u < p:
      aspect = ratio
      break
    u -= p
  if aspect is None:
    aspect = math.exp(rng.uniform(math.log(0.5), math.log(2.0)))
  v = rng.random()
  if v < P_500:
    longer = 500
  elif v < 1.0 - P_LARGE:
    longer = int(min(max(math.exp(rng.normal(math.log(MID_MEDIAN), MID_SIGMA)), 64), 1000))
  else:
    longer = int(math.exp(rng.uniform(math.log(1000), math.log(2500))))
  if aspect >= 1:
    return longer, max(1, round(longer / aspect))
  return max(1, round(longer * aspect)), longer


def draw_image(rng):
  """One distinct image: (PIL RGB image, grey?)."""
  import numpy as np
  from PIL import Image
  sources = _sources()
  grey = rng.random() < GREY_SHARE
  pool = sources["grey" if grey else "colour"]
  src = pool[rng.integers(len(pool))]
  w, h = draw_size(rng)
  sh, sw = src.shape[:2]
  aspect = w / h
  cw, ch = (sw, sw / aspect) if sw / aspect <= sh else (sh * aspect, sh)  # largest crop
  lo = min(1.0, w / cw)        # no smaller than the output where the source allows
  scale = rng.uniform(lo, 1.0) if lo < 1.0 else 1.0
  cw, ch = max(2, int(cw * scale)), max(2, int(ch * scale))
  x0, y0 = rng.integers(0, sw - cw + 1), rng.integers(0, sh - ch + 1)
  image = Image.fromarray(src[y0:y0 + ch, x0:x0 + cw]).resize((w, h), Image.BICUBIC)
  if rng.random() < 0.5:
    image = image.transpose(Image.FLIP_LEFT_RIGHT)
  x = np.asarray(image, dtype=np.float32)
  gain = rng.uniform(0.85, 1.15, size=1 if grey else 3)
  noise = rng.normal(0.0, rng.uniform(*GRAIN), size=x.shape[:2] + ((1,) if grey else (3,)))
  x = np.clip(x * gain + noise, 0, 255).round().astype(np.uint8)
  return Image.fromarray(x), grey


def _write_one(job):
  """Worker: draw image i (seeded by (seed, i)) and write it; its figures."""
  import numpy as np
  path, seed, i = job
  rng = np.random.default_rng([seed, i])
  image, grey = draw_image(rng)
  image.save(path, "JPEG", quality=int(rng.integers(JPEG_QUALITY[0], JPEG_QUALITY[1] + 1)))
  return os.path.getsize(path), image.width, image.height, grey


def set_dir(cache_dir: str, num_images: int, classes: int, seed: int) -> str:
  return os.path.join(cache_dir, f"n{num_images}_c{classes}_s{seed}_v{SET_VERSION}")


def jpeg_set(cache_dir: str, num_images: int, classes: int, seed: int = 0,
             workers: int | None = None) -> tuple[str, dict]:
  """The image folder (written once, reused when its set.json is there) and its figures.

  DIR/train/<class>/*.jpg: image i in class i mod classes; DIR/val/<class>/: one hard link per
  class to a train image (the layout wants a val split; nothing here times it).
  """
  root = set_dir(cache_dir, num_images, classes, seed)
  manifest = os.path.join(root, "set.json")
  if os.path.exists(manifest):
    with open(manifest) as f:
      return root, json.load(f)
  if classes > num_images:
    raise SystemExit(f"--classes {classes} is more than --num-images {num_images}")
  os.makedirs(cache_dir, exist_ok=True)
  tmp = tempfile.mkdtemp(prefix=os.path.basename(root) + ".tmp-", dir=cache_dir)
  names = [f"c{c:04d}" for c in range(classes)]
  for split in ("train", "val"):
    for name in names:
      os.makedirs(os.path.join(tmp, split, name))
  jobs = [(os.path.join(tmp, "train", names[i % classes], f"img_{i:07d}.jpg"), seed, i)
          for i in range(num_images)]
  start = time.perf_counter()
  workers = workers or host_cpus()
  _sources()   # loaded once, inherited by the forked workers
  try:
    if workers > 1 and num_images >= 64:
      with multiprocessing.get_context("fork").Pool(workers) as pool:
        figures = pool.map(_write_one, jobs, chunksize=16)
    else:
      figures = [_write_one(job) for job in jobs]
    for c, name in enumerate(names):
      src, dst = jobs[c][0], os.path.join(tmp, "val", name, os.path.basename(jobs[c][0]))
      try:
        os.link(src, dst)
      except OSError:
        shutil.copyfile(src, dst)
  except BaseException:   # no half-written set left behind
    shutil.rmtree(tmp, ignore_errors=True)
    raise
  sizes = sorted(f[0] for f in figures)
  pixels = sorted(f[1] * f[2] for f in figures)
  stats = {"version": SET_VERSION, "images": num_images, "classes": classes, "seed": seed,
           "jpeg_quality": JPEG_QUALITY, "bytes": sum(sizes),
           "mean_kb": sum(sizes) / len(sizes) / 1000, "median_kb": sizes[len(sizes) // 2] / 1000,
           "mean_width": sum(f[1] for f in figures) / len(figures),
           "mean_height": sum(f[2] for f in figures) / len(figures),
           "mean_pixels": sum(pixels) / len(pixels), "median_pixels": pixels[len(pixels) // 2],
           "shorter_below_224": sum(min(f[1], f[2]) < 224 for f in figures) / len(figures),
           "grey": sum(f[3] for f in figures) / len(figures),
           "generate_s": round(time.perf_counter() - start, 1)}
  with open(os.path.join(tmp, "set.json"), "w") as f:
    json.dump(stats, f, indent=1)
  try:
    os.rename(tmp, root)
  except OSError:   # another run wrote it meanwhile: use theirs
    shutil.rmtree(tmp, ignore_errors=True)
    with open(manifest) as f:
      return root, json.load(f)
  return root, stats


def describe_set(root: str, s: dict) -> str:
  quality = "-".join(map(str, s["jpeg_quality"]))
  return (f"set {root}: {s['images']:,} JPEGs (quality {quality}), {s['classes']} classes; "
          f"mean {s['mean_kb']:.0f} KB (median {s['median_kb']:.0f}), mean "
          f"{s['mean_width']:.0f} x {s['mean_height']:.0f} px, {s['mean_pixels'] / 1e3:.0f} k "
          f"pixels (median {s['median_pixels'] / 1e3:.0f} k), shorter side < 224: "
          f"{100 * s['shorter_below_224']:.0f}%, grey {100 * s['grey']:.0f}%\n"
          f"ImageNet train, approximately: {IMAGENET['images']:,} JPEGs, mean ~"
          f"{IMAGENET['mean_kb']} KB, average resolution {IMAGENET['mean_size']} px")
