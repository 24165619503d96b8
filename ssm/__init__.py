"""Differentiable linear scans for state-space models and linear RNNs."""

from ._deer import parallel_scan_nonlinear as parallel_scan_nonlinear
from ._nonlinear import scan as scan
from ._scan import linear_scan as linear_scan, matrix_scan as matrix_scan

__all__ = ["linear_scan", "matrix_scan", "parallel_scan_nonlinear", "scan"]
