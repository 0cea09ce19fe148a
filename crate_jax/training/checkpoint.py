"""Orbax checkpoints: one thin wrapper over `CheckpointManager`, the only Orbax API used here.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` holds the train state pytree (or just
{"params": ...} for converted/imported weights), `meta` a JSON dict (config, data position, ...).
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it); steps,
array metadata, restores and JSON all go through the manager. Nothing here knows a model family:
warm-start resizing comes in as an `adapt` function (the model's `adapt_params`).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any, Callable

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model/config."""


class CheckpointWriteError(OSError):
  """Saving a checkpoint failed (e.g. no space left on the device)."""


def _manager(directory: epath.Path, *, policies=(), async_save: bool = False,
             read_only: bool = False) -> ocp.CheckpointManager:
  options = ocp.CheckpointManagerOptions(
      preservation_policy=(ocp.checkpoint_managers.AnyPreservationPolicy(list(policies))
                           if policies else None),
      enable_async_checkpointing=async_save, create=not read_only, read_only=read_only,
      cleanup_tmp_directories=not read_only)
  # One handler per item, for saving, metadata and restoring alike (a PyTree handler reads what
  # StandardSave wrote: the on-disk format is the same).
  handlers = {"state": ocp.PyTreeCheckpointHandler(type_handler_registry=_type_handlers()),
              "meta": ocp.JsonCheckpointHandler()}
  return ocp.CheckpointManager(directory, item_handlers=handlers, options=options)


def _type_handlers():
  """Orbax's standard type handlers; in a single process, jax.Arrays written without its
  replica-parallel slicing. That splits each replicated array among its replicas so that several
  hosts share the write; with one process every replica is local, so it only compiled a slice
  program per array shape and device (136 of them, 5 s, at a tiny model's first save on 8 CPU
  devices) to write the same bytes."""
  from orbax.checkpoint import type_handlers
  standard = (int, float, bytes, np.number, np.ndarray, str)
  return type_handlers.create_type_handler_registry(
      *[(t, type_handlers.get_type_handler(t)) for t in standard],
      (jax.Array, type_handlers.ArrayHandler(use_replica_parallel=jax.process_count() > 1)))


class Checkpoints:
  """The checkpoints of one workdir: keep the last `keep` plus the best by `best_metric`.

  best_mode "max" keeps the highest metric (top-1), "min" the lowest (a loss). `directory` may
  also be a checkpoints folder itself (one holding <step>/state); read_only opens it for reading.
  """

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str | None = "top1",
               best_mode: str = "max", async_save: bool = True, read_only: bool = False):
    path = epath.Path(absolute(workdir))
    self.directory = path if read_only and not (path / CHECKPOINT_DIR).exists() else (
        path / CHECKPOINT_DIR)
    if best_mode not in ("max", "min"):
      raise ValueError(f"best_mode must be 'max' or 'min', got {best_mode!r}")
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], reverse=best_mode == "min", n=1,
          keep_checkpoints_without_metrics=False))
    self.manager = _manager(self.directory, policies=() if read_only else policies,
                            async_save=async_save and not read_only, read_only=read_only)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return sorted(self.manager.all_steps())

  def finished_steps(self) -> list[int]:
    """Steps whose writes completed, read afresh from storage."""
    self.manager.reload()
    return self.all_steps()

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Start an async save of `step` (an error of the previous async save surfaces here)."""
    with self._write_errors(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.PyTreeSave(state),
                                                      meta=ocp.args.JsonSave(meta)),
                        metrics=metrics, force=True)

  @contextlib.contextmanager
  def _write_errors(self, step):
    """A failed write (disk full, permissions) -> one clear CheckpointWriteError."""
    try:
      yield
    except Exception as e:  # noqa: BLE001 - Orbax wraps I/O errors in several types
      if not is_io_error(e):
        raise
      done = [s for s in self._intact_steps() if s != step]
      raise CheckpointWriteError(
          f"writing a checkpoint in {self.directory} failed ({_first_line(_root(e))}); stopping. "
          f"Earlier checkpoints are intact: steps {done}") from e

  def _intact_steps(self) -> list[int]:
    try:
      return self.finished_steps()
    except Exception:  # noqa: BLE001 - reporting only
      return []

  def saved_tree(self, step: int) -> Any:
    """The saved `state` tree of `step` as Orbax array metadata (shapes, dtypes); no arrays read."""
    return self.manager.item_metadata(step)["state"]

  def saved_meta(self, step: int) -> dict:
    """The meta (step, config, ...) saved with `step`; no arrays read."""
    return dict(self.manager.restore(step, args=ocp.args.Composite(
        meta=ocp.args.JsonRestore())).meta)

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings).

    A checkpoint of another model/config raises CheckpointError naming the mismatched leaves
    (checked on the saved metadata, before reading any array).
    """
    try:
      check_compatible(abstract_state, self.saved_tree(step),
                       what=f"checkpoint step {step} in {self.directory}")
    except CheckpointError as e:
      raise CheckpointError(
          f"{e}. Refusing to resume: use a new --workdir, or warm-start from it with "
          f"--config.init_from={self.directory / str(step)}") from None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(
            abstract_state, restore_args=ocp.checkpoint_utils.construct_restore_args(
                abstract_state)),
        meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_host(self, step: int) -> tuple[Any, dict]:
    """The saved state as host numpy arrays (any topology it was written on) and its meta."""
    as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray),
                            self.saved_tree(step))
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.PyTreeRestore(restore_args=as_numpy), meta=ocp.args.JsonRestore()))
    return out.state, dict(out.meta)

  def restore_latest(self, abstract_state: Any) -> tuple[int | None, Any, dict]:
    """Restore the newest checkpoint that reads cleanly; (None, None, {}) if there is none.

    A truncated or corrupt step is reported in one line and moved aside to `<step>.corrupt-N`
    (kept on disk, never deleted); the previous good step is used instead.
    """
    for step in sorted(self.all_steps(), reverse=True):
      try:
        state, meta = self.restore(step, abstract_state)
        return step, state, meta
      except CheckpointError:
        raise
      except Exception as e:  # noqa: BLE001 - any unreadable checkpoint falls back the same way
        aside = self._move_aside(step)
        logging.warning("checkpoint step %d is unreadable (%s); moved to %s, trying an earlier "
                        "step", step, _first_line(e), aside)
    return None, None, {}

  def _move_aside(self, step: int) -> epath.Path:
    src = self.directory / str(step)
    n = 0
    while (self.directory / f"{step}.corrupt-{n}").exists():
      n += 1
    dst = self.directory / f"{step}.corrupt-{n}"
    if jax.process_index() == 0:
      src.rename(dst)
    _sync(f"move_aside_{step}")
    self.manager.reload()
    return dst

  def reached_preemption(self, step: int) -> bool:
    return self.manager.reached_preemption(step)

  def wait(self) -> None:
    with self._write_errors(None):
      self.manager.wait_until_finished()

  def close(self) -> None:
    try:
      self.wait()
    finally:
      self.manager.close()


