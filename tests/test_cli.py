"""The command line as a new user meets it: every entry point answers a bad input with one line
`error: ...` and exit status 2 (a traceback only with --debug or CRATE_JAX_DEBUG=1), --help exits
0, and a training run prints one readable line per log step and per eval, with a quiet stderr.

The subprocess cases (10 s each, mostly imports) run together, 3 at a time, in one fixture.
"""
import concurrent.futures
import os
import re
import subprocess
import sys
import types

import numpy as np
import pytest

from crate_jax import bench, cli, convert, models
from crate_jax.training import metrics
from tests.helpers import EMBEDDED, ROOT

TINY_RUN = ["--config.model.kwargs.patch_size=7", "--config.model.kwargs.dim=32",
            "--config.model.kwargs.depth=2", "--config.model.kwargs.heads=2",
            "--config.model.kwargs.dim_head=16", "--config.batch_size=64",
            "--config.eval_batch_size=200", "--config.num_train_steps=4",
            "--config.log_every_steps=2", "--config.eval_every_steps=4",
            "--config.checkpoint_every_steps=4", "--config.optimizer.warmup_epochs=0.1"]
TRAIN_LINE = re.compile(r"^step [ \d]+/4  loss \d+\.\d{4}  top1 \d\.\d{3}  lr \d\.\de[-+]\d\d"
                        r"  \d+ img/s  ETA \d+:\d\d:\d\d$")
EVAL_LINE = re.compile(r"^eval at step 4/4  top1 \d\.\d{4}  top5 \d\.\d{4}  loss \d+\.\d{4}$")


def _cases(tmp):
  """name -> (argv after `python -m`, extra environment)."""
  empty = tmp / "empty_tfds"
  empty.mkdir()
  ckpt = tmp / "ckpt"
  from crate_jax.training import checkpoint as ckpt_lib
  ckpt_lib.save_params(str(ckpt), {"w": np.zeros(2, np.float32)}, {"step": 0})
  config = ["--config", EMBEDDED]
  return {
      "train_run": (["crate_jax.train", *config, "--workdir", str(tmp / "run"),
                     f"--config.data.data_dir={tmp / 'tfds'}", *TINY_RUN], {}),
      "train_no_data": (["crate_jax.train", *config, "--workdir", str(tmp / "w"),
                         "--config.data.name=imagenet2012", "--config.data.num_classes=1000",
                         f"--config.data.data_dir={empty}"], {}),
      "train_typo": (["crate_jax.train", *config, "--config.batchsize=8"], {}),
      "train_typo_debug": (["crate_jax.train", *config, "--config.batchsize=8", "--debug"], {}),
      "evaluate_no_ckpt": (["crate_jax.evaluate", *config, "--checkpoint", str(tmp / "none")],
                           {}),
      "evaluate_no_ckpt_debug": (["crate_jax.evaluate", *config, "--checkpoint",
                                  str(tmp / "none")], {cli.DEBUG_ENV: "1"}),
      "analyze_bad_images": (["crate_jax.analyze", *config, "--checkpoint", str(ckpt), "--out",
                              str(tmp / "out"), "--images", str(tmp / "no_images")], {}),
      "analyze_segment_no_masks": (["crate_jax.analyze", *config, "--checkpoint", str(ckpt),
                                    "--out", str(tmp / "seg"), "--segment",
                                    "--config.data.name=cifar10"], {}),
      "convert_no_file": (["crate_jax.convert", "--torch", str(tmp / "none.pth"), "--variant",
                           "crate_tiny", "--out", str(tmp / "conv")], {}),
      "bench_unknown_model": (["crate_jax.bench", "--tiny", "--models", "crate_gigantic"], {}),
      **{f"{m}_help": ([f"crate_jax.{m}", "--help"], {})
         for m in ("train", "evaluate", "analyze", "convert", "bench", "export", "generate",
                   "plan", "pretrained")},
  }


def _run(argv, extra_env):
  env = {k: v for k, v in os.environ.items() if k not in (cli.DEBUG_ENV, "TF_CPP_MIN_LOG_LEVEL")}
  env.update(PYTHONPATH=ROOT, JAX_PLATFORMS="cpu", HTTP_PROXY="http://127.0.0.1:9",
             HTTPS_PROXY="http://127.0.0.1:9", **extra_env)  # any network use fails at once
  return subprocess.run([sys.executable, "-m", *argv], cwd=ROOT, env=env, capture_output=True,
                        text=True, timeout=600)


