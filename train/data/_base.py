"""The task interface and the config-checking helpers every task uses."""

import abc
import dataclasses
from typing import Any, Literal

import numpy as np

from ..errors import DataError as DataError

Batch = dict[str, np.ndarray]
Kind = Literal["classification", "sequence", "lm"]


def _help(text: str, **kwargs: Any) -> Any:
    return dataclasses.field(metadata={"help": text}, **kwargs)


def _require(condition: bool, key: str, message: str) -> None:
    if not condition:
        raise ValueError(f"{key}: {message}")


def _check_name(config: Any) -> None:
    expected = type(config).__dataclass_fields__["name"].default
    _require(
        config.name == expected,
        "name",
        f"must be {expected!r} for {type(config).__name__}, got {config.name!r}",
    )


def _check_int(config: Any, key: str, low: int, high: int | None = None) -> None:
    value = getattr(config, key)
    _require(
        isinstance(value, int | np.integer) and not isinstance(value, bool),
        key,
        f"must be an integer, got {value!r}",
    )
    _require(value >= low, key, f"must be >= {low}, got {value}")
    if high is not None:
        _require(value <= high, key, f"must be <= {high}, got {value}")


@dataclasses.dataclass(frozen=True)
class SplitSizes:
    """The number of examples in each split: the task keys `num_train`, `num_val` and
    `num_test`, shared by every generated task's config (which subclasses this one; a
    task may redeclare a field to change its default or meaning).

    **Arguments:**

    - `num_train`, `num_val`, `num_test`: the sizes of the splits, each >= 1.
    """

    num_train: int = _help("training examples", default=100_000)
    num_val: int = _help("validation examples", default=1_000)
    num_test: int = _help("test examples", default=1_000)

    def __post_init__(self):
        for split in ("train", "val", "test"):
            _check_int(self, f"num_{split}", 1)

    def split_size(self, split: str) -> int:
        """The number of examples of `split` (`"train"`, `"val"` or `"test"`)."""
        return getattr(self, f"num_{split}")


class Task(abc.ABC):
    """A dataset with fixed splits, addressable by example index.

    **Attributes:**

    - `config`: the frozen config it was built from.
    - `kind`: `"classification"` (one label per sequence; the model pools),
        `"sequence"` (per-step targets under a mask) or `"lm"` (next-token targets at
        every step).
    - `vocab_size`: the input vocabulary for integer-token inputs, else `None`.
    - `d_input`: the width of real-valued inputs, else `None`.
    - `n_outputs`: the number of classes, or the output vocabulary.
    - `seq_len`: the length of every input sequence.
    - `splits`: the split names, `("train", "val", "test")` or `("train", "val")`;
        a synthetic task with `eval_lengths` adds `val_len{L}` and `test_len{L}` for
        each length `L`, whose sequences have `split_seq_len(split)` steps.

    `examples(split, idx)` returns a dict of numpy arrays for the examples `idx`:

    - `"inputs"`: `(B, seq_len)` int32 tokens or `(B, seq_len, d_input)` float32.
    - `"targets"`: `(B,)` int32 labels for classification, else `(B, seq_len)` int32.
    - `"mask"` (sequence and lm tasks): `(B, seq_len)` float32, 1 where the loss
        counts.
    - `"resets"` (lm tasks): `(B, seq_len)` bool, true at the first token of each
        packed document.
    - `"bytes"` (lm tasks): `(B, seq_len)` float32, the bytes of text each target
        stands for (the denominator of bits per byte).
    """

    config: Any
    kind: Kind
    vocab_size: int | None
    d_input: int | None
    n_outputs: int
    seq_len: int
    splits: tuple[str, ...]

    @abc.abstractmethod
    def size(self, split: str) -> int:
        """The number of examples in `split`."""

    @abc.abstractmethod
    def examples(self, split: str, idx: np.ndarray) -> Batch:
        """The examples at indices `idx` (a 1-D integer array) of `split`."""

    def split_seq_len(self, split: str) -> int:
        """The length of the sequences of `split`: `seq_len` unless the split is one of
        the extra evaluation lengths."""
        self._check_split(split)
        return self.seq_len

    def augment(
        self, batch: Batch, rng: np.random.Generator, rows: slice, batch_size: int
    ) -> Batch:
        """Training-time augmentation of rows `rows` of a batch of `batch_size`; the
        identity unless a task has one. Draws are made for the whole batch and sliced,
        so a process that builds only its rows gets exactly what the whole batch would
        hold there."""
        del rng, rows, batch_size
        return batch

    def save(self, run_dir: Any) -> None:
        """Write what a run needs to rebuild this task into `run_dir` (the LM task's
        tokenizer); nothing unless a task has such state."""
        del run_dir

    def _check_split(self, split: str) -> str:
        if split not in self.splits:
            raise KeyError(f"unknown split {split!r}; this task has {self.splits}")
        return split

    def _indices(self, split: str, idx: Any) -> np.ndarray:
        self._check_split(split)
        idx = np.asarray(idx)
        if idx.ndim != 1 or not (idx.size == 0 or np.issubdtype(idx.dtype, np.integer)):
            raise ValueError(f"idx must be a 1-D integer array, got {idx.dtype}{idx.shape}")
        n = self.size(split)
        if idx.size and (idx.min() < 0 or idx.max() >= n):
            raise IndexError(f"example indices must lie in [0, {n}) for split {split!r}")
        return idx.astype(np.int64)

    def __repr__(self) -> str:
        sizes = ", ".join(f"{s}={self.size(s)}" for s in self.splits)
        return f"{type(self).__name__}({self.config!r}, {sizes})"


def _read_only(x: np.ndarray) -> np.ndarray:
    x.setflags(write=False)
    return x
