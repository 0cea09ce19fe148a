"""benchmarks/input_pipeline.py in its tiny mode, crate_jax side only: the JPEG set is written once
(and reused), and every recipe's pipeline (plain, RandAugment + mixup/cutmix, DINO multi-crop,
eval) yields batches of the recipe's shapes from those files."""
import importlib.util
import os
import sys

import pytest

from tests.helpers import ROOT


def _bench():
  path = os.path.join(ROOT, "benchmarks", "input_pipeline.py")
  spec = importlib.util.spec_from_file_location("crate_jax_input_bench", path)
  module = importlib.util.module_from_spec(spec)
  sys.modules[spec.name] = module   # dataclasses look their module up there
  spec.loader.exec_module(module)
  return module


def test_tiny_input_benchmark_crate_jax_side(tmp_path, capsys):
  pytest.importorskip("skimage", reason="the JPEG set needs scikit-image (.[bench] or .[test])")
  bench = _bench()
  out = bench.main(["--tiny", "--no-torchvision", "--cache-dir", str(tmp_path)])
  s = out["set"]
  assert (s["images"], s["classes"]) == (40, 10)
  files = [f for _, _, names in os.walk(os.path.join(s["root"], "train")) for f in names]
  assert len(files) == 40 and all(f.endswith(".jpg") for f in files)
  assert s["mean_kb"] > 5 and s["mean_pixels"] > 10_000
  assert [r["case"] for r in out["rows"]] == list(bench.JPEG_CASES)
  assert all(r["crate_jax"]["img_s"] > 0 and r["torchvision"] is None for r in out["rows"])
  assert out["machine"]["cores"] >= 1 and out["machine"]["cpu"]
  printed = capsys.readouterr().out
  assert "crate_jax img/s" in printed and "ImageNet train" in printed
  # Reused, not rewritten: same figures, same files.
  mtime = os.path.getmtime(os.path.join(s["root"], "set.json"))
  root, again = bench.jpeg_set.jpeg_set(str(tmp_path), 40, 10)
  assert root == s["root"] and again["bytes"] == s["bytes"]
  assert os.path.getmtime(os.path.join(root, "set.json")) == mtime


def test_median_run_and_the_torchvision_side_in_another_interpreter():
  """--repeats keeps the median run; --torchvision-python with an interpreter that lacks
  torchvision (or is not one) gives a reason to print, not a traceback."""
  bench = _bench()
  runs = [{"img_s": 3.0, "n": 0}, {"img_s": 1.0, "n": 1}, {"img_s": 2.0, "n": 2}]
  assert bench.median_run(runs) == {"img_s": 2.0, "n": 2, "img_s_runs": [3.0, 1.0, 2.0]}
  assert bench.median_run(runs[:2])["img_s"] == 1.0
  try:
    import torchvision  # noqa: F401
  except Exception:   # noqa: BLE001 - not importable here: the case to test
    found, why = bench.torchvision_side(sys.executable)
    assert found is None and why
  found, why = bench.torchvision_side(os.path.join(ROOT, "no-such-python"))
  assert found is None and "no-such-python" in why
