"""`MIXERS`: the registry of sequence mixers by the names configs use."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

from ._attention import Attention, LocalAttention
from ._deltanet import DeltaNet, GatedDeltaNet
from ._gla import GLA
from ._gru import GRU
from ._linear_attention import LinearAttention
from ._lru import LRU
from ._lstm import LSTM
from ._mamba import Mamba
from ._mamba2 import Mamba2
from ._mixer import AbstractMixer
from ._mlstm import MLSTM
from ._retnet import RetNet
from ._rglru import RGLRU
from ._s4d import S4D
from ._s5 import S5

MIXERS: dict[str, type[AbstractMixer]] = {
    "s4d": S4D,
    "s5": S5,
    "lru": LRU,
    "mamba": Mamba,
    "rglru": RGLRU,
    "gru": GRU,
    "lstm": LSTM,
    "linear_attention": LinearAttention,
    "retnet": RetNet,
    "gla": GLA,
    "mlstm": MLSTM,
    "mamba2": Mamba2,
    "deltanet": DeltaNet,
    "gated_deltanet": GatedDeltaNet,
    "attention": Attention,
    "local_attention": LocalAttention,
}
"""Sequence-mixer classes by registry name; `MIXERS[name](d_model, ..., key=key)`."""


def make_mixer(mixer, d_model: int, mixer_kwargs: dict | None, *, key) -> AbstractMixer:
    """Build a mixer from a registry name, a mixer class, or pass an instance through."""
    if isinstance(mixer, AbstractMixer):
        if mixer_kwargs:
            raise ValueError("`mixer_kwargs` only applies when `mixer` is a name or class.")
        if mixer.d_model != d_model:
            raise ValueError(f"mixer has d_model={mixer.d_model}, expected {d_model}.")
        return mixer
    if isinstance(mixer, str):
        if mixer not in MIXERS:
            raise ValueError(
                f"unknown mixer {mixer!r}; the registered ones are {sorted(MIXERS)}."
            )
        mixer = MIXERS[mixer]
    return mixer(d_model, **(mixer_kwargs or {}), key=key)


def _name(mixer) -> str:
    return mixer if isinstance(mixer, str) else getattr(mixer, "__name__", repr(mixer))


def mixer_pattern(
    mixer, mixer_kwargs: Mapping[Any, Any] | None, n_layers: int
) -> list[tuple[Any, dict[str, Any]]]:
    """The mixer and its keyword arguments for each of `n_layers` blocks.

    **Arguments:**

    - `mixer`: one mixer (a name in `MIXERS` or a class) for every block, or a list of
      them repeated (and cut) to `n_layers`, e.g. `["rglru", "rglru",
      "local_attention"]` for Griffin.
    - `mixer_kwargs`: for one mixer, its constructor's keyword arguments; for a list,
      a mapping from the list's entries (names or classes) to their keyword
      arguments, e.g. `{"local_attention": {"window": 64}}`.
    - `n_layers`: the number of blocks.

    **Returns:** a list of `(mixer, kwargs)` of length `n_layers`.
    """
    if isinstance(mixer, str | type) or not isinstance(mixer, Sequence):
        return [(mixer, dict(mixer_kwargs or {}))] * n_layers
    pattern = list(mixer)
    if not pattern:
        raise ValueError("`mixer`: an empty list; give at least one mixer.")
    for i, entry in enumerate(pattern):
        if isinstance(entry, str):
            if entry not in MIXERS:
                raise ValueError(
                    f"mixer[{i}]: unknown mixer {entry!r}; the registered ones are "
                    f"{sorted(MIXERS)}."
                )
        elif not (isinstance(entry, type) and issubclass(entry, AbstractMixer)):
            raise ValueError(
                f"mixer[{i}]: expected a name in MIXERS or a mixer class, got {entry!r}."
            )
    kwargs = dict(mixer_kwargs or {})
    for kind, options in kwargs.items():
        if kind not in pattern:
            raise ValueError(
                f"mixer_kwargs.{_name(kind)}: no such mixer in the pattern "
                f"{[_name(m) for m in pattern]}; with a list of mixers, mixer_kwargs "
                "maps a mixer's name to its keyword arguments."
            )
        if options is not None and not isinstance(options, Mapping):
            raise ValueError(
                f"mixer_kwargs.{_name(kind)}: expected a mapping of keyword arguments, "
                f"got {options!r}."
            )
    return [
        (pattern[i % len(pattern)], dict(kwargs.get(pattern[i % len(pattern)]) or {}))
        for i in range(n_layers)
    ]
