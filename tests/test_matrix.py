"""Every setup x every command: it works and gives a sane result, or it is refused with the
project's one-line error before anything compiles.

A row is a registered task on a representative family (tiny sizes, the embedded offline data);
its run is trained once (2 steps) and every command is run on it in-process, through the same
functions the command line calls. A new task or family joins by adding its row: the expected
table says, per cell, None (works) or the refusal's text.
"""
import dataclasses
import functools
import os

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from crate_jax import cli, config_lib, setups
from tests.helpers import ROOT, TINY_ARCH, preempt_at

COMMANDS = ("train", "resume", "whitebox", "evaluate", "knn", "linear", "analyze", "segment",
            "export_torch", "export_stablehlo", "generate", "plan")

# hang_timeout_s: a hang (e.g. the white-box hook's, fixed in whitebox.rates) ends the worker and
# fails the row after 5 minutes instead of waiting forever.
_IMAGE = {"hang_timeout_s": 300.0, "data.image_size": 28, "batch_size": 16, "eval_batch_size": 200,
          "num_train_steps": 2, "log_every_steps": 1, "eval_every_steps": 2,
          "checkpoint_every_steps": 2, "optimizer.warmup_epochs": 0.01}
_TEXT = {"hang_timeout_s": 300.0, "batch_size": 8, "eval_batch_size": 64, "num_train_steps": 2,
         "log_every_steps": 1,
         "eval_every_steps": 2, "checkpoint_every_steps": 2, "optimizer.warmup_epochs": 0.01,
         "data.seq_len": 32}
_SMALL = dict(dim=32, depth=2, heads=2, dim_head=16)


@dataclasses.dataclass(frozen=True)
class Row:
  config: str                     # a file in configs/
  overrides: dict


ROWS = {
    "crate": Row("embedded.py", {**_IMAGE, "model.kwargs": dict(TINY_ARCH)}),
    "crate_alpha": Row("embedded.py", {**_IMAGE, "model.name": "crate_alpha_t16",
                                       "model.kwargs": dict(TINY_ARCH)}),
    "vit": Row("embedded.py", {**_IMAGE, "model.name": "vit_tiny",
                               "model.kwargs": dict(TINY_ARCH)}),
    "crate_mae": Row("embedded_mae.py", {**_IMAGE, "model.kwargs": dict(
        image_size=28, patch_size=7, dim=32, depth=2, heads=2, dim_head=16)}),
    "dino": Row("crate_dino_embedded.py", {
        **_IMAGE, "model.kwargs": dict(TINY_ARCH, patch_size=4, interpolate_pos=True,
                                       pool="mean"),
        "dino.out_dim": 16, "dino.hidden_dim": 32, "dino.bottleneck_dim": 8,
        "data.multicrop.num_local": 1, "data.multicrop.local_size": 12}),
    "simdino": Row("simdino_embedded.py", {
        **_IMAGE, "model.kwargs": dict(TINY_ARCH, patch_size=4, interpolate_pos=True,
                                       pool="mean"),
        "simdino.z_dim": 8, "simdino.hidden_dim": 32,
        "data.multicrop.num_local": 1, "data.multicrop.local_size": 12}),
    "tost": Row("tost_embedded.py", {**_IMAGE, "model.kwargs": dict(
        patch_size=8, dim=32, depth=2, heads=2)}),
    "tost_dino": Row("crate_dino_embedded.py", {
        **_IMAGE, "model.name": "tost_cab_tiny_12_p8",
        "model.kwargs": dict(patch_size=8, dim=32, depth=2, heads=2),
        "dino.out_dim": 16, "dino.hidden_dim": 32, "dino.bottleneck_dim": 8,
        "data.multicrop.num_local": 1, "data.multicrop.local_size": 16}),
    "tost_gpt": Row("tost_embedded_lm.py", {**_TEXT, "model.kwargs.dim": 32,
                                           "model.kwargs.depth": 2, "model.kwargs.heads": 2}),
    "crate_gpt": Row("embedded_lm.py", {**_TEXT, "model.kwargs.dim": 32,
                                        "model.kwargs.depth": 2, "model.kwargs.heads": 2,
                                        "model.kwargs.dim_head": 16}),
    "gpt": Row("embedded_lm.py", {**_TEXT, "model.name": "gpt_mini", "model.kwargs.dim": 32,
                                  "model.kwargs.depth": 2, "model.kwargs.heads": 2,
                                  "model.kwargs.dim_head": 16}),
    "crate_bert": Row("embedded_mlm.py", {**_TEXT, "model.kwargs.dim": 32,
                                          "model.kwargs.depth": 2, "model.kwargs.heads": 2,
                                          "model.kwargs.dim_head": 16}),
}

