"""White-box analysis of CRATE: coding rates, rate reduction, sparsity, attention maps and PCA.

  from crate_jax import whitebox
  logits, out = whitebox.intermediates(model, params, images)   # + out["normed"] = LN(Z^l)
  stats = whitebox.layerwise_stats(out)                        # per-layer R^c, R, Delta R, sparsity
  scalars = whitebox.whitebox_metrics(model, params, images)    # {"whitebox/layer_03/...": x}
"""
from crate_jax.whitebox.maps import (cls_attention_maps, membership_maps, minmax, pca,
                                     pca_visualisation, upsample_maps)
from crate_jax.whitebox.rates import (OFFICIAL_EPS_SQ, coding_rate, coding_rate_measured,
                                      compression_rate, compression_rate_measured, gram,
                                      l0_per_token, logdet_i_plus, normalize_tokens, project,
                                      rate_reduction, sparse_rate_reduction)
from crate_jax.whitebox.sparsity import density, l1_over_l0, zero_fraction
from crate_jax.whitebox.stats import (METRIC_KEYS, intermediates, layerwise_stats,
                                      per_image_stats, whitebox_metrics)

__all__ = ["OFFICIAL_EPS_SQ", "METRIC_KEYS", "cls_attention_maps", "coding_rate",
           "coding_rate_measured", "compression_rate", "compression_rate_measured", "density",
           "gram", "intermediates", "l0_per_token", "l1_over_l0", "layerwise_stats",
           "logdet_i_plus", "membership_maps", "minmax", "normalize_tokens", "pca",
           "pca_visualisation",
           "per_image_stats", "project", "rate_reduction", "sparse_rate_reduction",
           "upsample_maps", "whitebox_metrics", "zero_fraction"]
