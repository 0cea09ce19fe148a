"""Per-example image ops in TensorFlow: decode, inception crop, resize, flip, normalise.

Every random op is stateless: it takes a key (shape (2,) int tensor), so an example's augmentation
is a pure function of (seed, epoch, position) and a resumed pipeline repeats it bit for bit.
Images are uint8 (H, W, 3) until `normalize`, which returns float32 (x / 255 - mean) / std.
"""
from __future__ import annotations

import math

import numpy as np
import tensorflow as tf


def decode(image: tf.Tensor) -> tf.Tensor:
  """Encoded bytes or a decoded uint8 image -> uint8 (H, W, 3); grey is repeated to 3 channels."""
  if image.dtype == tf.string:
    image = tf.io.decode_image(image, channels=3, expand_animations=False)
  return to_rgb(image)


def to_rgb(image: tf.Tensor) -> tf.Tensor:
  channels = image.shape[-1]
  if channels == 1:
    return tf.image.grayscale_to_rgb(image)
  if channels is None:
    image = tf.cond(tf.shape(image)[-1] == 1, lambda: tf.tile(image, [1, 1, 3]), lambda: image)
  return tf.ensure_shape(image, [None, None, 3])


def sample_crop(height, width, key, area_range=(0.08, 1.0), ratio_range=(3 / 4, 4 / 3),
                attempts: int = 10):
  """torchvision's RandomResizedCrop box: (top, left, h, w) int32.

  Up to `attempts` draws of area ~ U(area_range) * H * W and log-ratio ~ U(log ratio_range); the
  first box that fits wins, else a centre crop clamped to ratio_range.
  """
  h = tf.cast(height, tf.float32)
  w = tf.cast(width, tf.float32)
  k_box, k_pos = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  u = tf.random.stateless_uniform([attempts, 2], seed=k_box)
  area = h * w * (area_range[0] + (area_range[1] - area_range[0]) * u[:, 0])
  log_lo, log_hi = math.log(ratio_range[0]), math.log(ratio_range[1])
  ratio = tf.exp(log_lo + (log_hi - log_lo) * u[:, 1])
  cw = tf.round(tf.sqrt(area * ratio))
  ch = tf.round(tf.sqrt(area / ratio))
  fits = (cw > 0) & (ch > 0) & (cw <= w) & (ch <= h)
  first = tf.argmax(tf.cast(fits, tf.int32), output_type=tf.int32)
  v = tf.random.stateless_uniform([2], seed=k_pos)
  # Fallback: the whole image, narrowed to the closest allowed aspect ratio, centred.
  in_ratio = w / h
  fw = tf.where(in_ratio > ratio_range[1], tf.round(h * ratio_range[1]), w)
  fh = tf.where(in_ratio < ratio_range[0], tf.round(w / ratio_range[0]), h)
  found = tf.reduce_any(fits)
  ch = tf.where(found, ch[first], fh)
  cw = tf.where(found, cw[first], fw)
  top = tf.where(found, tf.floor(v[0] * (h - ch + 1)), tf.floor((h - ch) / 2))
  left = tf.where(found, tf.floor(v[1] * (w - cw + 1)), tf.floor((w - cw) / 2))
  return [tf.cast(t, tf.int32) for t in (top, left, ch, cw)]


def random_crop(image: tf.Tensor, key, area_range, ratio_range=(3 / 4, 4 / 3)) -> tf.Tensor:
  """Inception crop of encoded bytes (JPEG: decoded only inside the box) or a decoded image."""
  def crop_decoded(img):
    img = to_rgb(img)
    top, left, h, w = sample_crop(tf.shape(img)[0], tf.shape(img)[1], key, area_range, ratio_range)
    return img[top:top + h, left:left + w]

  if image.dtype != tf.string:
    return crop_decoded(image)

  def jpeg():
    hw = tf.image.extract_jpeg_shape(image)
    top, left, h, w = sample_crop(hw[0], hw[1], key, area_range, ratio_range)
    return tf.image.decode_and_crop_jpeg(image, tf.stack([top, left, h, w]), channels=3)

  return tf.cond(tf.io.is_jpeg(image), jpeg, lambda: crop_decoded(decode(image)))


