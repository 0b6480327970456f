"""Tokenizers: UTF-8 bytes, or a SentencePiece model (e.g. a BPE trained here).

The byte tokenizer and the BPE of `train_bpe` round-trip text exactly
(`decode(encode(s)) == s`): the BPE uses identity normalization, no dummy
prefix and byte fallback, so no character is lost or rewritten.
"""

import hashlib
import io
import os
from typing import Iterable, Sequence

import sentencepiece as spm


class Tokenizer:
  """Maps text to token ids and back. `name` identifies it in cache keys."""

  name: str
  vocab_size: int
  eos_id: int

  def encode(self, text: str) -> list[int]:
    return self.encode_batch([text])[0]

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    raise NotImplementedError

  def decode(self, ids: Iterable[int]) -> str:
    raise NotImplementedError


class ByteTokenizer(Tokenizer):
  """UTF-8 bytes are ids 0..255; EOS is 256 (vocab 257)."""

  name = "byte"
  vocab_size = 257
  eos_id = 256

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return [list(t.encode("utf-8")) for t in texts]

  def decode(self, ids: Iterable[int]) -> str:
    data = bytes(int(i) for i in ids if 0 <= int(i) < 256)
    return data.decode("utf-8", errors="replace")


class SentencePieceTokenizer(Tokenizer):
  """A SentencePiece .model file; it must define an EOS piece."""

  def __init__(self, path: str):
    with open(path, "rb") as f:
      proto = f.read()
    self._sp = spm.SentencePieceProcessor(model_proto=proto)
    if self._sp.eos_id() < 0:
      raise ValueError(f"SentencePiece model {path} has no EOS piece.")
    stem = os.path.splitext(os.path.basename(path))[0]
    self.name = f"{stem}-{hashlib.sha256(proto).hexdigest()[:8]}"
    self.vocab_size = self._sp.vocab_size()
    self.eos_id = self._sp.eos_id()
    self.path = path

  def encode_batch(self, texts: Sequence[str]) -> list[list[int]]:
    return self._sp.encode(list(texts), num_threads=2)

  def decode(self, ids: Iterable[int]) -> str:
    return self._sp.decode([int(i) for i in ids])


def train_bpe(
  sentences: Iterable[str], vocab_size: int, out_file: io.IOBase, max_sentences: int = 2_000_000
) -> None:
  """Trains a lossless SentencePiece BPE on `sentences`; writes the model bytes.

  Ids: 0 = <unk> (unused thanks to byte fallback), 1 = EOS, then the 256 byte
  pieces and the merges. Deterministic (no input shuffling).
  """
  spm.SentencePieceTrainer.train(
    sentence_iterator=iter(sentences),
    model_writer=out_file,
    model_type="bpe",
    vocab_size=vocab_size,
    character_coverage=1.0,
    byte_fallback=True,
    normalization_rule_name="identity",
    remove_extra_whitespaces=False,
    add_dummy_prefix=False,
    allow_whitespace_only_pieces=True,
    split_digits=True,
    unk_id=0,
    eos_id=1,
    bos_id=-1,
    pad_id=-1,
    input_sentence_size=max_sentences,
    shuffle_input_sentence=False,
    max_sentence_length=1 << 16,
    num_threads=2,
    minloglevel=2,
  )
