"""The checkpoint rules: the latest N plus the best by a metric, in either direction; reading
any of the three path forms; metadata before arrays."""
import numpy as np
import pytest

from crate_jax.training import checkpoint as ckpt_lib


@pytest.mark.parametrize("mode,best", [("min", 2), ("max", 3)])
def test_keeps_latest_and_best_by_metric(tmp_path, mode, best):
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), keep=1, best_metric="loss", best_mode=mode,
                               async_save=False)
  for step, loss in zip((1, 2, 3, 4), (3.0, 1.0, 5.0, 2.0)):
    ckpts.save(step, {"params": {"w": np.full((2,), step, np.float32)}}, {"step": step},
               metrics={"loss": loss})
  ckpts.close()
  assert ckpt_lib.Checkpoints(str(tmp_path), read_only=True).all_steps() == sorted({best, 4})
  for path in (tmp_path, tmp_path / "checkpoints", tmp_path / "checkpoints" / str(best)):
    params, meta = ckpt_lib.load_params(str(path))
    want = 4 if path != tmp_path / "checkpoints" / str(best) else best
    assert meta["step"] == want and params["w"].tolist() == [want, want]


def test_bad_best_mode_and_missing_checkpoint(tmp_path):
  with pytest.raises(ValueError, match="best_mode"):
    ckpt_lib.Checkpoints(str(tmp_path), best_mode="lowest")
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint found"):
    ckpt_lib.load_params(str(tmp_path / "nothing"))
  (tmp_path / "empty").mkdir()
  with pytest.raises(ckpt_lib.CheckpointError, match="no checkpoint found"):
    ckpt_lib.load_params(str(tmp_path / "empty"))


def test_replicated_arrays_save_and_load_without_compiling_in_one_process(tmp_path):
  """On 8 devices of one process: the write is one copy per array, no per-replica slice
  programs (Orbax's replica-parallel writing serves several hosts), and the values round-trip."""
  import jax
  from crate_jax.training import sharding
  from tests.helpers import programs_lowered
  mesh = sharding.make_mesh()
  assert mesh.devices.size == 8
  rng = np.random.default_rng(0)
  host = {"w": rng.normal(size=(24, 40)).astype(np.float32),
          "b": rng.normal(size=(7,)).astype(np.float32)}
  state = jax.device_put(host, sharding.replicated(mesh))
  ckpts = ckpt_lib.Checkpoints(str(tmp_path), async_save=False, best_metric=None)
  with programs_lowered() as lowered:
    ckpts.save(1, {"params": state}, {"step": 1})
  ckpts.close()
  assert lowered == []
  params, _ = ckpt_lib.load_params(str(tmp_path))
  jax.tree.map(np.testing.assert_array_equal, params, host)
