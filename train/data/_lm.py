"""Language modelling over local text: bytes or BPE tokens, packed documents, shards."""

import dataclasses
from pathlib import Path
from typing import Any, Literal

import numpy as np

from . import _corpus as corpus_lib
from ._base import Batch, DataError, Task, _check_int, _check_name, _help, _require
from ._tokenizer import (
    EOD_NAMES,
    TOKENIZER_FILE,
    BytesTokenizer,
    load_tokenizer_file,
    train_bpe,
    write_atomic,
)

STDLIB_EXCLUDE = ("test", "tests", "idle_test", "site-packages", "dist-packages")


@dataclasses.dataclass(frozen=True)
class LMConfig:
    """Language modelling over local text files (by default the Python standard
    library): bytes or BPE tokens, documents packed into rows."""

    name: str = _help("task name", default="lm")
    paths: tuple[str, ...] = _help(
        "files or glob patterns (** recurses; hidden directories are skipped), relative "
        "to the current directory; 'stdlib:PATTERN' is relative to the running "
        "interpreter's standard library (sysconfig's stdlib path); matches are sorted "
        "and deduplicated",
        default=("stdlib:**/*.py",),
    )
    exclude: tuple[str, ...] = _help(
        "fnmatch patterns: a matched file is skipped when one of its directory names, or "
        "its path, below the fixed directory its pattern starts from matches one (the "
        "default drops the standard library's test suites and installed packages)",
        default=STDLIB_EXCLUDE,
    )
    tokenizer: str = _help(
        "'bytes' (UTF-8 bytes, plus an end-of-document token 256 unless documents is "
        "none), 'bpe' (byte-level BPE with vocab_size tokens trained on the training "
        "split with Hugging Face tokenizers), or the path of a tokenizer.json; bpe and "
        "file tokenizers are saved in the run directory as tokenizer.json, and resume, "
        "ssm-eval and ssm-generate reload that copy",
        default="bytes",
    )
    vocab_size: int = _help(
        "vocabulary size of a 'bpe' tokenizer (>= 257: the 256 bytes and the "
        "end-of-document token; a small corpus may give fewer)",
        default=4096,
    )
    documents: Literal["files", "paragraphs", "none"] = _help(
        "what a document is: a file, or a blank-line separated paragraph; documents are "
        "packed into rows with an end-of-document token after each, batches carry "
        "'resets' (true at each document's first token) and the loss skips the "
        "prediction across a boundary. none: the files' text as one stream",
        default="files",
    )
    seq_len: int = _help("window length in tokens", default=256)
    val_fraction: float = _help(
        "fraction of the corpus bytes, from the end, held out for validation",
        default=0.1,
    )
    train_stride: int = _help(
        "offset between consecutive training windows (0 means seq_len: disjoint "
        "windows); validation windows are always disjoint",
        default=0,
    )
    cache_dir: str | None = _help(
        "where tokenized shards and trained BPE tokenizers are cached, keyed by the "
        "files (paths, sizes, mtimes) and the tokenizer (null: $SSM_JAX_CACHE, else "
        "$XDG_CACHE_HOME/ssm-jax, else ~/.cache/ssm-jax)",
        default=None,
    )
    shard_tokens: int = _help(
        "tokens per shard file (uint16, or uint32 above 65536 tokens of vocabulary)",
        default=1 << 24,
    )

    def __post_init__(self):
        _check_name(self)
        for key in ("paths", "exclude"):
            value = getattr(self, key)
            if isinstance(value, str):
                value = (value,)
            _require(
                isinstance(value, list | tuple) and all(isinstance(p, str) for p in value),
                key,
                f"must be a list of strings, got {getattr(self, key)!r}",
            )
            object.__setattr__(self, key, tuple(value))
        _require(len(self.paths) > 0, "paths", "must name at least one file or pattern")
        _require(
            isinstance(self.tokenizer, str) and self.tokenizer != "",
            "tokenizer",
            f"must be 'bytes', 'bpe' or the path of a tokenizer.json, got "
            f"{self.tokenizer!r}",
        )
        _check_int(self, "vocab_size", 257, 1 << 32)
        _require(
            self.documents in ("files", "paragraphs", "none"),
            "documents",
            f"must be 'files', 'paragraphs' or 'none', got {self.documents!r}",
        )
        _check_int(self, "seq_len", 1)
        _require(
            isinstance(self.val_fraction, int | float)
            and 0.0 < float(self.val_fraction) < 1.0,
            "val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )
        _check_int(self, "train_stride", 0)
        _require(
            self.cache_dir is None or isinstance(self.cache_dir, str),
            "cache_dir",
            f"must be a path or null, got {self.cache_dir!r}",
        )
        _check_int(self, "shard_tokens", 1)


@dataclasses.dataclass(frozen=True)
class BytesLMConfig(LMConfig):
    """Byte-level language modelling over local text files, as one stream of text (the
    `lm` task with the defaults this task always had)."""

    name: str = _help("task name", default="lm_bytes")
    paths: tuple[str, ...] = _help(
        "files or glob patterns (** recurses; hidden directories are skipped), relative "
        "to the current directory ('stdlib:PATTERN': relative to the standard library); "
        "matches are sorted, deduplicated and concatenated",
        default=("README.md", "**/*.py"),
    )
    exclude: tuple[str, ...] = _help(
        "fnmatch patterns of directory names or paths to skip (see task lm)", default=()
    )
    documents: Literal["files", "paragraphs", "none"] = _help(
        "none: the files' bytes as one stream; files or paragraphs: packed documents "
        "with an end-of-document token (see task lm)",
        default="none",
    )


def _bpe_texts(corpus, cut, mode: str):
    for text, _ in corpus_lib.documents(corpus, cut, "train", mode):
        yield text


class LMTask(Task):
    """Next-token prediction over a corpus's token shards.

    The documents of each split are tokenized once into memory-mapped shards (see
    `train.data._corpus`). Example `i` of a split is the window starting at token
    `i * stride`: inputs are `seq_len` tokens, targets the same shifted by one. Besides
    `inputs`, `targets` and `mask`, a batch holds `resets` (bool, true at the first
    token of a document, and at a split's first token) and `bytes` (float32, the bytes
    of text each target stands for: the denominator of bits per byte). The mask is 0
    where the input is the end-of-document token, whose target opens the next document.

    **Arguments:** the config, and `run_dir`: a run whose `tokenizer.json` is used
    instead of the one the config names (resume, evaluation, generation).
    """

    kind = "lm"
    d_input = None
    splits = ("train", "val")

    def __init__(self, config: LMConfig, run_dir: str | Path | None = None):
        self.config = config
        self.seq_len = config.seq_len
        corpus = corpus_lib.find_corpus(config.paths, config.exclude)
        self.files = corpus.files
        cut = corpus_lib.find_cut(corpus, float(config.val_fraction))
        cache = (
            Path(config.cache_dir) if config.cache_dir else corpus_lib.default_cache_dir()
        )
        self.tokenizer = _tokenizer(config, corpus, cut, cache, run_dir)
        self.vocab_size = self.n_outputs = self.tokenizer.vocab_size
        self.eod_id = None if config.documents == "none" else self.tokenizer.eod_id
        if config.documents != "none" and self.eod_id is None:
            raise DataError(
                f"task.tokenizer: {self.tokenizer.source} has no end-of-document token "
                f"(one of {list(EOD_NAMES)}); add one, or set task.documents=none"
            )
        self._token_bytes = self.tokenizer.token_bytes.astype(np.float32)
        self.cache_path, self._tokens = _shards(config, corpus, cut, cache, self)
        train_stride = config.train_stride or config.seq_len
        self._stride = {"train": train_stride, "val": config.seq_len}
        for split, tokens in self._tokens.items():
            if len(tokens) < config.seq_len + 1:
                shown = ", ".join(self.files[:3]) + (", ..." if len(self.files) > 3 else "")
                raise DataError(
                    f"task.paths: the {split} split holds {len(tokens)} tokens of the "
                    f"{corpus.total_bytes} bytes in {len(self.files)} file(s) ({shown}) "
                    f"(val_fraction={config.val_fraction}), fewer than one window "
                    f"(task.seq_len + 1 = {config.seq_len + 1})"
                )

    def size(self, split: str) -> int:
        tokens = self._tokens[self._check_split(split)]
        return (len(tokens) - self.seq_len - 1) // self._stride[split] + 1

    def tokens(self, split: str) -> np.ndarray:
        """All of a split's tokens in memory (int32), for tests and inspection."""
        return self._tokens[self._check_split(split)].to_array()

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        idx = self._indices(split, idx)
        # positions start - 1 .. start + seq_len: the token before each input says
        # whether the input opens a document.
        pos = idx[:, None] * self._stride[split] + np.arange(-1, self.seq_len + 1)
        tokens = self._tokens[split].gather(np.maximum(pos, 0))
        inputs, targets = tokens[:, 1:-1], tokens[:, 2:]
        resets = pos[:, 1:-1] == 0
        if self.eod_id is not None:
            resets |= tokens[:, :-2] == self.eod_id
            mask = (inputs != self.eod_id).astype(np.float32)
        else:
            mask = np.ones(inputs.shape, np.float32)
        return {
            "inputs": inputs,
            "targets": targets,
            "mask": mask,
            "resets": resets,
            "bytes": self._token_bytes[targets],
        }

    def save(self, run_dir: str | Path) -> None:
        """Write the tokenizer into `run_dir` (for bpe and file tokenizers)."""
        text = self.tokenizer.to_json()
        if text is None:
            return
        path = Path(run_dir) / TOKENIZER_FILE
        if path.is_file() and path.read_text(encoding="utf-8") == text:
            return
        write_atomic(path, text)

    def encode(self, text: str) -> np.ndarray:
        """The int32 tokens of `text`."""
        return self.tokenizer.encode(text)

    def decode(self, tokens: Any) -> str:
        """The text of tokens (bytes: malformed UTF-8 replaced by U+FFFD)."""
        return self.tokenizer.decode(tokens)


def _tokenizer(config: LMConfig, corpus, cut, cache: Path, run_dir):
    if config.tokenizer == "bytes":
        return BytesTokenizer(eod=config.documents != "none")
    if run_dir is not None:
        return load_tokenizer_file(Path(run_dir) / TOKENIZER_FILE, "task.tokenizer")
    if config.tokenizer != "bpe":
        return load_tokenizer_file(config.tokenizer, "task.tokenizer")
    key = corpus_lib.cache_key(
        {
            "format": corpus_lib.FORMAT,
            "files": corpus.key(),
            "cut": dataclasses.astuple(cut),
            "documents": config.documents,
            "vocab_size": config.vocab_size,
        }
    )
    path = cache / "tokenizers" / f"bpe-{key}.json"
    if not path.is_file():
        trained = train_bpe(_bpe_texts(corpus, cut, config.documents), config.vocab_size)
        write_atomic(path, trained.to_json())
    tok = load_tokenizer_file(path, "task.cache_dir")
    tok.source = f"the bpe tokenizer trained on task.paths ({path})"
    return tok


def _shards(config: LMConfig, corpus, cut, cache: Path, task: LMTask):
    tokenizer = task.tokenizer
    expected = {
        "format": corpus_lib.FORMAT,
        "files": corpus.key(),
        "cut": list(dataclasses.astuple(cut)),
        "documents": config.documents,
        "tokenizer": tokenizer.fingerprint,
        "vocab_size": tokenizer.vocab_size,
        "eod_id": task.eod_id,
        "shard_tokens": config.shard_tokens,
        "dtype": corpus_lib.token_dtype(tokenizer.vocab_size).name,
    }
    directory = cache / "shards" / corpus_lib.cache_key(expected)
    if not (directory / "index.json").is_file():
        if directory.exists():
            raise DataError(
                f"task.cache_dir: the shard cache {directory} has no index.json; delete "
                f"{directory} and it is rebuilt"
            )
        streams = {
            split: corpus_lib.token_stream(
                tokenizer,
                corpus_lib.documents(corpus, cut, split, config.documents),
                task.eod_id,
            )
            for split in ("train", "val")
        }
        corpus_lib.build_shards(directory, expected, streams, config.shard_tokens)
    _, tokens = corpus_lib.open_shards(directory, expected)
    if set(tokens) != {"train", "val"}:
        raise DataError(
            f"task.cache_dir: the shard cache {directory} does not match its index "
            f"(splits {sorted(tokens)}); delete {directory} and it is rebuilt"
        )
    return directory, tokens
