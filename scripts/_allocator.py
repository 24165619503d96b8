"""The allocator the benchmark scripts run under (set up before JAX allocates).

By default a benchmark configures glibc exactly as `ssm-train`, `ssm-eval` and
`ssm-generate` do (`train.configure_allocator`: freed memory stays in the process, see
`train/allocator.py`), so its figures are those of the environment the product's entry
points run in. Without it, every buffer above glibc's mmap threshold is mmapped afresh
on each call and page-faulted in again (about 20 ms per 64 MiB on a 2-core VM).
``--system-malloc`` leaves the process's allocator as it is: the figures a library
user gets who calls `ssm` from a program of their own without
`train.configure_allocator()`. Each table's header says which.
"""

from __future__ import annotations

import sys

from train.allocator import allocator_state, configure_allocator


def retain_freed_memory() -> None:
    """Configure the allocator as the entry points do, unless ``--system-malloc``."""
    if "--system-malloc" not in sys.argv:
        configure_allocator()


def describe() -> str:
    state = allocator_state()
    if state == "retained":
        return "allocator: retained (as ssm-train configures it)"
    return f"allocator: system malloc ({state}; what a plain library user gets)"
