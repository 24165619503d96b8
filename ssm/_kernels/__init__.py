"""The compiled CPU kernels, apart from the math (``ssm/*.py``) and from XLA's loops
(``ssm/_loops.py``): their C++ sources, the build that compiles them on first use
(`build`), and the wrappers that emit them where they apply (`linear_scan` for the diagonal
linear scan, `products` for the chunked operators, `selective` for Mamba's selective
scan). See ``docs/cpu_kernels.md``.
"""

from . import selective  # noqa: F401 (Mamba's selective scan: ssm._kernels.selective)
from .build import available, disabled, xla_only
from .linear_scan import covers, scan
from .products import chain, matmul, per_key_tree

__all__ = [
    "available",
    "chain",
    "covers",
    "disabled",
    "matmul",
    "per_key_tree",
    "scan",
    "xla_only",
]
