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

from crate_jax.data import preprocess

DEFAULT_OPS = ("Identity", "ShearX", "ShearY", "TranslateX", "TranslateY", "Rotate", "Brightness",
               "Color", "Contrast", "Sharpness", "Posterize", "Solarize", "AutoContrast",
               "Equalize")


def _to_uint8(x):
  return tf.cast(tf.clip_by_value(tf.round(x), 0.0, 255.0), tf.uint8)


def _blend(image, degenerate, factor):
  """degenerate + factor * (image - degenerate), clipped, uint8 (degenerate: a scalar or an
  image of image's shape)."""
  image = tf.cast(image, tf.float32)
  degenerate = tf.cast(degenerate, tf.float32)
  return _to_uint8(degenerate + factor * (image - degenerate))


# A note on speed: on a CPU TF applies a (3,) vector along the channel axis, and tf.where over an
# image, several times slower than an op on two tensors of one shape, so per-channel factors go
# through preprocess.channel_mix (a matmul) and selections through arithmetic or a gather.


def _round_half_away(v):
  """std::round: halves away from zero (what ImageProjectiveTransformV3's nearest sampling uses)."""
  return tf.sign(v) * tf.floor(tf.abs(v) + 0.5)


def _warp(image, a0, a1, a2, b0, b1, b2):
  """Output pixel (x, y) samples input (a0 x + a1 y + a2, b0 x + b1 y + b2); nearest, fill 0.

  ImageProjectiveTransformV3's result (its nearest-neighbour rounding and fill) as one gather of
  the pixels: about 4x faster than that op on a CPU.
  """
  shape = tf.shape(image)
  h, w = shape[0], shape[1]
  ys, xs = tf.meshgrid(tf.range(h, dtype=tf.float32), tf.range(w, dtype=tf.float32),
                       indexing="ij")
  coef = [tf.cast(c, tf.float32) for c in (a0, a1, a2, b0, b1, b2)]
  sx = _round_half_away(coef[0] * xs + coef[1] * ys + coef[2])
  sy = _round_half_away(coef[3] * xs + coef[4] * ys + coef[5])
  inside = ((sx >= 0) & (sx < tf.cast(w, tf.float32)) & (sy >= 0)
            & (sy < tf.cast(h, tf.float32)))
  index = tf.where(inside, tf.cast(sy, tf.int32) * w + tf.cast(sx, tf.int32), h * w)
  pixels = tf.concat([tf.reshape(image, [-1, 3]), tf.zeros([1, 3], image.dtype)], 0)
  return tf.reshape(tf.gather(pixels, tf.reshape(index, [-1])), shape)


def _shift(image, t, axis: int):
  """Output pixel i takes input pixel i + t along `axis` (t integer-valued), fill 0: _warp's
  result for a translation, by slicing."""
  n = tf.shape(image)[axis]
  t = tf.clip_by_value(tf.cast(t, tf.int32), -n, n)
  begin, size, pads = [0, 0, 0], [-1, -1, -1], [[0, 0]] * 3
  begin[axis], size[axis] = tf.maximum(t, 0), n - tf.abs(t)
  pads[axis] = [tf.maximum(-t, 0), tf.maximum(t, 0)]
  return tf.pad(tf.slice(image, tf.stack(begin), tf.stack(size)), pads)


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
  """Each channel stretched to [0, 255]: (x - lo) * 255 / (hi - lo), left alone where hi = lo."""
  flat = tf.reshape(image, [-1, 3])   # reduced as uint8: 3x faster than as float
  lo = tf.cast(tf.reduce_min(flat, axis=0), tf.float32)
  hi = tf.cast(tf.reduce_max(flat, axis=0), tf.float32)
  scale = tf.where(hi > lo, 255.0 / tf.maximum(hi - lo, 1.0), 1.0)
  lo = tf.where(hi > lo, lo, 0.0)
  return _to_uint8(preprocess.channel_mix(image, tf.linalg.diag(scale), -lo * scale))


def _equalize(image):
  """PIL / torchvision histogram equalisation of each uint8 channel (the three at once)."""
  values = tf.transpose(tf.reshape(tf.cast(image, tf.int32), [-1, 3]))   # (3, HW)
  hist = tf.math.bincount(values, minlength=256, maxlength=256, axis=-1)   # (3, 256)
  last = tf.gather(hist, tf.reduce_max(values, axis=1), batch_dims=1)  # the last non-empty bin
  step = (tf.reduce_sum(hist, axis=1) - last) // 255
  lut = (tf.cumsum(hist, axis=1, exclusive=True) + step[:, None] // 2) // tf.maximum(
      step[:, None], 1)
  lut = tf.where(step[:, None] == 0, tf.range(256)[None], tf.clip_by_value(lut, 0, 255))
  out = tf.gather(tf.cast(lut, tf.uint8), values, batch_dims=1)   # step 0: unchanged
  return tf.reshape(tf.transpose(out), tf.shape(image))


def _solarize(image, threshold):
  """255 - x where x >= threshold (uint8): x xor 255 there."""
  return tf.bitwise.bitwise_xor(image, tf.cast(image >= threshold, tf.uint8) * 255)


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
      "TranslateX": lambda: _shift(image, tf.round(sign * level * 150 / 331 * w), axis=1),
      "TranslateY": lambda: _shift(image, tf.round(sign * level * 150 / 331 * h), axis=0),
      "Rotate": lambda: _rotate(image, sign * 30.0 * level),
      "Brightness": lambda: _blend(image, tf.zeros_like(image), factor),
      "Color": lambda: _to_uint8(preprocess.channel_mix(image, preprocess.grey_mix(factor))),
      "Contrast": lambda: _blend(image, preprocess.grey_mean(image), factor),
      "Sharpness": lambda: _sharpness(image, factor),
      "Posterize": lambda: tf.bitwise.bitwise_and(image, tf.constant((0xFF << (8 - bits)) & 0xFF,
                                                                     tf.uint8)),
      "Solarize": lambda: _solarize(image, threshold),
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
