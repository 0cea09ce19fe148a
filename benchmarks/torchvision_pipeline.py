"""The torchvision side of the input benchmark (benchmarks/input_pipeline.py): the same recipes
as a PyTorch user writes them (PIL decode through datasets.ImageFolder, transforms.v2, mixup /
cutmix in the DataLoader's collate_fn, DataLoader workers), reading the same JPEG files.

It runs in the benchmark's process when torchvision imports there, or in another interpreter
(input_pipeline.py --torchvision-python PY), which needs torch, torchvision and Pillow only:

  PY benchmarks/torchvision_pipeline.py --versions
  PY benchmarks/torchvision_pipeline.py --spec '{"case": ..., "setup": ..., "cfg": ...}'

prints one JSON line (the versions, or the Timer figures of the case).
"""
from __future__ import annotations

import argparse
import dataclasses
import gc
import json
import multiprocessing
import os
import subprocess
import sys
import types

sys.path.insert(0, os.path.dirname(os.path.abspath(__file__)))   # run as a script

from pipeline_timing import Setup, Timer  # noqa: E402


def import_torchvision():
  """(torch, torchvision) or None with the reason, without failing the crate_jax side."""
  try:
    import torch
    import torchvision
    from torchvision.transforms import v2  # noqa: F401
  except Exception as e:  # noqa: BLE001 - ImportError, or a build that does not match torch
    return None, f"{type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}"
  return (torch, torchvision), None


class PilBlur:
  """DINO's Gaussian blur: PIL's filter with radius ~ U(lo, hi), applied with probability p."""

  def __init__(self, p: float, lo: float = 0.1, hi: float = 2.0):
    self.p, self.lo, self.hi = p, lo, hi

  def __call__(self, image):
    import random

    from PIL import ImageFilter
    if random.random() >= self.p:
      return image
    return image.filter(ImageFilter.GaussianBlur(radius=random.uniform(self.lo, self.hi)))


class MultiCrop:
  """DINO's views of one PIL image: (global f32 (2, 3, G, G), local f32 (N, 3, L, L))."""

  def __init__(self, cfg):
    from torchvision.transforms import v2
    import torch
    m = cfg.multicrop
    tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
            v2.Normalize(list(cfg.mean), list(cfg.std))]

    def view(size, scale, blur_p, solarize_p):
      ops = [v2.RandomResizedCrop(size, scale=tuple(scale), antialias=True),
             v2.RandomHorizontalFlip(),
             v2.RandomApply([v2.ColorJitter(0.4, 0.4, 0.2, 0.1)], p=float(m.jitter_p)),
             v2.RandomGrayscale(p=float(m.grey_p)), PilBlur(blur_p)]
      if solarize_p:
        ops.append(v2.RandomSolarize(128, p=solarize_p))
      return v2.Compose(ops + tail)

    size = int(cfg.image_size)
    self.globals = [view(size, m.global_scale, 1.0, 0.0), view(size, m.global_scale, 0.1, 0.2)]
    self.local = view(int(m.local_size), m.local_scale, 0.5, 0.0)
    self.num_local = int(m.num_local)

  def __call__(self, image):
    import torch
    return (torch.stack([t(image) for t in self.globals]),
            torch.stack([self.local(image) for _ in range(self.num_local)]))


class MixCollate:
  """default_collate, then mixup (alpha 0.8) or cutmix (1.0), each with probability 1/2, in the
  worker (as torchvision's docs suggest): images f32 (b, 3, H, W), soft labels (b, K)."""

  def __init__(self, num_classes: int):
    from torchvision.transforms import v2
    self.mix = v2.RandomChoice([v2.MixUp(alpha=0.8, num_classes=num_classes),
                                v2.CutMix(alpha=1.0, num_classes=num_classes)])

  def __call__(self, samples):
    from torch.utils.data import default_collate
    return self.mix(*default_collate(samples))


