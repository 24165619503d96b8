"""The allocator setting both benchmark scripts run under (imported before JAX).

By default a benchmark re-executes itself with glibc told to keep freed memory in the
process (``MALLOC_ARENA_MAX=1 MALLOC_MMAP_MAX_=0 MALLOC_TRIM_THRESHOLD_=2**36``).
Without it, every buffer above glibc's 32 MiB mmap threshold is mmapped afresh on each
call and page-faulted in again (about 20 ms per 64 MiB on our 2-core VM), which
charges every contender for its allocation pattern rather than its algorithm, and on
GPUs XLA's own allocator never does that. ``--system-malloc`` keeps the process's
allocator as it is.
"""

from __future__ import annotations

import os
import sys

MALLOC_ENV = {
    "MALLOC_ARENA_MAX": "1",
    "MALLOC_MMAP_MAX_": "0",
    "MALLOC_TRIM_THRESHOLD_": str(1 << 36),
}


def retain_freed_memory() -> None:
    """Re-execute this script with `MALLOC_ENV`, unless ``--system-malloc`` is given
    or this is the re-executed process."""
    if "--system-malloc" in sys.argv or os.environ.get("_SSM_BENCH_CHILD"):
        return
    env = dict(os.environ, _SSM_BENCH_CHILD="1", **MALLOC_ENV)
    os.execve(sys.executable, [sys.executable, *sys.argv], env)


def describe() -> str:
    retained = all(os.environ.get(k) == v for k, v in MALLOC_ENV.items())
    return f"retained-malloc={retained}"
