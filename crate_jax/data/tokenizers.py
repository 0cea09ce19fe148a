"""Tokenizers for the text tasks: "byte" (UTF-8 bytes, no vocabulary file) and "bpe" (byte-level
BPE trained offline on the training split with the `tokenizers` library, saved with the run as
`tokenizer.json` and read back from there by resume, evaluation and `generate`).

Every tokenizer numbers its ids the same way: ordinary tokens 0 .. num_normal - 1, then the
specials end-of-document (`eos_id`), `mask_id` (BERT's [MASK]) and `pad_id`; vocab_size =
num_normal + 3. `token_bytes[i]` is how many bytes of text token i stands for (0 for specials),
from which evaluation reports bits per byte. Importable without TensorFlow.
"""
from __future__ import annotations

import dataclasses
import os
from typing import Any, Iterable

import numpy as np

TOKENIZERS = ("byte", "bpe")
TOKENIZER_FILE = "tokenizer.json"   # the trained BPE, in the run's workdir
NUM_SPECIAL = 3                     # eos, mask, pad after the ordinary ids
BYTE_SYMBOLS = 256                  # every byte-level BPE starts from these: its smallest size


class TokenizerError(ValueError):
  """An unknown tokenizer, or a BPE run whose trained tokenizer file is missing."""


def _decode_docs(ids, eos_id: int, num_normal: int, to_text) -> str:
  """Ordinary ids through `to_text`, documents joined by a newline at each eos; other specials
  dropped."""
  ids = [int(i) for i in np.asarray(ids).reshape(-1)]
  parts, cur = [], []
  for i in ids:
    if i == eos_id:
      parts.append(cur)
      cur = []
    elif 0 <= i < num_normal:
      cur.append(i)
  parts.append(cur)
  return "\n".join(to_text(p) for p in parts)


class SpecialIds:
  """The specials after the num_normal ordinary ids: eos, mask, pad; vocab_size counts all."""
  num_normal: int

  @property
  def eos_id(self) -> int:
    return self.num_normal

  @property
  def mask_id(self) -> int:
    return self.num_normal + 1

  @property
  def pad_id(self) -> int:
    return self.num_normal + 2

  @property
  def vocab_size(self) -> int:
    return self.num_normal + NUM_SPECIAL