def torch_loader(case: str, setup, cfg):
  """The torchvision DataLoader a user would write for the recipe, over DIR/train; `setup` the
  benchmark's Setup, `cfg` the recipe's config.data (input_pipeline.crate_data_cfg)."""
  import torch
  from torchvision import datasets
  from torchvision.transforms import v2
  size = int(cfg.image_size)
  tail = [v2.ToImage(), v2.ToDtype(torch.float32, scale=True),
          v2.Normalize(list(cfg.mean), list(cfg.std))]
  train_crop = [v2.RandomResizedCrop(size, scale=(float(cfg.crop_min_area), 1.0), antialias=True),
                v2.RandomHorizontalFlip()]
  collate = None
  if case == "plain":
    transform = v2.Compose(train_crop + tail)
  elif case == "randaug_mix":
    transform = v2.Compose(train_crop + [v2.RandAugment(2, 9)] + tail)
    collate = MixCollate(setup.classes)
  elif case == "dino_multicrop":
    transform = MultiCrop(cfg)
  else:
    transform = v2.Compose([v2.Resize(int(cfg.eval_resize), antialias=True),
                            v2.CenterCrop(size)] + tail)
  dataset = datasets.ImageFolder(os.path.join(setup.root, "train"), transform=transform)
  train, workers = case != "eval", setup.workers
  # Workers from a fresh forkserver, not forked from this process (its TensorFlow and jax
  # threads): as in a PyTorch-only script.
  context = None
  if workers > 0 and sys.platform.startswith("linux"):
    context = multiprocessing.get_context("forkserver")
    context.set_forkserver_preload(["__main__", "torch", "torchvision.datasets",
                                    "torchvision.transforms.v2"])
  return torch.utils.data.DataLoader(
      dataset, batch_size=setup.batch_size, shuffle=train, drop_last=train, num_workers=workers,
      persistent_workers=workers > 0, collate_fn=collate, multiprocessing_context=context)


def torch_rate(case: str, setup, cfg) -> dict:
  """torchvision figures (Timer.run) of one JPEG case."""
  loader = torch_loader(case, setup, cfg)
  transform, its = loader.dataset.transform, []

  def next_batch():
    first = not its
    while True:
      if not its:
        its.append(iter(loader))
        first = True
      try:
        images, labels = next(its[-1])
      except StopIteration:   # the next epoch (persistent workers)
        its.pop()
        continue
      b = len(labels)
      if case == "dino_multicrop":
        g, l = images
        assert g.shape == (b, 2, 3, 224, 224) and l.shape == (b, transform.num_local, 3, 96, 96)
      else:
        assert images.shape == (b, 3, 224, 224), images.shape
      return b, first

  try:
    return setup.timer.run(next_batch, setup.warmup)
  finally:
    its.clear()
    gc.collect()


# ------------------------------------------------------------------ in another interpreter
def _namespace(value):
  """A config.data dict (ConfigDict.to_dict()) read by attribute, as the recipes read it."""
  if isinstance(value, dict):
    return types.SimpleNamespace(**{k: _namespace(v) for k, v in value.items()})
  return value


def _last_json(python: str, *args: str) -> dict:
  here = os.path.abspath(__file__)
  proc = subprocess.run([python, here, *args], capture_output=True, text=True, check=False)
  lines = [line for line in proc.stdout.splitlines() if line.startswith("{")]
  if proc.returncode or not lines:
    tail = (proc.stderr.strip().splitlines() or ["no output"])[-1]
    raise RuntimeError(f"{python} {os.path.basename(here)} failed: {tail}")
  return json.loads(lines[-1])


def versions_in(python: str):
  """({"torch", "torchvision"} of `python`, None) or (None, why)."""
  try:
    found = _last_json(python, "--versions")
  except (OSError, RuntimeError) as e:
    return None, str(e)
  return (found, None) if "torch" in found else (None, found.get("error", "no torch"))


def torch_rate_in(python: str, case: str, setup: Setup, cfg) -> dict:
  """torch_rate run by `python` (an interpreter with torch + torchvision)."""
  fields = {f.name: getattr(setup, f.name) for f in dataclasses.fields(setup) if f.name != "timer"}
  spec = {"case": case, "setup": fields, "cfg": cfg.to_dict(),
          "timer": {"batches": setup.timer.batches, "seconds": setup.timer.seconds}}
  return _last_json(python, "--spec", json.dumps(spec))


def main(argv=None) -> None:
  parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
  parser.add_argument("--versions", action="store_true")
  parser.add_argument("--spec", default=None, help="JSON: case, setup, timer, cfg")
  args = parser.parse_args(argv)
  tv, why = import_torchvision()
  if args.versions or tv is None:
    print(json.dumps({"torch": tv[0].__version__, "torchvision": tv[1].__version__} if tv
                     else {"error": why}))
    return
  spec = json.loads(args.spec)
  setup = Setup(**spec["setup"], timer=Timer(**spec["timer"]))
  print(json.dumps(torch_rate(spec["case"], setup, _namespace(spec["cfg"]))))


if __name__ == "__main__":
  main()
