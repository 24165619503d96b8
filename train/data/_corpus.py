"""Text corpora for the LM task: files, documents, the train/val cut and token shards.

A corpus is the sorted list of files that `task.paths` match (less `task.exclude`).
Its bytes, in file order, are cut once: the last `val_fraction` of them (moved forward
to the next character boundary) is the validation split. Each split is a sequence of
documents (a file, or a blank-line separated paragraph, or with `documents: none` one
stream of text); a document that ends inside the split is followed by the
end-of-document token.

Tokens are written once per (files with their sizes and mtimes, tokenizer, document
mode, cut, shard size) into a cache directory: `index.json` and `.npy` shards of
`shard_tokens` tokens each (uint16, or uint32 for vocabularies above 65536). A cache
entry is built under a temporary name and renamed into place when complete, so a
reader never sees half of one; training memory-maps the shards.
"""

import dataclasses
import fnmatch
import glob
import hashlib
import json
import os
import re
import shutil
import sysconfig
import uuid
from collections.abc import Iterator
from pathlib import Path

import numpy as np

from ._base import DataError

STDLIB = "stdlib:"
FORMAT = 1
_GLOB_CHARS = re.compile(r"[*?\[]")
# A paragraph break: a newline and one or more blank (whitespace-only) lines.
_PARAGRAPH_BREAK = re.compile(r"\n(?:[ \t\r\f\v]*\n)+")
_ENCODE_GROUP_BYTES = 1 << 22


def stdlib_dir() -> str:
    """The running interpreter's standard library directory."""
    return sysconfig.get_paths()["stdlib"]


