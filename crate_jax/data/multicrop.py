"""DINO's multi-crop augmentation as a stateless tf.data example function.

Per image (DINO paper / its recipe: their choices): 2 global crops (random-resized, area scale
(0.4, 1), size 224) and N local crops (area scale (0.05, 0.4), size 96); every crop is flipped
with p 0.5, colour-jittered with p 0.8 (brightness 0.4, contrast 0.4, saturation 0.2, hue 0.1),
made grey with p 0.2; Gaussian blur (sigma ~ U(0.1, 2.0)) with p 1.0 on global crop 1, 0.1 on
global crop 2 and 0.5 on local crops; solarisation (x -> 1 - x where x >= 1/2) with p 0.2 on global
crop 2 only. Ours: the jitter factors are applied in a fixed order (brightness, contrast,
saturation, hue; torchvision draws a random order), blur sigmas are in pixels of the output
crop scaled by size / 224 (so small images, e.g. 28 x 28 digits, are not wiped out), and the
kernel radius is ceil(3 sigma_max).

Every random draw is keyed by the example key (crate_jax.data.pipeline: a pure function of seed,
process, epoch and position), so a resumed pipeline repeats the crops bit for bit. Output:
  {"global": f32 (2, G, G, 3), "local": f32 (N, L, L, 3), "label": int}, normalised like `image`.
"""
from __future__ import annotations

import math

import tensorflow as tf

from crate_jax.data import preprocess

GLOBAL_BLUR_P = (1.0, 0.1)
GLOBAL_SOLARIZE_P = (0.0, 0.2)
LOCAL_BLUR_P = 0.5


def check(cfg) -> None:
  """One ValueError naming the key: local crops larger than global ones, bad scales."""
  m = cfg.multicrop
  if int(m.local_size) > int(cfg.image_size):
    raise ValueError(f"config.data.multicrop.local_size={m.local_size} is larger than the global "
                     f"crops (config.data.image_size={cfg.image_size})")
  if int(m.num_local) < 0:
    raise ValueError(f"config.data.multicrop.num_local={m.num_local} must be >= 0")
  for key in ("global_scale", "local_scale"):
    lo, hi = m[key]
    if not 0.0 < lo <= hi <= 1.0:
      raise ValueError(f"config.data.multicrop.{key}={tuple(m[key])} must satisfy "
                       "0 < lo <= hi <= 1")


def _uniform(key, lo=0.0, hi=1.0, shape=()):
  return tf.random.stateless_uniform(shape, seed=key, minval=lo, maxval=hi)


def _grey(image):
  """ITU-R 601 luma repeated to 3 channels (float image in [0, 1])."""
  return preprocess.channel_mix(image, preprocess.grey_mix(0.0))


def colour_jitter(image, key, brightness=0.4, contrast=0.4, saturation=0.2, hue=0.1):
  """Float [0, 1] image: x * b, then contrast about the grey mean by c, saturation s, hue shift h;
  b, c, s ~ U(1 - v, 1 + v), h ~ U(-hue, hue); clipped to [0, 1] after each. (Per-channel maths
  through preprocess.channel_mix: see preprocess.normalize on speed.)"""
  kb, kc, ks, kh = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  clip = lambda x: tf.clip_by_value(x, 0.0, 1.0)
  image = clip(image * _uniform(kb, 1 - brightness, 1 + brightness))
  mean = preprocess.grey_mean(image)
  image = clip(mean + (image - mean) * _uniform(kc, 1 - contrast, 1 + contrast))
  s = _uniform(ks, 1 - saturation, 1 + saturation)
  image = clip(preprocess.channel_mix(image, preprocess.grey_mix(s)))
  return clip(tf.image.adjust_hue(image, _uniform(kh, -hue, hue)))


