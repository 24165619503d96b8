"""State-tracking tasks: parity and modular addition, trained short and tested long.

The formal-language setting of Deletang et al. ("Neural networks and the Chomsky
hierarchy", ICLR 2023), as the xLSTM paper (Beck et al. 2024, Sec. 4.1) and Grazzi et
al. ("Unlocking state-tracking in linear RNNs through negative eigenvalues", ICLR 2025,
Sec. 5.1) use it: train on sequences of lengths drawn uniformly from
`[min_len, max_len]` (3 to 40 in those papers), evaluate on longer ones
(`eval_lengths`; the papers test 40 to 256). Parity is the running sum of bits mod 2, a
task a linear RNN whose transition eigenvalues lie in `[0, 1]` cannot solve at
arbitrary length (Grazzi et al., Theorem 1) and one with eigenvalues in `[-1, 1]` can.

Sequences shorter than `max_len` are padded with the token `modulus` (one past the
digits) and carry no loss there. With `supervision: final` (the default, as in those
papers) only the last real token is labelled, with the sum of the whole sequence, so the
reported accuracy is the fraction of sequences whose result is right; `running` labels
every real token with the sum so far (denser supervision, per-token accuracy).
"""

import dataclasses
from typing import ClassVar, Literal

import numpy as np

from ._base import SplitSizes, _check_int, _check_name, _help, _require
from ._synthetic import _AbstractSyntheticTask, _check_eval_lengths, _eval_lengths_field

_SUPERVISION_HELP = (
    "final: label only the last token of each sequence with the sum of all of it (the "
    "accuracy is over sequences, as in Deletang et al. 2023 and Grazzi et al. 2025); "
    "running: label every token with the sum so far (per-token accuracy)"
)


@dataclasses.dataclass(frozen=True)
class _RunningSumConfig(SplitSizes):
    """The keys shared by parity and modular addition."""

    min_len: int = _help(
        "shortest training sequence (lengths are uniform in [min_len, max_len])",
        default=3,
    )
    max_len: int = _help(
        "longest training sequence, the padded length of the training, val and test "
        "splits (seq_len)",
        default=40,
    )
    supervision: Literal["final", "running"] = _help(_SUPERVISION_HELP, default="final")
    seed: int = _help("seed of the example generator", default=0)
    eval_lengths: tuple[int, ...] = _eval_lengths_field("min_len = max_len")
    length_keys: ClassVar[tuple[str, ...]] = ("min_len", "max_len")

    def __post_init__(self):
        _check_name(self)
        _check_int(self, "modulus", 2, 2**16)
        _check_int(self, "min_len", 1)
        _check_int(self, "max_len", 1, 2**20)
        _require(
            self.max_len >= self.min_len,
            "max_len",
            f"must be >= min_len ({self.min_len}), got {self.max_len}",
        )
        _require(
            self.supervision in ("final", "running"),
            "supervision",
            f"must be 'final' or 'running', got {self.supervision!r}",
        )
        _check_int(self, "seed", 0, 2**63 - 1)
        super().__post_init__()
        _check_eval_lengths(self)


@dataclasses.dataclass(frozen=True)
class ParityConfig(_RunningSumConfig):
    """Parity (Deletang et al. 2023; Grazzi et al. 2025): the running sum of bits mod 2."""

    name: str = _help("task name", default="parity")
    modulus: int = _help("the modulus; 2 for parity (input bits 0 and 1)", default=2)

    def __post_init__(self):
        _require(self.modulus == 2, "modulus", f"must be 2 for parity, got {self.modulus}")
        super().__post_init__()


@dataclasses.dataclass(frozen=True)
class ModularAdditionConfig(_RunningSumConfig):
    """Modular addition: tokens in Z_m, labels their running sum mod m."""

    name: str = _help("task name", default="modular_addition")
    modulus: int = _help(
        "m: input tokens are 0 .. m - 1 and labels their sum mod m (Deletang et al. use 5)",
        default=5,
    )


class RunningSumTask(_AbstractSyntheticTask):
    """Parity and modular addition: `x_1 .. x_n` in `Z_m`, padded to `max_len` with the
    token `m`; the target at step `t` is `(x_1 + .. + x_t) mod m`, counted at the last
    real step (`supervision: final`) or at every real step (`running`).

    Inputs are tokens `0 .. m` (vocab_size `m + 1`), outputs classes `0 .. m - 1`.
    """

    def __init__(self, config: _RunningSumConfig):
        super().__init__(config)
        self.vocab_size = config.modulus + 1
        self.n_outputs = config.modulus
        self.seq_len = config.max_len

    def _generate(self, draws):
        c = self.config
        m, t = c.modulus, c.max_len
        length = draws.integers(0, 1, c.min_len, c.max_len + 1)  # (B, 1)
        digits = draws.integers(1, t, 0, m)
        real = np.arange(t)[None, :] < length
        inputs = np.where(real, digits, m)
        sums = np.where(real, np.cumsum(np.where(real, digits, 0), axis=1) % m, 0)
        if c.supervision == "running":
            mask = real.astype(np.float32)
        else:
            mask = (np.arange(t)[None, :] == length - 1).astype(np.float32)
        return inputs, sums, mask
