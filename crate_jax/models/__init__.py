"""The CRATE model family and its registry.

  from crate_jax import models
  model = models.get("crate_base", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
"""
from crate_jax.models.crate import CRATE, ISTA, MSSA, CRATELayer, PatchEmbed, ista, mssa
from crate_jax.models.posemb import resize_params_pos_embedding, resize_pos_embedding
from crate_jax.models.registry import from_config, get, names, register, variant_kwargs

# The official CRATE variants (224 px, patch 16); eta = lambda = 0.1 as in the released code.
register("crate_tiny", CRATE, dim=384, depth=12, heads=6, dim_head=64)
register("crate_small", CRATE, dim=576, depth=12, heads=12, dim_head=48)
register("crate_base", CRATE, dim=768, depth=12, heads=12, dim_head=64)
register("crate_large", CRATE, dim=1024, depth=24, heads=16, dim_head=64)
# The emergence-demo architecture (patch 8, 6 heads of width 128, ImageNet-21K classes).
register("crate_base_demo", CRATE, patch_size=8, dim=768, depth=12, heads=6, dim_head=128,
         num_classes=21842)

__all__ = ["CRATE", "CRATELayer", "ISTA", "MSSA", "PatchEmbed", "from_config", "get", "ista", "mssa", "names",
           "register", "resize_params_pos_embedding", "resize_pos_embedding", "variant_kwargs"]
