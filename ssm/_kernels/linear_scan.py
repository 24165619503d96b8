"""The diagonal linear scan's kernel (``scan.cc``): `covers` says which cases it
computes, `scan` calls it. Used by ``ssm._loops.evaluate`` for ``method="sequential"``
(and ``"auto"`` on CPU): a diagonal scan on the CPU backend, real or complex, 32 or 64
bits (and bfloat16 decays and inputs to a float32 state), ``a`` of ``b``'s shape or
time-invariant or shared over leading state axes, ``resets`` one flag per step.

XLA's CPU loops run one thread, zero-fill their output and write it row by row
through the cache; on a memory-bound scan that costs about half the time (see
``scripts/bench_scan.py``). The kernel splits the columns across threads and writes
large outputs with non-temporal stores.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np

from .build import cpus

F32, BF16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)
# The state dtypes (h0, h) and, for each, the dtypes `a` and `b` may have.
_INPUTS = {
    F32: (F32, BF16),
    np.dtype(np.float64): (np.dtype(np.float64),),
    np.dtype(np.complex64): (np.dtype(np.complex64),),
    np.dtype(np.complex128): (np.dtype(np.complex128),),
}
# Outputs at least this large are written with non-temporal stores (they would not
# stay in cache anyway); smaller ones through the cache, where the next op finds them.
NONTEMPORAL_BYTES = 8 << 20
# Below this many elements one thread does it all (starting threads costs more).
THREADS_ELEMENTS = 1 << 16


def _a_columns(a_shape, b_shape) -> int | None:
    """How many columns ``a`` has when ``b (T, *S)`` is flattened to ``(T, D)``: ``a``
    must be ``(T or 1, *Sa)`` with ``Sa`` equal to a trailing part of ``S`` after
    leading ones (a decay shared over leading state axes, such as a batch). ``None``
    if the kernel cannot broadcast it."""
    T, S = b_shape[0], tuple(b_shape[1:])
    if len(a_shape) == 0 or a_shape[0] not in (1, T) or len(a_shape) - 1 > len(S):
        return None
    Sa = (1,) * (len(S) - len(a_shape) + 1) + tuple(a_shape[1:])
    k = 0
    while k < len(S) and Sa[k] == 1 and S[k] != 1:
        k += 1
    if Sa[k:] != S[k:]:
        return None
    return int(np.prod(S[k:], dtype=np.int64))


def covers(a, b, h0, r, *, matrix: bool, has_resets: bool) -> bool:
    """Whether the kernel computes this case (arrays as the primitive passes them)."""
    inputs = _INPUTS.get(np.dtype(h0.dtype), ())
    if (
        matrix
        or (has_resets and not (r.dtype == np.bool_ and r.size == r.shape[0]))
        or np.dtype(a.dtype) not in inputs
        or np.dtype(b.dtype) not in inputs
    ):
        return False
    Da = _a_columns(a.shape, b.shape)
    if Da is None:
        return False
    # Only where the kernel's vector loops apply (a decay per column of b, one per
    # step, or shared in whole blocks of its vector loop); elsewhere its per-column
    # gather is slower forwards than XLA's loop (measured).
    real = np.dtype(h0.dtype) in (F32, np.dtype(np.float64))
    reals = Da * (1 if real else 2)
    block = 64 if np.dtype(h0.dtype) in (F32, np.dtype(np.complex64)) else 32
    return Da == int(np.prod(b.shape[1:])) or reals % block == 0 or (Da == 1 and real)


def scan(a, b, h0, r, *, reverse: bool, shift: bool, has_resets: bool):
    """The recurrence of ``ssm._loops`` (processing order, ``shift``) for a diagonal
    ``a`` and ``b (T, *S)`` that `covers` accepts; ``h0`` of shape ``S`` in the state
    dtype, which the states come out in; ``r`` the resets, one flag per step (or one
    for all), read only if ``has_resets``."""
    T = b.shape[0]
    D = int(np.prod(b.shape[1:], dtype=np.int64))
    Da = _a_columns(a.shape, b.shape)
    size = T * D
    out_bytes = size * np.dtype(h0.dtype).itemsize
    call = jax.ffi.ffi_call("ssm_linear_scan", jax.ShapeDtypeStruct((T, D), h0.dtype))
    h = call(
        a.reshape(a.shape[0], Da),
        b.reshape(T, D),
        h0.reshape(D),
        r.reshape(-1),
        reverse=bool(reverse),
        shift=bool(shift),
        has_resets=bool(has_resets),
        nontemporal=bool(out_bytes >= NONTEMPORAL_BYTES),
        threads=np.int64(1 if size < THREADS_ELEMENTS else cpus()),
    )
    return h.reshape(b.shape)