# None: works. A string: the refusal must contain it (one line, a user error, exit 2 on the CLI).
REFUSED = {
    ("vit", "whitebox"): "ViT carries no ['features']",
    ("gpt", "whitebox"): "TextModel carries no ['features']",
    ("dino", "evaluate"): "no supervised head to score",
    ("crate_mae", "evaluate"): None,
    ("vit", "analyze"): "ViT carries no white-box quantities",
    ("gpt", "analyze"): "TextModel carries no white-box quantities",
    ("crate_mae", "export_stablehlo"): "has no classifier forward pass",
    ("crate_bert", "generate"): "not a causal language model",
}
REFUSED[("tost_dino", "evaluate")] = "no supervised head to score"
REFUSED[("simdino", "evaluate")] = "no supervised head to score"
for _row in ("crate_gpt", "gpt", "crate_bert", "tost_gpt"):
  REFUSED.update({(_row, "knn"): "has no labels to probe", (_row, "linear"): "has no labels",
                  (_row, "segment"): "segmentation needs images"})
  if _row != "tost_gpt":   # the causal ToST exports to the official nanoGPT-TSSA layout
    REFUSED[(_row, "export_torch")] = "TextModel has no PyTorch layout"
for _row in ("crate", "crate_alpha", "vit", "crate_mae", "dino", "simdino", "tost", "tost_dino"):
  REFUSED[(_row, "generate")] = "not a causal language model"


def expected(row: str, command: str):
  return REFUSED.get((row, command))


class Context:
  """One row: its config and (trained on first use) run directory."""

  def __init__(self, row: str, root):
    self.name, self.row, self.root = row, ROWS[row], root
    self.workdir = str(root / row)
    self._trained = None

  def config(self, **extra):
    from crate_jax import config_lib
    overrides = {"data.data_dir": str(self.root / "tfds"), **self.row.overrides, **extra}
    return config_lib.load_config(os.path.join(ROOT, "configs", self.row.config), **overrides)

  def whitebox_allowed(self) -> bool:
    try:
      setups.check(self.config(whitebox_every_steps=2), "train")
      return True
    except setups.UnsupportedError:
      return False

  def run_config(self):
    """The row's training config: 3 steps (with the white-box hook where the setup allows it)."""
    return self.config(num_train_steps=3,
                       whitebox_every_steps=2 if self.whitebox_allowed() else 0)

  def trained(self):
    """The row's run, preempted (SIGTERM) after step 2: evaluated and saved at step 2; the
    "resume" cell trains its last step with the same program (the compilation cache serves it)."""
    if self._trained is None:
      from crate_jax import train
      self._trained = train.train_and_evaluate(self.run_config(), self.workdir,
                                               callbacks=[preempt_at(2)])
    return self._trained


def _finite(metrics: dict) -> dict:
  assert metrics and all(np.isfinite(v) for v in metrics.values() if isinstance(v, float)), metrics
  return metrics


