"""Text input: byte tokenizer, tfds text datasets (mock data) packed per process, deterministic and
resumable training batches, padded eval passes, the embedded Shakespeare corpus."""
import pathlib

import numpy as np
import pytest
import tensorflow_datasets as tfds

from crate_jax import config_lib
from crate_jax.data import datasets, embedded_text, text, tokenizers

from tests.data.test_pipeline import write_mock_metadata

N_DOCS = 80


def text_cfg(data_dir, name="tiny_shakespeare", **overrides):
  cfg = config_lib.text_config("crate_gpt_tiny").data
  cfg.name, cfg.data_dir, cfg.seq_len = name, str(data_dir), 16
  for k, v in overrides.items():
    cfg[k] = v
  return cfg


@pytest.fixture(scope="module")
def mock_dir(tmp_path_factory):
  root = tmp_path_factory.mktemp("mock_text")
  return write_mock_metadata(pathlib.Path(root),
                             {"tiny_shakespeare": {"train": N_DOCS, "validation": N_DOCS}})


@pytest.fixture
def mocked(mock_dir):
  text._STREAMS.clear()  # pylint: disable=protected-access
  with tfds.testing.mock_data(num_examples=N_DOCS, data_dir=mock_dir):
    yield
  text._STREAMS.clear()  # pylint: disable=protected-access


def test_byte_tokenizer_round_trip_and_specials():
  tok = tokenizers.get("byte")
  ids = tok.encode("Wherefore art thou — Roméo?")
  assert (ids.dtype == np.int32 and ids.max() < 256
          and len(ids) == len("Wherefore art thou — Roméo?".encode()))
  assert tok.decode(ids) == "Wherefore art thou — Roméo?"
  assert tok.decode(np.concatenate([tok.encode("a"), [tok.eos_id, tok.mask_id],
                                    tok.encode("b")])) == "a\nb"
  assert (tok.eos_id, tok.mask_id, tok.pad_id, tok.vocab_size) == (256, 257, 258, 259)
  assert tok.token_bytes.sum() == 256
  with pytest.raises(ValueError, match="config.data.tokenizer='wordpiece' is not a known"):
    tokenizers.get("wordpiece")


def test_train_batches_are_packed_deterministic_and_resumable(mocked, mock_dir):
  cfg = text_cfg(mock_dir)
  stream = text.token_stream(cfg, "train")
  assert (stream == 256).sum() == N_DOCS  # one end-of-document token per document
  it = text.train_iterator(cfg, global_batch_size=8, seed=3)
  batches = [next(it)["tokens"] for _ in range(12)]
  assert all(b.shape == (8, 16) and b.dtype == np.int32 for b in batches)
  # Every row is a window of the stream.
  joined = stream.tobytes()
  for row in batches[0]:
    assert row.tobytes() in joined
  # Resume at step 5: the same batches as the uninterrupted iterator.
  resumed = text.train_iterator(cfg, global_batch_size=8, seed=3, start_step=5)
  for k in range(5, 12):
    np.testing.assert_array_equal(next(resumed)["tokens"], batches[k])
  other = next(text.train_iterator(cfg, global_batch_size=8, seed=4))["tokens"]
  assert not np.array_equal(other, batches[0])
  # An epoch visits distinct rows: no repeated window within one epoch.
  rows_per_epoch = (len(stream) // 16 - 1) // 8
  epoch = np.concatenate(batches[:min(rows_per_epoch, 12)])
  assert len({r.tobytes() for r in epoch}) == len(epoch)


def test_processes_read_their_own_documents_and_eval_is_padded(mocked, mock_dir):
  cfg = text_cfg(mock_dir)
  first = [next(text.train_iterator(cfg, global_batch_size=8, seed=0, process_index=p,
                                    process_count=2))["tokens"] for p in (0, 1)]
  assert first[0].shape == (4, 16) and not np.array_equal(first[0], first[1])
  rows = len(text.token_stream(cfg, "validation")) // 16
  passes = [list(text.eval_iterator(cfg, global_batch_size=8, process_index=p, process_count=2))
            for p in (0, 1)]
  assert len(passes[0]) == len(passes[1])
  assert sum(b["valid"].sum() for p in passes for b in p) == rows
  assert all(b["tokens"].shape == (4, 16) for b in passes[0])
  assert text.num_sequences(cfg, "validation") == rows


def test_unprepared_text_dataset_is_one_clear_error(tmp_path):
  text._STREAMS.clear()  # pylint: disable=protected-access
  with pytest.raises(datasets.DatasetNotPreparedError, match="text dataset 'lm1b' is not prepared"):
    text.token_stream(text_cfg(tmp_path, name="lm1b"), "train")
  with pytest.raises(ValueError, match="not a supported text dataset"):
    text.get_builder(text_cfg(tmp_path, name="imagenet2012"))


def test_embedded_shakespeare_scenes_and_split():
  scenes = embedded_text.all_scenes()
  assert len(scenes) > 700 and sum(len(t) for _, t in scenes) > 4_000_000
  test = embedded_text.is_test([s for s, _ in scenes])
  assert 0.04 < np.mean(test) < 0.06
  hamlet = next(t for s, t in scenes if s.startswith("hamlet/"))
  assert "BERNARDO\nWho's there?" in hamlet and "**" not in hamlet and "#" not in hamlet
