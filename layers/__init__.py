"""Equinox sequence-mixer layers built on the ``ssm`` scan core."""

from ._block import Block as Block, GatedMLP as GatedMLP
from ._deltanet import DeltaNet as DeltaNet, GatedDeltaNet as GatedDeltaNet
from ._gru import GRU as GRU
from ._labels import ssm_param_labels as ssm_param_labels, ssm_param_mask as ssm_param_mask
from ._lru import LRU as LRU
from ._lstm import LSTM as LSTM
from ._mamba import Mamba as Mamba
from ._mixer import AbstractMixer as AbstractMixer, ConvState as ConvState
from ._model import SequenceModel as SequenceModel
from ._registry import MIXERS as MIXERS
from ._rglru import RGLRU as RGLRU
from ._s4d import S4D as S4D
from ._s5 import S5 as S5

__all__ = [
    "MIXERS",
    "GRU",
    "LRU",
    "LSTM",
    "RGLRU",
    "S4D",
    "S5",
    "AbstractMixer",
    "Block",
    "ConvState",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedMLP",
    "Mamba",
    "SequenceModel",
    "ssm_param_labels",
    "ssm_param_mask",
]