def gaussian_blur(image, sigma, radius: int):
  """Separable Gaussian blur with std `sigma` (pixels) and a (2 radius + 1) kernel, reflect pad."""
  x = tf.range(-radius, radius + 1, dtype=tf.float32)
  w = tf.exp(-0.5 * tf.square(x / sigma))
  w = w / tf.reduce_sum(w)
  padded = tf.pad(image[None], [[0, 0], [radius, radius], [radius, radius], [0, 0]], "REFLECT")
  depthwise = lambda k: tf.tile(k[:, :, None, None], [1, 1, 3, 1])
  out = tf.nn.depthwise_conv2d(padded, depthwise(w[:, None]), [1, 1, 1, 1], "VALID")
  out = tf.nn.depthwise_conv2d(out, depthwise(w[None, :]), [1, 1, 1, 1], "VALID")
  return out[0]


def solarize(image):
  """x -> 1 - x where x >= 1/2 (PIL's solarise at threshold 128), as x + [x >= 1/2] (1 - 2 x)
  (a tf.where over the image is 4x slower on a CPU)."""
  return image + tf.cast(image >= 0.5, tf.float32) * (1.0 - 2.0 * image)


def _maybe(key, p: float, fn, image):
  if p <= 0.0:
    return image
  if p >= 1.0:
    return fn(image)
  return tf.cond(_uniform(key) < p, lambda: fn(image), lambda: image)


def crop_view(image, key, *, size: int, scale, blur_p: float, solarize_p: float, cfg):
  """One augmented view: crop, resize, flip, jitter (p .8), grey (p .2), blur, solarise,
  normalise -> f32 (size, size, 3)."""
  k = tf.unstack(tf.random.experimental.stateless_split(key, 8))
  view = preprocess.resize(preprocess.random_crop(image, k[0], tuple(scale)), size,
                           bool(cfg.resize_antialias))
  if cfg.flip:
    view = preprocess.random_flip(view, k[1])
  view = tf.ensure_shape(tf.cast(view, tf.float32) / 255.0, [size, size, 3])
  m = cfg.multicrop
  view = _maybe(k[2], float(m.jitter_p), lambda x: colour_jitter(x, k[3]), view)
  view = _maybe(k[4], float(m.grey_p), _grey, view)
  lo, hi = (float(s) * size / 224.0 for s in m.blur_sigma)
  radius = max(int(math.ceil(3 * hi)), 1)
  view = _maybe(k[5], blur_p, lambda x: gaussian_blur(x, _uniform(k[6], lo, hi), radius), view)
  view = _maybe(k[7], solarize_p, solarize, view)
  return tf.ensure_shape(preprocess.normalize(view * 255.0, cfg.mean, cfg.std), [size, size, 3])


def example_fn(cfg):
  """(epoch key, position, record) -> {"global", "local", "label"}, stateless (a tf.function)."""
  check(cfg)
  m = cfg.multicrop
  g, l, n_local = int(cfg.image_size), int(m.local_size), int(m.num_local)

  @tf.function
  def example(epoch_key, index, ex):
    key = tf.random.experimental.stateless_fold_in(epoch_key, index)
    keys = tf.unstack(tf.random.experimental.stateless_split(key, 2 + max(n_local, 1)))
    # Decoded once for all 2 + N views: a crop-window decode per view read the JPEG 12 times,
    # two thirds of the example's time with DINO's 10 local crops.
    image = preprocess.decode(ex["image"])
    views = [crop_view(image, keys[i], size=g, scale=m.global_scale, blur_p=GLOBAL_BLUR_P[i],
                       solarize_p=GLOBAL_SOLARIZE_P[i], cfg=cfg) for i in range(2)]
    local = [crop_view(image, keys[2 + i], size=l, scale=m.local_scale, blur_p=LOCAL_BLUR_P,
                       solarize_p=0.0, cfg=cfg) for i in range(n_local)]
    out = {"global": tf.stack(views), "label": ex["label"]}
    out["local"] = tf.stack(local) if local else tf.zeros([0, l, l, 3], tf.float32)
    return out
  return example
