"""One registry of data sources, images and text alike: what a dataset name stands for, for the
rest of the package (tasks, setups, the planner, the train loop's hooks). The image table is
crate_jax.data.datasets.DATASETS, the text table crate_jax.data.text_datasets.TEXT_DATASETS;
both are import-light (no TensorFlow).

  source(name) -> Source    one error listing every supported dataset for an unknown name
"""
from __future__ import annotations

import dataclasses

from crate_jax.data import datasets, text_datasets


@dataclasses.dataclass(frozen=True)
class Source:
  name: str
  kind: str                 # "images" or "text"
  num_classes: int          # 0: no labels (a text corpus), or an image folder's own count
  train_split: str
  eval_split: str
  train_examples: int       # the train split's size as the table knows it; 0: unknown
  has_masks: bool           # ground-truth segmentation (analyze --segment, the white-box hook)

  @property
  def labelled(self) -> bool:
    """Examples carry a class (k-NN / linear probes, task classification)."""
    return self.kind == "images" or self.num_classes > 0


def names() -> list[str]:
  return sorted({*datasets.DATASETS, *text_datasets.TEXT_DATASETS})


def source(name: str) -> Source:
  if text_datasets.is_text(name):
    t = text_datasets.spec(name)
    return Source(name, "text", t.num_classes, t.train_split, t.eval_split, 0, False)
  if datasets.base_name(name) not in datasets.DATASETS:
    raise ValueError(f"config.data.name={name!r} is not a supported dataset; supported: "
                     f"{names()}")
  s = datasets.spec(name)
  return Source(name, "images", s.num_classes, s.train_split, s.eval_split, s.train_examples,
                s.mask_key is not None)
