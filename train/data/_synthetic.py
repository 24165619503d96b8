"""Synthetic token tasks: copying, selective copying, MQAR, induction heads.

Every example is a pure function of (config seed, split, example index), computed with
a counter-based hash, so splits are independent streams, any example can be
regenerated alone and a batch is generated in one vectorised pass.

A task whose length is a parameter takes `eval_lengths`: for each length `L` it has
two more splits, `val_len{L}` and `test_len{L}`, drawn from a copy of the config with
the length set to `L` (`at_length`) and a seed derived from `(seed, L)`.
"""

import abc
import dataclasses
import re
from typing import Any, ClassVar

import numpy as np

from ._base import Batch, SplitSizes, Task, _check_int, _check_name, _help, _require

_EVAL_LENGTHS_HELP = (
    "extra evaluation lengths: for each L, splits val_len{L} and test_len{L} (num_val "
    "and num_test examples) at {key} = L, drawn with a seed derived from (seed, L); "
    "evaluated at the end of training with the chosen checkpoint and reported per "
    "length in summary.json"
)


def _eval_lengths_field(key: str) -> Any:
    return _help(_EVAL_LENGTHS_HELP.replace("{key}", key), default=())


def _check_eval_lengths(config: Any) -> None:
    """`eval_lengths`: distinct positive integers, each a valid length of the task;
    stored as a tuple (so the config stays hashable)."""
    value = config.eval_lengths
    _require(
        isinstance(value, list | tuple),
        "eval_lengths",
        f"must be a list of positive integers, got {value!r}",
    )
    for i, length in enumerate(value):
        _require(
            isinstance(length, int | np.integer)
            and not isinstance(length, bool)
            and length >= 1,
            "eval_lengths",
            f"must be positive integers, got {length!r} at index {i}",
        )
    _require(
        len(set(value)) == len(value), "eval_lengths", f"has repeated lengths: {value}"
    )
    object.__setattr__(config, "eval_lengths", tuple(int(v) for v in value))
    for length in config.eval_lengths:
        try:
            at_length(config, length)
        except ValueError as e:
            raise ValueError(
                f"eval_lengths: length {length} is not a valid length of task "
                f"{config.name!r} ({e})"
            ) from None


def length_seed(seed: int, length: int) -> int:
    """The generator seed of the evaluation splits at `length`: a hash of `(seed,
    length)`, in [0, 2^63)."""
    key = _mix(_mix(np.asarray([seed], np.uint64)) ^ np.uint64(0x4C454E00 + length))
    return int(key[0] >> np.uint64(1))


def at_length(config: Any, length: int) -> Any:
    """A copy of a task config whose sequences have length `length` (the keys in
    `config.length_keys` set to it), with the seed `length_seed(seed, length)` and no
    `eval_lengths` of its own.

    **Raises:** `ValueError` when the task has no length or `length` does not fit it.
    """
    keys = getattr(type(config), "length_keys", None)
    if not keys:
        raise ValueError(f"task {config.name!r} has no length parameter")
    changes = dict.fromkeys(keys, length)
    return dataclasses.replace(
        config, **changes, seed=length_seed(config.seed, length), eval_lengths=()
    )


_LENGTH_SPLIT = re.compile(r"^(val|test)_len(\d+)$")


def length_split(split: str) -> tuple[str, int] | None:
    """`("val", 512)` for `"val_len512"`, `("test", L)` for `"test_len{L}"`, else None."""
    m = _LENGTH_SPLIT.match(split)
    return None if m is None else (m[1], int(m[2]))


@dataclasses.dataclass(frozen=True)
class CopyingConfig(SplitSizes):
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
    eval_lengths: tuple[int, ...] = _eval_lengths_field("lag")
    length_keys: ClassVar[tuple[str, ...]] = ("lag",)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "vocab_size", 3)
        _check_int(self, "num_tokens", 1)
        _check_int(self, "lag", 0)
        _check_int(self, "seed", 0, 2**63 - 1)
        super().__post_init__()
        _check_eval_lengths(self)


@dataclasses.dataclass(frozen=True)
class SelectiveCopyingConfig(SplitSizes):
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
    eval_lengths: tuple[int, ...] = _eval_lengths_field("context_len")
    length_keys: ClassVar[tuple[str, ...]] = ("context_len",)

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
        _check_int(self, "seed", 0, 2**63 - 1)
        super().__post_init__()
        _check_eval_lengths(self)


@dataclasses.dataclass(frozen=True)
class MQARConfig(SplitSizes):
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
    eval_lengths: tuple[int, ...] = _eval_lengths_field("seq_len")
    length_keys: ClassVar[tuple[str, ...]] = ("seq_len",)
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
        _check_int(self, "seed", 0, 2**63 - 1)
        super().__post_init__()
        _check_eval_lengths(self)


@dataclasses.dataclass(frozen=True)
class InductionHeadsConfig(SplitSizes):
    """Induction heads (Olsson et al. 2022; H3, Mamba): recall the token after a trigger."""

    name: str = _help("task name", default="induction_heads")
    vocab_size: int = _help(
        "vocabulary including the trigger token vocab_size - 1 (context tokens are "
        "0 .. vocab_size - 2; the Mamba paper uses 16)",
        default=16,
    )
    seq_len: int = _help("sequence length (the Mamba paper trains at 256)", default=256)
    seed: int = _help("seed of the example generator", default=0)
    eval_lengths: tuple[int, ...] = _eval_lengths_field("seq_len")
    length_keys: ClassVar[tuple[str, ...]] = ("seq_len",)

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "vocab_size", 3)
        _check_int(self, "seq_len", 3)
        _check_int(self, "seed", 0, 2**63 - 1)
        super().__post_init__()
        _check_eval_lengths(self)


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
    """A generated token task with per-step targets under a mask.

    With `config.eval_lengths`, the splits `val_len{L}` and `test_len{L}` are the
    `val` and `test` splits of the same task built from `at_length(config, L)`.
    """

    kind = "sequence"
    d_input = None

    def __init__(self, config: Any):
        self.config = config
        self.vocab_size = self.n_outputs = getattr(config, "vocab_size", None)
        lengths = getattr(config, "eval_lengths", ())
        self.at_length = {n: type(self)(at_length(config, n)) for n in lengths}
        extra = [f"{split}_len{n}" for n in lengths for split in ("val", "test")]
        self.splits = ("train", "val", "test", *extra)

    def size(self, split: str) -> int:
        at = length_split(self._check_split(split))
        if at is not None:
            return self.at_length[at[1]].size(at[0])
        return self.config.split_size(split)

    def split_seq_len(self, split: str) -> int:
        at = length_split(self._check_split(split))
        return self.seq_len if at is None else self.at_length[at[1]].seq_len

    def examples(self, split: str, idx: np.ndarray) -> Batch:
        at = length_split(self._check_split(split))
        if at is not None:
            return self.at_length[at[1]].examples(at[0], idx)
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
