"""Datasets and batching for training: MNIST-1D, synthetic recall tasks, byte-level LM.

A task is chosen by a frozen config dataclass (one per task, registered in `TASKS`
under the name that configs use) and built with `build_task(config)` into a
[`Task`][]: the shapes a model needs (`kind`, `vocab_size`, `d_input`, `n_outputs`,
`seq_len`), the split names and sizes, and `examples(split, idx)`, which returns numpy
arrays for any set of example indices. Batches are numpy; the trainer puts them on
devices.

**Tasks:**

- `"mnist1d"`: MNIST-1D (Greydanus & Kobak, "Scaling down deep learning with
  MNIST-1D", ICML 2024). Ten 1-D digit templates, padded, scaled, translated,
  sheared and noised into length-40 real-valued sequences; classify the digit.
  Generated locally by the `mnist1d` package (never downloaded): by default 5000
  examples, the first 4000 the generator's training portion (of which the last
  `num_val` become the validation split) and the last 1000 the test split.
- `"copying"`: the copy-memory task (Hochreiter & Schmidhuber 1997; Arjovsky, Shah
  and Bengio, "Unitary evolution recurrent neural networks", ICML 2016). `num_tokens`
  data tokens, then `lag` noise tokens, then `num_tokens` marker tokens; at the
  markers the model outputs the data tokens in order.
- `"selective_copying"`: selective copying (Gu & Dao, "Mamba: linear-time sequence
  modeling with selective state spaces", 2023, Sec. 3.1). As copying, but the data
  tokens sit at random positions among noise tokens in a context of `context_len`
  positions, so the spacing must be filtered out by content.
- `"mqar"`: multi-query associative recall (Arora et al., "Zoology: measuring and
  improving recall in efficient language models", 2023). `num_kv_pairs` key-value
  pairs, then the keys again, one at a time, at power-law distributed positions
  among random tokens; at each query the target is the value bound to that key.
- `"induction_heads"`: induction heads (Olsson et al., "In-context learning and
  induction heads", 2022; the synthetic task of Fu et al., H3, 2023, and of the Mamba
  paper, Sec. 4.1). Random tokens with a trigger token somewhere followed by an
  answer token; the sequence ends with the trigger again and the target is the answer.
- `"lm_bytes"`: byte-level language modelling over local text files (vocabulary 256):
  the concatenated bytes, the last `val_fraction` held out for validation, cut into
  windows of `seq_len` inputs with next-byte targets.

For the synthetic tasks every example is a pure function of (config seed, split,
example index), computed with a counter-based hash, so splits are independent streams,
any example can be regenerated alone and a batch is generated in one vectorised pass.

**Batching:** `train_batch(task, seed, step, batch_size)` is a pure function of
`(seed, step)`: example `step * batch_size + i` of an endless stream in which each
epoch is a fresh permutation of the training split drawn from `(seed, epoch)`; so a
resumed run needs only the step. `eval_batches(task, split, batch_size)` walks a split
in order in batches of one shape, the last one padded, with a per-example `"weight"`
(0 for padding).
"""

import abc
import dataclasses
import functools
import glob
import os
import random
from collections.abc import Iterator
from typing import Any, Literal

import numpy as np

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


def _check_splits(config: Any) -> None:
    _check_int(config, "seed", 0, 2**63 - 1)
    _check_int(config, "num_train", 1)
    _check_int(config, "num_val", 1)
    _check_int(config, "num_test", 1)


# --------------------------------------------------------------------------- configs


