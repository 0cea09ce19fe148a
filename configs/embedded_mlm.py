"""CRATE-BERT (masked LM, BERT's 15% with 80/10/10) on the embedded Shakespeare corpus, offline,
with the model of configs/embedded_lm.py (128-byte sequences, 1,500 steps):

  python -m crate_jax.train --config configs/embedded_mlm.py --workdir workdirs/embedded_mlm
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.text_config(model="crate_bert_mini", task="mlm")
  config.model.kwargs.update(dim=128, depth=4, heads=4, dim_head=32)
  config.compute_dtype = "float32"
  config.data.name = "embedded_shakespeare"
  config.data.train_split, config.data.eval_split = "train", "test"
  config.data.seq_len = 128
  config.batch_size, config.eval_batch_size = 32, 64
  config.num_train_steps = 1500
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_epochs = 0.1
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 50, 500, 500
  config.keep_checkpoints = 2
  return config
