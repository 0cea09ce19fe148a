"""Coding rates of token sets: R(Z), R^c(Z; U_[K]), Delta R and the sparse rate reduction objective.

Conventions (all functions here):
  * Z is row-major, (..., N, d): N tokens of dimension d (the paper writes Z in R^{d x N}; its
    Z Z^T is our Z^T Z). Leading axes are batch axes, so everything is batchable (and vmappable).
  * `eps_sq` is the squared distortion eps^2 of the paper. The official CRATE measurement calls it
    `eps` and uses 0.01 (i.e. eps = 0.1); OFFICIAL_EPS_SQ = 0.01 is that value.
  * logdet(I_d + a Z^T Z) = logdet(I_N + a Z Z^T) (Sylvester), so the smaller Gram matrix is used,
    and the log-determinant is taken through a Cholesky factor (the matrix is >= I, so always SPD;
    `logdet_i_plus` says why CPU programs factor it with XLA ops).
  * Rates are in nats (natural log), as in the official code.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

OFFICIAL_EPS_SQ = 0.01


def logdet_i_plus(G: jax.Array, alpha) -> jax.Array:
  """logdet(I + alpha G) for symmetric PSD G (..., m, m): 2 sum_i log L_ii, L = chol(I + alpha G).

  On CPU the factor comes from `cholesky_diagonal` (plain XLA ops); elsewhere from the backend's
  solver (cuSOLVER, the TPU's). jaxlib's CPU LAPACK kernels split a batch over XLA's intra-op
  thread pool and block a pool thread until the pieces finish: two such calls running at once on a
  2-thread pool (a 2-core machine) wait for each other forever. That hung the train loop's
  white-box hook; no program here calls them.
  """
  m = G.shape[-1]
  A = jnp.eye(m, dtype=G.dtype) + alpha * G
  lapack = lambda a: jnp.diagonal(jnp.linalg.cholesky(a), axis1=-2, axis2=-1)
  diag = jax.lax.platform_dependent(A, cpu=cholesky_diagonal, default=lapack)
  return 2.0 * jnp.sum(jnp.log(diag), axis=-1)


def cholesky_diagonal(A: jax.Array) -> jax.Array:
  """diag(L) of A = L L^T for SPD A (..., m, m), by right-looking elimination in XLA ops: step j
  takes L_jj = sqrt(A_jj), l = A_{>j, j} / L_jj, and A_{>j, >j} -= l l^T. m steps of
  O(m^2) work per matrix (batched), differentiable."""
  m = A.shape[-1]
  idx = jnp.arange(m)
  A = 0.5 * (A + jnp.swapaxes(A, -1, -2))  # reads both triangles: a symmetric gradient

  def step(j, carry):
    A, diag = carry
    pivot = jnp.sqrt(A[..., j, j])
    col = jnp.where(idx > j, A[..., :, j] / pivot[..., None], 0.0)
    A = A - col[..., :, None] * col[..., None, :]
    return A, diag.at[..., j].set(pivot)

  _, diag = jax.lax.fori_loop(0, m, step, (A, jnp.zeros(A.shape[:-1], A.dtype)))
  return diag


def gram(Z: jax.Array) -> jax.Array:
  """The smaller Gram matrix of Z (..., N, d): Z^T Z (d x d) if d <= N, else Z Z^T (N x N), at
  HIGHEST precision (a float32 matmul may otherwise run as one bf16 pass on TPUs, TF32 on GPUs)."""
  n, d = Z.shape[-2:]
  Zt = jnp.swapaxes(Z, -1, -2)
  mm = lambda a, b: jnp.matmul(a, b, precision=jax.lax.Precision.HIGHEST)
  return mm(Zt, Z) if d <= n else mm(Z, Zt)


def coding_rate(Z: jax.Array, eps_sq: float = OFFICIAL_EPS_SQ, n=None) -> jax.Array:
  """R(Z) = 1/2 logdet(I + d / (N eps^2) Z^T Z) for Z (..., N, d), in float32 or wider whatever
  Z's dtype; returns shape (...). `n` replaces N in the scale (rows of zeros left out)."""
  rows, d = Z.shape[-2:]
  n = rows if n is None else n
  Z = Z.astype(jnp.promote_types(Z.dtype, jnp.float32))
  return 0.5 * logdet_i_plus(gram(Z), d / (n * eps_sq))


def project(Z: jax.Array, U: jax.Array) -> jax.Array:
  """U_k^T Z for every subspace: Z (..., N, d), U (d, K, p) -> (..., K, N, p)."""
  return jnp.einsum("...nd,dkp->...knp", Z, U.astype(Z.dtype))


def compression_rate(Z: jax.Array, U: jax.Array, eps_sq: float = OFFICIAL_EPS_SQ) -> jax.Array:
  """R^c(Z; U_[K]) = sum_k R(U_k^T Z) = 1/2 sum_k logdet(I + p/(N eps^2) (U_k^T Z)^T (U_k^T Z)).

  Z (..., N, d); U (d, K, p), the layout of the model's `mssa/U` parameter. Returns shape (...).
  """
  return jnp.sum(coding_rate(project(Z, U), eps_sq), axis=-1)


def rate_reduction(Z: jax.Array, U: jax.Array, eps_sq: float = OFFICIAL_EPS_SQ) -> jax.Array:
  """Delta R(Z; U_[K]) = R(Z) - R^c(Z; U_[K]) (paper normalisations: d/(N eps^2) vs p/(N eps^2))."""
  return coding_rate(Z, eps_sq) - compression_rate(Z, U, eps_sq)


def l0_per_token(Z: jax.Array) -> jax.Array:
  """||Z||_0 / N: the mean number of nonzero coordinates per token, Z (..., N, d) -> (...)."""
  return jnp.sum(Z != 0, axis=(-2, -1)).astype(jnp.float32) / Z.shape[-2]


def sparse_rate_reduction(Z: jax.Array, U: jax.Array, lambd: float,
                          eps_sq: float = OFFICIAL_EPS_SQ) -> jax.Array:
  """The objective CRATE's layers descend: R^c(Z; U_[K]) + lambda ||Z||_0 / N - R(Z)."""
  return compression_rate(Z, U, eps_sq) + lambd * l0_per_token(Z) - coding_rate(Z, eps_sq)


def normalize_tokens(x: jax.Array, axis: int = -1, eps: float = 1e-12) -> jax.Array:
  """x / max(||x||_2, eps) along `axis` (torch.nn.functional.normalize)."""
  x = x.astype(jnp.promote_types(x.dtype, jnp.float32))
  norm = jnp.sqrt(jnp.sum(x * x, axis=axis, keepdims=True))
  return x / jnp.maximum(norm, eps)


def compression_rate_measured(features: jax.Array, eps: float = OFFICIAL_EPS_SQ) -> jax.Array:
  """The official per-image R^c: features (..., N, K, p) = U_k^T LN(Z^l) -> (...).

  X_k = the tokens of head k l2-normalised over p (CLS token included);
  R^c = 1/2 sum_k logdet(I_N + p / (N eps) X_k X_k^T), eps = 0.01 playing eps^2.
  """
  X = jnp.moveaxis(normalize_tokens(features), -2, -3)  # (..., K, N, p)
  return jnp.sum(coding_rate(X, eps), axis=-1)


def coding_rate_measured(Z: jax.Array, eps: float = OFFICIAL_EPS_SQ) -> jax.Array:
  """R of a layer representation in the same convention: tokens l2-normalised over d,
  R = 1/2 logdet(I + d / (N eps) Z^T Z), eps = 0.01 playing eps^2. Z (..., N, d) -> (...)."""
  return coding_rate(normalize_tokens(Z), eps)
