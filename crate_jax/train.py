"""The one train loop: python -m crate_jax.train --config configs/crate_base.py --workdir DIR.

data -> model -> step -> loop -> checkpoint, one way. A workdir that holds checkpoints is resumed
from its latest step (the data iterator continues at that step: same batches as an uninterrupted
run); SIGTERM saves and exits cleanly; a non-finite loss stops the run before anything bad is saved.
"""
from __future__ import annotations

import dataclasses
import functools
import json
import logging
import os
import signal
import time

import jax
import jax.numpy as jnp
import ml_collections
import numpy as np
from etils import epath

from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import flops as flops_lib
from crate_jax import data as data_lib
from crate_jax.training import metrics as metrics_lib
from crate_jax import config_lib, models
from crate_jax import setups
from crate_jax.training import evaluation, program, sharding, tasks
from crate_jax.training import lock as lock_lib
from crate_jax.training import watchdog as watchdog_lib
from crate_jax.training import weights as weights_lib



class NonFiniteLossError(FloatingPointError):
  pass


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


def _warm_start(state, config, model, task, abstract_params):
  """Params from config.init_from (the weights that stand for its run's model), fitted by the
  model family (e.g. positions resized); with init_head the family's head keeps its fresh init
  (the fresh leaves stay on their devices: no gather of sharded params to one host)."""
  fresh = {k: v for k, v in state.params.items()
           if config.init_head and k in models.head_params(model)}
  loaded, _, what = weights_lib.load(config.init_from)
  params = ckpt_lib.fit_params(abstract_params, loaded, what=f"checkpoint {config.init_from}",
                               keep_fresh=fresh, drop_extra=True,
                               adapt=functools.partial(models.adapt_params, model))
  logging.info("Warm-started params from %s (%s)", config.init_from, what)
  return task.with_params(state, params)


class _Preemption:
  """SIGTERM sets a flag; the loop saves at the next step boundary and exits cleanly (the
  watchdog bounds how long that may take: config.preemption_grace_s)."""

  def __init__(self, on_signal=None):
    self.requested = False
    self._on_signal = on_signal
    self._old = signal.signal(signal.SIGTERM, self._handler)

  def _handler(self, signum, frame):
    logging.warning("SIGTERM received: saving a checkpoint and exiting")
    self.requested = True
    if self._on_signal is not None:
      self._on_signal()

  def restore(self):
    signal.signal(signal.SIGTERM, self._old)