def absolute(path: str) -> str:
  """Orbax wants absolute paths: make a local path absolute, leave gs:// and the like alone."""
  path = os.fspath(path)
  return path if "://" in path else os.path.abspath(path)


def _sync(name: str) -> None:
  if jax.process_count() > 1:
    from jax.experimental import multihost_utils
    multihost_utils.sync_global_devices(name)


def save_params(directory: str, params: Any, meta: dict, step: int = 0) -> str:
  """Write params alone as a checkpoint our loop, evaluate and analyze can load. Returns its
  path."""
  ckpt = Checkpoints(directory, keep=1, best_metric=None, async_save=False)
  ckpt.save(step, {"params": params}, meta)
  ckpt.close()
  return str(ckpt.directory / str(step))


@contextlib.contextmanager
def open_checkpoint(path: str):
  """A workdir, its checkpoints/ folder or one step folder -> (reader, step), the latest step
  unless a step folder is named. Raises CheckpointError naming the path if there is none."""
  p = epath.Path(absolute(path))
  step = None
  if p.name.isdigit() and (p / "state").exists():
    p, step = p.parent, int(p.name)
  if not p.exists():
    raise CheckpointError(f"no checkpoint found at {path}: no such folder")
  reader = Checkpoints(os.fspath(p), read_only=True)
  try:
    steps = reader.all_steps()
    if step is None and steps:
      step = steps[-1]
    if step is None or step not in steps:
      raise CheckpointError(f"no checkpoint found at {path} (looked for <step>/state under "
                            f"{reader.directory})")
    yield reader, step
  finally:
    reader.close()


def resolve(path: str) -> epath.Path:
  """The step folder `path` stands for (see `open_checkpoint`)."""
  with open_checkpoint(path) as (reader, step):
    return reader.directory / str(step)


def load_state(path: str) -> tuple[Any, dict]:
  """The saved state tree (host numpy arrays; "params", and for training runs "opt_state",
  "ema_params", "task_state", ...) and meta of any of our checkpoints."""
  with open_checkpoint(path) as (reader, step):
    return reader.restore_host(step)