@dataclasses.dataclass(frozen=True)
class MNIST1DConfig:
    """MNIST-1D classification (Greydanus & Kobak 2024), generated locally."""

    name: str = _help("task name", default="mnist1d")
    num_train: int = _help(
        "size of the generator's training portion; the last num_val of it become the "
        "validation split",
        default=4000,
    )
    num_val: int = _help("validation examples carved from the end of train", default=500)
    num_test: int = _help(
        "test examples (num_train + num_test must be a multiple of 10)", default=1000
    )
    seed: int = _help("seed of the mnist1d dataset generator", default=42)
    seq_len: int = _help("sequence length (the generator's final_seq_length)", default=40)
    shuffle_seq: bool = _help(
        "permute the time axis with one fixed permutation (the generator's shuffle_seq)",
        default=False,
    )
    train_shift: int = _help(
        "augmentation: circularly shift each training sequence by a random offset in "
        "[-train_shift, train_shift] (training batches only; 0 disables)",
        default=0,
    )
    train_noise: float = _help(
        "augmentation: standard deviation of Gaussian noise added to training inputs "
        "(training batches only; 0 disables)",
        default=0.0,
    )
    train_scale: float = _help(
        "augmentation: multiply each training sequence by 1 + a, a ~ U(-train_scale, "
        "train_scale) (training batches only; 0 disables)",
        default=0.0,
    )
    train_shear: float = _help(
        "augmentation: add c * t to each training sequence, c ~ U(-train_shear, "
        "train_shear), t = linspace(-0.5, 0.5, seq_len): a random linear ramp "
        "(training batches only; 0 disables)",
        default=0.0,
    )

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "num_train", 2)
        _check_int(self, "num_test", 1)
        total = self.num_train + self.num_test
        _require(
            total % 10 == 0,
            "num_test",
            "num_train + num_test must be a multiple of 10 (the generator makes equally "
            f"many of each digit), got {self.num_train} + {self.num_test} = {total}",
        )
        _check_int(self, "num_val", 1)
        _require(
            self.num_val < self.num_train,
            "num_val",
            f"must be < num_train ({self.num_train}), got {self.num_val}",
        )
        _check_int(self, "seed", 0, 2**32 - 1)
        _check_int(self, "seq_len", 1)
        _check_int(self, "train_shift", 0)
        _require(
            self.train_shift < self.seq_len,
            "train_shift",
            f"must be < seq_len ({self.seq_len}), got {self.train_shift}",
        )
        _require(
            float(self.train_noise) >= 0.0,
            "train_noise",
            f"must be >= 0, got {self.train_noise}",
        )
        for key in ("train_scale", "train_shear"):
            value = getattr(self, key)
            _require(
                isinstance(value, int | float)
                and not isinstance(value, bool)
                and value >= 0,
                key,
                f"must be a number >= 0, got {value!r}",
            )


@dataclasses.dataclass(frozen=True)
class CopyingConfig:
    """Copy memory (Arjovsky et al. 2016): data, `lag` noise tokens, then the copy."""

    name: str = _help("task name", default="copying")
    vocab_size: int = _help(
        "vocabulary including the noise token 0 and the marker vocab_size - 1 (data "
        "tokens are 1 .. vocab_size - 2)",
        default=10,
    )
    num_tokens: int = _help("data tokens to copy", default=10)
    lag: int = _help(
        "noise tokens between the data and the markers (seq_len = 2 num_tokens + lag)",
        default=100,
    )
    seed: int = _help("seed of the example generator", default=0)
    num_train: int = _help("training examples", default=100_000)
    num_val: int = _help("validation examples", default=1_000)
    num_test: int = _help("test examples", default=1_000)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "vocab_size", 3)
        _check_int(self, "num_tokens", 1)
        _check_int(self, "lag", 0)
        _check_splits(self)


@dataclasses.dataclass(frozen=True)
class SelectiveCopyingConfig:
    """Selective copying (Gu & Dao 2023): data tokens at random positions among noise."""

    name: str = _help("task name", default="selective_copying")
    vocab_size: int = _help(
        "vocabulary including the noise token 0 and the marker vocab_size - 1 (data "
        "tokens are 1 .. vocab_size - 2; the Mamba paper uses 16)",
        default=16,
    )
    num_tokens: int = _help("data tokens to copy (the Mamba paper uses 16)", default=16)
    context_len: int = _help(
        "positions among which the data tokens are scattered (seq_len = context_len + "
        "num_tokens; the Mamba paper uses 4096)",
        default=256,
    )
    seed: int = _help("seed of the example generator", default=0)
    num_train: int = _help("training examples", default=100_000)
    num_val: int = _help("validation examples", default=1_000)
    num_test: int = _help("test examples", default=1_000)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "vocab_size", 3)
        _check_int(self, "num_tokens", 1)
        _check_int(self, "context_len", 1)
        _require(
            self.context_len >= self.num_tokens,
            "context_len",
            f"must be >= num_tokens ({self.num_tokens}), got {self.context_len}",
        )
        _check_splits(self)


