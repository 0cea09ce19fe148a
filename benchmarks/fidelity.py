"""Training fidelity against the official code: the PyTorch reference of the official CRATE
architecture and crate_jax, trained with one recipe on the embedded digits, several seeds each.

  python benchmarks/fidelity.py --seeds 0 1 2 3 4 [--frameworks jax torch] [--epochs 8]

The recipe is configs/embedded.py's: a 4-layer CRATE (dim 96, 4 heads of 24, patch 4, 28 px),
AdamW lr 2e-3 (b2 0.999, weight decay 0.05 on every parameter), 1 epoch of linear warm-up then
per-step cosine to 0, batch 128, 8 epochs, no augmentation, plain cross-entropy. Both frameworks
read the *same* batches in the same order (crate_jax's pipeline, seeded per run) and draw their
initial weights from the same distributions (PyTorch defaults; crate_jax mirrors them), but not
the same samples. Prints per-run and mean/std of the final test top-1 and loss per framework.
Needs torch (pip install -e ".[torch]"); CPU only.
"""
from __future__ import annotations

import argparse
import json
import math
import os
import sys
import tempfile
import time

os.environ.setdefault("TF_CPP_MIN_LOG_LEVEL", "3")
sys.path.insert(0, os.path.dirname(os.path.dirname(os.path.abspath(__file__))))

import numpy as np  # noqa: E402

from crate_jax import config_lib  # noqa: E402

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))


def recipe(seed: int, epochs: int, data_dir: str):
  return config_lib.load_config(os.path.join(ROOT, "configs", "embedded.py"), **{
      "seed": seed, "num_epochs": epochs, "data.data_dir": data_dir})


def run_jax(config, workdir: str) -> dict:
  """One crate_jax run to the end. A run stopped early (SIGTERM saves and returns, as on a
  preemption) would report its last eval as if final: refused, so no half run is averaged."""
  from crate_jax import train
  from crate_jax.training import metrics
  result = train.train_and_evaluate(config, workdir)
  total = train.plan(config).total_steps
  last = max(r["step"] for r in metrics.read_jsonl(os.path.join(workdir, "metrics.jsonl")))
  if last != total:
    raise SystemExit(f"the crate_jax run in {workdir} stopped at step {last} of {total} "
                     "(interrupted?); not counted")
  return {"top1": result["top1"], "loss": result["loss"]}


def lr_at(step: int, config, total: int, steps_per_epoch: int) -> float:
  """optax.warmup_cosine_decay_schedule from 0 to lr and back to 0, as crate_jax steps it."""
  peak, warmup = config.optimizer.lr, int(round(config.optimizer.warmup_epochs * steps_per_epoch))
  if step < warmup:
    return peak * step / warmup
  frac = (step - warmup) / max(total - warmup, 1)
  return 0.5 * peak * (1 + math.cos(math.pi * min(frac, 1.0)))


def run_torch(config, seed: int, threads: int | None = None) -> dict:
  import torch
  from crate_jax import data as data_lib
  from crate_jax.interop.torch_reference import CRATE as TorchCRATE
  torch.manual_seed(seed)
  torch.set_num_threads(threads or os.cpu_count() or 1)
  k = config.model.kwargs
  model = TorchCRATE(image_size=k.image_size, patch_size=k.patch_size, num_classes=k.num_classes,
                     dim=k.dim, depth=k.depth, heads=k.heads, dim_head=k.dim_head)
  opt = config.optimizer
  optimizer = torch.optim.AdamW(model.parameters(), lr=opt.lr, betas=(opt.b1, opt.b2),
                                eps=opt.eps, weight_decay=opt.weight_decay)
  spe = config_lib.steps_per_epoch(data_lib.num_examples(config.data, config.data.train_split),
                                   config.batch_size)
  total = config_lib.total_steps(config, spe)
  batches = data_lib.train_iterator(config.data, global_batch_size=config.batch_size,
                                    seed=config.seed, process_index=0, process_count=1)
  to_torch = lambda x: torch.from_numpy(np.ascontiguousarray(x.transpose(0, 3, 1, 2)))
  model.train()
  for step in range(total):
    batch = next(batches)
    for group in optimizer.param_groups:
      group["lr"] = lr_at(step, config, total, spe)
    logits = model(to_torch(batch["image"]))
    loss = -(torch.from_numpy(batch["labels"]) * torch.log_softmax(logits, -1)).sum(-1).mean()
    optimizer.zero_grad()
    loss.backward()
    optimizer.step()
  model.eval()
  correct = losses = count = 0.0
  with torch.no_grad():
    for batch in data_lib.eval_iterator(config.data, global_batch_size=config.eval_batch_size,
                                        process_index=0, process_count=1):
      keep = batch["valid"] > 0
      logits = model(to_torch(batch["image"][keep]))
      label = torch.from_numpy(batch["label"][keep].astype(np.int64))
      correct += float((logits.argmax(-1) == label).sum())
      losses += float(torch.nn.functional.cross_entropy(logits, label, reduction="sum"))
      count += float(keep.sum())
  return {"top1": correct / count, "loss": losses / count}


def main(argv=None) -> int:
  parser = argparse.ArgumentParser(description=__doc__,
                                   formatter_class=argparse.RawDescriptionHelpFormatter)
  parser.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2, 3, 4])
  parser.add_argument("--frameworks", nargs="+", default=["jax", "torch"],
                      choices=["jax", "torch"])
  parser.add_argument("--epochs", type=int, default=8)
  parser.add_argument("--data-dir", default=None, help="tfds dir (default: a temporary one)")
  parser.add_argument("--json", default=None, help="also write the runs to this JSON file")
  parser.add_argument("--torch-threads", type=int, default=None,
                      help="PyTorch intra-op threads (default: all cores; 1 on a busy machine, "
                      "where oversubscribed threads slow it several-fold)")
  args = parser.parse_args(argv)
  data_dir = args.data_dir or tempfile.mkdtemp(prefix="fidelity_tfds_")
  runs = {f: [] for f in args.frameworks}
  for seed in args.seeds:
    for framework in args.frameworks:
      config = recipe(seed, args.epochs, data_dir)
      t = time.perf_counter()
      result = (run_jax(config, tempfile.mkdtemp(prefix=f"fidelity_{seed}_"))
                if framework == "jax" else run_torch(config, seed, args.torch_threads))
      result.update(seed=seed, seconds=round(time.perf_counter() - t, 1))
      runs[framework].append(result)
      print(f"{framework:5s} seed {seed}: top-1 {100 * result['top1']:.1f}%  "
            f"loss {result['loss']:.4f}  ({result['seconds']} s)", flush=True)
  print("\nframework  seeds  top-1 mean +- std (%)   loss mean +- std")
  for framework, rows in runs.items():
    top1 = 100 * np.array([r["top1"] for r in rows])
    loss = np.array([r["loss"] for r in rows])
    print(f"{framework:9s}  {len(rows):5d}  {top1.mean():6.2f} +- "
          f"{top1.std(ddof=1) if len(rows) > 1 else 0:4.2f}"
          f"          {loss.mean():.4f} +- {loss.std(ddof=1) if len(rows) > 1 else 0:.4f}")
  if args.json:
    with open(args.json, "w") as f:
      json.dump(runs, f, indent=2)
  return 0


if __name__ == "__main__":
  sys.exit(main())
