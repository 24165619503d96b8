"""Equinox sequence-mixer layers built on the ``ssm`` scan core."""

from ._attention import (
    AbstractAttention as AbstractAttention,
    Attention as Attention,
    AttentionState as AttentionState,
    LocalAttention as LocalAttention,
)
from ._block import Block as Block, GatedMLP as GatedMLP
from ._conv import ConvState as ConvState
from ._deltanet import DeltaNet as DeltaNet, GatedDeltaNet as GatedDeltaNet
from ._gla import GLA as GLA
from ._gru import GRU as GRU
from ._labels import ssm_param_labels as ssm_param_labels, ssm_param_mask as ssm_param_mask
from ._linear_attention import LinearAttention as LinearAttention
from ._lru import LRU as LRU
from ._lstm import LSTM as LSTM
from ._mamba import Mamba as Mamba
from ._mamba2 import Mamba2 as Mamba2
from ._mixer import AbstractMixer as AbstractMixer
from ._mlstm import MLSTM as MLSTM, MLSTMLayerState as MLSTMLayerState
from ._model import SequenceModel as SequenceModel
from ._registry import MIXERS as MIXERS
from ._retnet import RetNet as RetNet, RetNetState as RetNetState
from ._rglru import RGLRU as RGLRU
from ._s4d import S4D as S4D
from ._s5 import S5 as S5

__all__ = [
    "MIXERS",
    "GLA",
    "GRU",
    "LRU",
    "LSTM",
    "MLSTM",
    "RGLRU",
    "S4D",
    "S5",
    "AbstractAttention",
    "AbstractMixer",
    "Attention",
    "AttentionState",
    "Block",
    "ConvState",
    "DeltaNet",
    "GatedDeltaNet",
    "GatedMLP",
    "LinearAttention",
    "LocalAttention",
    "MLSTMLayerState",
    "Mamba",
    "Mamba2",
    "RetNet",
    "RetNetState",
    "SequenceModel",
    "ssm_param_labels",
    "ssm_param_mask",
]
