"""A training subprocess for the fault-injection tests (not collected by pytest).

  python tests/training/fault_worker.py WORKDIR OVERRIDES_JSON [PHASE:STEP]

PHASE:STEP kills this process with SIGKILL: "step:k" right after step k, "save:k" while the
asynchronous save of step k is being written, "eval:k" in the middle of the eval at step k.
"""
import json
import os
import signal
import sys


def _kill():
  os.kill(os.getpid(), signal.SIGKILL)


def main():
  from crate_jax.training import checkpoint as ckpt_lib
  from crate_jax import train
  from tests.helpers import tiny_config
  workdir, overrides = sys.argv[1], json.loads(sys.argv[2])
  phase, step = (sys.argv[3].split(":") if len(sys.argv) > 3 else ("", "-1"))
  step = int(step)
  callbacks = []
  real_save = ckpt_lib.Checkpoints.save

  def save(self, s, *args, **kwargs):
    """Saves before the fault complete (a later kill then finds them finalised); the save of
    step k in the "save" phase is killed while its asynchronous write is in flight."""
    real_save(self, s, *args, **kwargs)
    if phase == "save" and s == step:
      _kill()
    self.wait()
  ckpt_lib.Checkpoints.save = save
  if phase == "step":
    callbacks.append(lambda s, state: _kill() if s == step else None)
  elif phase == "eval":
    real_eval_iterator = train.data_lib.eval_iterator
    state = {"step": 0}
    callbacks.append(lambda s, _: state.update(step=s))

    def eval_then_kill(*args, **kwargs):
      for i, batch in enumerate(real_eval_iterator(*args, **kwargs)):
        if i == 1 and state["step"] == step:
          _kill()
        yield batch
    train.data_lib.eval_iterator = eval_then_kill
  train.train_and_evaluate(tiny_config(overrides["data.data_dir"], **overrides), workdir,
                           callbacks=callbacks)


if __name__ == "__main__":
  main()