@dataclasses.dataclass(frozen=True)
class MQARConfig:
    """Multi-query associative recall (Arora et al. 2023, Zoology)."""

    name: str = _help("task name", default="mqar")
    vocab_size: int = _help(
        "vocabulary: keys are 1 .. vocab_size // 2 - 1, values vocab_size // 2 .. "
        "vocab_size - 1, fillers anything",
        default=8192,
    )
    seq_len: int = _help("sequence length (>= 4 num_kv_pairs)", default=256)
    num_kv_pairs: int = _help("key-value pairs, each queried once", default=16)
    power_a: float = _help(
        "power-law exponent of the query positions: the gap i (in pairs of tokens) "
        "after the key-value context has probability proportional to i^(power_a - 1)",
        default=0.01,
    )
    random_non_queries: bool = _help(
        "fill non-query positions with random tokens (else with token 0)", default=True
    )
    seed: int = _help("seed of the example generator", default=0)
    num_train: int = _help("training examples", default=100_000)
    num_val: int = _help("validation examples", default=3_000)
    num_test: int = _help("test examples", default=3_000)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "num_kv_pairs", 1)
        _check_int(self, "vocab_size", 4)
        _require(
            self.vocab_size // 2 - 1 >= self.num_kv_pairs,
            "vocab_size",
            f"must give at least num_kv_pairs ({self.num_kv_pairs}) distinct keys, i.e. "
            f"vocab_size // 2 - 1 >= {self.num_kv_pairs}, got {self.vocab_size}",
        )
        _check_int(self, "seq_len", 1)
        _require(
            self.seq_len >= 4 * self.num_kv_pairs,
            "seq_len",
            f"must be >= 4 * num_kv_pairs ({4 * self.num_kv_pairs}), got {self.seq_len}",
        )
        _require(float(self.power_a) > 0.0, "power_a", f"must be > 0, got {self.power_a}")
        _check_splits(self)


@dataclasses.dataclass(frozen=True)
class InductionHeadsConfig:
    """Induction heads (Olsson et al. 2022; H3, Mamba): recall the token after a trigger."""

    name: str = _help("task name", default="induction_heads")
    vocab_size: int = _help(
        "vocabulary including the trigger token vocab_size - 1 (context tokens are "
        "0 .. vocab_size - 2; the Mamba paper uses 16)",
        default=16,
    )
    seq_len: int = _help("sequence length (the Mamba paper trains at 256)", default=256)
    seed: int = _help("seed of the example generator", default=0)
    num_train: int = _help("training examples", default=100_000)
    num_val: int = _help("validation examples", default=1_000)
    num_test: int = _help("test examples", default=1_000)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "vocab_size", 3)
        _check_int(self, "seq_len", 3)
        _check_splits(self)


@dataclasses.dataclass(frozen=True)
class BytesLMConfig:
    """Byte-level language modelling over local text files."""

    name: str = _help("task name", default="lm_bytes")
    paths: tuple[str, ...] = _help(
        "files or glob patterns (** recurses; hidden directories are skipped), relative "
        "to the current directory; matches are sorted, deduplicated and concatenated",
        default=("README.md", "**/*.py"),
    )
    seq_len: int = _help("window length in bytes", default=256)
    val_fraction: float = _help(
        "fraction of the concatenated bytes, from the end, held out for validation",
        default=0.1,
    )
    train_stride: int = _help(
        "offset between consecutive training windows (0 means seq_len: disjoint "
        "windows); validation windows are always disjoint",
        default=0,
    )

    def __post_init__(self):
        _check_name(self)
        paths = self.paths
        if isinstance(paths, str):
            paths = (paths,)
        _require(
            isinstance(paths, list | tuple) and all(isinstance(p, str) for p in paths),
            "paths",
            f"must be a list of strings, got {self.paths!r}",
        )
        _require(len(paths) > 0, "paths", "must name at least one file or pattern")
        object.__setattr__(self, "paths", tuple(paths))
        _check_int(self, "seq_len", 1)
        _require(
            0.0 < float(self.val_fraction) < 1.0,
            "val_fraction",
            f"must be in (0, 1), got {self.val_fraction}",
        )
        _check_int(self, "train_stride", 0)


TaskConfig = (
    MNIST1DConfig
    | CopyingConfig
    | SelectiveCopyingConfig
    | MQARConfig
    | InductionHeadsConfig
    | BytesLMConfig
)

TASKS: dict[str, type] = {
    "mnist1d": MNIST1DConfig,
    "copying": CopyingConfig,
    "selective_copying": SelectiveCopyingConfig,
    "mqar": MQARConfig,
    "induction_heads": InductionHeadsConfig,
    "lm_bytes": BytesLMConfig,
}


