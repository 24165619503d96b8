"""Mamba's selective scan kernel (``selective.cc``): `covers` says which cases it
computes, `forward` and `backward` call it. Used by ``ssm._selective`` for
``method="kernel"`` (and ``"auto"`` on CPU): the recurrence ``h[t] = exp(dt A) h[t-1] +
dt x B[t]``, ``y[t] = h[t] C[t]`` in float32 or float64, grouped ``B``/``C``, resets,
an initial and a final state, and its reverse-mode derivative (the skip term ``D``
and the gate ``z`` stay in XLA around it).

XLA's CPU loops run the chunked scan of ``ssm._selective`` one step at a time, a few
small fused loops per step on one thread; the kernel runs a whole block of channels
through the sequence with its states in L1, the exponentials vectorised, and blocks
shared across threads (see ``docs/cpu_kernels.md``).

Arrays are in the operator's internal layout: ``x, dt (T, d_inner)``, ``A, h0 (N,
d_inner)``, ``B, C (T, N, G)``, ``resets`` bool ``(T,)``; any leading batch axes come
from ``jax.vmap`` (``vmap_method="broadcast_all"``).
"""

from __future__ import annotations

import jax
import numpy as np

from .build import cpus

# Below this many state updates (T x N x d_inner, all examples) one thread does it all.
THREADS_UPDATES = 1 << 15

_DTYPES = (np.dtype(np.float32), np.dtype(np.float64))


def covers(*arrays) -> bool:
    """Whether the kernel computes this case: float arrays of one dtype, float32 or
    float64 (bfloat16 and float16 inputs are widened before, as the operator does)."""
    dtypes = {np.dtype(a.dtype) for a in arrays}
    return len(dtypes) == 1 and dtypes.pop() in _DTYPES


def _threads(x, N) -> int:
    return 1 if x.size * N < THREADS_UPDATES else cpus()


def forward(x, dt, A, B, C, h0, resets, *, chunk: int, xla):
    """``(y, hT, starts)``: ``y = h C`` (T, d_inner), the final state ``(N, d_inner)``
    and the state before each chunk of ``chunk`` steps ``(ceil(T / chunk), N,
    d_inner)``. On the CPU backend the kernel; lowered for other platforms,
    ``xla(x, dt, A, B, C, h0, resets)``, which must return the same."""
    T, d = x.shape
    N = A.shape[0]
    n = -(-T // chunk)
    dtype = x.dtype
    out = (
        jax.ShapeDtypeStruct((T, d), dtype),
        jax.ShapeDtypeStruct((N, d), dtype),
        jax.ShapeDtypeStruct((n, N, d), dtype),
    )
    threads = _threads(x, N)

    def kernel(*args):
        call = jax.ffi.ffi_call("ssm_selective_fwd", out, vmap_method="broadcast_all")
        return tuple(call(*args, chunk=np.int64(chunk), threads=np.int64(threads)))

    args = (x, dt, A, B, C, h0, resets)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def backward(x, dt, A, B, C, resets, starts, gy, m, *, chunk: int, xla):
    """``(dx, ddt, dA, dB, dC, dh0)``, the cotangents of `forward`'s inputs from the
    cotangents ``gy`` of ``y`` and ``m`` of the final state, recomputing each chunk's
    states from ``starts``. On the CPU backend the kernel; lowered for other
    platforms, ``xla(x, dt, A, B, C, resets, starts, gy, m)``."""
    out = tuple(jax.ShapeDtypeStruct(v.shape, v.dtype) for v in (x, dt, A, B, C, m))
    threads = _threads(x, A.shape[0])

    def kernel(*args):
        call = jax.ffi.ffi_call("ssm_selective_bwd", out, vmap_method="broadcast_all")
        return tuple(call(*args, chunk=np.int64(chunk), threads=np.int64(threads)))

    args = (x, dt, A, B, C, resets, starts, gy, m)
    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
