"""Recipe options through the loop: weight EMA (math, checkpointed, resumed exactly, evaluated)."""
import jax
import numpy as np
import pytest

from crate_jax import evaluate, train
from crate_jax.training import checkpoint as ckpt_lib
from tests.helpers import tiny_config


@pytest.fixture(scope="module")
def data_dir(tmp_path_factory):
  return tmp_path_factory.mktemp("tfds")


def ema_cfg(data_dir, **kw):
  return tiny_config(data_dir, num_train_steps=6, checkpoint_every_steps=3, eval_every_steps=6,
                     ema_decay=0.5, **kw)


def test_weight_ema_follows_each_step_resumes_exactly_and_is_evaluated(tmp_path, data_dir):
  seen = []
  train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "straight"),
                           callbacks=[lambda s, st: seen.append(jax.device_get(
                               (st.params, st.ema_params)))])
  for (_, ema_prev), (params, ema) in zip(seen, seen[1:]):   # ema_t = 0.5 ema_{t-1} + 0.5 p_t
    jax.tree.map(lambda e, ep, p: np.testing.assert_allclose(e, 0.5 * ep + 0.5 * p, rtol=1e-6,
                                                             atol=1e-7), ema, ema_prev, params)
  final_params, final_ema = seen[-1]
  assert not np.allclose(final_ema["head"]["kernel"], final_params["head"]["kernel"])

  def stop(step, state):
    if step == 4:
      raise KeyboardInterrupt("stop after step 4 (checkpoint at 3)")

  with pytest.raises(KeyboardInterrupt):
    train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "resumed"), callbacks=[stop])
  train.train_and_evaluate(ema_cfg(data_dir), str(tmp_path / "resumed"))
  for path in ("straight", "resumed"):   # the EMA is in the checkpoint, resumed bit-exactly
    ema, _ = ckpt_lib.load_params(str(tmp_path / path), ema=True)
    jax.tree.map(np.testing.assert_array_equal, ema, final_ema)

  # evaluate uses the EMA when the config has one (eval_ema), the raw weights otherwise
  with_ema = evaluate.evaluate_checkpoint(ema_cfg(data_dir), str(tmp_path / "straight"))
  without = evaluate.evaluate_checkpoint(ema_cfg(data_dir, eval_ema=False),
                                         str(tmp_path / "straight"))
  assert with_ema["loss"] != without["loss"]


def test_bad_ema_decay_is_refused_before_compiling(tmp_path, data_dir):
  with pytest.raises(ValueError, match=r"config.ema_decay=1.0: must be in \[0, 1\)"):
    train.train_and_evaluate(tiny_config(data_dir, ema_decay=1.0), str(tmp_path))
