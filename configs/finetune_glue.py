"""Fine-tune a CRATE-BERT checkpoint (task mlm) to classify a GLUE task's sentences:

  python -m crate_jax.train --config configs/finetune_glue.py \
      --config.init_from=workdirs/embedded_mlm --workdir workdirs/glue_sst2
  # another task: --config.data.name=glue/mrpc --config.data.eval_split=validation

GLUE comes through tfds (prepare it where there is internet: `tfds build glue/sst2`). The model
arguments must match the checkpoint's (here those of configs/embedded_mlm.py).
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.text_classification_config("crate_bert_mini", "glue/sst2")
  config.model.kwargs.update(dim=128, depth=4, heads=4, dim_head=32)
  config.compute_dtype = "float32"
  config.data.seq_len = 128
  config.batch_size = 32
  config.eval_batch_size = 64
  config.optimizer.lr = 1e-4
  config.init_from = ""           # set: a CRATE-BERT checkpoint (workdir or step folder)
  config.log_every_steps = 50
  config.eval_every_steps = 500
  config.checkpoint_every_steps = 500
  return config
