"""Text input for the lm / mlm tasks: tfds text datasets tokenized and packed into fixed-length
sequences per JAX process, deterministic and resumable like the image pipeline.

Tokens. Each process reads its even share of the split's documents (tfds.even_splits, file
order), tokenizes them (config.data.tokenizer) and concatenates them, an end-of-document token
after each: one int32 stream per process and split, kept in memory (`_STREAMS`).

Train batch k (local batch b, sequence length T, stream of n tokens): the epoch e = k // S has
R = n // T - 1 rows and S = R // b steps; with a generator seeded by (seed, process, process
count, e) it draws an offset o in [0, T) and a permutation pi of the R rows; batch k holds rows
pi[(k mod S) b : (k mod S + 1) b], row r being stream[o + r T : o + (r + 1) T]. So batch k is a
pure function of (dataset, tokenizer, T, seed, k, process), start_step=k resumes exactly, and
each epoch cuts the text at new places.

Eval: the whole split's stream cut into rows from offset 0, the rows split contiguously over the
processes; every process yields the same number of full batches, padding rows have mask 0.

Sequence classification (GLUE by tfds name, e.g. glue/sst2): each example's text features joined
by end-of-document, truncated / padded (pad id) to seq_len: {"tokens", "label", "labels"}; epoch
e of a process is a permutation of its examples seeded by (seed, process, process count, e).
"""
from __future__ import annotations

import collections
import os
from typing import Iterator

import jax
import numpy as np

from crate_jax.data import prepare, text_datasets, tokenizers
from crate_jax.data.device import check_batch_size, process_position as _process

_STREAMS: collections.OrderedDict = collections.OrderedDict()
_EPOCH_TAG = 7


def get_builder(data_cfg):
  """A prepared tfds builder of a text dataset; never downloads (embedded_shakespeare:
  prepares it offline)."""
  prepare.hide_gpus_from_tf()
  import tensorflow_datasets as tfds
  name = data_cfg.name
  info = text_datasets.spec(name)
  data_dir = prepare.resolve_data_dir(data_cfg)
  if text_datasets.base_name(name) == "embedded_shakespeare":
    from crate_jax.data import embedded_text
    return embedded_text.prepared_builder(data_dir)
  builder = tfds.builder(name, data_dir=data_dir, try_gcs=False)
  if not builder.is_prepared():
    raise prepare.DatasetNotPreparedError(
        f"text dataset {name!r} is not prepared: looked in {builder.data_dir} (data_dir="
        f"{data_dir or 'tfds default ' + str(builder.data_dir_root)}). Nothing is downloaded at "
        f"run time. To prepare it: {info.how_to_prepare.format(name=name)}.")
  return builder


def token_stream(data_cfg, split: str) -> np.ndarray:
  """The split's documents tokenized and concatenated, eos after each: int32 (n,)."""
  builder = get_builder(data_cfg)
  key = (str(builder.data_dir), str(split), _tokenizer_key(data_cfg))
  if key in _STREAMS:
    _STREAMS.move_to_end(key)
    return _STREAMS[key]
  tok = tokenizers.from_config(data_cfg)
  eos = np.asarray([tok.eos_id], np.int32)
  parts = []
  for doc in documents(data_cfg, split, builder):
    parts.append(tok.encode(doc))
    parts.append(eos)
  stream = np.concatenate(parts) if parts else np.zeros((0,), np.int32)
  _STREAMS[key] = stream
  while len(_STREAMS) > 8:
    _STREAMS.popitem(last=False)
  return stream


def _tokenizer_key(data_cfg) -> tuple:
  return (data_cfg.tokenizer, data_cfg.get("tokenizer_dir", ""),
          int(data_cfg.get("bpe_vocab_size", 0)))


def _records(builder, split: str):
  """The split's examples in file order (an unknown split: one error naming the available ones)."""
  prepare.split_size(builder, split)
  return builder.as_dataset(split=split, shuffle_files=False).as_numpy_iterator()


def documents(data_cfg, split: str, builder=None):
  """The split's documents (str) in file order (a text dataset: its text_key)."""
  text_key = text_datasets.spec(data_cfg.name).text_key
  for ex in _records(builder or get_builder(data_cfg), split):
    yield ex[text_key].decode("utf-8")


def _text_fields(data_cfg, split: str, builder=None):
  """(its text fields, label) of each example of a classification split, in file order."""
  keys = text_datasets.spec(data_cfg.name).text_keys
  for ex in _records(builder or get_builder(data_cfg), split):
    yield [ex[k].decode("utf-8") for k in keys], int(ex["label"])


