"""The process's memory allocator, configured by the entry points before JAX allocates.

On the CPU, XLA takes its buffers from the C library's `malloc`. glibc returns every
block above its mmap threshold (32 MiB at most) to the kernel when it is freed, so a
training step that needs a large temporary maps it afresh on every call and faults
its pages in again: on a 2-core VM about 20 ms per 64 MiB, more than the arithmetic
of many steps. `configure_allocator` tells glibc, through `mallopt`, to keep freed
memory in the process instead (no mmapped blocks, no trimming, one arena), the
setting that `MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=... MALLOC_ARENA_MAX=1` give
from the environment.

`ssm-train`, `ssm-eval` and `ssm-generate` call it first thing; a library user calls
it at the start of a program (before the first JAX computation). Set
`SSM_JAX_MALLOC=system` to leave the allocator alone. The price is memory: what a
step frees stays reserved by the process (its peak resident size does not shrink
between steps). On other C libraries (macOS, musl) it does nothing.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import sys

ENV = "SSM_JAX_MALLOC"

# glibc's mallopt parameters (malloc.h).
_M_TRIM_THRESHOLD = -1
_M_MMAP_MAX = -4
_M_ARENA_MAX = -8

_SETTINGS = ((_M_MMAP_MAX, 0), (_M_TRIM_THRESHOLD, 2**31 - 1), (_M_ARENA_MAX, 1))

_state: str | None = None


def _glibc():
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6")
        libc.gnu_get_libc_version.restype = ctypes.c_char_p
        libc.gnu_get_libc_version()
    except (OSError, AttributeError):
        return None  # not glibc
    return libc


def configure_allocator() -> str:
    """Make glibc keep freed memory in the process (see the module docstring).

    **Returns:** what was done: `"retained"` (configured now or earlier), `"system"`
    (left alone because `SSM_JAX_MALLOC=system`) or `"unsupported"` (not glibc, or
    `mallopt` refused a setting).
    """
    global _state
    if _state is not None:
        return _state
    choice = os.environ.get(ENV, "retained").strip().lower()
    if choice not in ("retained", "system"):
        raise ValueError(f"{ENV} must be 'retained' or 'system', got {choice!r}.")
    if choice == "system":
        _state = "system"
        return _state
    libc = _glibc()
    if libc is None:
        _state = "unsupported"
        return _state
    libc.mallopt.argtypes = (ctypes.c_int, ctypes.c_int)
    ok = all(libc.mallopt(param, value) == 1 for param, value in _SETTINGS)
    _state = "retained" if ok else "unsupported"
    return _state


def allocator_state() -> str:
    """`"retained"`, `"system"`, `"unsupported"`, or `"default"` if not configured."""
    return _state or "default"
