"""RandAugment(N, M) in TensorFlow with torchvision's op set and magnitude scale (stateless).

Each of N layers applies one op drawn uniformly (with replacement) at magnitude M of num_bins - 1
(torchvision: 31 bins, so the recipe's M = 14 is 14/30 of each op's range); signed ops get a random
sign. Geometric ops use nearest-neighbour sampling and fill 0, as torchvision does. Ranges at
full magnitude: shear 0.3, translate 150/331 of the side, rotate 30 deg, brightness / colour /
contrast / sharpness factor 1 +- 0.9, posterize 8 -> 4 bits, solarize threshold 255 -> 0.
"""
from __future__ import annotations

import math

import tensorflow as tf

DEFAULT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
               "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
               "Equalize")


def _blend(image, degenerate, factor):
  """degenerate + factor * (image - degenerate), clipped, uint8."""
  image = tf.cast(image, tf.float32)
  out = tf.cast(degenerate, tf.float32) + factor * (image - tf.cast(degenerate, tf.float32))
  return tf.cast(tf.clip_by_value(tf.round(out), 0.0, 255.0), tf.uint8)


def _grey(image):
  """ITU-R 601 luma, float (H, W, 1)."""
  weights = tf.constant([0.299, 0.587, 0.114], tf.float32)
  return tf.reduce_sum(tf.cast(image, tf.float32) * weights, axis=-1, keepdims=True)


def _warp(image, a0, a1, a2, b0, b1, b2):
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2); nearest, fill 0."""
  matrix = tf.cast(tf.stack([a0, a1, a2, b0, b1, b2, 0.0, 0.0]), tf.float32)[None]
  out = tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=matrix, output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(0.0), interpolation="NEAREST", fill_mode="CONSTANT")
  return out[0]


def _rotate(image, degrees):
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  cy, cx = (h - 1) / 2, (w - 1) / 2
  t = degrees * math.pi / 180
  c, s = tf.cos(t), tf.sin(t)
  return _warp(image, c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy)


def _sharpness(image, factor):
  """Blend with a 3x3 smoothing ([[1,1,1],[1,5,1],[1,1,1]] / 13) of the interior pixels."""
  x = tf.cast(image, tf.float32)[None]
  kernel = tf.constant([[1, 1, 1], [1, 5, 1], [1, 1, 1]], tf.float32) / 13.0
  kernel = tf.tile(kernel[:, :, None, None], [1, 1, 3, 1])
  smooth = tf.nn.depthwise_conv2d(x, kernel, [1, 1, 1, 1], padding="VALID")[0]
  smooth = tf.round(smooth)
  border = tf.pad(tf.ones_like(smooth), [[1, 1], [1, 1], [0, 0]])
  degenerate = tf.pad(smooth, [[1, 1], [1, 1], [0, 0]]) * border + x[0] * (1 - border)
  return _blend(image, degenerate, factor)


def _autocontrast(image):
  x = tf.cast(image, tf.float32)
  lo = tf.reduce_min(x, axis=[0, 1], keepdims=True)
  hi = tf.reduce_max(x, axis=[0, 1], keepdims=True)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  lo = tf.where(hi > lo, lo, 0.0)
  return tf.cast(tf.clip_by_value(tf.round((x - lo) * scale), 0.0, 255.0), tf.uint8)


def _equalize_channel(channel):
  """PIL / torchvision histogram equalisation of one uint8 channel (H, W)."""
  values = tf.cast(tf.reshape(channel, [-1]), tf.int32)
  hist = tf.math.bincount(values, minlength=256, maxlength=256)
  last = tf.gather(hist, tf.reduce_max(values))  # count of the last non-empty bin
  step = (tf.reduce_sum(hist) - last) // 255
  lut = (tf.cumsum(hist, exclusive=True) + step // 2) // tf.maximum(step, 1)
  lut = tf.cast(tf.clip_by_value(lut, 0, 255), tf.uint8)
  return tf.where(step == 0, channel, tf.gather(lut, tf.cast(channel, tf.int32)))


def _equalize(image):
  return tf.stack([_equalize_channel(image[..., c]) for c in range(3)], axis=-1)


def _ops(image, level, sign):
  """name -> thunk applying that op at `level` in [0, 1] with `sign` in {-1, 1}."""
  h = tf.cast(tf.shape(image)[0], tf.float32)
  w = tf.cast(tf.shape(image)[1], tf.float32)
  shear = sign * 0.3 * level
  factor = 1.0 + sign * 0.9 * level
  bits = 8 - int(round(level * 4))
  threshold = tf.constant(min(math.ceil(255.0 * (1.0 - level)), 255), tf.uint8)
  return {
      "Identity": lambda: image,
      "ShearX": lambda: _warp(image, 1.0, shear, 0.0, 0.0, 1.0, 0.0),
      "ShearY": lambda: _warp(image, 1.0, 0.0, 0.0, shear, 1.0, 0.0),
      "TranslateX": lambda: _warp(image, 1.0, 0.0, tf.round(sign * level * 150 / 331 * w),
                                  0.0, 1.0, 0.0),
      "TranslateY": lambda: _warp(image, 1.0, 0.0, 0.0, 0.0, 1.0,
                                  tf.round(sign * level * 150 / 331 * h)),
      "Rotate": lambda: _rotate(image, sign * 30.0 * level),
      "Brightness": lambda: _blend(image, tf.zeros_like(image), factor),
      "Color": lambda: _blend(image, _grey(image), factor),
      "Contrast": lambda: _blend(image, tf.reduce_mean(_grey(image)), factor),
      "Sharpness": lambda: _sharpness(image, factor),
      "Posterize": lambda: tf.bitwise.bitwise_and(image, tf.constant((0xFF << (8 - bits)) & 0xFF,
                                                                     tf.uint8)),
      "Solarize": lambda: tf.where(image >= threshold, 255 - image, image),
      "AutoContrast": lambda: _autocontrast(image),
      "Equalize": lambda: _equalize(image),
  }


def parse_ops(spec) -> tuple[str, ...]:
  """"default" / "" -> DEFAULT_OPS; else a comma-separated string or a sequence of op names."""
  if not spec or spec == "default":
    return DEFAULT_OPS
  parts = spec.split(",") if isinstance(spec, str) else spec
  names = tuple(n.strip() for n in parts if n.strip())
  unknown = [n for n in names if n not in DEFAULT_OPS]
  if unknown or not names:
    raise ValueError(f"unknown RandAugment ops {unknown}; choose from {DEFAULT_OPS}")
  return names


def randaugment(image: tf.Tensor, key, num_layers: int, magnitude: float, num_bins: int = 31,
                ops=DEFAULT_OPS) -> tf.Tensor:
  """RandAugment on a uint8 (H, W, 3) image; key: stateless seed (2,)."""
  if num_layers <= 0:
    return image
  if not 0 <= magnitude <= num_bins - 1:
    raise ValueError(f"RandAugment magnitude {magnitude} outside [0, {num_bins - 1}]")
  level = float(magnitude) / (num_bins - 1)
  ops = parse_ops(ops)
  k_op, k_sign = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  choice = tf.random.stateless_uniform([num_layers], seed=k_op, maxval=len(ops), dtype=tf.int32)
  signs = tf.where(tf.random.stateless_uniform([num_layers], seed=k_sign) < 0.5, -1.0, 1.0)
  shape = image.shape
  for i in range(num_layers):
    table = _ops(image, level, signs[i])
    image = tf.switch_case(choice[i], [table[name] for name in ops])
    image = tf.ensure_shape(image, shape)
  return image