def _run_tokenizer(config, workdir: str):
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


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       callbacks=()) -> dict:
  """Train (or resume) in `workdir`; returns the final eval metrics.

  `callbacks` are called as cb(step, state) after every step (e.g. custom logging).
  """
  config = _run_tokenizer(config, workdir)
  p = plan(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  workdir_lock = lock_lib.acquire(workdir)  # one trainer per workdir (process 0 holds it)
  try:
    return _train(config, p, workdir, callbacks)
  finally:
    workdir_lock.release()


def _train(config, p: Plan, workdir: str, callbacks) -> dict:
  """train_and_evaluate once the plan is made and the workdir is locked."""
  prog = program.build(config, p.model, p.mesh, total_steps=p.total_steps,
                       steps_per_epoch=p.steps_per_epoch)
  data_sh, abstract, schedule, task = (prog.data_sharding, prog.abstract_state, prog.schedule,
                                       prog.task)

  best_metric, best_mode = setups.best_checkpoint(config)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=best_metric,
                               best_mode=best_mode)
  jsonl = os.fspath(epath.Path(workdir) / "metrics.jsonl")
  start, state, meta = ckpts.restore_latest(abstract)
  if start is not None:
    logging.info("Resuming from step %d in %s", start, workdir)
    if jax.process_index() == 0:
      metrics_lib.truncate_jsonl(jsonl, start)
  if start is None:
    start = 0
    state = prog.init()
    if config.init_from:
      state = _warm_start(state, config, p.model, task, abstract.params)
    if jax.process_index() == 0:
      (epath.Path(workdir) / "config.json").write_text(config.to_json_best_effort(indent=2))
      names = data_lib.class_names(config.data)
      if names is not None:  # beside config.json: evaluate / analyze print and check them
        (epath.Path(workdir) / data_lib.CLASS_NAMES_FILE).write_text(json.dumps(names, indent=1))

  if start >= p.total_steps:
    logging.warning("%s already holds the final step %d: nothing to train (a new --workdir "
                    "starts over)", workdir, start)
    ckpts.close()
    return {}

  train_step, eval_step = prog.train_step, prog.eval_step
  whitebox = _whitebox_hook(config, p) if config.whitebox_every_steps > 0 else None

  writer = metrics_lib.create_writer(workdir, total_steps=p.total_steps)
  from clu import periodic_actions
  throughput = metrics_lib.Throughput(config.batch_size,
                                      flops_lib.train_flops_per_example(p.model),
                                      tokens_per_example=(int(config.data.seq_len)
                                                          if task.reads_tokens(config) else None))
  hooks = [throughput]  # the one speed measurement; its clock starts once step 1 has compiled
  if config.profile_steps > 0 and jax.process_index() == 0:
    hooks.append(periodic_actions.Profile(logdir=workdir, num_profile_steps=config.profile_steps))
  train_iter = data_lib.prefetch_to_device(
      data_lib.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                              start_step=start), data_sh, size=config.data.prefetch)
  watchdog = watchdog_lib.Watchdog(config.hang_timeout_s, config.preemption_grace_s)
  preemption = _Preemption(on_signal=lambda: watchdog.preempted(step))
  pending: list = []
  eval_metrics: dict = {}

  def flush(step):
    """Fetch the pending per-step metrics; stop on a non-finite loss (before any save)."""
    rows = jax.device_get(pending)
    pending.clear()
    for s, m in rows:
      if not np.isfinite(m["loss"]):
        raise NonFiniteLossError(
            f"non-finite training loss ({m['loss']}) at step {s}; stopping. The last good "
            f"checkpoint is step {ckpts.latest_step()} in {ckpts.directory}")
    if rows:
      mean = {f"train/{k}": float(np.mean([m[k] for _, m in rows])) for k in rows[0][1]}
      mean["train/lr"] = float(schedule(step - 1))
      task.check_logged(mean, step)
      writer.write_scalars(step, {**mean, **throughput.measure(step)})

  def save(step, metrics=None):
    meta = {"step": step, "data_seed": config.seed, "examples_seen": step * config.batch_size,
            "model": config.model.name, "config": json.loads(config.to_json_best_effort())}
    ckpts.save(step, state, meta, metrics=metrics)

  step = start
  finished = False
  try:
    while step < p.total_steps:
      with watchdog.phase("the train step", step + 1):
        batch = next(train_iter)
        state, m = train_step(state, batch)
        step += 1
        pending.append((step, m))
        for hook in hooks:
          hook(step)
        for cb in callbacks:
          cb(step, state)
      last = step == p.total_steps
      if step % p.every["log"] == 0 or last:
        with watchdog.phase("the metrics flush", step):
          flush(step)
      if step % p.every["eval"] == 0 or last:
        with watchdog.phase("evaluation", step):
          flush(step)
          t = time.perf_counter()
          eval_metrics = evaluation.evaluate_all(eval_step, program.eval_params(prog, config, state),
                                                 config, data_sh, task=task)
          writer.write_scalars(step, {f"eval/{k}": v for k, v in eval_metrics.items()})
          throughput.pause(time.perf_counter() - t)
      if whitebox and step % config.whitebox_every_steps == 0:
        with watchdog.phase("the white-box hook", step):
          writer.write_scalars(step, whitebox(task.weights(config, tasks.state_dict(state))[0]))
      preempted = preemption.requested or ckpts.reached_preemption(step)
      if step % p.every["checkpoint"] == 0 or last or preempted:
        with watchdog.phase("the checkpoint save", step):
          flush(step)
          at_eval = step % p.every["eval"] == 0 or last
          save(step, {best_metric: eval_metrics[best_metric]} if at_eval and eval_metrics
               else None)
      if preempted:
        logging.warning("Saved step %d after a preemption signal; exiting", step)
        break
    finished = True
  except OSError as e:
    if isinstance(e, ckpt_lib.CheckpointWriteError) or not ckpt_lib.is_io_error(e):
      raise
    raise ckpt_lib.CheckpointWriteError(
        f"writing to {workdir} failed at step {step} ({e}); stopping. Earlier checkpoints are "
        f"intact: steps {ckpts.finished_steps()}") from e
  finally:
    preemption.restore()
    if hasattr(train_iter, "close"):
      train_iter.close()
    with watchdog.phase("closing (pending checkpoint writes)", step):
      _close_quietly(ckpts, writer, failing=not finished)
    watchdog.close()
  return eval_metrics


