"""The benchmark runs at tiny size on CPU (CI keeps it working). (The FLOP counts are checked
against the spec in tests/models/test_family_api.py.)"""
import pytest

from crate_jax import bench


def test_tiny_benchmark_runs_with_torch_comparison(capsys):
  torch = pytest.importorskip("torch")
  del torch
  results = bench.main(["--tiny", "--models", "crate_tiny", "--batch", "16", "--steps", "2",
                        "--warmup", "1", "--dtype", "float32", "--vs-torch"])
  jax_r, torch_r = results
  assert jax_r["impl"] == "jax" and torch_r["impl"] == "torch"
  assert jax_r["img_per_sec"] > 0 and torch_r["img_per_sec"] > 0
  assert jax_r["tflops_per_device"] > 0 and jax_r["compile_s"] > 0
  assert torch_r["jax_speedup"] == pytest.approx(jax_r["img_per_sec"] / torch_r["img_per_sec"])
  out = capsys.readouterr().out
  assert "img/s" in out and "jax is" in out


def test_forward_only_mode():
  (r,) = bench.main(["--tiny", "--models", "crate_base", "--batch", "8", "--steps", "1",
                     "--warmup", "1", "--dtype", "bfloat16", "--forward-only"])
  assert r["mode"] == "forward" and r["img_per_sec"] > 0


def test_model_step_and_bench_import_without_the_data_stack():
  """The GPU image lacks clu, TensorFlow, tfds and ml-collections: the model, the train step
  and the benchmark must not need them."""
  import subprocess
  import sys
  code = ("import sys\nfor m in ['clu', 'tensorflow', 'tensorflow_datasets', 'ml_collections']:\n"
          "  sys.modules[m] = None\n"
          "import crate_jax.bench, crate_jax.training.steps, crate_jax.models\n")
  subprocess.run([sys.executable, "-c", code], check=True)