def resize(image: tf.Tensor, size, antialias: bool = True) -> tf.Tensor:
  """Bilinear resize to `size` (int -> square), float32 in [0, 255].

  antialias (as PIL's bilinear) only acts when shrinking, so it is skipped for pure upsampling,
  where it gives the same result at twice the cost.
  """
  size = tf.constant([size, size]) if isinstance(size, int) else tf.convert_to_tensor(size)

  def bilinear(aa: bool):
    return lambda: tf.image.resize(image, size, method="bilinear", antialias=aa)

  if antialias:
    shrinks = tf.reduce_any(tf.shape(image)[:2] > tf.cast(size, tf.int32))
    out = tf.cond(shrinks, bilinear(True), bilinear(False))
  else:
    out = bilinear(False)()
  return tf.clip_by_value(out, 0.0, 255.0)


def random_flip(image: tf.Tensor, key) -> tf.Tensor:
  """Horizontal flip with probability 1/2."""
  flip = tf.random.stateless_uniform([], seed=key) < 0.5
  return tf.cond(flip, lambda: tf.reverse(image, axis=[1]), lambda: image)


def to_uint8(image: tf.Tensor) -> tf.Tensor:
  return tf.cast(tf.clip_by_value(tf.round(image), 0.0, 255.0), tf.uint8)


def normalize(image: tf.Tensor, mean, std) -> tf.Tensor:
  """(x / 255 - mean) / std per channel, float32: x * (1 / (255 std)) - mean / std.

  TF's CPU kernels apply a (3,) vector along the last axis about 5x slower than they combine two
  tensors of one shape (0.6 against 0.1 ms a 224 px image on one core), so with a static shape
  the per-channel factors are constants of the image's shape.
  """
  std = np.asarray(std, np.float32)
  scale, offset = 1.0 / (255.0 * std), -np.asarray(mean, np.float32) / std
  image = tf.cast(image, tf.float32)
  if image.shape.is_fully_defined():
    full = lambda v: tf.constant(np.broadcast_to(v, image.shape))
    return image * full(scale) + full(offset)
  return channel_mix(image, np.diag(scale), offset)


GREY = np.array([0.299, 0.587, 0.114], np.float32)   # ITU-R 601 luma (PIL's "L")


def channel_mix(image: tf.Tensor, matrix, offset=None) -> tf.Tensor:
  """Float (H, W, 3) image -> x @ matrix (+ offset): every pixel's colour mixed by one (3, 3)
  matrix (and shifted per channel), as one (HW, 3) @ (3, 3) matmul, the fast way to apply
  per-channel factors in TF on a CPU (see normalize).

  grey_mix(s) mixes a colour with its grey, diag(v) scales the channels.
  """
  x = tf.reshape(tf.cast(image, tf.float32), [-1, 3])
  out = tf.matmul(x, tf.cast(matrix, tf.float32))
  if offset is not None:   # bias_add: the fast per-channel add
    out = tf.nn.bias_add(out, tf.cast(offset, tf.float32))
  return tf.reshape(out, tf.shape(image))


def grey_mix(s) -> tf.Tensor:
  """(3, 3) matrix of x -> grey(x) + s (x - grey(x)) = s x + (1 - s) grey(x) (grey on every
  channel): s = 0 gives the grey image, 1 the image, s > 1 more saturation."""
  s = tf.cast(s, tf.float32)
  return s * tf.eye(3) + (1.0 - s) * tf.tile(tf.constant(GREY)[:, None], [1, 3])


def grey_mean(image: tf.Tensor) -> tf.Tensor:
  """Mean grey level of an (H, W, 3) image, float scalar: mean over pixels, then the luma."""
  means = tf.reduce_mean(tf.reshape(tf.cast(image, tf.float32), [-1, 3]), axis=0)
  return tf.tensordot(means, tf.constant(GREY), 1)


