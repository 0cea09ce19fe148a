"""The fast forms of the per-image ops (issue 32: per-channel maths as matmuls, selections as
arithmetic or gathers) give what the plain forms give: numpy references, and TF's own
ImageProjectiveTransformV3 for the geometric RandAugment ops."""
from __future__ import annotations

import math

import numpy as np
import pytest
import tensorflow as tf

from crate_jax.data import multicrop, preprocess, randaugment

MEAN, STD = (0.485, 0.456, 0.406), (0.229, 0.224, 0.225)


def _image(shape, seed=0):
  return np.random.default_rng(seed).integers(0, 256, shape, dtype=np.uint8)


def _reference_warp(image, coef):
  """TF's projective-transform op, nearest, fill 0 (what RandAugment used before)."""
  matrix = tf.constant([list(coef) + [0.0, 0.0]], tf.float32)
  return tf.raw_ops.ImageProjectiveTransformV3(
      images=image[None], transforms=matrix, output_shape=tf.shape(image)[:2],
      fill_value=tf.constant(0.0), interpolation="NEAREST", fill_mode="CONSTANT")[0].numpy()


@pytest.mark.parametrize("shape", [(24, 20, 3), (37, 50, 3)])
def test_warp_matches_the_projective_transform_op(shape):
  image = tf.constant(_image(shape))
  h, w = shape[:2]
  cases = []
  for shear in (-0.3, -0.11, 0.17, 0.3):
    cases += [(1.0, shear, 0.0, 0.0, 1.0, 0.0), (1.0, 0.0, 0.0, shear, 1.0, 0.0)]
  for degrees in (-30.0, -7.5, 12.0, 30.0):
    t = degrees * math.pi / 180
    c, s = math.cos(t), math.sin(t)
    cy, cx = (h - 1) / 2, (w - 1) / 2
    cases.append((c, s, cx - c * cx - s * cy, -s, c, cy + s * cx - c * cy))
  for coef in cases:
    ours = randaugment._warp(image, *coef).numpy()
    # Identical here; a pixel whose source lands on a rounding tie may differ in the last bit of
    # a float on another build, so allow a handful.
    assert (ours != _reference_warp(image, coef)).mean() < 2e-3, coef


def test_shift_is_the_translation_exactly():
  image = tf.constant(_image((24, 20, 3), 1))
  for t in (-25, -7, 0, 3, 19, 40):
    np.testing.assert_array_equal(randaugment._shift(image, float(t), axis=1).numpy(),
                                  _reference_warp(image, (1.0, 0.0, t, 0.0, 1.0, 0.0)))
    np.testing.assert_array_equal(randaugment._shift(image, float(t), axis=0).numpy(),
                                  _reference_warp(image, (1.0, 0.0, 0.0, 0.0, 1.0, t)))


def test_solarize_equalize_autocontrast_against_numpy():
  x = _image((31, 17, 3), 2)
  x[..., 2] = 77   # a flat channel: equalize and autocontrast leave it alone
  image = tf.constant(x)
  for threshold in (0, 128, 255):
    want = np.where(x >= threshold, 255 - x, x)
    np.testing.assert_array_equal(
        randaugment._solarize(image, tf.constant(threshold, tf.uint8)).numpy(), want)
  want = np.empty_like(x)
  for c in range(3):   # PIL's ImageOps.equalize
    v = x[..., c].ravel()
    hist = np.bincount(v, minlength=256)
    step = (hist.sum() - hist[v.max()]) // 255
    lut = np.clip((np.cumsum(hist) - hist + step // 2) // max(step, 1), 0, 255)
    want[..., c] = x[..., c] if step == 0 else lut[x[..., c]]
  np.testing.assert_array_equal(randaugment._equalize(image).numpy(), want)
  lo, hi = x.min((0, 1)).astype(float), x.max((0, 1)).astype(float)
  stretch = np.where(hi > lo, 255 / np.maximum(hi - lo, 1), 1.0)
  want = np.clip(np.round((x - np.where(hi > lo, lo, 0)) * stretch), 0, 255)
  assert np.abs(randaugment._autocontrast(image).numpy() - want).max() <= 1


def test_normalize_and_channel_mix_against_numpy():
  x = _image((9, 11, 3), 3)
  want = (x / 255.0 - np.array(MEAN)) / np.array(STD)
  static = preprocess.normalize(tf.constant(x), MEAN, STD)
  dynamic = tf.function(lambda i: preprocess.normalize(i, MEAN, STD),
                        input_signature=[tf.TensorSpec([None, None, 3], tf.uint8)])(x)
  for got in (static, dynamic):
    assert got.dtype == tf.float32
    np.testing.assert_allclose(got.numpy(), want, atol=2e-6)
  f = x / 255.0
  grey = f @ preprocess.GREY
  for s in (0.0, 0.8, 1.2):
    np.testing.assert_allclose(
        preprocess.channel_mix(tf.constant(f, tf.float32), preprocess.grey_mix(s)).numpy(),
        grey[..., None] + s * (f - grey[..., None]), atol=2e-6)
  np.testing.assert_allclose(preprocess.grey_mean(tf.constant(x)).numpy(), grey.mean() * 255,
                             rtol=1e-5)
  y = tf.constant(f, tf.float32)
  np.testing.assert_allclose(multicrop.solarize(y).numpy(), np.where(f >= 0.5, 1 - f, f),
                             atol=1e-7)


@pytest.mark.parametrize("shape", [(300, 411, 3), (411, 300, 3), (257, 256, 3), (180, 240, 3),
                                   (256, 256, 3)])
def test_resized_center_crop_is_the_crop_of_the_resize(shape):
  """Eval geometry: only the kept window is resampled, the same pixels to float rounding."""
  image = tf.constant(_image(shape, 4))
  want = preprocess.center_crop(preprocess.resize_shorter(image, 256), 224).numpy()
  got = preprocess.resized_center_crop(image, 256, 224).numpy()
  assert got.shape == (224, 224, 3)
  np.testing.assert_allclose(got, want, atol=0.02)
