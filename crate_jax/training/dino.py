"""DINO self-distillation (Caron et al. 2021): loss over view pairs, teacher centre, schedules,
collapse metrics. Pure functions of arrays; the train step composes them.

From the DINO paper (their choices): teacher outputs are centred and sharpened,
  P_t(x) = softmax((g_t(x) - c) / tau_t),  P_s(x) = softmax(g_s(x) / tau_s),
the loss is the cross-entropy H(P_t(x_i), P_s(x_j)) = -sum_k P_t,k log P_s,k averaged over every
pair of a teacher global view i and a student view j != i; the centre is an EMA of the teacher's
batch mean, c <- m c + (1 - m) mean_b g_t (m = 0.9); tau_s = 0.1; tau_t warms up linearly from
0.04 to its final value (0.04 - 0.07) over the first epochs; the teacher momentum follows a
cosine from 0.996 to 1 (checked against the paper and facebookresearch/dino's main_dino.py: its
DINOLoss skips the pairs i == j and divides by the number of pairs, as here). The long-form
CRATE paper (arXiv 2311.13110) reports CRATE trained with DINO, the backbone swapped; its
hyper-parameters could not be read here (only its abstract was found), so nothing below is
taken from it. Our choices: the temperature schedule is per step (DINO: per epoch; the momentum
is per iteration in both); the collapse metrics below.
"""
from __future__ import annotations

import math

import jax
import jax.numpy as jnp


def momentum_schedule(step, total_steps: int, base: float = 0.996, final: float = 1.0):
  """Teacher EMA momentum: final - (final - base) (cos(pi step / total) + 1) / 2."""
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / max(total_steps, 1), 0.0, 1.0)
  return final - (final - base) * (jnp.cos(jnp.pi * frac) + 1.0) / 2.0


def teacher_temperature(step, warmup_steps: int, start: float = 0.04, final: float = 0.04):
  """tau_t: linear from `start` to `final` over warmup_steps, then `final`."""
  if warmup_steps <= 0:
    return jnp.asarray(final, jnp.float32)
  frac = jnp.clip(jnp.asarray(step, jnp.float32) / warmup_steps, 0.0, 1.0)
  return start + (final - start) * frac


def teacher_targets(teacher_out, centre, temperature):
  """P_t = softmax((g_t - c) / tau_t) (no gradient flows into the teacher)."""
  return jax.nn.softmax(jax.lax.stop_gradient((teacher_out - centre) / temperature), axis=-1)


def update_centre(centre, teacher_out, momentum: float = 0.9):
  """c <- m c + (1 - m) mean over all teacher outputs in the (global) batch, shape (1, K)."""
  batch_mean = jnp.mean(teacher_out.reshape(-1, teacher_out.shape[-1]), axis=0, keepdims=True)
  return momentum * centre + (1.0 - momentum) * jax.lax.stop_gradient(batch_mean)


def dino_loss(student_out, teacher_out, centre, *, student_temp: float, teacher_temp):
  """Mean over pairs (i, j), i a teacher global view, j != i a student view, of
  -sum_k P_t(x_i)_k log P_s(x_j)_k, averaged over the batch.

  student_out: (V, B, K) logits of all V views (the first G are the global crops);
  teacher_out: (G, B, K) logits of the global crops. View j of the student and view i of the
  teacher are the same crop iff i == j < G.
  """
  targets = teacher_targets(teacher_out, centre, teacher_temp)          # (G, B, K)
  log_p = jax.nn.log_softmax(student_out / student_temp, axis=-1)       # (V, B, K)
  ce = -jnp.einsum("gbk,vbk->gvb", targets, log_p).mean(-1)             # (G, V)
  g, v = ce.shape
  pairs = 1.0 - jnp.eye(g, v, dtype=ce.dtype)
  return jnp.sum(ce * pairs) / jnp.sum(pairs)


def entropy(p, axis=-1):
  """H(p) = -sum p log p (0 log 0 = 0), in nats."""
  return -jnp.sum(jnp.where(p > 0, p * jnp.log(jnp.where(p > 0, p, 1.0)), 0.0), axis=axis)


def collapse_metrics(targets) -> dict:
  """From the teacher's sharpened outputs P_t (..., K):
    teacher_entropy      mean over examples of H(P_t) (-> log K when every output is uniform)
    teacher_kl_uniform   KL(mean P_t || U) = log K - H(mean P_t) (-> log K when every example
                         picks the same prototype)
  both also as fractions of log K (our choice of collapse measures; DINO's paper plots H and KL
  between teacher and student)."""
  k = targets.shape[-1]
  flat = targets.reshape(-1, k)
  h = entropy(flat).mean()
  kl = math.log(k) - entropy(flat.mean(0))
  return {"teacher_entropy": h, "teacher_kl_uniform": kl,
          "teacher_entropy_frac": h / math.log(k), "teacher_kl_uniform_frac": kl / math.log(k)}


def collapse_warning(metrics: dict, threshold: float = 0.95) -> str | None:
  """A warning line when the teacher has collapsed: outputs all near uniform (entropy at log K)
  or all on one prototype (KL of the mean to uniform near log K); None otherwise."""
  h, kl = metrics.get("teacher_entropy_frac"), metrics.get("teacher_kl_uniform_frac")
  if h is not None and h >= threshold:
    return (f"DINO teacher collapse: output entropy is {h:.1%} of log K (uniform outputs); "
            "lower the teacher temperature or the centre momentum")
  if kl is not None and kl >= threshold:
    return (f"DINO teacher collapse: every example picks the same prototype (KL to uniform "
            f"{kl:.1%} of log K); raise the centre momentum's effect or the teacher temperature")
  return None