def run_cell(ctx: Context, command: str):
  """Run one command on the row's run; returns a short description of what it gave."""
  from crate_jax.training import checkpoint as ckpt_lib
  from crate_jax.training import metrics as metrics_lib
  cfg = ctx.config()
  out = ctx.root / f"{ctx.name}_{command}"
  if command == "train":
    return _finite(ctx.trained())
  if command == "resume":
    ctx.trained()
    from crate_jax import train
    assert ckpt_lib.Checkpoints(ctx.workdir).all_steps()[-1] == 2
    more = train.train_and_evaluate(ctx.run_config(), ctx.workdir)
    assert ckpt_lib.Checkpoints(ctx.workdir).all_steps()[-1] == 3
    return _finite(more)
  if command == "whitebox":
    setups.check(ctx.config(whitebox_every_steps=2), "train")
    ctx.trained()
    rows = metrics_lib.read_jsonl(os.path.join(ctx.workdir, "metrics.jsonl"))
    keys = {k for r in rows for k in r if k.startswith("whitebox/")}
    assert any(k.endswith("/coding_rate_c") for k in keys), sorted(keys)[:5]
    return f"{len(keys)} whitebox/ series"
  if command == "evaluate":
    from crate_jax import evaluate
    setups.check(cfg, "evaluate")
    ctx.trained()
    return _finite(evaluate.evaluate_checkpoint(cfg, ctx.workdir))
  if command in ("knn", "linear"):
    from crate_jax import evaluate
    setups.check(cfg, command, pool="mean")
    ctx.trained()
    r = evaluate.frozen_feature_eval(cfg, ctx.workdir, command, pool="mean")
    assert 0.0 <= r["top1"] <= 1.0 and r["num_test"] > 0
    return r["top1"]
  if command == "analyze":
    from crate_jax import analyze
    setups.check(cfg, "analyze")
    ctx.trained()
    r = analyze.analyze(cfg, ctx.workdir, str(out), num_images=2)
    assert np.isfinite(r["stats"]["coding_rate_c"]).all()
    return sorted(r["paths"])
  if command == "segment":
    from crate_jax import analyze_segment
    setups.check(cfg, "segment")
    ctx.trained()
    r = analyze_segment.segment_analysis(cfg, ctx.workdir, str(out), num_images=4)["report"]
    assert all(0.0 <= v <= 1.0 for e in r["layers"] for k, v in e.items() if k != "layer")
    return r["weights"]
  if command == "export_torch":
    from crate_jax.interop import exporters
    ctx.trained()
    path = exporters.export_torch(ctx.workdir, str(out) + ".pt")
    import torch
    sd = torch.load(path, weights_only=True)
    assert len(sd) > 0
    _check_tost_export(ctx, sd)
    return os.path.basename(path)
  if command == "export_stablehlo":
    return _check_stablehlo(ctx, str(out))
  if command == "generate":
    from crate_jax import generate
    ctx.trained()
    model, params, _ = generate.load(ctx.workdir)
    ids = generate.generate(model, params, [65, 66], max_new_tokens=3, temperature=0.0)
    assert len(ids) == 5
    return ids.tolist()
  if command == "plan":
    return _check_plan(cfg, with_eval=ctx.name in PLAN_EVAL_ROWS)
  raise AssertionError(command)


def _check_tost_export(ctx, sd):
  """A ToST run's export loads strictly into the PyTorch class that follows the official file
  and computes the run's logits."""
  from crate_jax import models
  from crate_jax.interop import exporters
  from crate_jax.interop import tost_reference as ref_lib
  import torch
  model, params, cfg = exporters.load(ctx.workdir)
  if isinstance(model, models.ToST):
    ref = ref_lib.tost_cab(patch_size=model.patch_size, embed_dim=model.dim, depth=model.depth,
                           num_heads=model.heads, eta=model.eta,
                           num_classes=model.num_classes)
    x = np.random.default_rng(0).normal(size=(2, 28, 28, 3)).astype(np.float32)
    with torch.no_grad():
      ref.load_state_dict(sd, strict=True)
      want = ref.eval()(torch.from_numpy(x.transpose(0, 3, 1, 2))).numpy()
  elif isinstance(model, models.TextModel) and model.block == "tost":
    ref = ref_lib.GPT(ref_lib.GPTConfig(block_size=model.max_len, vocab_size=model.vocab_size,
                                        n_layer=model.depth, n_head=model.heads,
                                        n_embd=model.dim, bias=model.use_bias))
    x = np.random.default_rng(0).integers(0, 200, (2, 16))
    with torch.no_grad():
      ref.load_state_dict(sd, strict=True)
      want = ref.eval().logits(torch.from_numpy(x)).numpy()
  else:
    return
  got = np.asarray(jax.jit(lambda p, x: model.apply(models.variables(p), x))(params, x))
  np.testing.assert_allclose(got, want, atol=1e-4 * max(1.0, float(np.abs(want).max())))


