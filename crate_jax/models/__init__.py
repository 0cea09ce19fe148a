"""The CRATE model family and its registry.

  from crate_jax import models
  model = models.get("crate_base", num_classes=10)
  variables = model.init(jax.random.key(0), jnp.zeros((1, 224, 224, 3)))
"""
from crate_jax.models.crate import CRATE, ISTA, MSSA, CRATELayer, PatchEmbed, ista, mssa
from crate_jax.models.tssa import causal_tssa, tssa
from crate_jax.models.posemb import resize_params_pos_embedding, resize_pos_embedding
from crate_jax.models.registry import from_config, get, names, register, variant_kwargs
from crate_jax.models.crate_alpha import ALPHA_VARIANTS, CRATEAlpha, alpha_kwargs, ista_alpha
from crate_jax.models.crate_mae import (MAE_SIZES, CRATEMAE, CRATEMAEClassifier,
                                        classifier_params_from_mae, reconstruction_figure)
from crate_jax.models.vit import VIT_SIZES, ViT
from crate_jax.models.crate_lm import BERT_SIZES, GPT_SIZES, TOST_GPT_SIZES, TextModel, lm_kwargs
from crate_jax.models.tost import TOST_SIZES, ToST, tost_kwargs
from crate_jax.models.family import (Contract, adapt_params, contract, forward_flops,
                                     has_class_token, head_params, init_params,
                                     initial_params,
                                     layer_ids, apply_train, variables, with_state,
                                     prefix_tokens, token_grid,
                                     layer_outputs, scan_layout)

# The official CRATE variants (224 px, patch 16); eta = lambda = 0.1 as in the released code.
register("crate_tiny", CRATE, dim=384, depth=12, heads=6, dim_head=64)
register("crate_small", CRATE, dim=576, depth=12, heads=12, dim_head=48)
register("crate_base", CRATE, dim=768, depth=12, heads=12, dim_head=64)
register("crate_large", CRATE, dim=1024, depth=24, heads=16, dim_head=64)
# The emergence-demo architecture (patch 8, 6 heads of width 128, ImageNet-21K classes).
register("crate_base_demo", CRATE, patch_size=8, dim=768, depth=12, heads=6, dim_head=128,
         num_classes=21842)

# CRATE-alpha: crate_alpha_{t,s,b,l,h}{patch} (e.g. crate_alpha_b16, crate_alpha_l14) and the
# size names crate_alpha_{tiny,small,base,large} (patch 16), crate_alpha_huge (patch 14).
for _letter, (_size, _patches) in ALPHA_VARIANTS.items():
  for _patch in _patches:
    register(f"crate_alpha_{_letter}{_patch}", CRATEAlpha, **alpha_kwargs(_size, _patch))
  register(f"crate_alpha_{_size}", CRATEAlpha,
           **alpha_kwargs(_size, 14 if _size == "huge" else 16))
# ViT baselines (patch 16, dim_head 64) and CRATE-MAE (patch 16; decoder mirrors the encoder).
for _size, (_dim, _depth, _heads) in VIT_SIZES.items():
  register(f"vit_{_size}", ViT, patch_size=16, dim=_dim, depth=_depth, heads=_heads,
           dim_head=_dim // _heads)
for _size, (_dim, _depth, _heads) in MAE_SIZES.items():
  _arch = dict(patch_size=16, dim=_dim, depth=_depth, heads=_heads, dim_head=_dim // _heads)
  register(f"crate_mae_{_size}", CRATEMAE, **_arch)
  register(f"crate_mae_classifier_{_size}", CRATEMAEClassifier, **_arch)

# ToST (linear-time TSSA attention): the official tost_cab_{size}_{p16,p8} factories.
for _size in TOST_SIZES:
  for _patch in (16, 8):
    register(f"tost_cab_{_size}_p{_patch}", ToST, **tost_kwargs(_size, _patch))

# Language: CRATE-GPT / CRATE-BERT and the GPT / BERT baselines of the same sizes; small /
# medium / large / xl are the official CRATE-GPT's crate / crate-medium / crate-large / crate-xl.
for _size in GPT_SIZES:
  register(f"crate_gpt_{_size}", TextModel, **lm_kwargs(_size, block="crate", causal=True))
  register(f"gpt_{_size}", TextModel, **lm_kwargs(_size, block="transformer", causal=True))
for _size in TOST_GPT_SIZES:   # the causal ToST (tost_gpt_base / medium / large: the official)
  register(f"tost_gpt_{_size}", TextModel, **lm_kwargs(_size, block="tost", causal=True))
for _size in BERT_SIZES:
  register(f"crate_bert_{_size}", TextModel, **lm_kwargs(_size, block="crate", causal=False))
  register(f"bert_{_size}", TextModel, **lm_kwargs(_size, block="transformer", causal=False))

__all__ = ["Contract", "contract", "causal_tssa", "tssa", "apply_train", "variables",
           "with_state", "prefix_tokens", "token_grid",
           "TextModel", "CRATE", "CRATELayer", "ISTA", "MSSA", "PatchEmbed",
           "adapt_params", "forward_flops",
           "from_config", "get", "has_class_token", "head_params", "init_params",
           "initial_params", "ista",
           "layer_ids", "layer_outputs", "mssa", "scan_layout",
           "names", "register",
           "resize_params_pos_embedding", "resize_pos_embedding", "variant_kwargs", "CRATEAlpha",
           "CRATEMAE", "CRATEMAEClassifier", "ViT", "ToST", "classifier_params_from_mae",
           "ista_alpha",
           "reconstruction_figure"]
