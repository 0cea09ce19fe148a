"""Token statistics self-attention (ToST, "Token Statistics Transformer: Linear-Time Attention via
Variational Rate Reduction", ICLR 2025): the compression step of a variational form of the coding
rate, computed from per-group second moments of the tokens, never an N x N matrix. Pure functions
of the projected tokens, as `crate.mssa` is for CRATE; the layout is mssa's: w = U^T x per head,
(B, N, heads, d).

Both follow the official code (RobinWu218/ToST): `tssa` its vision attention
(tost_vision/tost.py, AttentionTSSA), `causal_tssa` its language attention
(tost_lang/model_TSSA.py, CausalSelfAttention_TSSA). The two normalise the memberships
differently (ToST issue #4 asks which is canonical); both are kept, each named for what it does.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.models import layers as L

NORM_EPS = 1e-12     # F.normalize's floor, and the causal running energy's clamp
MASS_EPS = 1e-8      # added to a group's total membership before dividing by it


def tssa(w: jax.Array, temp: jax.Array, *, return_memberships: bool = False):
  """TSSA over all N tokens, per head k, token i, coordinate j:

    w~_{i,k,j} = w_{i,k,j} / max(||w_{:,k,j}||_2, 1e-12)      (normalised across the tokens)
    Pi_{i,k}   = softmax_k( temp_k * sum_j w~_{i,k,j}^2 )       (memberships: sum_k Pi_{i,k} = 1)
    s_{k,j}    = sum_i Pi_{i,k} w_{i,k,j}^2 / (sum_i Pi_{i,k} + 1e-8)   (group k's second moment)
    out_{i,k,j} = -Pi_{i,k} w_{i,k,j} / (1 + s_{k,j})

  w (B, N, heads, d), temp (heads,) -> (B, N, heads, d), in w's dtype (the statistics at least
  in float32). Cost O(N heads d); permuting the tokens permutes the output. With
  return_memberships: (out, Pi (B, N, heads)).
  """
  x = w.astype(L.at_least_f32(w.dtype))
  norm = jnp.sqrt(jnp.sum(x * x, axis=1, keepdims=True))
  normed = x / jnp.maximum(norm, NORM_EPS)
  pi = jax.nn.softmax(jnp.sum(normed * normed, axis=-1) * temp.astype(x.dtype), axis=-1)
  mass = jnp.sum(pi, axis=1, keepdims=True)[..., None]                       # (B, 1, h, 1)
  second = jnp.sum(pi[..., None] * x * x, axis=1, keepdims=True) / (mass + MASS_EPS)
  out = (-pi[..., None] * x / (1.0 + second)).astype(w.dtype)
  return (out, pi) if return_memberships else out


def causal_tssa(w: jax.Array, temp: jax.Array, denom_bias: jax.Array, *,
                return_memberships: bool = False, carry=None):
  """Causal TSSA: token t sees the statistics of tokens <= t only (running sums):

    e_{t,k,j}  = sum_{u<=t} w_{u,k,j}^2                      (clamped below at 1e-12)
    Pi_{t,k}   = softmax_k( temp_k * sum_j (w_{t,k,j}^2 / e_{t,k,j} + b_{k,t}) )
    s_{t,k,j}  = sum_{u<=t} Pi_{u,k} w_{u,k,j}^2 / (sum_{u<=t} Pi_{u,k} + 1e-8)
    out_{t,k,j} = -Pi_{t,k} w_{t,k,j} / (1 + s_{t,k,j})

  with b = denom_bias, a learned per-head, per-position offset. w (B, T, heads, d), temp (heads,),
  denom_bias (heads, max_len) with T <= max_len -> (B, T, heads, d); with return_memberships:
  (out, Pi (B, T, heads)).

  Every statistic is a running sum, so decoding needs no key-value cache, only a state of
  O(heads d) per sequence: carry = (start, energy (B, h, d), weighted (B, h, d), mass (B, h)),
  the position of w's first token and the three sums over the tokens before it (zeros and 0 for
  none): calling on the tokens piece by piece, each time with the carry the call before
  returned, equals one call on all of them. Returns then (out, [Pi,] the new carry).
  """
  t, max_len = w.shape[1], denom_bias.shape[1]
  x = w.astype(L.at_least_f32(w.dtype))
  sq = x * x
  if carry is None:
    if t > max_len:
      raise ValueError(f"causal TSSA: a sequence of {t} tokens is longer than the position "
                       f"table (denom_bias) of {max_len}")
    start, e0, s0, m0 = 0, 0.0, 0.0, 0.0
    offset = denom_bias[:, :t]
  else:
    start, e0, s0, m0 = carry
    e0, s0, m0 = e0[:, None], s0[:, None], m0[:, None]
    offset = jax.lax.dynamic_slice_in_dim(denom_bias, start, t, axis=1)
  running = e0 + jnp.cumsum(sq, axis=1)
  energy = jnp.maximum(running, NORM_EPS)
  offset = offset.T.astype(x.dtype)[None, :, :, None]                       # (1, T, h, 1)
  logits = jnp.sum(sq / energy + offset, axis=-1) * temp.astype(x.dtype)
  pi = jax.nn.softmax(logits, axis=-1)                                       # (B, T, h)
  mass = m0 + jnp.cumsum(pi, axis=1)
  weighted = s0 + jnp.cumsum(pi[..., None] * sq, axis=1)
  out = (-pi[..., None] * x / (1.0 + weighted / (mass[..., None] + MASS_EPS))).astype(w.dtype)
  result = (out, pi) if return_memberships else (out,)
  if carry is not None:
    result += ((start + t, running[:, -1], weighted[:, -1], mass[:, -1]),)
  return result if len(result) > 1 else out