def _close_quietly(ckpts, writer, failing: bool):
  """Finish pending saves; if the run is already failing, report (not raise) a second error."""
  for close in (ckpts.close, writer.flush):
    try:
      close()
    except Exception:  # noqa: BLE001
      if not failing:
        raise
      logging.exception("while stopping after an error")


def _whitebox_hook(config, p):
  """Per-layer coding rate / sparsity on a fixed eval batch, every whitebox_every_steps (the
  setup was checked: crate_jax.setups); where the dataset has ground-truth masks also
  whitebox/seg_iou/layer_LL (the segmentation IoU of the class token's attention, or of the
  features' PCA for families without a class token). The hook takes the weights that stand for
  the model (its task's rule: the EMA, DINO's teacher backbone, ...)."""
  from crate_jax import whitebox
  from crate_jax.data import datasets
  from crate_jax.whitebox import segscore
  contract = models.contract(p.model)
  masks = contract.inputs == "images" and datasets.spec(config.data.name).mask_key is not None
  if not masks:
    logging.info("whitebox: dataset %s has no segmentation masks; no whitebox/seg_iou",
                 config.data.name)
  batch = next(iter(data_lib.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                           **({"masks": True} if masks else {}))))
  n = min(32, int(np.sum(batch["mask"])))
  inputs = jnp.asarray(batch[contract.batch_key][:n])
  if not masks:
    fn = jax.jit(lambda params: whitebox.whitebox_metrics(p.model, params, inputs))
    return lambda params: {k: float(v) for k, v in jax.device_get(fn(params)).items()}

  # Two programs: the sharded one computes the metrics and the (small) mask inputs; these are
  # gathered to the host and the masks, whose eigensolves call back to numpy, are scored in a
  # single-device program (a host callback inside the sharded program aborted XLA:CPU).
  from jax.experimental import multihost_utils
  from crate_jax.whitebox import stats
  methods = segscore.default_methods(p.model)
  grid = segscore.patch_grid(p.model, inputs)
  gt = np.asarray(batch["foreground"][:n]).astype(bool)

  def sharded(params):
    _, out = stats.intermediates(p.model, params, inputs)
    return stats.metrics_of(p.model, out), segscore.segmentation_inputs(p.model, out, methods)
  first = jax.jit(sharded)
  score = jax.jit(lambda seg_inputs: segscore.segmentation_scalars(p.model, seg_inputs, gt, grid,
                                                                   methods=methods))

  def hook(params):
    out, seg_inputs = first(params)
    seg_inputs = multihost_utils.process_allgather(seg_inputs, tiled=True)
    out = {**jax.device_get(out), **jax.device_get(score(seg_inputs))}
    return {k: float(v) for k, v in out.items()}
  return hook


def _quiet_orbax_info(record) -> bool:
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


def main(argv):
  del argv
  from absl import flags
  from crate_jax import cli
  logging.getLogger("absl").addFilter(_quiet_orbax_info)
  maybe_initialize_distributed()
  cli.import_tensorflow()
  cfg = flags.FLAGS.config
  workdir = flags.FLAGS.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(flags.FLAGS["config"].config_filename))[0])
  n, d = jax.process_count(), jax.device_count()
  logging.info("workdir %s  (%d process%s, %d device%s)", workdir, n, "es" * (n > 1), d,
               "s" * (d > 1))
  result = train_and_evaluate(cfg, workdir)
  if jax.process_index() == 0 and result:
    print(f"final eval  {metrics_lib.format_eval(result)}", flush=True)


if __name__ == "__main__":
  from crate_jax import cli

  def define_flags():
    from absl import flags
    cli.define_config_flag("configs/embedded.py")
    flags.DEFINE_string("workdir", None, "Checkpoints and logs; default workdirs/<config name>.")

  cli.run(main, define_flags)
