"""CRATE-Base on ImageNet-1K on a 64-chip TPU pod slice: global batch 4096 = 64 chips x 64 per chip.

Slice: v4-128 (64 chips, 16 hosts; the number counts TensorCores). v5litepod-64 and v5p-128 also
have 64 chips. Launch from a workstation with gcloud (see docs/tpu-pods.md):

  PROJECT=my-project ZONE=us-central2-b TPU_NAME=crate-b-pod BUCKET=gs://my-bucket \\
    launch/tpu/pod.sh up --accelerator-type v4-128 --spot --config configs/crate_base_pod.py

which runs, on every worker of the slice:

  python -m crate_jax.train --config configs/crate_base_pod.py --workdir gs://my-bucket/workdirs/crate_base_pod

The recipe is configs/crate_base.py's (Lion, wd 0.05, 200 epochs, 20 warm-up epochs) with the batch
raised from 512 to 4096 and the peak learning rate scaled linearly with it. To change the batch from
the command line, also pass the matching --config.optimizer.lr=scaled_lr(BATCH).
"""
from crate_jax import config_lib

NUM_CHIPS = 64                  # v4-128 / v5litepod-64 / v5p-128
PER_DEVICE_BATCH = 64
GLOBAL_BATCH = NUM_CHIPS * PER_DEVICE_BATCH  # 4096


def scaled_lr(batch_size: int) -> float:
  """Linear scaling rule: the base recipe's 2e-4 at batch 512, times batch_size / 512."""
  base = config_lib.base_config()
  return base.optimizer.lr * batch_size / base.batch_size


def get_config(arg=None):
  if arg:
    raise ValueError(f"configs/crate_base_pod.py takes no argument (got {arg!r})")
  config = config_lib.imagenet_config("crate_base")
  config.batch_size = GLOBAL_BATCH
  config.eval_batch_size = GLOBAL_BATCH
  # Linear LR scaling (Goyal et al., 2017): 2e-4 * 4096 / 512 = 1.6e-3.
  config.optimizer.lr = scaled_lr(config.batch_size)
  # Warm-up stays 20 epochs; the trainer converts epochs to steps with the dataset's size
  # (ImageNet: 1,281,167 // 4096 = 312 steps per epoch, so 6,240 warm-up steps).
  config.optimizer.warmup_epochs = 20.0
  config.log_every_steps = 50
  config.checkpoint_every_epochs = 1.0   # SIGTERM (preemption) also saves
  config.eval_every_epochs = 10.0        # and at the end
  return config
