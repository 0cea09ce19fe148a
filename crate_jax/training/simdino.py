"""SimDINO (Wu et al., "Simplifying DINO via Coding Rate Regularization", ICML 2025): DINO's
self-distillation with its prototypes, centring and temperatures replaced by the coding rate.
Pure functions of arrays; the train step (crate_jax.training.tasks.simdino) composes them.

With z = head(backbone(x)) / ||.|| of p = z_dim dimensions, V student views (the first G = 2 are
the global crops the teacher sees) and a global batch of n images per view, the loss (the
official `MCRLoss`, RobinWu218/SimDINO simdino/main_dino.py) is

    loss = - coeff * C - R
    C = sum_{g < G, v < V, v != g} mean_i cos(z_t[g, i], z_s[v, i]) / (G V - min(G, V))
    R = gamma * mean_g R_eps(Zbar_g),   gamma = (p + n) / (p n)
    R_eps(Z) = 1/2 logdet(I_p + p / (n eps) Z^T Z)        (crate_jax.whitebox.coding_rate)
    Zbar_g = (z_s[g] + z_t[g]) / 2 (expa_type 1, the default)  or  z_s[g] (expa_type 0)

C pulls every student view towards the teacher's view of another crop (compression); R spreads
the merged global features over the p dimensions (expansion), which is what stops the collapse
DINO's centring and sharpening prevent. The teacher gets no gradient.

Ours, against the official code: n is the GLOBAL batch. Their default (`reduce_cov=0`) sums
Z^T Z over each GPU's m samples while scaling by m N, so the objective changes with the number
of GPUs (their issues #29, #48); here the arrays are global under `jax.jit` over a mesh, so the
Gram matrix is summed over every device and host by construction, which equals their
`reduce_cov=1`. The rate is computed in float32 (HIGHEST matmul precision) whatever the features'
dtype: their NaNs (#19, #20) came from the fp16 covariance.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.whitebox import rates

EXPA_TYPES = (0, 1)


def cosine(a, b, eps: float = 1e-8):
  """cos(a, b) = <a, b> / max(||a|| ||b||, eps) over the last axis (float32)."""
  a, b = a.astype(jnp.float32), b.astype(jnp.float32)
  norms = jnp.linalg.norm(a, axis=-1) * jnp.linalg.norm(b, axis=-1)
  return jnp.sum(a * b, axis=-1) / jnp.maximum(norms, eps)


def compression(student, teacher):
  """C: the mean cosine between each teacher global view g and each student view v != g.

  student (V, n, p), teacher (G, n, p); student view g and teacher view g are the same crop for
  g < G, and those pairs are left out. Returns a scalar."""
  sim = cosine(teacher[:, None], student[None]).mean(-1)       # (G, V): mean over the batch
  g, v = sim.shape
  pairs = 1.0 - jnp.eye(g, v, dtype=sim.dtype)
  return jnp.sum(sim * pairs) / (g * v - min(g, v))


def gamma(p: int, n: int) -> float:
  """SimDINO's balancing factor (p + n) / (p n) on the rate (their heuristic)."""
  return (p + n) / (p * n)


def rate(z, eps: float, valid=None):
  """R_eps(Z_g) = 1/2 logdet(I_p + p / (n eps) Z_g^T Z_g) of each z (G, n, p) -> (G,), in
  float32. `valid` (n,) in {0, 1} leaves rows out (an eval batch's padding): they are zeroed and
  n counts the valid rows."""
  z = z.astype(jnp.float32)
  n = z.shape[-2]
  if valid is not None:
    z = z * valid.astype(jnp.float32)[None, :, None]
    n = jnp.maximum(jnp.sum(valid.astype(jnp.float32)), 1.0)
  return rates.coding_rate(z, eps, n=n)


def expansion(merged, eps: float):
  """R = gamma * mean_g R_eps(Zbar_g) for merged (G, n, p), n the global batch (float32)."""
  n, p = merged.shape[-2:]
  return gamma(p, n) * jnp.mean(rate(merged, eps))


def merge(student_global, teacher, expa_type: int = 1):
  """Zbar: (z_s + z_t) / 2 for expa_type 1 (the default), the student's global views for 0."""
  if expa_type not in EXPA_TYPES:
    raise ValueError(f"simdino.expa_type={expa_type!r} is not one of {EXPA_TYPES}")
  return (student_global + teacher) / 2.0 if expa_type == 1 else student_global


def mcr_loss(student, teacher, *, eps: float, coeff: float = 1.0, expa_type: int = 1):
  """(loss, {"compression": C, "expansion": R}) with loss = -coeff C - R (module docstring).

  student (V, n, p) of all views, the G global ones first; teacher (G, n, p) (stop-gradient)."""
  teacher = jax.lax.stop_gradient(teacher)
  c = compression(student, teacher)
  r = expansion(merge(student[:teacher.shape[0]], teacher, expa_type), eps)
  return -coeff * c - r, {"compression": c, "expansion": r}