def ensure_tokenizer(data_cfg) -> str | None:
  """config.data.tokenizer="bpe": the run's DIR/tokenizer.json (DIR = config.data.tokenizer_dir),
  trained on the first config.data.bpe_train_chars characters of the training split's documents
  if it is not there yet (a resumed run reads the saved one: the ids never change). Returns its
  path; None for tokenizers without a file. A classification dataset trains on its text fields."""
  if data_cfg.tokenizer != "bpe":
    return None
  from etils import epath
  directory = data_cfg.get("tokenizer_dir") or ""
  if not directory:
    raise tokenizers.TokenizerError("config.data.tokenizer='bpe' needs config.data.tokenizer_dir "
                                     "(the training loop sets it to the workdir)")
  path = epath.Path(directory) / tokenizers.TOKENIZER_FILE
  if path.exists():
    return os.fspath(path)
  budget = int(data_cfg.bpe_train_chars)

  def sample():
    used = 0
    for doc in _training_texts(data_cfg):
      if used >= budget:
        return
      doc = doc[:budget - used]
      used += len(doc)
      yield doc
  tok = tokenizers.train_bpe(sample(), int(data_cfg.bpe_vocab_size))
  return tok.save(directory)


def _training_texts(data_cfg):
  split = data_cfg.train_split
  if not text_datasets.is_classification(data_cfg.name):
    yield from documents(data_cfg, split)
    return
  for texts, _ in _text_fields(data_cfg, split):
    yield from texts


def process_split(split: str, pi: int, pc: int, drop_remainder: bool = True) -> str:
  import tensorflow_datasets as tfds
  return tfds.even_splits(split, n=pc, drop_remainder=drop_remainder)[pi] if pc > 1 else split


def num_sequences(data_cfg, split: str) -> int:
  """Packed sequences of config.data.seq_len tokens in `split` (for steps per epoch); a
  classification dataset's examples."""
  if text_datasets.is_classification(data_cfg.name):
    return len(labelled_examples(data_cfg, split)[1])
  return len(token_stream(data_cfg, split)) // int(data_cfg.seq_len)


def labelled_examples(data_cfg, split: str) -> tuple[np.ndarray, np.ndarray]:
  """(tokens int32 (n, seq_len) padded with pad_id, labels int32 (n,)) of a classification split."""
  builder = get_builder(data_cfg)
  seq_len = int(data_cfg.seq_len)
  key = ("classification", str(builder.data_dir), str(split), _tokenizer_key(data_cfg), seq_len)
  if key in _STREAMS:
    return _STREAMS[key]
  tok = tokenizers.from_config(data_cfg)
  rows, labels = [], []
  for texts, label in _text_fields(data_cfg, split, builder):
    parts = []
    for i, t in enumerate(texts):
      if i:
        parts.append(np.asarray([tok.eos_id], np.int32))
      parts.append(tok.encode(t))
    ids = np.concatenate(parts)[:seq_len]
    rows.append(np.pad(ids, (0, seq_len - len(ids)), constant_values=tok.pad_id))
    labels.append(label)
  out = (np.stack(rows).astype(np.int32) if rows else np.zeros((0, seq_len), np.int32),
         np.asarray(labels, np.int32))
  _STREAMS[key] = out
  return out


def _classification_train(data_cfg, local, seed, pi, pc, start_step):
  tokens, labels = labelled_examples(data_cfg, process_split(data_cfg.train_split, pi, pc))
  if len(labels) < local:
    raise ValueError(f"process {pi} holds {len(labels)} examples of {data_cfg.name}:"
                     f"{data_cfg.train_split}, fewer than one local batch of {local}")
  classes = int(data_cfg.num_classes)
  steps, step, cached, perm = len(labels) // local, start_step, None, None
  while True:
    epoch, s = divmod(step, steps)
    if epoch != cached:
      perm = epoch_plan(seed, pi, pc, epoch, len(labels), 1)[1]
      cached = epoch
    idx = perm[s * local:(s + 1) * local]
    yield {"tokens": tokens[idx], "label": labels[idx],
           "labels": np.eye(classes, dtype=np.float32)[labels[idx]]}
    step += 1


