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
