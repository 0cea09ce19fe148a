"""DINO vs SimDINO vs random init on the embedded digits, over seeds: k-NN and linear-probe top-1
of the teacher (mean of the tokens, last layer), training wall time, and the segmentation IoU of
`analyze --segment` (last layer), each run trained from scratch.

  python benchmarks/self_supervision.py --seeds 0 1 2 --out workdirs/ssl
  python benchmarks/self_supervision.py --seeds 0 --runs simdino:simdino.eps=0.05 --out workdirs/ssl

A run is `NAME[:key=value,...]` with NAME one of RUNS (its config file) and dotted overrides.
Each (run, seed) trains into OUT/<run>_s<seed> (skipped when its final checkpoint exists) and
appends one JSON row to OUT/results.jsonl; the table at the end is the mean and standard
deviation over the seeds of every row in that file.
"""
from __future__ import annotations

import argparse
import ast
import json
import os
import sys
import time

ROOT = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
sys.path.insert(0, ROOT)

RUNS = {"dino": "configs/crate_dino_embedded.py", "simdino": "configs/simdino_embedded.py"}
SEGMENT_IMAGES = 500


def parse_run(spec: str) -> tuple[str, dict]:
  name, _, rest = spec.partition(":")
  overrides = {}
  for item in filter(None, rest.split(",")):
    key, _, value = item.partition("=")
    try:
      overrides[key] = ast.literal_eval(value)
    except (ValueError, SyntaxError):
      overrides[key] = value
  return name, overrides


def one(spec: str, seed: int, out: str) -> dict:
  from crate_jax import analyze_segment, config_lib, evaluate, train
  from crate_jax.training import checkpoint as ckpt_lib
  name, overrides = parse_run(spec)
  config = config_lib.load_config(os.path.join(ROOT, RUNS[name]), seed=seed, **overrides)
  workdir = os.path.join(out, f"{spec.replace(':', '_').replace('=', '').replace(',', '_')}"
                              f"_s{seed}")
  total = config.num_epochs * 4000 // config.batch_size
  start = time.time()
  done = os.path.isdir(workdir) and ckpt_lib.Checkpoints(workdir).latest_step() == total
  if not done:
    train.train_and_evaluate(config, workdir)
  train_s = None if done else time.time() - start
  row = {"run": spec, "seed": seed, "train_s": train_s}
  for protocol in ("knn", "linear"):
    row[protocol] = evaluate.frozen_feature_eval(config, workdir, protocol, pool="mean")["top1"]
    row[f"{protocol}_random_init"] = evaluate.frozen_feature_eval(
        config, None, protocol, pool="mean")["top1"]
  report = analyze_segment.segment_analysis(config, workdir, os.path.join(workdir, "segment"),
                                            num_images=SEGMENT_IMAGES, seed=seed)["report"]
  last = report["layers"][-1]
  for method in ("attention", "pca", "maskcut"):
    row[f"iou_{method}"] = last[method]
    row[f"iou_{method}_random_init"] = last[f"{method}_random_init"]
  with open(os.path.join(out, "results.jsonl"), "a") as f:
    f.write(json.dumps(row) + "\n")
  print(json.dumps(row), flush=True)
  return row


def table(out: str) -> str:
  import numpy as np
  rows = [json.loads(line) for line in open(os.path.join(out, "results.jsonl"))]
  keys = ("knn", "linear", "iou_attention", "iou_pca", "iou_maskcut")
  lines = ["| run | seeds | k-NN | linear | IoU attention | IoU pca | IoU maskcut | train s |",
           "|---|---|---|---|---|---|---|---|"]
  fmt = lambda xs, pct: (f"{100 * np.mean(xs):.1f} ± {100 * np.std(xs):.1f}" if pct
                         else f"{np.mean(xs):.3f} ± {np.std(xs):.3f}")
  for run in dict.fromkeys(r["run"] for r in rows):
    rs = {r["seed"]: r for r in rows if r["run"] == run}.values()   # the newest row per seed
    for label, suffix in ((run, ""), (f"{run}: random init", "_random_init")):
      cells = [fmt([r[k + suffix] for r in rs], k in ("knn", "linear")) for k in keys]
      times = [r["train_s"] for r in rs if r["train_s"] and not suffix]
      seconds = f"{np.mean(times):.0f}" if times else ""
      lines.append(f"| {label} | {len(rs)} | " + " | ".join(cells) + f" | {seconds} |")
  runs = list(dict.fromkeys(r["run"] for r in rows))
  newest = {(r["run"], r["seed"]): r for r in rows}
  for run in runs[1:]:   # paired by seed (same backbone init and batches) against the first run
    seeds = sorted(s for (r, s) in newest if r == run and (runs[0], s) in newest)
    for k in ("knn", "linear"):
      diffs = [100 * (newest[(run, s)][k] - newest[(runs[0], s)][k]) for s in seeds]
      lines.append(f"{run} - {runs[0]}, {k}, per seed {seeds}: "
                   + ", ".join(f"{d:+.1f}" for d in diffs) + f" (mean {np.mean(diffs):+.1f})")
  return "\n".join(lines)


def main() -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--runs", nargs="+", default=["dino", "simdino"])
  parser.add_argument("--seeds", nargs="+", type=int, default=[0, 1, 2])
  parser.add_argument("--out", default=os.path.join(ROOT, "workdirs", "ssl"))
  parser.add_argument("--table_only", action="store_true")
  args = parser.parse_args()
  os.makedirs(args.out, exist_ok=True)
  if not args.table_only:
    for seed in args.seeds:
      for spec in args.runs:
        one(spec, seed, args.out)
  print(table(args.out))


if __name__ == "__main__":
  main()