# ----------------------------------------------------------------------------- tasks


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
    - `splits`: the split names, `("train", "val", "test")` or `("train", "val")`.

    `examples(split, idx)` returns a dict of numpy arrays for the examples `idx`:

    - `"inputs"`: `(B, seq_len)` int32 tokens or `(B, seq_len, d_input)` float32.
    - `"targets"`: `(B,)` int32 labels for classification, else `(B, seq_len)` int32.
    - `"mask"` (sequence and lm tasks): `(B, seq_len)` float32, 1 where the loss
        counts.
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

    def augment(
        self, batch: Batch, rng: np.random.Generator, rows: slice, batch_size: int
    ) -> Batch:
        """Training-time augmentation of rows `rows` of a batch of `batch_size`; the
        identity unless a task has one. Draws are made for the whole batch and sliced,
        so a process that builds only its rows gets exactly what the whole batch would
        hold there."""
        del rng, rows, batch_size
        return batch

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


# MNIST-1D -------------------------------------------------------------------------


@functools.lru_cache(maxsize=8)
def _mnist1d_arrays(
    num_samples: int, seed: int, seq_len: int, shuffle_seq: bool
) -> tuple[np.ndarray, np.ndarray]:
    """All `num_samples` generated MNIST-1D examples, in the generator's order."""
    from mnist1d.data import get_dataset_args, make_dataset

    args = get_dataset_args()
    args.num_samples = num_samples
    args.seed = seed
    args.final_seq_length = seq_len
    args.shuffle_seq = shuffle_seq
    # make_dataset seeds Python's and NumPy's global generators: put them back after.
    py_state, np_state = random.getstate(), np.random.get_state()
    try:
        data = make_dataset(args)
    finally:
        random.setstate(py_state)
        np.random.set_state(np_state)
    x = np.concatenate([data["x"], data["x_test"]]).astype(np.float32)[..., None]
    y = np.concatenate([data["y"], data["y_test"]]).astype(np.int32)
    return _read_only(x), _read_only(y)


class MNIST1DTask(Task):
    """MNIST-1D classification: `(B, seq_len, 1)` float inputs, 10 classes.

    The generator's examples `[0, num_train - num_val)` are the training split,
    `[num_train - num_val, num_train)` validation and `[num_train, num_train +
    num_test)` test. Generated arrays are cached in memory per generator settings.
    """

    kind = "classification"
    vocab_size = None
    d_input = 1
    n_outputs = 10
    splits = ("train", "val", "test")

    def __init__(self, config: MNIST1DConfig):
        self.config = config
        self.seq_len = config.seq_len
        self._x, self._y = _mnist1d_arrays(
            config.num_train + config.num_test, config.seed, config.seq_len,
            bool(config.shuffle_seq),
        )  # fmt: skip
        n_train = config.num_train - config.num_val
        self._offset = {"train": 0, "val": n_train, "test": config.num_train}
        self._size = {"train": n_train, "val": config.num_val, "test": config.num_test}

    def size(self, split: str) -> int:
        return self._size[self._check_split(split)]

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        idx = self._indices(split, idx) + self._offset[split]
        return {"inputs": self._x[idx], "targets": self._y[idx]}

    def augment(
        self, batch: Batch, rng: np.random.Generator, rows: slice, batch_size: int
    ) -> Batch:
        """Random circular time shifts, Gaussian noise, scaling and linear ramps (in
        that order), as the config asks."""
        x = batch["inputs"]
        full = batch_size  # draws for the whole batch, then this share's rows
        shift, noise = self.config.train_shift, float(self.config.train_noise)
        if shift > 0:
            offsets = rng.integers(-shift, shift + 1, size=full)[rows]
            time = (np.arange(x.shape[1])[None, :] - offsets[:, None]) % x.shape[1]
            x = np.take_along_axis(x, time[:, :, None], axis=1)
        if noise > 0.0:
            shape = (full,) + x.shape[1:]
            x = x + np.float32(noise) * rng.standard_normal(shape, dtype=np.float32)[rows]
        scale, shear = float(self.config.train_scale), float(self.config.train_shear)
        if scale > 0.0:
            a = rng.uniform(-scale, scale, size=full)[rows].astype(np.float32)
            x = x * (1 + a)[:, None, None]
        if shear > 0.0:
            c = rng.uniform(-shear, shear, size=full)[rows].astype(np.float32)
            t = np.linspace(-0.5, 0.5, x.shape[1], dtype=np.float32)
            x = x + c[:, None, None] * t[None, :, None]
        return {**batch, "inputs": x.astype(np.float32)}


