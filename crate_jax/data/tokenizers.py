"""Tokenizers for the text tasks: a byte-level one (no vocabulary file). (A BPE tokenizer trained
offline is not implemented yet.)

Every tokenizer numbers its ids the same way: ordinary tokens 0 .. num_normal - 1, then the
specials end-of-document (`eos_id`), `mask_id` (BERT's [MASK]) and `pad_id`; vocab_size =
num_normal + 3. `token_bytes[i]` is how many bytes of text token i stands for (0 for specials),
from which evaluation reports bits per byte. Importable without TensorFlow.
"""
from __future__ import annotations

import dataclasses
import numpy as np

TOKENIZERS = ("byte",)


@dataclasses.dataclass(frozen=True)
class ByteTokenizer:
  """UTF-8 bytes as tokens: id = byte value (0..255); 256 eos, 257 mask, 258 pad."""
  name: str = "byte"
  num_normal: int = 256

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
    return self.num_normal + 3

  @property
  def token_bytes(self) -> np.ndarray:
    return np.concatenate([np.ones(self.num_normal, np.int32), np.zeros(3, np.int32)])

  def encode(self, text: str) -> np.ndarray:
    return np.frombuffer(text.encode("utf-8"), np.uint8).astype(np.int32)

  def decode(self, ids) -> str:
    """Text of the ordinary tokens (eos becomes a newline, other specials are dropped);
    invalid UTF-8 (a cut multi-byte character) is replaced, never raised."""
    ids = [int(i) for i in np.asarray(ids).reshape(-1)]
    data = bytes(i for i in ids if 0 <= i < 256)
    if self.eos_id in ids:
      parts, cur = [], []
      for i in ids:
        if i == self.eos_id:
          parts.append(bytes(cur)); cur = []
        elif 0 <= i < 256:
          cur.append(i)
      parts.append(bytes(cur))
      data = b"\n".join(parts)
    return data.decode("utf-8", errors="replace")

  def save(self, directory: str) -> None:
    del directory  # nothing to save: the byte tokenizer has no vocabulary file


def get(name: str, directory: str | None = None):
  """The tokenizer config.data.tokenizer names; unknown names: one ValueError naming the key."""
  del directory  # for tokenizers saved with a run
  if name == "byte":
    return ByteTokenizer()
  raise ValueError(f"config.data.tokenizer={name!r} is not a known tokenizer; use one of "
                   f"{TOKENIZERS}")


def check(name: str) -> None:
  if name not in TOKENIZERS:
    raise ValueError(f"config.data.tokenizer={name!r} is not a known tokenizer; use one of "
                     f"{TOKENIZERS}")

