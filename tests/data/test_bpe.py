"""config.data.tokenizer="bpe": byte-level BPE trained offline on the training split, saved with
the run (WORKDIR/tokenizer.json) and read back by resume and `generate`."""
import json
import os

import numpy as np
import pytest

from crate_jax import config_lib
from crate_jax.data import text, tokenizers

CORPUS = ["Now is the winter of our discontent made glorious summer. " * 3,
          "To be, or not to be, that is the question: whether 'tis nobler. " * 2,
          "Café, naïve, Œdipus — and “quotes”. "] * 40


def test_trained_bpe_is_deterministic_lossless_and_counts_bytes():
  a, b = tokenizers.train_bpe(CORPUS, 300), tokenizers.train_bpe(CORPUS, 300)
  assert a.hf.to_str() == b.hf.to_str()  # same text, same tokenizer
  assert 256 < a.hf.get_vocab_size() <= 300 and a.num_normal == 300
  assert (a.eos_id, a.mask_id, a.pad_id, a.vocab_size) == (300, 301, 302, 303)
  doc = "the question of Œdipus, naïve café — never seen: ∑ 🙂"
  ids = a.encode(doc)
  assert len(ids) < len(doc.encode("utf-8"))  # merges learned: fewer tokens than bytes
  assert a.decode(ids) == doc
  assert a.decode(list(ids) + [a.eos_id] + list(a.encode("x"))) == doc + "\nx"
  assert int(a.token_bytes[ids].sum()) == len(doc.encode("utf-8"))
  assert a.token_bytes[a.hf.get_vocab_size():].sum() == 0  # unlearned ids and specials


def test_bad_bpe_inputs_are_one_clear_error(tmp_path):
  with pytest.raises(tokenizers.TokenizerError, match="is not a known tokenizer"):
    tokenizers.get("wordpiece")
  with pytest.raises(tokenizers.TokenizerError, match="there is none in config.data.tokenizer_dir"):
    tokenizers.get("bpe", str(tmp_path), 512)
  with pytest.raises(tokenizers.TokenizerError, match="must be >= 256"):
    tokenizers.train_bpe(CORPUS, 100)


@pytest.fixture(scope="module")
def bpe_run(tmp_path_factory):
  """A tiny CRATE-GPT on the embedded Shakespeare with a 512-token BPE: 4 steps, then resumed
  to 6."""
  from crate_jax import train
  root = tmp_path_factory.mktemp("bpe")
  cfg = config_lib.load_config(os.path.join(os.path.dirname(__file__), "..", "..", "configs",
                                            "embedded_lm.py"))
  with cfg.unlocked():
    cfg.model.kwargs.update(dim=32, depth=2, heads=2, dim_head=16, vocab_size=515, max_len=64)
    cfg.data.update(tokenizer="bpe", bpe_vocab_size=512, bpe_train_chars=300_000, seq_len=32,
                    data_dir=str(root / "tfds"), eval_split="test[:5%]")
    cfg.update(batch_size=16, eval_batch_size=64, num_train_steps=4, log_every_steps=2,
               eval_every_steps=100, checkpoint_every_steps=2)
  workdir = str(root / "run")
  train.train_and_evaluate(cfg, workdir)
  saved = open(os.path.join(workdir, "tokenizer.json")).read()
  with cfg.unlocked():
    cfg.num_train_steps = 6
  result = train.train_and_evaluate(cfg, workdir)
  return cfg, workdir, saved, result


def test_bpe_run_saves_its_tokenizer_and_resumes_with_it(bpe_run):
  cfg, workdir, saved, result = bpe_run
  assert open(os.path.join(workdir, "tokenizer.json")).read() == saved  # not retrained
  written = json.load(open(os.path.join(workdir, "config.json")))
  assert written["data"]["tokenizer_dir"] == os.path.abspath(workdir)
  tok = tokenizers.get("bpe", workdir, 512)
  assert tok.hf.get_vocab_size() == 512  # the Shakespeare sample fills the vocabulary
  assert 1.5 < result["bytes_per_token"] < 6  # merged tokens: several bytes each
  # the token stream the loop read is this tokenizer's ids
  data = cfg.data.copy_and_resolve_references()
  with data.unlocked():
    data.tokenizer_dir = workdir
  stream = text.token_stream(data, data.eval_split)
  first_doc = next(text.documents(data, data.eval_split))
  np.testing.assert_array_equal(stream[:50], tok.encode(first_doc)[:50])


def test_evaluate_reads_the_runs_tokenizer(bpe_run):
  """evaluate with the config file alone (no tokenizer_dir) finds tokenizer.json beside the
  checkpoint and reproduces the loop's final eval."""
  from crate_jax import evaluate
  cfg, workdir, _, result = bpe_run
  assert not cfg.data.tokenizer_dir
  again = evaluate.evaluate_checkpoint(cfg, workdir)
  np.testing.assert_allclose(again["loss"], result["loss"], rtol=1e-5)


def test_generate_reads_the_runs_tokenizer_after_the_run_moved(bpe_run, tmp_path, capsys):
  from crate_jax import generate
  _, workdir, _, _ = bpe_run
  moved = tmp_path / "moved"
  os.rename(workdir, moved)
  try:
    assert generate.main(["--checkpoint", str(moved), "--prompt", "ROMEO:",
                          "--max-new-tokens", "8", "--temperature", "0"]) == 0
  finally:
    os.rename(moved, workdir)
  assert capsys.readouterr().out.startswith("ROMEO:")