@pytest.fixture(scope="module")
def runs(tmp_path_factory):
  cases = _cases(tmp_path_factory.mktemp("cli"))
  with concurrent.futures.ThreadPoolExecutor(3) as pool:  # train_run (the longest) first
    futures = {name: pool.submit(_run, *case) for name, case in cases.items()}
    return {name: f.result() for name, f in futures.items()}, cases


def _one_error_line(r, starts):
  assert r.returncode == 2, (r.returncode, r.stderr[-3000:])
  assert "Traceback" not in r.stderr, r.stderr[-3000:]
  lines = r.stderr.splitlines()
  assert len(lines) == 1 and lines[0].startswith("error: " + starts), r.stderr[-3000:]
  return lines[0]


@pytest.mark.parametrize("name,starts", [
    ("train_no_data", "dataset 'imagenet2012' is not prepared"),
    ("train_typo", "config has no key 'batchsize'; did you mean 'batch_size'?"),
    ("evaluate_no_ckpt", "no checkpoint found at"),
    ("analyze_bad_images", "--images"),
    ("analyze_segment_no_masks", "--segment: dataset 'cifar10' (config.data.name) has no "
     "segmentation masks"),
    ("convert_no_file", "PyTorch checkpoint"),
    ("bench_unknown_model", "unknown model 'crate_gigantic'"),
])
def test_bad_input_is_one_error_line_and_exit_2(runs, name, starts):
  line = _one_error_line(runs[0][name], starts)
  if name == "train_no_data":
    assert "Nothing is downloaded" in line and "tfds build imagenet2012" in line
  if name == "train_typo":
    assert line.endswith("(--config.batchsize=8)")


@pytest.mark.parametrize("name,error", [("train_typo_debug", "ConfigError"),
                                        ("evaluate_no_ckpt_debug", "CheckpointError")])
def test_debug_shows_the_traceback(runs, name, error):
  r = runs[0][name]
  assert r.returncode != 0 and "Traceback (most recent call last)" in r.stderr
  assert error in r.stderr.splitlines()[-1]


@pytest.mark.parametrize("entry", ["train", "evaluate", "analyze", "convert", "bench", "export",
                                   "generate", "plan", "pretrained"])
def test_help_exits_0(runs, entry):
  r = runs[0][f"{entry}_help"]
  assert r.returncode == 0, r.stderr[-3000:]
  assert re.search(r"--(\[no\])?debug", r.stdout) and not r.stderr


def test_training_prints_one_line_per_log_step_and_eval(runs):
  r = runs[0]["train_run"]
  assert r.returncode == 0, r.stderr[-3000:]
  assert r.stderr == "", r.stderr[-3000:]  # no TF/XLA start-up lines, no logger prefixes
  lines = r.stdout.splitlines()
  assert lines[0].startswith("workdir ")
  assert [l for l in lines if l.startswith("step ")] == [l for l in lines if TRAIN_LINE.match(l)]
  assert len([l for l in lines if TRAIN_LINE.match(l)]) == 2, r.stdout  # steps 2 and 4
  assert any(EVAL_LINE.match(l) for l in lines), r.stdout
  assert lines[-1].startswith("final eval  top1 ")
  workdir = runs[1]["train_run"][0][runs[1]["train_run"][0].index("--workdir") + 1]
  last = [row for row in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl"))
          if row["step"] == 4 and "train/loss" in row][0]
  assert {"perf/img_per_sec", "perf/img_per_sec_per_device", "perf/step_time_ms",
          "perf/tflops_per_device"} <= set(last)
  assert not os.path.exists(os.path.join(workdir, ".lock"))


# ------------------------------------------------------------------------------- in-process
def test_argparse_mains_return_2_with_one_line_or_raise_with_debug(tmp_path, capsys):
  missing = ["--torch", str(tmp_path / "none.pth"), "--variant", "crate_tiny", "--out",
             str(tmp_path / "out")]
  assert convert.main(missing) == 2
  assert capsys.readouterr().err == (f"error: PyTorch checkpoint '{tmp_path / 'none.pth'}' "
                                     "does not exist\n")
  with pytest.raises(FileNotFoundError):
    convert.main(missing + ["--debug"])
  assert bench.main(["--models", "crate_gigantic", "--tiny"]) == 2
  assert capsys.readouterr().err.startswith("error: unknown model 'crate_gigantic'")
  with pytest.raises(SystemExit) as e:
    bench.main(["--batch", "many"])
  assert e.value.code == 2
  err = capsys.readouterr().err.splitlines()
  assert len(err) == 1 and err[0].startswith("error: argument --batch: invalid int value")


