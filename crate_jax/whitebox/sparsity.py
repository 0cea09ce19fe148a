"""Sparsity of the ISTA codes Z^{l+1}, per image, as the official measurement (CLS token
included)."""
from __future__ import annotations

import jax
import jax.numpy as jnp


def zero_fraction(codes: jax.Array) -> jax.Array:
  """Fraction of entries exactly 0 over all N*d entries: codes (..., N, d) -> (...)."""
  return jnp.mean((codes == 0).astype(jnp.float32), axis=(-2, -1))


def density(codes: jax.Array) -> jax.Array:
  """1 - zero_fraction = ||Z||_0 / (N d), the curve the official plot labels "Sparsity"."""
  return 1.0 - zero_fraction(codes)


def l1_over_l0(codes: jax.Array) -> jax.Array:
  """||Z||_1 / ||Z||_0: mean magnitude of the nonzero entries (0 when all are zero)."""
  codes = codes.astype(jnp.float32)
  nonzero = jnp.sum(codes != 0, axis=(-2, -1))
  return jnp.sum(jnp.abs(codes), axis=(-2, -1)) / jnp.maximum(nonzero, 1)