def shorter_side_size(image: tf.Tensor, shorter: int) -> tf.Tensor:
  """(h, w) int32 with the shorter side -> `shorter`, longer -> int(shorter * long / short)."""
  hw = tf.cast(tf.shape(image)[:2], tf.float32)
  scale = shorter / tf.reduce_min(hw)
  new = tf.where(hw == tf.reduce_min(hw), float(shorter), tf.floor(hw * scale))
  return tf.cast(new, tf.int32)


def resize_shorter(image: tf.Tensor, shorter: int, antialias: bool = True) -> tf.Tensor:
  """torchvision Resize(int): shorter side -> `shorter`, longer -> int(shorter * long / short)."""
  return resize(image, shorter_side_size(image, shorter), antialias)


def resized_center_crop(image: tf.Tensor, shorter: int, size: int,
                        antialias: bool = True) -> tf.Tensor:
  """center_crop(resize_shorter(image, shorter), size), computing only the kept pixels when it
  shrinks: the antialiased resize is ScaleAndTranslate at scale new / old, so asking it for the
  size x size window shifted by the crop's offset gives the same pixels (the resize of a
  landscape ImageNet photo to 256 x 292 makes 1.5x the pixels the crop keeps)."""
  image = tf.convert_to_tensor(image)
  whole = lambda: center_crop(resize_shorter(image, shorter, antialias), size)
  if not antialias:
    return whole()
  hw = tf.shape(image)[:2]
  out_hw = shorter_side_size(image, shorter)

  def window():
    scale = tf.cast(out_hw, tf.float32) / tf.cast(hw, tf.float32)
    offset = tf.cast(center_offsets(out_hw, size), tf.float32)
    out = tf.raw_ops.ScaleAndTranslate(
        images=tf.cast(image, tf.float32)[None], size=tf.constant([size, size]), scale=scale,
        translation=-offset, kernel_type="triangle", antialias=True)[0]
    return tf.clip_by_value(out, 0.0, 255.0)

  return tf.cond(tf.reduce_any(hw > out_hw), window, whole)


def center_offsets(hw: tf.Tensor, size: int) -> tf.Tensor:
  """(top, left) int32 of a centred size x size window in an (h, w) image (torchvision's
  rounding)."""
  return tf.cast(tf.round(tf.cast(hw - size, tf.float32) / 2), tf.int32)


def center_crop(image: tf.Tensor, size: int) -> tf.Tensor:
  """Centre size x size crop (torchvision rounding of the offsets)."""
  top, left = tf.unstack(center_offsets(tf.shape(image)[:2], size))
  return image[top:top + size, left:left + size]


def eval_image(image: tf.Tensor, size: int, resize_to: int, antialias: bool = True) -> tf.Tensor:
  """Shorter side -> resize_to, centre crop size; if resize_to <= size just resize to size^2."""
  image = decode(image)
  if resize_to > size:
    out = resized_center_crop(image, resize_to, size, antialias)
  else:
    out = resize(image, size, antialias)
  return tf.ensure_shape(out, [size, size, 3])


def eval_mask(mask: tf.Tensor, size: int, resize_to: int) -> tf.Tensor:
  """A label map (encoded PNG or (H, W[, 1]) integers) through `eval_image`'s geometry with
  nearest-neighbour resizing, so labels stay labels: (size, size), the input's dtype."""
  if mask.dtype == tf.string:
    mask = tf.io.decode_image(mask, channels=1, expand_animations=False)
  elif mask.shape.rank == 2:
    mask = mask[..., None]
  if resize_to > size:
    mask = tf.image.resize(mask, shorter_side_size(mask, resize_to), method="nearest")
    mask = center_crop(mask, size)
  else:
    mask = tf.image.resize(mask, [size, size], method="nearest")
  return tf.ensure_shape(mask[..., 0], [size, size])