def test_bugs_keep_their_traceback():
  @cli.command
  def buggy(argv):
    return np.zeros(2).reshape(3)  # a ValueError raised inside numpy, not by the project

  with pytest.raises(ValueError):
    buggy([])
  with pytest.raises(ValueError) as ours:
    models.get("crate_gigantic")  # raised by crate_jax itself: a user error
  assert cli.is_user_error(ours.value)
  try:
    raise ValueError("raised outside crate_jax")
  except ValueError as e:
    assert not cli.is_user_error(e)
  assert cli.is_user_error(FileNotFoundError("anywhere"))


def test_a_failed_saves_leftovers_stay_off_the_console():
  """The late reports of a failed asynchronous save (tests/training/test_faults.py fills a disk)
  are dropped; other unraisable exceptions and asyncio errors are not."""
  import asyncio
  import logging
  leftover = logging.LogRecord("asyncio", logging.ERROR, asyncio.base_events.__file__, 1,
                               "Future exception was never retrieved\nfuture: <Future>", (), None)
  other = logging.LogRecord("asyncio", logging.ERROR, asyncio.base_events.__file__, 1,
                            "Task was destroyed but it is pending!", (), None)
  assert cli._is_noise(leftover) and not cli._is_noise(other)
  seen, before = [], sys.unraisablehook
  try:
    sys.unraisablehook = seen.append
    cli.drop_closed_loop_reports()
    cli.drop_closed_loop_reports()  # once per process, however many commands run
    report = lambda e: types.SimpleNamespace(exc_type=type(e), exc_value=e, exc_traceback=None,
                                             err_msg=None, object=None)
    sys.unraisablehook(report(RuntimeError("Event loop is closed")))
    kept = report(RuntimeError("something else"))
    sys.unraisablehook(kept)
    assert seen == [kept]
  finally:
    sys.unraisablehook = before


def test_missing_config_keys_get_close_matches():
  config = {"batch_size": 1, "optimizer": {"lr": 1.0, "b1": 0.9}}
  assert cli.missing_key(config, "batch_size") is None
  assert cli.missing_key(config, "batchsize") == ("has no key 'batchsize'; did you mean "
                                                  "'batch_size'?")
  assert cli.missing_key(config, "optimiser.lr").endswith("did you mean 'optimizer.lr'?")
  assert cli.missing_key(config, "optimizer.lrr").endswith("did you mean 'optimizer.lr'?")
  assert cli.missing_key(config, "zzz") == "has no key 'zzz'"


def test_console_lines():
  console = metrics.ConsoleWriter(total_steps=248)
  row = {"train/loss": 0.41234, "train/top1": 0.8712, "train/lr": 1.6e-3, "train/grad_norm": 2.0,
         "perf/img_per_sec": 1234.4, "perf/step_time_ms": 250.0}
  assert console.format(125, row) == ("step 125/248  loss 0.4123  top1 0.871  lr 1.6e-03  "
                                      "1234 img/s  ETA 0:00:31")
  assert console.format(7, {"eval/loss": 0.3456, "eval/top5": 0.994, "eval/top1": 0.891}) == (
      "eval at step   7/248  top1 0.8910  top5 0.9940  loss 0.3456")
  assert console.format(7, {"whitebox/layer0/sparsity": 0.5}) is None


def test_throughput_clock_starts_after_the_first_step(monkeypatch):
  clock = iter([10.0, 15.0])
  monkeypatch.setattr(metrics, "time", types.SimpleNamespace(perf_counter=lambda: next(clock)))
  t = metrics.Throughput(global_batch=8, flops_per_example=None)
  t(1)  # the hook after step 1, once it has compiled: the clock starts (10 s)
  t(2)  # later calls leave it running
  assert t.measure(1) == {}  # nothing timed yet: no perf/* keys
  t.pause(1.0)  # an eval of 1 s does not count
  out = t.measure(3)  # 15 s: steps 2 and 3 took 4 s
  assert out == {"perf/img_per_sec": 4.0, "perf/img_per_sec_per_device": 4.0 / t.devices,
                 "perf/step_time_ms": 2000.0}
