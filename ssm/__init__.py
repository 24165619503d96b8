"""Differentiable linear scans for state-space models and linear RNNs."""

from ._scan import linear_scan as linear_scan, matrix_scan as matrix_scan

__all__ = ["linear_scan", "matrix_scan"]
