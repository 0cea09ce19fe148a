"""The command line refuses what a setup cannot serve: one `error:` line, exit status 2, no
traceback, before anything compiles or is read (the matrix test covers every cell in-process)."""
import os
import subprocess
import sys

from tests.helpers import EMBEDDED, ROOT

LM = os.path.join(ROOT, "configs", "embedded_lm.py")


def _run(*args):
  env = dict(os.environ, JAX_PLATFORMS="cpu")
  return subprocess.run([sys.executable, "-m", *args], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=300)


def _refused(proc, *needles):
  lines = proc.stderr.strip().splitlines()
  assert proc.returncode == 2, proc.stderr[-2000:]
  assert len(lines) == 1 and lines[0].startswith("error: "), proc.stderr[-2000:]
  assert "Traceback" not in proc.stderr
  for needle in needles:
    assert needle in lines[0], lines[0]


def test_whitebox_hook_on_vit_is_refused_before_training(tmp_path):
  proc = _run("crate_jax.train", "--config", EMBEDDED, "--workdir", str(tmp_path / "w"),
              "--config.model.name=vit_tiny", "--config.whitebox_every_steps=10")
  _refused(proc, "white-box hook", "vit_tiny", "ViT carries no")
  assert not os.path.exists(tmp_path / "w" / "checkpoints")


def test_knn_on_a_language_model_is_refused(tmp_path):
  proc = _run("crate_jax.evaluate", "--config", LM, "--checkpoint", str(tmp_path),
              "--protocol", "knn")
  _refused(proc, "--protocol knn", "embedded_shakespeare has no labels")



def test_a_checkpoint_of_another_family_is_one_line_naming_both(tmp_path):
  """A ToST checkpoint read with a CRATE config: one line naming both families, not a list of
  missing leaves (in-process: the CLI prints a user error's one line)."""
  import jax
  import jax.numpy as jnp
  import pytest
  from crate_jax import cli, config_lib, evaluate, models
  from crate_jax.training import checkpoint as ckpt_lib
  kw = dict(image_size=28, patch_size=8, num_classes=10, dim=32, depth=2, heads=2)
  model = models.get("tost_cab_tiny_12_p8", **kw)
  params = models.init_params(model, jax.random.key(0), jnp.zeros((1, 28, 28, 3)))
  ckpt_lib.save_params(str(tmp_path / "tost"), params,
                       {"model": "tost_cab_tiny_12_p8", "model_kwargs": kw})
  cfg = config_lib.load_config(EMBEDDED, **{"data.data_dir": str(tmp_path / "tfds")})
  with pytest.raises(ckpt_lib.CheckpointError) as e:
    evaluate.evaluate_checkpoint(cfg, str(tmp_path / "tost"))
  assert cli.is_user_error(e.value) and "\n" not in str(e.value)
  assert "holds a ToST model ('tost_cab_tiny_12_p8') and the config builds a CRATE" in str(e.value)