# Synthetic tasks ------------------------------------------------------------------

_SPLIT_ID = {"train": 1, "val": 2, "test": 3}
_M1 = np.uint64(0xBF58476D1CE4E5B9)
_M2 = np.uint64(0x94D049BB133111EB)
_GOLDEN = np.uint64(0x9E3779B97F4A7C15)


def _mix(x: np.ndarray) -> np.ndarray:
    """The splitmix64 finaliser: a bijective, well-mixing hash of uint64 arrays."""
    x = x + _GOLDEN
    x = (x ^ (x >> np.uint64(30))) * _M1
    x = (x ^ (x >> np.uint64(27))) * _M2
    return x ^ (x >> np.uint64(31))


class _Draws:
    """Counter-based random numbers, a pure function of (seed, split, example, draw).

    Each example has a 64-bit key hashed from `(seed, split, index)`; draw `j` of
    stream `(tag, attempt)` is a hash of the key and that counter. So any example is
    generated alone or in any batch with the same numbers.
    """

    def __init__(self, keys: np.ndarray):
        self.keys = keys

    @classmethod
    def for_examples(cls, seed: int, split: str, idx: np.ndarray) -> "_Draws":
        base = _mix(_mix(np.asarray([seed], np.uint64)) ^ np.uint64(_SPLIT_ID[split]))
        return cls(_mix(base ^ idx.astype(np.uint64)))

    def __getitem__(self, rows: np.ndarray) -> "_Draws":
        return _Draws(self.keys[rows])

    def bits(self, tag: int, n: int, attempt: int = 0) -> np.ndarray:
        """`(B, n)` uint64 random bits."""
        assert n < 2**24 and attempt < 2**16 and tag < 2**24
        counter = np.uint64((tag << 40) | (attempt << 24)) + np.arange(n, dtype=np.uint64)
        return _mix(self.keys[:, None] ^ _mix(counter)[None, :])

    def uniform(self, tag: int, n: int, attempt: int = 0) -> np.ndarray:
        """`(B, n)` float64 uniform on [0, 1)."""
        return (self.bits(tag, n, attempt) >> np.uint64(11)) * (1.0 / 2**53)

    def integers(self, tag: int, n: int, low: int, high: int, attempt: int = 0):
        """`(B, n)` int64 uniform on [low, high) (Lemire's multiply-shift)."""
        assert 0 < high - low < 2**32
        top = self.bits(tag, n, attempt) >> np.uint64(32)
        return low + ((top * np.uint64(high - low)) >> np.uint64(32)).astype(np.int64)

    def distinct(self, tag: int, k: int, n: int) -> np.ndarray:
        """`(B, k)` distinct integers of [0, n) in uniformly random order."""
        if k * k > 2 * n:  # dense: the k smallest of n random keys
            u = self.uniform(tag, n)
            top = np.argpartition(u, k - 1, axis=1)[:, :k] if k < n else np.argsort(u, 1)
            order = np.argsort(np.take_along_axis(u, top, axis=1), axis=1)
            return np.take_along_axis(top, order, axis=1)
        # sparse: draw with replacement, redraw the rows that repeat a value
        out = self.integers(tag, k, 0, n)
        rows = np.flatnonzero(_has_repeats(out))
        attempt = 1
        while rows.size:
            out[rows] = self[rows].integers(tag, k, 0, n, attempt)
            rows = rows[_has_repeats(out[rows])]
            attempt += 1
        return out


def _has_repeats(x: np.ndarray) -> np.ndarray:
    s = np.sort(x, axis=1)
    return (s[:, 1:] == s[:, :-1]).any(axis=1)


class _AbstractSyntheticTask(Task):
    """A generated token task with per-step targets under a mask."""

    kind = "sequence"
    d_input = None
    splits = ("train", "val", "test")

    def __init__(self, config: Any):
        self.config = config
        self.vocab_size = config.vocab_size
        self.n_outputs = config.vocab_size

    def size(self, split: str) -> int:
        return getattr(self.config, f"num_{self._check_split(split)}")

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        idx = self._indices(split, idx)
        inputs, targets, mask = self._generate(
            _Draws.for_examples(self.config.seed, split, idx)
        )
        return {
            "inputs": inputs.astype(np.int32),
            "targets": targets.astype(np.int32),
            "mask": mask.astype(np.float32),
        }

    @abc.abstractmethod
    def _generate(self, draws: _Draws) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """Inputs, targets and mask, each `(B, seq_len)`."""


