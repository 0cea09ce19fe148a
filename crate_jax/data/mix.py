"""Mixup and CutMix on a host batch (TensorFlow, stateless: a function of (seed, step) only).

Each example is paired with its mirror in the batch (i <-> b - 1 - i), as in timm:
  mixup:  x = lam x + (1 - lam) x',               lam ~ Beta(a_mixup, a_mixup)
  cutmix: x = x' inside a box of area (1 - lam) HW, lam recomputed from the clipped box
  targets = lam y + (1 - lam) y'  (rows still sum to 1)
With both alphas > 0 a batch uses CutMix with probability switch_prob; with probability
1 - prob it is left as it is.
"""
from __future__ import annotations

import tensorflow as tf


def _beta(key, alpha: float):
  """Beta(alpha, alpha) from two stateless gammas."""
  k1, k2 = tf.unstack(tf.random.experimental.stateless_split(key, 2))
  g1 = tf.random.stateless_gamma([], seed=k1, alpha=alpha)
  g2 = tf.random.stateless_gamma([], seed=k2, alpha=alpha)
  return tf.where(g1 + g2 > 0, g1 / tf.maximum(g1 + g2, 1e-12), 0.5)


def _mixup(images, lam):
  return lam * images + (1.0 - lam) * tf.reverse(images, axis=[0]), lam


def _cutmix(images, lam, key):
  """Paste the partner's box; returns (images, lam of the kept area)."""
  shape = tf.shape(images)
  h, w = shape[1], shape[2]
  cut = tf.sqrt(1.0 - lam)
  cut_h = tf.cast(tf.cast(h, tf.float32) * cut, tf.int32)
  cut_w = tf.cast(tf.cast(w, tf.float32) * cut, tf.int32)
  cy = tf.random.stateless_uniform([], seed=key, maxval=h, dtype=tf.int32)
  cx = tf.random.stateless_uniform([], seed=tf.random.experimental.stateless_fold_in(key, 1),
                                   maxval=w, dtype=tf.int32)
  y0, y1 = tf.clip_by_value(cy - cut_h // 2, 0, h), tf.clip_by_value(cy + cut_h // 2, 0, h)
  x0, x1 = tf.clip_by_value(cx - cut_w // 2, 0, w), tf.clip_by_value(cx + cut_w // 2, 0, w)
  box = tf.reverse(images[:, y0:y1, x0:x1], axis=[0])
  band = tf.concat([images[:, y0:y1, :x0], box, images[:, y0:y1, x1:]], axis=2)
  mixed = tf.concat([images[:, :y0], band, images[:, y1:]], axis=1)
  area = tf.cast((y1 - y0) * (x1 - x0), tf.float32) / tf.cast(h * w, tf.float32)
  return mixed, 1.0 - area


def mix_batch(batch: dict, key, *, mixup_alpha: float, cutmix_alpha: float, prob: float = 1.0,
              switch_prob: float = 0.5) -> dict:
  """Mix batch["image"] (b, H, W, C) float and batch["labels"] (b, K); other keys untouched."""
  if mixup_alpha <= 0 and cutmix_alpha <= 0:
    return batch
  k_apply, k_switch, k_lam, k_box = tf.unstack(tf.random.experimental.stateless_split(key, 4))
  images, labels = batch["image"], batch["labels"]

  def mixup():
    return _mixup(images, _beta(k_lam, mixup_alpha))

  def cutmix():
    return _cutmix(images, _beta(k_lam, cutmix_alpha), k_box)

  if mixup_alpha > 0 and cutmix_alpha > 0:
    use_cutmix = tf.random.stateless_uniform([], seed=k_switch) < switch_prob
    mixed, lam = tf.cond(use_cutmix, cutmix, mixup)
  else:
    mixed, lam = cutmix() if cutmix_alpha > 0 else mixup()
  if prob < 1:
    apply = tf.random.stateless_uniform([], seed=k_apply) < prob
    lam = tf.where(apply, lam, 1.0)
    mixed = tf.cond(apply, lambda: mixed, lambda: images)
  out = dict(batch)
  out["image"] = tf.ensure_shape(mixed, images.shape)
  out["labels"] = lam * labels + (1.0 - lam) * tf.reverse(labels, axis=[0])
  return out
