"""The causal ToST on the embedded Shakespeare (offline, byte-level, a few minutes on 2 CPU
cores): configs/embedded_lm.py's recipe and budget (2,000 steps of 32 x 64 bytes) with TSSA
blocks (the official LayerScale 1e-5 on both branches, GPT-2's init) at the same width, depth
and heads as its CRATE-GPT and GPT baselines.

  python -m crate_jax.train --config configs/tost_embedded_lm.py --workdir workdirs/tost_lm
  python -m crate_jax.generate --checkpoint workdirs/tost_lm --prompt "ROMEO"
  python -m crate_jax.analyze --config configs/tost_embedded_lm.py \
      --checkpoint workdirs/tost_lm --out workdirs/tost_lm/analysis
"""
from crate_jax import config_lib


def get_config():
  config = config_lib.text_config(model="tost_gpt_mini", task="lm")
  config.model.kwargs.update(dim=128, depth=4, heads=4)
  config.compute_dtype = "float32"  # CPU; use bfloat16 on accelerators

  config.data.name = "embedded_shakespeare"
  config.data.train_split = "train"
  config.data.eval_split = "test"
  config.data.seq_len = 64
  config.data.tokenizer = "byte"

  config.batch_size = 32
  config.eval_batch_size = 64
  config.num_train_steps = 2000
  config.optimizer.lr = 2e-3
  config.optimizer.warmup_epochs = 0.1
  config.optimizer.decay_mask = "kernels"   # nanoGPT's: matrices (and denom_bias) only

  config.log_every_steps = 50
  config.eval_every_steps = 1000
  config.checkpoint_every_steps = 1000
  config.keep_checkpoints = 2
  return config