def default_cache_dir() -> Path:
    """`$SSM_JAX_CACHE`, else `$XDG_CACHE_HOME/ssm-jax`, else `~/.cache/ssm-jax`."""
    if os.environ.get("SSM_JAX_CACHE"):
        return Path(os.environ["SSM_JAX_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or os.path.join(
        os.path.expanduser("~"), ".cache"
    )
    return Path(base) / "ssm-jax"


def _pattern_root(pattern: str) -> tuple[str, str]:
    """The pattern with `stdlib:` expanded, and its fixed leading directory."""
    if pattern.startswith(STDLIB):
        pattern = os.path.join(stdlib_dir(), pattern[len(STDLIB) :].lstrip("/"))
    parts = pattern.split(os.sep)
    fixed = []
    for part in parts[:-1]:
        if _GLOB_CHARS.search(part):
            break
        fixed.append(part)
    root = os.sep.join(fixed) if fixed else "."
    return pattern, root or os.sep


def _name_matches(name: str, pattern: str) -> bool:
    # As glob: a wildcard does not match a leading dot.
    if name.startswith(".") and not pattern.startswith("."):
        return False
    return fnmatch.fnmatchcase(name, pattern)


def _path_matches(parts: list[str], pats: list[str]) -> bool:
    """Whether path components match pattern components (`**`: any number of them)."""
    if not pats:
        return not parts
    if pats[0] == "**":
        if _path_matches(parts, pats[1:]):
            return True
        return (
            bool(parts[:-1])
            and not parts[0].startswith(".")
            and _path_matches(parts[1:], pats)
        )
    return (
        bool(parts)
        and _name_matches(parts[0], pats[0])
        and _path_matches(parts[1:], pats[1:])
    )


def _excluded(rel: str, exclude: tuple[str, ...]) -> bool:
    dirs = rel.split(os.sep)[:-1]
    return any(
        fnmatch.fnmatchcase(rel, pat) or any(fnmatch.fnmatchcase(d, pat) for d in dirs)
        for pat in exclude
    )


def _match_pattern(pattern: str, exclude: tuple[str, ...]) -> tuple[list[str], int]:
    """Files one pattern matches, less the excluded, and how many were excluded.

    Like `glob.glob(pattern, recursive=True)` (hidden names are matched only by
    patterns that start with a dot), but the walk does not enter excluded directories.
    """
    expanded, root = _pattern_root(pattern)
    rest = os.path.relpath(expanded, root) if root != "." else os.path.normpath(expanded)
    pats = rest.split(os.sep)
    if not any(_GLOB_CHARS.search(p) for p in pats[:-1]):
        found = [p for p in glob.glob(expanded) if os.path.isfile(p)]
    else:
        found = []
        for here, dirs, files in os.walk(root):
            rel_dir = os.path.relpath(here, root)
            dirs[:] = sorted(
                d
                for d in dirs
                if not d.startswith(".")
                and not any(fnmatch.fnmatchcase(d, pat) for pat in exclude)
            )
            for name in files:
                rel = name if rel_dir == "." else os.path.join(rel_dir, name)
                if _path_matches(rel.split(os.sep), pats):
                    found.append(os.path.join(here, name))
    kept = [p for p in found if not _excluded(os.path.relpath(p, root), exclude)]
    return kept, len(found) - len(kept)


@dataclasses.dataclass(frozen=True)
class Corpus:
    """The matched files with the sizes and modification times they had when found."""

    files: tuple[str, ...]
    sizes: tuple[int, ...]
    mtimes: tuple[int, ...]

    @property
    def total_bytes(self) -> int:
        return sum(self.sizes)

    def key(self) -> list:
        return [
            [os.path.abspath(f), s, m]
            for f, s, m in zip(self.files, self.sizes, self.mtimes, strict=True)
        ]


def find_corpus(paths: tuple[str, ...], exclude: tuple[str, ...]) -> Corpus:
    """The files `paths` match (sorted, deduplicated, less `exclude`), with their
    stats; a `DataError` naming `task.paths` when none is left or all are empty."""
    found: set[str] = set()
    dropped = 0
    for pattern in paths:
        kept, excluded = _match_pattern(pattern, exclude)
        found.update(os.path.normpath(p) for p in kept)
        dropped += excluded
    files = sorted(found)
    if not files:
        why = f"; task.exclude {list(exclude)} removed {dropped}" if dropped else ""
        raise DataError(
            f"task.paths: {list(paths)} match no files (relative to {os.getcwd()}){why}"
        )
    stats = []
    for f in files:
        try:
            stats.append(os.stat(f))
        except OSError as e:
            raise DataError(f"task.paths: cannot read {f}: {e.strerror}") from None
    corpus = Corpus(
        tuple(files), tuple(s.st_size for s in stats), tuple(s.st_mtime_ns for s in stats)
    )
    if corpus.total_bytes == 0:
        raise DataError(
            f"task.paths: the corpus is empty: the {len(files)} file(s) matched by "
            f"{list(paths)} hold no bytes (first: {files[0]})"
        )
    return corpus


def read_text(path: str, size: int) -> str:
    """A file's text; a `DataError` naming `task.paths` and the file when it cannot be
    read, is not UTF-8, holds a NUL byte (a binary file) or changed size."""
    try:
        with open(path, "rb") as f:
            raw = f.read()
    except OSError as e:
        raise DataError(f"task.paths: cannot read {path}: {e.strerror}") from None
    if len(raw) != size:
        raise DataError(
            f"task.paths: {path} changed while the corpus was read ({size} bytes, then "
            f"{len(raw)}); run again"
        )
    nul = raw.find(b"\0")
    if nul >= 0:
        raise DataError(
            f"task.paths: {path} is not a text file (a NUL byte at offset {nul}); "
            "remove it from task.paths or add it to task.exclude"
        )
    try:
        return raw.decode("utf-8")
    except UnicodeDecodeError as e:
        raise DataError(
            f"task.paths: {path} is not UTF-8 text (byte {e.start}: {e.reason}); "
            "remove it from task.paths or add it to task.exclude"
        ) from None


@dataclasses.dataclass(frozen=True)
class Cut:
    """The train/val boundary: byte `offset` of file `file` (a character boundary
    once the file is read); file `len(files)` means nothing is held out."""

    file: int
    offset: int


def find_cut(corpus: Corpus, val_fraction: float) -> Cut:
    """The last `int(total * val_fraction)` bytes are validation."""
    cut = corpus.total_bytes - int(corpus.total_bytes * val_fraction)
    start = 0
    for i, size in enumerate(corpus.sizes):
        if cut < start + size:
            return Cut(i, cut - start)
        start += size
    return Cut(len(corpus.sizes), 0)


def _char_boundary(text_bytes: bytes, offset: int) -> int:
    while offset < len(text_bytes) and (text_bytes[offset] & 0xC0) == 0x80:
        offset += 1
    return offset


def split_pieces(corpus: Corpus, cut: Cut, split: str) -> Iterator[tuple[str, str, bool]]:
    """`(file, text, ends)` for the part of each file in `split`, in order; `ends` is
    False for the training part of the file that the cut falls in (its text goes on
    in the validation split)."""
    if split == "train":
        indices = range(min(cut.file + 1, len(corpus.files)))
    else:
        indices = range(cut.file, len(corpus.files))
    for i in indices:
        path = corpus.files[i]
        text = read_text(path, corpus.sizes[i])
        if i == cut.file:
            raw = text.encode("utf-8")
            at = _char_boundary(raw, cut.offset)
            head, tail = raw[:at].decode("utf-8"), raw[at:].decode("utf-8")
            if split == "train":
                if head:
                    yield path, head, False
            elif tail:
                yield path, tail, True
        elif text:
            yield path, text, True


def documents(
    corpus: Corpus, cut: Cut, split: str, mode: str
) -> Iterator[tuple[str, bool]]:
    """`(text, ends)` per document of `split`: a file's part (`files`, and `none`, where
    nothing ends), or its non-empty blank-line separated paragraphs (`paragraphs`);
    `ends` says whether the end-of-document token follows."""
    for _, text, ends in split_pieces(corpus, cut, split):
        if mode == "paragraphs":
            paragraphs = _PARAGRAPH_BREAK.split(text)
            kept = [p for p in paragraphs if p.strip()]
            for j, p in enumerate(kept):
                # The piece's last paragraph goes on in the next split when the
                # piece does, unless a paragraph break closed it.
                last_open = j == len(kept) - 1 and not ends and p is paragraphs[-1]
                yield p, not last_open
        else:
            yield text, ends and mode == "files"


def token_stream(
    tokenizer, docs: Iterator[tuple[str, bool]], eod_id
) -> Iterator[np.ndarray]:
    """int32 tokens of the documents in order, the end-of-document id after those that
    end; encoded in groups of about 4 MB of text (`encode_batch`)."""
    group: list[tuple[str, bool]] = []
    size = 0

    def flush():
        for (_, ends), ids in zip(
            group, tokenizer.encode_batch([t for t, _ in group]), strict=True
        ):
            yield ids
            if ends:
                yield np.asarray([eod_id], np.int32)

    for text, ends in docs:
        group.append((text, ends))
        size += len(text)
        if size >= _ENCODE_GROUP_BYTES:
            yield from flush()
            group, size = [], 0
    if group:
        yield from flush()


def cache_key(parts: dict) -> str:
    return hashlib.sha256(json.dumps(parts, sort_keys=True).encode()).hexdigest()[:24]


def token_dtype(vocab_size: int) -> np.dtype:
    return np.dtype(np.uint16 if vocab_size <= 1 << 16 else np.uint32)


class _ShardWriter:
    """Appends token arrays and writes them as `.npy` shards of exactly `size` tokens
    (the last one shorter)."""

    def __init__(self, directory: Path, split: str, dtype: np.dtype, size: int):
        self.directory, self.split, self.dtype, self.size = directory, split, dtype, size
        self.pending: list[np.ndarray] = []
        self.count = 0
        self.total = 0
        self.names: list[str] = []

    def add(self, tokens: np.ndarray) -> None:
        self.pending.append(tokens)
        self.count += len(tokens)
        self.total += len(tokens)
        if self.count >= self.size:
            self._write(final=False)

    def _write(self, final: bool) -> None:
        if not self.pending:
            return
        data = np.concatenate(self.pending)
        n_full = len(data) // self.size
        for i in range(n_full):
            self._save(data[i * self.size : (i + 1) * self.size])
        rest = data[n_full * self.size :]
        if final and len(rest):
            self._save(rest)
            rest = rest[:0]
        self.pending = [rest] if len(rest) else []
        self.count = len(rest)

    def _save(self, tokens: np.ndarray) -> None:
        name = f"{self.split}-{len(self.names):05d}.npy"
        np.save(self.directory / name, tokens.astype(self.dtype))
        self.names.append(name)

    def close(self) -> dict:
        self._write(final=True)
        return {"tokens": self.total, "shards": self.names}


def build_shards(
    directory: Path,
    index: dict,
    streams: dict[str, Iterator[np.ndarray]],
    shard_tokens: int,
) -> None:
    """Write the splits' token streams and `index.json` into `directory` (which must
    not exist yet) through a temporary directory renamed into place at the end; if
    another process finished the same entry first, its copy is kept."""
    directory.parent.mkdir(parents=True, exist_ok=True)
    tmp = directory.with_name(f".{directory.name}.tmp-{os.getpid()}-{uuid.uuid4().hex[:8]}")
    tmp.mkdir()
    try:
        dtype = np.dtype(index["dtype"])
        splits = {}
        for split, stream in streams.items():
            writer = _ShardWriter(tmp, split, dtype, shard_tokens)
            for tokens in stream:
                writer.add(tokens)
            splits[split] = writer.close()
        (tmp / "index.json").write_text(json.dumps({**index, "splits": splits}, indent=1))
        try:
            os.rename(tmp, directory)
        except OSError:
            if not (directory / "index.json").is_file():
                raise
    finally:
        shutil.rmtree(tmp, ignore_errors=True)


class TokenShards:
    """One split's tokens across memory-mapped shards, read by global position."""

    def __init__(self, arrays: list[np.ndarray], shard_tokens: int, total: int):
        self.arrays, self.shard_tokens, self.total = arrays, shard_tokens, total

    def __len__(self) -> int:
        return self.total

    def gather(self, positions: np.ndarray) -> np.ndarray:
        """int32 tokens at `positions` (any shape, values in `[0, len)`)."""
        shard, offset = np.divmod(positions, self.shard_tokens)
        out = np.empty(positions.shape, np.int32)
        for s in np.unique(shard):
            sel = shard == s
            out[sel] = self.arrays[int(s)][offset[sel]]
        return out

    def to_array(self) -> np.ndarray:
        if not self.arrays:
            return np.zeros((0,), np.int32)
        return np.concatenate([np.asarray(a) for a in self.arrays]).astype(np.int32)


def _mismatch(directory: Path, what: str) -> DataError:
    return DataError(
        f"task.cache_dir: the shard cache {directory} does not match its index ({what}); "
        f"delete {directory} and it is rebuilt"
    )


def open_shards(directory: Path, expected: dict) -> tuple[dict, dict[str, TokenShards]]:
    """The index and memory-mapped splits of a cache entry, checked against each other
    and against the `expected` index entries; a `DataError` naming `task.cache_dir`
    and the file on any mismatch."""
    index_file = directory / "index.json"
    try:
        index = json.loads(index_file.read_text())
        splits = index["splits"]
        dtype = np.dtype(index["dtype"])
        size = int(index["shard_tokens"])
    except (OSError, ValueError, KeyError, TypeError) as e:
        raise _mismatch(directory, f"{index_file} is unreadable: {e}") from None
    for key, value in expected.items():
        if index.get(key) != value:
            raise _mismatch(directory, f"{index_file} has {key}={index.get(key)!r}")
    out = {}
    for split, entry in splits.items():
        total, names = int(entry["tokens"]), list(entry["shards"])
        if len(names) != -(-total // size):
            raise _mismatch(directory, f"{len(names)} {split} shards for {total} tokens")
        arrays = []
        for i, name in enumerate(names):
            path = directory / name
            want = min(size, total - i * size)
            try:
                array = np.load(path, mmap_mode="r", allow_pickle=False)
            except (OSError, ValueError) as e:
                raise _mismatch(directory, f"{path} is unreadable: {e}") from None
            if array.dtype != dtype or array.shape != (want,):
                raise _mismatch(
                    directory,
                    f"{path} holds {array.dtype}{list(array.shape)}, the index says "
                    f"{dtype}[{want}]",
                )
            arrays.append(array)
        out[split] = TokenShards(arrays, size, total)
    return index, out
