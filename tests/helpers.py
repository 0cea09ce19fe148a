"""Shared test helpers: repository paths, the tiny train config, reading a run's outputs."""
import contextlib
import os

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
EMBEDDED = os.path.join(ROOT, "configs", "embedded.py")
TINY_ARCH = dict(image_size=28, patch_size=7, num_classes=10, dim=32, depth=2, heads=2,
                 dim_head=16)


def xla_flags(devices):
  """The suite's XLA_FLAGS (see conftest) with the simulated CPU device count set to `devices`."""
  rest = [f for f in os.environ.get("XLA_FLAGS", "").split() if "device_count" not in f]
  return " ".join([f"--xla_force_host_platform_device_count={devices}", *rest])


def tiny_config(data_dir, **overrides):
  """configs/embedded.py shrunk: a 2-layer CRATE, batch 64, a few steps."""
  from crate_jax import config_lib
  base = {"model.kwargs": dict(TINY_ARCH),
          "data.data_dir": str(data_dir), "batch_size": 64, "eval_batch_size": 200,
          "num_train_steps": 10, "log_every_steps": 1, "eval_every_steps": 1000,
          "checkpoint_every_steps": 4, "optimizer.warmup_epochs": 0.1}
  base.update(overrides)
  return config_lib.load_config(EMBEDDED, **base)


def losses(workdir):
  """{step: train loss} from a run's metrics.jsonl."""
  from crate_jax.training import metrics
  return {r["step"]: r["train/loss"]
          for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")) if "train/loss" in r}


def final_params(workdir):
  from crate_jax.training import checkpoint as ckpt_lib
  return ckpt_lib.load_params(workdir)[0]


def preempt_at(step: int):
  """A train_and_evaluate callback that sends this process SIGTERM after `step` (a preemption:
  the loop saves that step and exits)."""
  import signal

  def callback(s, state):
    if s == step:
      os.kill(os.getpid(), signal.SIGTERM)
  return callback


def latest_state(workdir):
  """The latest saved train state of a run, as host numpy arrays."""
  from crate_jax.training import checkpoint as ckpt_lib
  with ckpt_lib.open_checkpoint(workdir) as (reader, step):
    return reader.restore_host(step)[0]


@contextlib.contextmanager
def programs_lowered():
  """Yields a list that counts the programs jax lowers inside the block: each jitted function
  traced afresh and each eager op (one program per primitive and shape) - the compiles a cold
  process pays for, whether or not the persistent cache then serves them."""
  import jax
  seen = []
  listener = lambda name, _secs, **_: seen.append(name) if name.endswith(
      "jaxpr_to_mlir_module_duration") else None
  jax.monitoring.register_event_duration_secs_listener(listener)
  try:
    yield seen
  finally:
    jax.monitoring.unregister_event_duration_listener(listener)