def _copy_examples(tokens: np.ndarray, positions: np.ndarray, context_len: int, vocab: int):
    """Scatter `tokens` at `positions` of a noise context, then one marker per token."""
    b, k = tokens.shape
    inputs = np.zeros((b, context_len + k), np.int64)
    np.put_along_axis(inputs, positions, tokens, axis=1)
    inputs[:, context_len:] = vocab - 1
    targets = np.zeros_like(inputs)
    targets[:, context_len:] = tokens
    mask = np.zeros(inputs.shape, np.float32)
    mask[:, context_len:] = 1.0
    return inputs, targets, mask


class CopyingTask(_AbstractSyntheticTask):
    """Copying: `[x_1 .. x_k, 0 × lag, m × k]`, targets `x_1 .. x_k` at the markers `m`."""

    def __init__(self, config: CopyingConfig):
        super().__init__(config)
        self.seq_len = 2 * config.num_tokens + config.lag

    def _generate(self, draws):
        c = self.config
        tokens = draws.integers(0, c.num_tokens, 1, c.vocab_size - 1)
        positions = np.broadcast_to(np.arange(c.num_tokens), tokens.shape)
        return _copy_examples(tokens, positions, c.num_tokens + c.lag, c.vocab_size)


class SelectiveCopyingTask(_AbstractSyntheticTask):
    """Selective copying: data tokens at random sorted positions of a noise context."""

    def __init__(self, config: SelectiveCopyingConfig):
        super().__init__(config)
        self.seq_len = config.context_len + config.num_tokens

    def _generate(self, draws):
        c = self.config
        tokens = draws.integers(0, c.num_tokens, 1, c.vocab_size - 1)
        positions = np.sort(draws.distinct(1, c.num_tokens, c.context_len), axis=1)
        return _copy_examples(tokens, positions, c.context_len, c.vocab_size)


class MQARTask(_AbstractSyntheticTask):
    """Multi-query associative recall, following Zoology's `multiquery_ar` generator.

    `[k_1 v_1 .. k_n v_n | queries]`: distinct keys from `[1, V/2)`, distinct values
    from `[V/2, V)`; key `k_j` is queried at position `2n + 2 g_j`, the gaps `g_j`
    drawn without replacement with probability proportional to `(g + 1)^(a - 1)`;
    the target at the query is `v_j`. Other query-region positions are random tokens.
    """

    def __init__(self, config: MQARConfig):
        super().__init__(config)
        self.seq_len = config.seq_len

    def _generate(self, draws):
        c = self.config
        n, half = c.num_kv_pairs, c.vocab_size // 2
        b, t = draws.keys.shape[0], c.seq_len
        keys = 1 + draws.distinct(0, n, half - 1)
        values = half + draws.distinct(1, n, c.vocab_size - half)
        # Efraimidis-Spirakis: the n largest log(u) / p_i are a draw without
        # replacement proportional to p_i, in the order they would be drawn.
        space = (t - 2 * n) // 2
        p = np.arange(1, space + 1, dtype=np.float64) ** (float(c.power_a) - 1.0)
        score = np.log1p(-draws.uniform(2, space)) / (p / p.sum())
        top = np.argpartition(-score, n - 1, axis=1)[:, :n]
        order = np.argsort(-np.take_along_axis(score, top, axis=1), axis=1)
        gaps = np.take_along_axis(top, order, axis=1)
        if c.random_non_queries:
            inputs = draws.integers(3, t, 0, c.vocab_size)
        else:
            inputs = np.zeros((b, t), np.int64)
        inputs[:, 0 : 2 * n : 2] = keys
        inputs[:, 1 : 2 * n : 2] = values
        query = 2 * n + 2 * gaps
        np.put_along_axis(inputs, query, keys, axis=1)
        targets = np.zeros((b, t), np.int64)
        np.put_along_axis(targets, query, values, axis=1)
        mask = np.zeros((b, t), np.float32)
        np.put_along_axis(mask, query, 1.0, axis=1)
        return inputs, targets, mask


