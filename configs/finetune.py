"""Transfer fine-tuning as in the official recipe (finetune.py of the CRATE repository):
224 px, RandomResizedCrop + flip + RandAugment(2, 14), AdamW (wd 0.01), cosine without warm-up,
batch 256, plain cross-entropy, the classifier head (and its LayerNorm) re-initialised.

  python -m crate_jax.convert --torch crate_small.pth --variant crate_small --out ckpt/crate_small
  python -m crate_jax.train --config configs/finetune.py:cifar10 \
      --config.model.name=crate_small --config.init_from=ckpt/crate_small --workdir DIR

The argument after ':' picks the dataset: cifar10 | cifar100 | flowers | pets.
"""
from crate_jax import config_lib

# dataset -> (tfds name, train split, eval split, classes, lr, epochs)
DATASETS = {
    "cifar10": ("cifar10", "train", "test", 10, 5e-5, 200),
    "cifar100": ("cifar100", "train", "test", 100, 5e-5, 200),
    "flowers": ("oxford_flowers102", "train", "test", 102, 1e-4, 400),
    "pets": ("oxford_iiit_pet", "train", "test", 37, 1e-4, 400),
}


def get_config(arg: str = "cifar10"):
  if arg not in DATASETS:
    raise ValueError(f"configs/finetune.py:{arg} - dataset must be one of {sorted(DATASETS)}")
  tfds_name, train_split, eval_split, classes, lr, epochs = DATASETS[arg]
  config = config_lib.base_config(model="crate_small")
  config.data.name = tfds_name
  config.data.train_split = train_split
  config.data.eval_split = eval_split
  config.data.num_classes = classes
  config.data.randaugment_layers = 2
  config.data.randaugment_magnitude = 14
  config.data.eval_resize = 224           # the official test transform: Resize((224, 224))
  config.batch_size = 256
  config.eval_batch_size = 256
  config.num_epochs = epochs
  config.optimizer.name = "adamw"
  config.optimizer.lr = lr
  config.optimizer.b2 = 0.999
  config.optimizer.weight_decay = 0.01
  config.optimizer.warmup_epochs = 0.0
  config.label_smoothing = 0.0
  config.init_head = True
  config.eval_every_steps = 1000
  return config
