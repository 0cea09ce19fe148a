"""What the train loop derives before it compiles anything: the plan (config validated against
the devices and data), the distributed runtime, a BPE run's tokenizer, and the warm start."""
from __future__ import annotations

import dataclasses
import functools
import logging
import os

import jax
import ml_collections
from etils import epath

from crate_jax import config_lib, models, setups
from crate_jax import data as data_lib
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import evaluation, sharding, tasks
from crate_jax.training import weights as weights_lib


@dataclasses.dataclass
class Plan:
  """Everything derived from the config before compiling anything."""
  model: object
  mesh: object
  steps_per_epoch: int
  total_steps: int
  every: dict  # {"log", "eval", "checkpoint"} intervals in steps


def maybe_initialize_distributed() -> None:
  """jax.distributed.initialize() when several processes run this program; no-op otherwise.

  Explicit: JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, JAX_PROCESS_ID. Automatic: SLURM with more
  than one task, Cloud TPU pods (several worker hostnames).
  """
  env = os.environ
  if jax.distributed.is_initialized():
    return
  if env.get("JAX_COORDINATOR_ADDRESS"):
    if env.get("JAX_PLATFORMS", "").startswith("cpu"):
      jax.config.update("jax_cpu_collectives_implementation", "gloo")
    jax.distributed.initialize(coordinator_address=env["JAX_COORDINATOR_ADDRESS"],
                               num_processes=int(env["JAX_NUM_PROCESSES"]),
                               process_id=int(env["JAX_PROCESS_ID"]))
  elif int(env.get("SLURM_NTASKS", "1")) > 1 or "," in env.get("TPU_WORKER_HOSTNAMES", ""):
    jax.distributed.initialize()


def plan(config: ml_collections.ConfigDict, *, devices=None, process_count: int | None = None,
         num_train_examples: int | None = None) -> Plan:
  """Validate the config (once), then against the devices and data; before any compile.

  The TPU planner passes a slice's devices and host count, and the train split's size from the
  dataset table when the data is not prepared on the planning machine.
  """
  setups.check(config, "train")
  model = models.from_config(config)
  devices = jax.devices() if devices is None else devices
  process_count = jax.process_count() if process_count is None else process_count
  mesh = sharding.make_mesh(config.mesh, devices)
  for key in ("batch_size", "eval_batch_size"):
    try:
      data_lib.check_batch_size(config[key], len(devices), process_count)
    except ValueError as e:
      raise ValueError(f"config.{key}: {e}") from None
  per_device = config.batch_size // len(devices)
  if per_device % config.grad_accum_steps:
    raise ValueError(f"config.grad_accum_steps={config.grad_accum_steps} must divide the "
                     f"per-device batch {per_device}")
  if num_train_examples is None:
    num_train = data_lib.num_examples(config.data, config.data.train_split)
    for name, cfg in evaluation.extra_eval_sets(config).items():
      try:
        data_lib.num_examples(cfg, cfg.eval_split)
      except FileNotFoundError as e:  # DatasetNotPreparedError
        raise type(e)(f"{e} (extra eval set {name!r} of config.data.extra_eval; to train "
                      "without it: --config.data.extra_eval=\"()\")") from None
  else:
    num_train = num_train_examples
  spe = config_lib.steps_per_epoch(num_train, config.batch_size)
  return Plan(model, mesh, spe, config_lib.total_steps(config, spe),
              config_lib.interval_steps(config, spe))


def run_tokenizer(config, workdir: str):
  """A BPE text run keeps its tokenizer with the run: WORKDIR/tokenizer.json, copied from
  config.data.tokenizer_dir when that names another run's (a fine-tune keeps its pre-training's
  ids), else trained on the training split once; resumes read it back. Returns the config with
  data.tokenizer_dir = the workdir. Other runs: the config unchanged."""
  if not (tasks.of(config).reads_tokens(config) and config.data.tokenizer == "bpe"):
    return config
  setups.check(config, "train")  # bad input fails before the tokenizer is trained
  from crate_jax.data import text, tokenizers
  target = epath.Path(workdir).absolute()
  source = config.data.tokenizer_dir
  if source and epath.Path(source).absolute() != target:
    tok = tokenizers.from_config(config.data)  # one error if the named run has none
    if not (target / tokenizers.TOKENIZER_FILE).exists():
      tok.save(os.fspath(target))
  config = tokenizers.with_directory(config, os.fspath(target))
  logging.info("BPE tokenizer: %s", text.ensure_tokenizer(config.data))
  return config


def warm_start(state, config, model, task, abstract_params):
  """Params from config.init_from (the weights that stand for its run's model), fitted by the
  model family (e.g. positions resized); with init_head the family's head keeps its fresh init
  (the fresh leaves stay on their devices: no gather of sharded params to one host)."""
  fresh = {k: v for k, v in state.params.items()
           if config.init_head and k in models.head_params(model)}
  loaded, meta, what = weights_lib.load(config.init_from)
  with weights_lib.other_family(meta, model, config.init_from):
    params = ckpt_lib.fit_params(abstract_params, loaded, what=f"checkpoint {config.init_from}",
                                 keep_fresh=fresh, drop_extra=True,
                                 adapt=functools.partial(models.adapt_params, model))
  logging.info("Warm-started params from %s (%s)", config.init_from, what)
  return task.with_params(state, params)