@dataclasses.dataclass(frozen=True)
class ByteTokenizer(SpecialIds):
  """UTF-8 bytes as tokens: id = byte value (0..255); 256 eos, 257 mask, 258 pad."""
  name: str = "byte"
  num_normal: int = 256

  @property
  def token_bytes(self) -> np.ndarray:
    return np.concatenate([np.ones(self.num_normal, np.int32), np.zeros(3, np.int32)])

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Text of the ordinary tokens (eos becomes a newline, other specials are dropped);
    invalid UTF-8 (a cut multi-byte character) is replaced, never raised."""
    return _decode_docs(ids, self.eos_id, self.num_normal,
                        lambda p: bytes(p).decode("utf-8", errors="replace"))

  def save(self, directory: str) -> None:
    del directory  # nothing to save: the byte tokenizer has no vocabulary file


@dataclasses.dataclass(frozen=True, eq=False)
class BPETokenizer(SpecialIds):
  """Byte-level BPE (the `tokenizers` library): the text's UTF-8 bytes are mapped to 256 symbols
  and merged by learned rules, so any text encodes and a token stands for len(its symbols) bytes.
  Ordinary ids: the trained vocabulary's (up to num_normal = config.data.bpe_vocab_size; a small
  corpus may learn fewer, the rest never occur), then eos, mask and pad at fixed ids."""
  hf: Any
  num_normal: int
  name: str = "bpe"

  @property
  def token_bytes(self) -> np.ndarray:
    learned = self.hf.get_vocab_size()
    lengths = [len(self.hf.id_to_token(i)) for i in range(learned)]
    return np.asarray(lengths + [0] * (self.num_normal - learned + NUM_SPECIAL), np.int32)

  def encode(self, text: str) -> np.ndarray:
    return np.asarray(self.hf.encode(text).ids, np.int32)

  def decode(self, ids) -> str:
    return _decode_docs(ids, self.eos_id, self.num_normal, self.hf.decode)

  def save(self, directory: str) -> str:
    """Write DIR/tokenizer.json atomically (local or gs:// paths); returns its path."""
    from etils import epath
    folder = epath.Path(directory)
    folder.mkdir(parents=True, exist_ok=True)
    tmp = folder / f"{TOKENIZER_FILE}.partial.{os.getpid()}"
    tmp.write_text(self.hf.to_str())
    tmp.rename(folder / TOKENIZER_FILE)
    return os.fspath(folder / TOKENIZER_FILE)


def train_bpe(texts: Iterable[str], vocab_size: int) -> BPETokenizer:
  """Byte-level BPE with at most `vocab_size` ordinary tokens (the 256 byte symbols and the
  merges of pairs seen at least twice), learned from `texts` in order (deterministic)."""
  from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
  if vocab_size < BYTE_SYMBOLS:
    raise TokenizerError(f"config.data.bpe_vocab_size={vocab_size} must be >= {BYTE_SYMBOLS} "
                         "(the byte symbols every byte-level BPE starts from)")
  hf = Tokenizer(models.BPE())
  hf.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
  hf.decoder = decoders.ByteLevel()
  trainer = trainers.BpeTrainer(vocab_size=vocab_size, min_frequency=2, show_progress=False,
                                initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
                                special_tokens=[])
  hf.train_from_iterator(texts, trainer=trainer)
  return BPETokenizer(hf, vocab_size)


def load_bpe(directory: str, num_normal: int) -> BPETokenizer:
  from etils import epath
  path = epath.Path(directory or ".") / TOKENIZER_FILE
  if not directory or not path.exists():
    raise TokenizerError(
        f"config.data.tokenizer='bpe' reads the run's trained {TOKENIZER_FILE}, and there is none "
        f"in config.data.tokenizer_dir={directory!r}; training writes it into the workdir: point "
        "--config.data.tokenizer_dir at that workdir")
  from tokenizers import Tokenizer
  hf = Tokenizer.from_str(path.read_text())
  if hf.get_vocab_size() > num_normal:
    raise TokenizerError(f"{path} holds {hf.get_vocab_size()} tokens, more than "
                         f"config.data.bpe_vocab_size={num_normal}")
  return BPETokenizer(hf, num_normal)


def run_directory(checkpoint: str, saved: str = "") -> str:
  """Where a BPE run's tokenizer.json is: the run folder holding `checkpoint` (WORKDIR, or above
  WORKDIR/checkpoints/STEP; the run may have moved since), else `saved`."""
  path = os.path.abspath(checkpoint)
  for _ in range(4):
    if os.path.isfile(os.path.join(path, TOKENIZER_FILE)):
      return path
    path = os.path.dirname(path)
  return saved


def with_directory(config, directory: str):
  """A copy of `config` whose data.tokenizer_dir is `directory`."""
  config = config.copy_and_resolve_references()
  with config.unlocked():
    config.data.tokenizer_dir = directory
  return config


def for_checkpoint(config, checkpoint: str):
  """A BPE config pointed at the tokenizer.json of the run holding `checkpoint` (run_directory);
  other configs unchanged."""
  if config.data.get("tokenizer") != "bpe":
    return config
  return with_directory(config, run_directory(checkpoint, config.data.tokenizer_dir))


def get(name: str, directory: str | None = None, bpe_vocab_size: int = 0):
  """The tokenizer config.data.tokenizer names (a BPE one: loaded from DIR/tokenizer.json);
  unknown names: one TokenizerError naming the key."""
  check(name)
  if name == "bpe":
    return load_bpe(directory, bpe_vocab_size)
  return ByteTokenizer()


def from_config(data_cfg):
  """The tokenizer of a text data config (config.data.tokenizer, .tokenizer_dir,
  .bpe_vocab_size)."""
  return get(data_cfg.tokenizer, data_cfg.get("tokenizer_dir") or None,
             int(data_cfg.get("bpe_vocab_size", 0)))


def pad_id(data_cfg) -> int:
  """The pad id of the config's tokenizer, known before any BPE is trained."""
  return vocab_size(data_cfg) - 1


def vocab_size(data_cfg) -> int:
  """How many ids the config's tokenizer can produce, known before any BPE is trained."""
  check(data_cfg.tokenizer)
  if data_cfg.tokenizer == "bpe":
    return int(data_cfg.bpe_vocab_size) + NUM_SPECIAL
  return ByteTokenizer().vocab_size


def check(name: str) -> None:
  if name not in TOKENIZERS:
    raise TokenizerError(f"config.data.tokenizer={name!r} is not a known tokenizer; use one of "
                         f"{TOKENIZERS}")
