"""Layer-wise white-box statistics of a CRATE forward pass, and the train loop's metric hook.

Layer l (0-based, as the `layer_l` parameters) maps Z^l -> Z^{l+1}. Following the official
measurement, the rate terms of layer l are taken at its input LN(Z^l) under its own U_[K] (the
MSSA step compresses there) and the sparsity at its output Z^{l+1} (the ISTA codes):

  R^c_l  = 1/2 sum_k logdet(I_N + p/(N eps) X_k X_k^T),  X_k = rownorm(U_k^T LN(Z^l))
  R_l    = 1/2 logdet(I_N + d/(N eps) Y Y^T),             Y   = rownorm(LN(Z^l))
  Delta R_l = R_l - R^c_l
  l0_l   = ||Z^{l+1}||_0 / N   (nonzeros per token, CLS included)
  objective_l = R^c_l + lambda * l0_l - R_l   (the sparse rate reduction objective, minimised)

with eps = 0.01 (the official value, playing eps^2), lambda the model's ISTA lambda, rownorm the
per-token l2 normalisation. Every quantity is computed per image, then mean and std (ddof=0)
over the images.
"""
from __future__ import annotations

import jax
import jax.numpy as jnp

from crate_jax.whitebox import rates, sparsity

METRIC_KEYS = ("coding_rate_c", "coding_rate_c_std", "coding_rate", "rate_reduction", "objective",
               "sparsity", "density", "l1_over_l0")


def _unwrap(params):
  return params["params"] if isinstance(params, dict) and set(params) == {"params"} else params


def intermediates(model, params, images):
  """(logits, out): the model's `return_intermediates=True` output, which holds
  out["normed"] (L, B, N, d) = LN(Z^l), the input of each layer's MSSA, for the CRATE families
  (CRATE, CRATE-alpha, the CRATE-MAE classifier); other families have no `normed`. A model
  without logits (CRATE-MAE pre-training) is read through its `encode` method: logits None.
  """
  from crate_jax.models import family
  variables = family.variables(_unwrap(params))
  if hasattr(model, "encode"):  # CRATE-MAE: the unmasked encoder
    _, out = model.apply(variables, images, return_intermediates=True, method="encode")
    return None, dict(out)
  logits, out = model.apply(variables, images, return_intermediates=True)
  return logits, dict(out)


def _mean_std(per_image: dict[str, jax.Array]) -> dict[str, jax.Array]:
  stats = {}
  for name, v in per_image.items():
    stats[name] = jnp.mean(v, axis=-1)
    stats[name + "_std"] = jnp.std(v, axis=-1)
  return stats


def per_image_stats(out, *, eps: float = rates.OFFICIAL_EPS_SQ, lambd: float = 0.1):
  """Per-layer, per-image quantities (each (L, B)); see the module docstring for the formulas.
  A family without ISTA codes (ToST: its features are TSSA's w = U^T LN(Z^l) + b) gets the
  rates only."""
  rc = rates.compression_rate_measured(out["features"], eps)
  per_image = {"coding_rate_c": rc}
  codes = out.get("codes")
  if codes is not None:
    per_image.update(sparsity=sparsity.zero_fraction(codes), density=sparsity.density(codes),
                     l1_over_l0=sparsity.l1_over_l0(codes))
  if "normed" in out:
    r = rates.coding_rate_measured(out["normed"], eps)
    per_image.update(coding_rate=r, rate_reduction=r - rc)
    if codes is not None:
      l0 = rates.l0_per_token(codes)
      per_image.update(l0=l0, objective=rc + lambd * l0 - r)
  return per_image


def layerwise_stats(out, *, eps: float = rates.OFFICIAL_EPS_SQ,
                    lambd: float = 0.1) -> dict[str, jax.Array]:
  """Per-layer arrays (L,) from the model's intermediates: NAME (mean over images), NAME_std.

  Names: coding_rate_c (the official R^c), sparsity (fraction of exact zeros of Z^{l+1}),
  density (1 - sparsity), l1_over_l0; with out["normed"] (see `intermediates`) also coding_rate
  (R), rate_reduction (Delta R = R - R^c), l0 (||Z^{l+1}||_0 / N) and objective
  (R^c + lambda l0 - R). Jittable.
  """
  return _mean_std(per_image_stats(out, eps=eps, lambd=lambd))


def whitebox_metrics(model, params, images, *, eps: float = rates.OFFICIAL_EPS_SQ,
                     keys=METRIC_KEYS) -> dict[str, jax.Array]:
  """{"whitebox/layer_03/coding_rate_c": scalar, ...} on one batch of (normalised NHWC) images.

  Jittable (e.g. jax.jit(lambda p: whitebox_metrics(model, p, images))); lambda is the model's.
  """
  _, out = intermediates(model, params, images)
  return metrics_of(model, out, eps=eps, keys=keys)


def metrics_of(model, out, *, eps: float = rates.OFFICIAL_EPS_SQ,
               keys=METRIC_KEYS) -> dict[str, jax.Array]:
  """`whitebox_metrics` from the model's intermediates `out` (already computed)."""
  stats = layerwise_stats(out, eps=eps, lambd=getattr(model, "lambd", 0.1))
  depth = out["features"].shape[0]
  return {f"whitebox/layer_{l:02d}/{k}": stats[k][l]
          for k in keys if k in stats for l in range(depth)}
