"""Orbax checkpoints: one thin wrapper so the rest of the code never touches Orbax directly.

Layout: <workdir>/checkpoints/<step>/{state, meta}. `state` holds the train state pytree (or just
{"params": ...} for converted/imported weights), `meta` a JSON dict (config, data position, ...).
Saves are asynchronous and atomic (Orbax writes to a temporary directory and renames it).
"""
from __future__ import annotations

import contextlib
import logging
import os
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from etils import epath

CHECKPOINT_DIR = "checkpoints"


class CheckpointError(ValueError):
  """A checkpoint that is missing or does not fit the model/config."""


class CheckpointWriteError(OSError):
  """Saving a checkpoint failed (e.g. no space left on the device)."""


class Checkpoints:
  """Keep the last `keep` checkpoints plus the one with the best eval metric (`best_metric`)."""

  def __init__(self, workdir: str, *, keep: int = 3, best_metric: str | None = "top1",
               async_save: bool = True):
    self.directory = epath.Path(absolute(workdir)) / CHECKPOINT_DIR
    policies = [ocp.checkpoint_managers.LatestN(keep)]
    if best_metric:
      policies.append(ocp.checkpoint_managers.BestN(
          get_metric_fn=lambda m: m[best_metric], n=1, keep_checkpoints_without_metrics=False))
    options = ocp.CheckpointManagerOptions(
        preservation_policy=ocp.checkpoint_managers.AnyPreservationPolicy(policies),
        enable_async_checkpointing=async_save, create=True, cleanup_tmp_directories=True)
    self.manager = ocp.CheckpointManager(self.directory, item_names=("state", "meta"),
                                         options=options)

  def latest_step(self) -> int | None:
    return self.manager.latest_step()

  def all_steps(self) -> list[int]:
    return list(self.manager.all_steps())

  def save(self, step: int, state: Any, meta: dict, metrics: dict | None = None) -> None:
    """Start an async save of `step` (an error of the previous async save surfaces here)."""
    with self._write_errors(step):
      self.manager.save(step, args=ocp.args.Composite(state=ocp.args.StandardSave(state),
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
      done = [s for s in self.finished_steps() if s != step]
      raise CheckpointWriteError(
          f"writing a checkpoint in {self.directory} failed ({_first_line(_root(e))}); stopping. "
          f"Earlier checkpoints are intact: steps {done}") from e

  def finished_steps(self) -> list[int]:
    return sorted(int(c.name) for c in self.directory.iterdir()
                  if c.name.isdigit() and (c / "state").exists())

  def restore(self, step: int, abstract_state: Any) -> tuple[Any, dict]:
    """Restore into `abstract_state` (ShapeDtypeStructs with shardings).

    A checkpoint of another model/config raises CheckpointError naming the mismatched leaves
    (checked on the saved metadata, before reading any array).
    """
    saved = saved_tree(self.directory / str(step))
    try:
      check_compatible(abstract_state, saved, what=f"checkpoint step {step} in {self.directory}")
    except CheckpointError as e:
      raise CheckpointError(
          f"{e}. Refusing to resume: use a new --workdir, or warm-start from it with "
          f"--config.init_from={self.directory / str(step)}") from None
    out = self.manager.restore(step, args=ocp.args.Composite(
        state=ocp.args.StandardRestore(abstract_state), meta=ocp.args.JsonRestore()))
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
  """Write params alone as a checkpoint our loop, evaluate and analyze can load. Returns its path."""
  ckpt = Checkpoints(directory, keep=1, best_metric=None, async_save=False)
  ckpt.save(step, {"params": params}, meta)
  ckpt.close()
  return str(ckpt.directory / str(step))


def resolve(path: str) -> epath.Path:
  """A workdir, its checkpoints/ dir or one step dir -> the step dir (latest step if several)."""
  p = epath.Path(absolute(path))
  if (p / "state").exists():
    return p
  for base in (p / CHECKPOINT_DIR, p):
    if base.exists():
      steps = sorted(int(c.name) for c in base.iterdir() if c.name.isdigit()
                     and (c / "state").exists())
      if steps:
        return base / str(steps[-1])
  raise CheckpointError(f"no checkpoint found at {path} (looked for <step>/state under {p} and "
                        f"{p / CHECKPOINT_DIR})")


def saved_tree(step_dir) -> Any:
  """The saved `state` tree of a step directory as Orbax array metadata (shapes, dtypes)."""
  path = os.fspath(epath.Path(step_dir) / "state")
  return ocp.PyTreeCheckpointer().metadata(path).item_metadata.tree


def load_params(path: str, abstract_params: Any = None) -> tuple[Any, dict]:
  """Params (and meta) from any of our checkpoints: train state or params-only.

  With `abstract_params` (e.g. jax.eval_shape of the model's params) the result is fitted and
  checked as in `load_params_for`; without it the raw arrays are returned.
  """
  if abstract_params is not None:
    return load_params_for(abstract_params, path)
  step_dir = resolve(path)
  # Restore as host numpy arrays: independent of the topology the checkpoint was written on.
  as_numpy = jax.tree.map(lambda _: ocp.RestoreArgs(restore_type=np.ndarray), saved_tree(step_dir))
  tree = ocp.PyTreeCheckpointer().restore(os.fspath(step_dir / "state"),
                                          args=ocp.args.PyTreeRestore(restore_args=as_numpy))
  meta = {}
  if (step_dir / "meta").exists():
    meta = dict(ocp.Checkpointer(ocp.JsonCheckpointHandler()).restore(
        os.fspath(step_dir / "meta")))
  return tree["params"], meta


def load_params_for(abstract_params: Any, path: str, *, keep_fresh: Any = None,
                    drop_extra: bool = False):
  """Params from `path` fitted to a model whose params look like `abstract_params`.

  The positional embedding is resized (bicubic, cls row kept) when the patch grid differs;
  top-level subtrees named in `keep_fresh` (a dict of fresh params, e.g. a new classifier head)
  replace the loaded ones; with drop_extra, top-level subtrees the model does not have (e.g. a
  CRATE-MAE decoder when fine-tuning its encoder) are left out. Shapes are then checked leaf by leaf.
  """
  import math
  from crate_jax.models import resize_pos_embedding
  params, meta = load_params(path)
  params = dict(params)
  if drop_extra:
    extra = sorted(set(params) - set(abstract_params))
    if extra:
      logging.info("not loading %s from %s (the model has no such parameters)", extra, path)
    params = {k: v for k, v in params.items() if k in abstract_params}
  for name, value in (keep_fresh or {}).items():
    params[name] = value
  want = abstract_params.get("pos_embedding")
  have = params.get("pos_embedding")
  if want is not None and have is not None and tuple(have.shape) != tuple(want.shape):
    grid = int(round(math.sqrt(want.shape[1] - 1)))
    params["pos_embedding"] = resize_pos_embedding(have, grid)
  check_compatible(abstract_params, params, what=f"checkpoint {path}")
  return jax.tree.map(
      lambda a, x: jax.device_put(jax.numpy.asarray(x, a.dtype), getattr(a, "sharding", None)),
      abstract_params, params), meta


def check_compatible(expected: Any, got: Any, what: str = "checkpoint") -> None:
  """Raise CheckpointError listing missing/unexpected/mis-shaped leaves of `got` vs `expected`."""
  expected, got = _as_plain_tree(expected), _as_plain_tree(got)
  want = {jax.tree_util.keystr(k): v.shape for k, v in jax.tree_util.tree_leaves_with_path(expected)}
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