class InductionHeadsTask(_AbstractSyntheticTask):
    """Induction heads: `[.. s a .. s]` with trigger `s` occurring only twice; target `a`.

    Context tokens are uniform on `[0, V - 1)`; the trigger `s = V - 1` sits at a uniform
    position `p` in `[0, seq_len - 3]` and at the last position, whose target is the
    token at `p + 1`.
    """

    def __init__(self, config: InductionHeadsConfig):
        super().__init__(config)
        self.seq_len = config.seq_len

    def _generate(self, draws):
        c = self.config
        t, trigger = c.seq_len, c.vocab_size - 1
        inputs = draws.integers(0, t, 0, trigger)
        rows = np.arange(inputs.shape[0])
        p = draws.integers(1, 1, 0, t - 2)[:, 0]
        inputs[rows, p] = trigger
        inputs[:, -1] = trigger
        targets = np.zeros_like(inputs)
        targets[:, -1] = inputs[rows, p + 1]
        mask = np.zeros(inputs.shape, np.float32)
        mask[:, -1] = 1.0
        return inputs, targets, mask


# Byte-level LM --------------------------------------------------------------------


def _match_files(patterns: tuple[str, ...]) -> list[str]:
    files: set[str] = set()
    for pattern in patterns:
        files.update(p for p in glob.glob(pattern, recursive=True) if os.path.isfile(p))
    return sorted(files)


@functools.lru_cache(maxsize=8)
def _read_corpus(patterns: tuple[str, ...], cwd: str) -> tuple[np.ndarray, tuple[str, ...]]:
    del cwd  # part of the cache key: patterns are relative to it
    files = _match_files(patterns)
    if not files:
        raise ValueError(
            f"paths: {list(patterns)} match no files (relative to {os.getcwd()})"
        )
    chunks = []
    for path in files:
        with open(path, "rb") as f:
            chunks.append(f.read())
    data = np.frombuffer(b"".join(chunks), dtype=np.uint8)
    return _read_only(data), tuple(files)


