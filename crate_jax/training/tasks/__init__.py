"""The training objectives, one module each, in one registry (`tasks.get(name)`,
`tasks.of(config)`).

  classification  supervised classes of images or text (classification.py)
  mae             masked autoencoding, CRATE-MAE (mae.py)
  dino            self-distillation with a projection head, EMA teacher and centre (dino.py)
  simdino         self-distillation regularised by the coding rate, no prototypes (simdino.py)
  lm, mlm         next-token / masked-token prediction (text.py)

A new objective is a module with a `base.Task` subclass registered here; nothing in the loop,
the steps, evaluation, the planner or checkpointing changes.
"""
from crate_jax.training.tasks.base import (COMMANDS, Task, get, image_batch, names, of, register,
                                           state_dict)
from crate_jax.training.tasks import classification, dino, mae, simdino, text  # noqa: F401  (register)

__all__ = ["COMMANDS", "Task", "get", "image_batch", "names", "of", "register", "state_dict"]
