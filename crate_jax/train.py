"""The one train loop: python -m crate_jax.train --config configs/crate_base.py --workdir DIR.

data -> model -> step -> loop -> checkpoint, one way. What is derived before compiling lives in
training/setup.py, the periodic hooks beside the step in training/hooks.py. A workdir that holds
checkpoints is resumed from its latest step (the data iterator continues at that step: same batches
as an uninterrupted run); SIGTERM saves and exits cleanly; a non-finite loss stops the run before
anything bad is saved.
"""
from __future__ import annotations

import json
import logging
import os
import sys
import time

import jax
import ml_collections
import numpy as np
from etils import epath

from crate_jax import cli
from crate_jax import data as data_lib
from crate_jax import setups
from crate_jax.training import checkpoint as ckpt_lib
from crate_jax.training import evaluation, hooks, program, setup, tasks
from crate_jax.training import lock as lock_lib
from crate_jax.training import metrics as metrics_lib
from crate_jax.training import watchdog as watchdog_lib
from crate_jax.training.setup import Plan, maybe_initialize_distributed, plan  # noqa: F401


class NonFiniteLossError(FloatingPointError):
  pass


def train_and_evaluate(config: ml_collections.ConfigDict, workdir: str, *,
                       callbacks=()) -> dict:
  """Train (or resume) in `workdir`; returns the final eval metrics.

  `callbacks` are called as cb(step, state) after every step (e.g. custom logging).
  """
  config = setup.run_tokenizer(config, workdir)
  p = plan(config)
  epath.Path(workdir).mkdir(parents=True, exist_ok=True)
  workdir_lock = lock_lib.acquire(workdir)  # one trainer per workdir (process 0 holds it)
  try:
    return _train(config, p, workdir, callbacks)
  finally:
    workdir_lock.release()


def _check_resumed_task(config, ckpts) -> None:
  """A workdir whose checkpoints another objective wrote is refused in one line (before the
  trees are compared leaf by leaf): resuming a SimDINO run with task dino, say."""
  step = ckpts.latest_step()
  if step is None:
    return
  try:
    saved = (ckpts.saved_meta(step).get("config") or {}).get("task", "classification")
  except Exception:  # noqa: BLE001 - an unreadable step is restore_latest's to report
    return
  if saved != config.get("task", "classification"):
    raise ckpt_lib.CheckpointError(
        f"checkpoint step {step} in {ckpts.directory} was trained with task {saved!r} and the "
        f"config trains task {config.task!r}: resume it with its own config (config.json in "
        f"the workdir), or start task {config.task!r} in a new --workdir (warm start: "
        f"--config.init_from={ckpts.directory / str(step)})")


def _train(config, p: setup.Plan, workdir: str, callbacks) -> dict:
  """train_and_evaluate once the plan is made and the workdir is locked."""
  prog = program.build(config, p.model, p.mesh, total_steps=p.total_steps,
                       steps_per_epoch=p.steps_per_epoch)
  data_sh, abstract, schedule, task = (prog.data_sharding, prog.abstract_state, prog.schedule,
                                       prog.task)

  best_metric, best_mode = setups.best_checkpoint(config)
  ckpts = ckpt_lib.Checkpoints(workdir, keep=config.keep_checkpoints, best_metric=best_metric,
                               best_mode=best_mode)
  jsonl = os.fspath(epath.Path(workdir) / "metrics.jsonl")
  _check_resumed_task(config, ckpts)
  start, state, meta = ckpts.restore_latest(abstract)
  if start is not None:
    logging.info("Resuming from step %d in %s", start, workdir)
    if jax.process_index() == 0:
      metrics_lib.truncate_jsonl(jsonl, start)
  if start is None:
    start = 0
    state = prog.init()
    if config.init_from:
      state = setup.warm_start(state, config, p.model, task, abstract.params)
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
  whitebox = hooks.whitebox_hook(config, p) if config.whitebox_every_steps > 0 else None

  writer = metrics_lib.create_writer(workdir, total_steps=p.total_steps)
  from clu import periodic_actions
  throughput = metrics_lib.Throughput(config.batch_size,
                                      task.train_flops_per_example(p.model, config),
                                      tokens_per_example=(int(config.data.seq_len)
                                                          if task.reads_tokens(config) else None))
  step_hooks = [throughput]  # the one speed measurement; its clock starts once step 1 has compiled
  if config.profile_steps > 0 and jax.process_index() == 0:
    step_hooks.append(periodic_actions.Profile(logdir=workdir,
                                               num_profile_steps=config.profile_steps))
  train_iter = data_lib.prefetch_to_device(
      data_lib.train_iterator(config.data, global_batch_size=config.batch_size, seed=config.seed,
                              start_step=start), data_sh, size=config.data.prefetch)
  watchdog = watchdog_lib.Watchdog(config.hang_timeout_s, config.preemption_grace_s)
  preemption = hooks.Preemption(on_signal=lambda: watchdog.preempted(step))
  pending: list = []
  eval_metrics: dict = {}

  def flush(step):
    """Fetch the pending per-step metrics; stop on a non-finite loss (before any save)."""
    rows = jax.device_get(pending)
    pending.clear()
    for s, m in rows:
      for key, what in task.must_be_finite.items():
        if key in m and not np.isfinite(m[key]):
          raise NonFiniteLossError(
              f"non-finite {what} ({m[key]}) at step {s}; stopping. The last good "
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
        for hook in step_hooks:
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
          eval_metrics = evaluation.evaluate_all(eval_step,
                                                 program.eval_params(prog, config, state),
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
      hooks.close_quietly(ckpts, writer, failing=not finished)
    watchdog.close()
  return eval_metrics


def _quiet_orbax_info(record) -> bool:
  """Orbax logs every save step at INFO; keep its warnings, drop the chatter."""
  return record.levelno >= logging.WARNING or "orbax" not in record.pathname


@cli.command
def main(argv=None) -> int:
  parser = cli.ArgumentParser(description=__doc__)
  cli.add_config_argument(parser, "configs/embedded.py")
  parser.add_argument("--workdir", default=None,
                      help="checkpoints and logs; default workdirs/<config name>")
  args = cli.parse_args(parser, argv)
  logging.getLogger("absl").addFilter(_quiet_orbax_info)
  maybe_initialize_distributed()
  cli.import_tensorflow()
  workdir = args.workdir or os.path.join(
      "workdirs", os.path.splitext(os.path.basename(args.config_file.partition(":")[0]))[0])
  n, d = jax.process_count(), jax.device_count()
  logging.info("workdir %s  (%d process%s, %d device%s)", workdir, n, "es" * (n > 1), d,
               "s" * (d > 1))
  result = train_and_evaluate(args.config, workdir)
  if jax.process_index() == 0 and result:
    print(f"final eval  {metrics_lib.format_eval(result)}", flush=True)
  return 0


if __name__ == "__main__":
  sys.exit(main())
