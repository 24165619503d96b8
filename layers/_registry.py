"""`MIXERS`: the registry of sequence mixers by the names configs use."""

from __future__ import annotations

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