def _check_stablehlo(ctx, out: str):
  """The exported forward pass equals the model's own on the weights the run stands for."""
  from crate_jax import models
  from crate_jax.interop import exporters
  ctx.trained()
  exporters.export_stablehlo(ctx.workdir, out)
  with open(os.path.join(out, exporters.STABLEHLO_FILE), "rb") as f:
    forward = jax.export.deserialize(bytearray(f.read()))
  model, params, cfg = exporters.load(ctx.workdir)
  example = exporters.example_input(model, cfg)
  x = (np.random.default_rng(0).integers(0, 100, (3, *example.shape[1:])).astype(np.int32)
       if example.dtype == jnp.int32 else
       np.random.default_rng(0).normal(size=(3, *example.shape[1:])).astype(np.float32))
  want = jax.jit(lambda p, x: model.apply(models.variables(p), x))(params, x)
  np.testing.assert_allclose(np.asarray(forward.call(x)), np.asarray(want), atol=1e-5)
  return tuple(example.shape[1:])


# The eval step's TPU plan is the task's program: compiled on one row per task (the train
# step, which the family shapes, on every row).
PLAN_EVAL_ROWS = ("crate", "crate_mae", "dino", "simdino", "crate_gpt", "crate_bert")


def _check_plan(cfg, with_eval: bool = True):
  from crate_jax import plan, tpu_topology
  if not tpu_topology.libtpu_installed():
    pytest.skip("libtpu is not installed (the [tpu] extra)")
  cfg = cfg.copy_and_resolve_references()
  cfg.batch_size, cfg.eval_batch_size = 16, 16
  r = plan.report(cfg, _slice(), with_eval=with_eval)
  assert r["fits"] and r["flops_per_chip"] > 0 and (not with_eval or r["eval"]["fits"]), r
  return r["per_chip_batch"]


@functools.cache
def _slice():
  from crate_jax import plan
  return plan.Slice.create("v5e:2x2")


# The rows run in two files (this one and test_matrix_more.py) so that the suite's two workers
# share them (pytest-xdist --dist loadfile sends a file to one worker).
MORE_ROWS = ("dino", "tost", "tost_dino", "crate_bert", "tost_gpt")
HERE_ROWS = tuple(r for r in ROWS if r not in MORE_ROWS)


def make_contexts(tmp_path_factory, rows):
  root = tmp_path_factory.mktemp("matrix")
  return {row: Context(row, root) for row in rows}


@pytest.fixture(scope="module")
def contexts(tmp_path_factory):
  return make_contexts(tmp_path_factory, HERE_ROWS)


# The TPU plan compiles for another backend: the shared CPU compilation cache cannot serve it.
@pytest.mark.filterwarnings("ignore:Error reading persistent compilation cache")
@pytest.mark.parametrize("row", HERE_ROWS)
def test_every_command(row, contexts):
  """One row: every command works, or is refused as the table says (one line, a user error)."""
  check_row(contexts[row])


def check_row(ctx):
  row = ctx.name
  failures = []
  for command in COMMANDS:
    want = expected(row, command)
    try:
      got = run_cell(ctx, command)
    except pytest.skip.Exception:
      continue
    except Exception as e:  # noqa: BLE001 - sorted below
      message = str(e)
      if want is None:
        failures.append(f"{command}: expected to work, raised {type(e).__name__}: {message}")
      elif not (cli.is_user_error(e) and "\n" not in message.strip() and want in message):
        failures.append(f"{command}: expected a one-line refusal containing {want!r}, got "
                        f"{type(e).__name__}: {message}")
      continue
    if want is not None:
      failures.append(f"{command}: expected a refusal ({want!r}), but it worked: {got}")
  assert not failures, "\n".join(failures)


def test_every_row_runs_in_one_of_the_two_files():
  assert set(MORE_ROWS) <= set(ROWS) and set(HERE_ROWS) | set(MORE_ROWS) == set(ROWS)
  assert set(PLAN_EVAL_ROWS) <= set(ROWS)


def test_the_table_covers_every_task():
  """A registered task without a row fails here: the matrix grows by registration."""
  from crate_jax.training import tasks
  rows = {config_lib.load_config(os.path.join(ROOT, "configs", r.config)).task
          if "task" not in r.overrides else r.overrides["task"] for r in ROWS.values()}
  assert set(tasks.names()) <= rows