def read_meta(path: str) -> dict:
  """The meta (JSON) of a checkpoint, without reading any array."""
  with open_checkpoint(path) as (reader, step):
    out = reader.manager.restore(step, args=ocp.args.Composite(meta=ocp.args.JsonRestore()))
    return dict(out.meta)


def load_params(path: str, *, ema: bool = False) -> tuple[Any, dict]:
  """Params (host numpy arrays) and meta from any of our checkpoints: train state or params-only.
  With ema, the weight EMA where the checkpoint has one (else the params, said in the log).
  Which weights stand for a training run's model is its task's choice
  (crate_jax.training.weights); this reads the raw tree."""
  tree, meta = load_state(path)
  if ema and tree.get("ema_params") is not None:
    return tree["ema_params"], meta
  if ema:
    logging.info("%s holds no weight EMA; using its params", path)
  return tree["params"], meta


def load_params_for(abstract_params: Any, path: str, *, adapt: Callable | None = None,
                    keep_fresh: Any = None, drop_extra: bool = False, ema: bool = False):
  """`fit_params` of the params (or EMA) saved at `path`; returns (params, meta)."""
  params, meta = load_params(path, ema=ema)
  return fit_params(abstract_params, params, what=f"checkpoint {path}", adapt=adapt,
                    keep_fresh=keep_fresh, drop_extra=drop_extra), meta


def fit_params(abstract_params: Any, params: Any, *, what: str, adapt: Callable | None = None,
               keep_fresh: Any = None, drop_extra: bool = False):
  """Loaded params fitted to a model whose params look like `abstract_params`, placed on its
  shardings (where the abstract leaves carry them).

  With drop_extra, top-level subtrees the model does not have (e.g. a CRATE-MAE decoder when
  fine-tuning its encoder) are left out; top-level subtrees named in `keep_fresh` (a dict of
  fresh params, e.g. a new classifier head) replace the loaded ones; `adapt(params,
  abstract_params)` (the model family's `adapt_params`, e.g. a positional-embedding resize)
  fits what the family knows how to fit. Shapes are then checked leaf by leaf.
  """
  params = dict(params)
  if drop_extra:
    extra = sorted(set(params) - set(abstract_params))
    if extra:
      logging.info("not loading %s from %s (the model has no such parameters)", extra, what)
    params = {k: v for k, v in params.items() if k in abstract_params}
  params.update(keep_fresh or {})
  if adapt is not None:
    params = dict(adapt(params, abstract_params))
  check_compatible(abstract_params, params, what=what)
  return jax.tree.map(
      lambda a, x: jax.device_put(jax.numpy.asarray(x, a.dtype), getattr(a, "sharding", None)),
      abstract_params, params)


def check_compatible(expected: Any, got: Any, what: str = "checkpoint") -> None:
  """Raise CheckpointError listing missing/unexpected/mis-shaped leaves of `got` vs `expected`."""
  expected, got = _as_plain_tree(expected), _as_plain_tree(got)
  want = {jax.tree_util.keystr(k): v.shape
          for k, v in jax.tree_util.tree_leaves_with_path(expected)}
  have = {jax.tree_util.keystr(k): getattr(v, "shape", None)
          for k, v in jax.tree_util.tree_leaves_with_path(got)}
  first = lambda k: (not k.startswith("['params']"), k)  # model weights before optimizer state
  want = dict(sorted(want.items(), key=lambda kv: first(kv[0])))
  have = dict(sorted(have.items(), key=lambda kv: first(kv[0])))
  problems = [f"missing {k}" for k in want if k not in have]
  problems += [f"unexpected {k}" for k in have if k not in want]
  problems += [f"{k}: checkpoint {tuple(have[k])} vs model {tuple(want[k])}"
               for k in want if k in have and tuple(have[k]) != tuple(want[k])]
  if problems:
    raise CheckpointError(f"{what} does not fit the model: " + "; ".join(problems[:10])
                          + (f" (+{len(problems) - 10} more)" if len(problems) > 10 else ""))


def _as_plain_tree(tree):
  """Dataclass states and Orbax metadata trees -> nested dicts, so leaf paths compare equal."""
  from flax import serialization
  tree = getattr(tree, "tree", tree)
  return serialization.to_state_dict(tree)


def _root(e: BaseException) -> BaseException:
  while e.__cause__ is not None or e.__context__ is not None:
    e = e.__cause__ or e.__context__
  return e


def is_io_error(e: BaseException) -> bool:
  while e is not None:
    if isinstance(e, OSError) or "No space left" in str(e):
      return True
    e = e.__cause__ or e.__context__
  return False


def _first_line(e: Exception) -> str:
  return (str(e).strip().splitlines() or [type(e).__name__])[0][:300]
