"""The loop's parts: steps, optimiser, mesh/shardings, checkpoints, metrics, FLOPs, evaluation.

Family-agnostic: what a model family knows (its head, its warm-start resizing, its FLOPs) comes
from `crate_jax.models`; nothing here names a family.
"""