def encode(text: str) -> np.ndarray:
    """The UTF-8 bytes of `text` as an int32 token array."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: Any) -> str:
    """The text of byte tokens (UTF-8, malformed bytes replaced by U+FFFD)."""
    data = np.asarray(tokens).reshape(-1)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError("byte tokens must lie in [0, 256)")
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BytesLMTask(Task):
    """Next-byte prediction over the concatenated bytes of local files.

    The last `val_fraction` of the bytes is the validation split. Example `i` of a
    split is the window starting at byte `i * stride` of it: inputs are `seq_len`
    bytes, targets the same bytes shifted by one (so a window reads `seq_len + 1`
    bytes, all inside its split).
    """

    kind = "lm"
    vocab_size = 256
    d_input = None
    n_outputs = 256
    splits = ("train", "val")

    def __init__(self, config: BytesLMConfig):
        self.config = config
        self.seq_len = config.seq_len
        data, self.files = _read_corpus(config.paths, os.getcwd())
        n_val = int(len(data) * config.val_fraction)
        self._data = {"train": data[: len(data) - n_val], "val": data[len(data) - n_val :]}
        train_stride = config.train_stride or config.seq_len
        self._stride = {"train": train_stride, "val": config.seq_len}
        for split, part in self._data.items():
            if len(part) < config.seq_len + 1:
                raise ValueError(
                    f"paths: the {split} split holds {len(part)} bytes of the "
                    f"{len(data)} matched by {list(config.paths)} "
                    f"(val_fraction={config.val_fraction}), fewer than one window "
                    f"(seq_len + 1 = {config.seq_len + 1})"
                )

    def size(self, split: str) -> int:
        part = self._data[self._check_split(split)]
        return (len(part) - self.seq_len - 1) // self._stride[split] + 1

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        idx = self._indices(split, idx)
        window = idx[:, None] * self._stride[split] + np.arange(self.seq_len + 1)
        tokens = self._data[split][window].astype(np.int32)
        return {
            "inputs": tokens[:, :-1],
            "targets": tokens[:, 1:],
            "mask": np.ones((len(idx), self.seq_len), np.float32),
        }

    @staticmethod
    def encode(text: str) -> np.ndarray:
        """The UTF-8 bytes of `text` as an int32 token array."""
        return encode(text)

    @staticmethod
    def decode(tokens: Any) -> str:
        """The text of byte tokens (UTF-8, malformed bytes replaced by U+FFFD)."""
        return decode(tokens)


# ------------------------------------------------------------------------- building

_BUILDERS: dict[type, type[Task]] = {
    MNIST1DConfig: MNIST1DTask,
    CopyingConfig: CopyingTask,
    SelectiveCopyingConfig: SelectiveCopyingTask,
    MQARConfig: MQARTask,
    InductionHeadsConfig: InductionHeadsTask,
    BytesLMConfig: BytesLMTask,
}


def build_task(config: TaskConfig) -> Task:
    """Build the task a config describes.

    **Arguments:**

    - `config`: one of the config classes in `TASKS`.

    **Returns:**

    A [`Task`][]. MNIST-1D arrays and byte corpora are cached in memory, so building
    the same config again is cheap.

    !!! example

        ```python
        task = build_task(MQARConfig(seq_len=128, num_kv_pairs=8))
        batch = train_batch(task, seed=0, step=0, batch_size=64)
        batch["inputs"].shape  # (64, 128)
        ```
    """
    try:
        builder = _BUILDERS[type(config)]
    except KeyError:
        raise TypeError(
            f"build_task takes one of {[c.__name__ for c in _BUILDERS]}, got "
            f"{type(config).__name__}"
        ) from None
    return builder(config)


# ------------------------------------------------------------------------- batching


@functools.lru_cache(maxsize=4)
def _epoch_permutation(seed: int, epoch: int, n: int) -> np.ndarray:
    rng = np.random.default_rng([seed, 0, epoch])
    return _read_only(rng.permutation(n))


def train_indices(num_examples: int, seed: int, step: int, batch_size: int) -> np.ndarray:
    """The training-split indices of batch `step`: a pure function of its arguments.

    Position `s = step * batch_size + i` of the stream is example
    `perm(seed, s // num_examples)[s % num_examples]`, with one permutation of
    `range(num_examples)` per epoch; a batch may span an epoch boundary.

    **Returns:**

    A `(batch_size,)` int64 array.
    """
    if num_examples < 1 or batch_size < 1 or step < 0 or seed < 0:
        raise ValueError(
            "need num_examples >= 1, batch_size >= 1, step >= 0 and seed >= 0, got "
            f"{num_examples}, {batch_size}, {step}, {seed}"
        )
    position = step * batch_size + np.arange(batch_size, dtype=np.int64)
    epoch, offset = np.divmod(position, num_examples)
    idx = np.empty(batch_size, np.int64)
    for e in np.unique(epoch):
        sel = epoch == e
        idx[sel] = _epoch_permutation(seed, int(e), num_examples)[offset[sel]]
    return idx


def train_batch(
    task: Task, seed: int, step: int, batch_size: int, rows: slice | None = None
) -> Batch:
    """Training batch number `step`, a pure function of `(seed, step)` for a task.

    **Arguments:**

    - `task`: the task.
    - `seed`: the data-order seed (separate from the task's generator seed).
    - `step`: the batch number, from 0.
    - `batch_size`: examples per batch (the global batch).
    - `rows`: only these rows of the batch (a process's share in a multi-process run);
      they equal the same rows of the whole batch.

    **Returns:**

    `task.examples("train", train_indices(...)[rows])` after the task's training
    augmentation (drawn from `(seed, step)`).
    """
    rows = slice(0, batch_size) if rows is None else rows
    if not 0 <= (rows.start or 0) <= rows.stop <= batch_size or rows.step not in (None, 1):
        raise ValueError(
            f"rows must be a contiguous slice of range({batch_size}), got {rows}"
        )
    rows = slice(rows.start or 0, rows.stop)
    idx = train_indices(task.size("train"), seed, step, batch_size)[rows]
    batch = task.examples("train", idx)
    return task.augment(batch, np.random.default_rng([seed, 1, step]), rows, batch_size)


def eval_batches(
    task: Task, split: str, batch_size: int, *, max_examples: int | None = None
) -> Iterator[Batch]:
    """Walk a split in order, in batches that all have `batch_size` rows.

    **Arguments:**

    - `task`: the task.
    - `split`: one of `task.splits`.
    - `batch_size`: rows per batch.
    - `max_examples`: evaluate only the first this many examples (all when `None`).

    **Returns:**

    An iterator of batches as `task.examples` gives them, plus `"weight"`: `(B,)`
    float32, 1 for real examples and 0 for the padding that fills the last batch
    (copies of the split's first example).
    """
    if batch_size < 1:
        raise ValueError(f"batch_size must be >= 1, got {batch_size}")
    n = task.size(split)
    if max_examples is not None:
        n = min(n, max_examples)
    for start in range(0, n, batch_size):
        count = min(batch_size, n - start)
        idx = np.zeros(batch_size, np.int64)
        idx[:count] = np.arange(start, start + count)
        weight = np.zeros(batch_size, np.float32)
        weight[:count] = 1.0
        yield {**task.examples(split, idx), "weight": weight}