def _classification_eval(data_cfg, local, split, pi, pc):
  tokens, labels = labelled_examples(data_cfg, split)
  mine = np.array_split(np.arange(len(labels)), pc)[pi]
  num_batches = -(-(-(-len(labels) // pc)) // local)
  classes = int(data_cfg.num_classes)
  pad = tokenizers.pad_id(data_cfg)
  for i in range(num_batches):
    idx = mine[i * local:(i + 1) * local]
    batch_tokens = np.full((local, tokens.shape[1]), pad, np.int32)
    batch_tokens[:len(idx)] = tokens[idx]
    label = np.zeros((local,), np.int32)
    label[:len(idx)] = labels[idx]
    yield {"tokens": batch_tokens, "label": label,
           "labels": np.eye(classes, dtype=np.float32)[label],
           "valid": (np.arange(local) < len(idx)).astype(np.float32)}


def epoch_plan(seed: int, pi: int, pc: int, epoch: int, rows: int, seq_len: int):
  """(offset, row permutation) of one training epoch: a pure function of its arguments."""
  rng = np.random.default_rng(np.random.SeedSequence([seed, pi, pc, epoch, _EPOCH_TAG]))
  offset = int(rng.integers(0, seq_len))
  return offset, rng.permutation(rows)


def train_iterator(data_cfg, *, global_batch_size: int, seed: int, start_step: int = 0,
                   process_index: int | None = None,
                   process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """Infinite host-local batches {"tokens": int32 (b, seq_len)}; batch k depends on (seed, k,
  process) only, so start_step=k resumes exactly."""
  pi, pc = _process(process_index, process_count)
  local = check_batch_size(global_batch_size, jax.device_count(), pc)
  if start_step < 0:
    raise ValueError(f"start_step must be >= 0, got {start_step}")
  if text_datasets.is_classification(data_cfg.name):
    return _classification_train(data_cfg, local, int(seed), pi, pc, int(start_step))
  seq_len = int(data_cfg.seq_len)
  stream = token_stream(data_cfg, process_split(data_cfg.train_split, pi, pc))
  rows = len(stream) // seq_len - 1
  if rows < local:
    raise ValueError(f"process {pi} holds {len(stream)} tokens of {data_cfg.name}:"
                     f"{data_cfg.train_split}, fewer than one local batch of {local} sequences "
                     f"of {seq_len} tokens")
  return _train_batches(stream, rows, local, seq_len, int(seed), pi, pc, int(start_step))


def _train_batches(stream, rows, local, seq_len, seed, pi, pc, step):
  steps = rows // local
  cached_epoch, offset, perm = None, 0, None
  window = np.arange(seq_len)
  while True:
    epoch, s = divmod(step, steps)
    if epoch != cached_epoch:
      offset, perm = epoch_plan(seed, pi, pc, epoch, rows, seq_len)
      cached_epoch = epoch
    starts = offset + perm[s * local:(s + 1) * local] * seq_len
    yield {"tokens": stream[starts[:, None] + window[None, :]]}
    step += 1


def eval_iterator(data_cfg, *, global_batch_size: int, split: str | None = None,
                  process_index: int | None = None,
                  process_count: int | None = None) -> Iterator[dict[str, np.ndarray]]:
  """One pass over the split's packed sequences: {"tokens", "valid"} full local batches."""
  pi, pc = _process(process_index, process_count)
  local = check_batch_size(global_batch_size, jax.device_count(), pc)
  if text_datasets.is_classification(data_cfg.name):
    return _classification_eval(data_cfg, local, split or data_cfg.eval_split, pi, pc)
  seq_len = int(data_cfg.seq_len)
  stream = token_stream(data_cfg, split or data_cfg.eval_split)
  rows = len(stream) // seq_len
  if rows == 0:
    raise ValueError(f"{data_cfg.name}:{split or data_cfg.eval_split} holds {len(stream)} "
                     f"tokens, fewer than one sequence of {seq_len}")
  mine = np.array_split(np.arange(rows), pc)[pi]
  num_batches = -(-(-(-rows // pc)) // local)
  return _eval_batches(stream, mine, num_batches, local, seq_len)


def _eval_batches(stream, mine, num_batches, local, seq_len):
  window = np.arange(seq_len)
  for i in range(num_batches):
    idx = mine[i * local:(i + 1) * local]
    tokens = np.zeros((local, seq_len), np.int32)
    tokens[:len(idx)] = stream[idx[:, None] * seq_len + window[None, :]]
    yield {"tokens": tokens, "valid": (np.arange(local) < len(idx)).astype(np.float32)}
