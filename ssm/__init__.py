"""Differentiable linear scans for state-space models and linear RNNs."""

from ._deer import parallel_scan_nonlinear as parallel_scan_nonlinear
from ._delta import delta_rule as delta_rule, delta_rule_step as delta_rule_step
from ._gla import (
    gated_linear_attention as gated_linear_attention,
    gated_linear_attention_step as gated_linear_attention_step,
)
from ._mlstm import MLSTMState as MLSTMState, mlstm as mlstm, mlstm_step as mlstm_step
from ._nonlinear import scan as scan
from ._selective import selective_scan as selective_scan
from ._sharded import (
    linear_scan as linear_scan,
    matrix_scan as matrix_scan,
    sharded_linear_scan as sharded_linear_scan,
    sharded_matrix_scan as sharded_matrix_scan,
)

__all__ = [
    "delta_rule",
    "delta_rule_step",
    "gated_linear_attention",
    "gated_linear_attention_step",
    "MLSTMState",
    "mlstm",
    "mlstm_step",
    "linear_scan",
    "matrix_scan",
    "parallel_scan_nonlinear",
    "scan",
    "selective_scan",
    "sharded_linear_scan",
    "sharded_matrix_scan",
]
