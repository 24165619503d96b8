"""Forward evaluation of linear recurrences: sequential, associative and chunked.

Every kernel here evaluates the same generalised recurrence, in *processing order*
p = 0, 1, ..., T-1 (time ``t = p`` forwards, ``t = T-1-p`` when ``reverse``):

    h[p] = m[p] · h[p-1] + b[p],        h[-1] = h0,

where the multiplier is ``m[p] = M(a[p])`` (``shift=False``) or ``m[p] = M(a[p-1])``
with ``m[0] = 1`` (``shift=True``). ``M(a)`` is ``a`` (diagonal), ``A`` or ``A^T``
(matrix, ``trans``), set to zero at the steps where ``resets`` is true. The shifted
form is what the transpose of a scan needs (``g[t] = ct[t] + a[t+1] g[t+1]``), so
the backward pass never materialises a shifted copy of ``a``.

Arrays arrive normalised by the primitive: ``a`` of shape ``(1 or T, *Sa)``,
``b`` of shape ``(T, *S)``, ``h0`` of shape ``S`` in the state dtype and
``r`` (resets) of shape ``(1 or T, *Sr)``; all broadcast against ``(T, *S)``.
These functions are never differentiated by JAX: the primitive in
``_primitive.py`` supplies the derivative rules.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import jax
import jax.numpy as jnp
from jax import lax


@dataclass(frozen=True)
class _Ops:
    """How a multiplier acts, for the diagonal and the matrix recurrence."""

    matrix: bool
    trans: bool

    def mult(self, a_k, r_k, dtype, has_resets):
        m = a_k.astype(dtype)
        if self.matrix and self.trans:
            m = jnp.swapaxes(m, -1, -2)
        if has_resets:
            m = jnp.where(r_k, jnp.zeros((), dtype), m)
        return m

    def apply(self, m, h):
        if self.matrix:
            return jnp.matmul(m, h, precision=lax.Precision.HIGHEST)
        return m * h

    def identity(self, shape, dtype):
        if self.matrix:
            n = shape[-1]
            return jnp.broadcast_to(jnp.eye(n, dtype=dtype), shape)
        return jnp.ones(shape, dtype)


def _mult_shape(ops: _Ops, a_shape, r_shape, has_resets):
    shape = tuple(a_shape)
    if has_resets:
        shape = jnp.broadcast_shapes(shape, tuple(r_shape))
    return shape


def sequential(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets, unroll=1):
    """One step per time index with ``lax.scan``."""
    dtype = h0.dtype
    a_varies = a.shape[0] != 1
    r_varies = has_resets and r.shape[0] != 1
    a_fixed = None if a_varies else a[0]
    r_fixed = r[0] if (has_resets and not r_varies) else None

    def body(carry, xs):
        h, m_prev = carry
        a_k, b_k, r_k = xs
        a_k = a_fixed if a_k is None else a_k
        r_k = r_fixed if r_k is None else r_k
        m_k = ops.mult(a_k, r_k, dtype, has_resets)
        m = m_prev if shift else m_k
        h = ops.apply(m, h) + b_k.astype(dtype)
        return (h, m_k if shift else m_prev), h

    m_shape = _mult_shape(ops, a.shape[1:], r.shape[1:], has_resets)
    m0 = ops.identity(m_shape, dtype) if shift else jnp.zeros((), dtype)
    xs = (a if a_varies else None, b, r if r_varies else None)
    _, h = lax.scan(body, (h0, m0), xs, reverse=reverse, unroll=unroll)
    return h


def _combine_diag(x, y):
    (a1, b1), (a2, b2) = x, y
    return a2 * a1, a2 * b1 + b2


def _combine_matrix(x, y):
    (a1, b1), (a2, b2) = x, y
    hi = lax.Precision.HIGHEST
    return jnp.matmul(a2, a1, precision=hi), jnp.matmul(a2, b1, precision=hi) + b2


def associative(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets):
    """``lax.associative_scan`` over (multiplier, input) pairs: O(log T) depth."""
    dtype = h0.dtype
    T = b.shape[0]
    m = ops.mult(a, r, dtype, has_resets)
    m = jnp.broadcast_to(m, (T,) + m.shape[1:])
    if shift:
        one = ops.identity((1,) + m.shape[1:], dtype)
        m = (
            jnp.concatenate([m[1:], one]) if reverse else jnp.concatenate([one, m[:-1]])
        )
    b = b.astype(dtype)
    first = T - 1 if reverse else 0
    b = b.at[first].add(ops.apply(m[first], h0))
    if not ops.matrix:
        m = jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, b.shape))
    combine = _combine_matrix if ops.matrix else _combine_diag
    _, h = lax.associative_scan(combine, (m, b), reverse=reverse)
    return h


def default_chunk_size(T: int) -> int:
    """A chunk length near sqrt(T), preferring one that divides T (no padding)."""
    target = max(1, round(math.sqrt(T)))
    for delta in range(0, target // 2 + 1):
        for c in (target + delta, target - delta):
            if 1 <= c <= T and T % c == 0:
                return c
    return target


def _pad_time(x, n_total, fill, front):
    """Pad the time axis to ``n_total`` on the side processed last, so padding
    never reaches a real step."""
    pad = n_total - x.shape[0]
    if pad == 0:
        return x
    widths = [(pad, 0) if front else (0, pad)] + [(0, 0)] * (x.ndim - 1)
    return jnp.pad(x, widths, constant_values=fill)


def chunked(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets, chunk_size=None):
    """Two-level scan: chunks of length C are processed side by side.

    Pass 1 runs the recurrence inside every chunk at once from a zero state,
    keeping only each chunk's total multiplier and final local state. Pass 2 is a
    short scan across chunks that turns those summaries into each chunk's true
    starting state. Pass 3 reruns the recurrence inside every chunk from its true
    start and writes the states. Each loop iteration works on a slab of
    ``T / C`` chunks, so there are about ``2 C + T / C`` iterations instead of T,
    and nothing larger than the output is ever stored.
    """
    dtype = h0.dtype
    T = b.shape[0]
    C = chunk_size or default_chunk_size(T)
    C = min(C, T)
    n = -(-T // C)
    a_varies = a.shape[0] != 1
    r_varies = has_resets and r.shape[0] != 1

    b_c = _pad_time(b, n * C, 0, reverse).reshape((n, C) + b.shape[1:])
    if a_varies:
        a_c = _pad_time(a, n * C, 1, reverse).reshape((n, C) + a.shape[1:])
    if r_varies:
        r_c = _pad_time(r, n * C, False, reverse).reshape((n, C) + r.shape[1:])
    state_shape = h0.shape
    m_shape = (n,) + _mult_shape(ops, a.shape[1:], r.shape[1:], has_resets)

    def position(j):
        return C - 1 - j if reverse else j

    def at(x, k):
        return lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False)

    def multiplier(k):
        a_k = at(a_c, k) if a_varies else a[0]
        r_k = None
        if has_resets:
            r_k = at(r_c, k) if r_varies else r[0]
        return jnp.broadcast_to(ops.mult(a_k, r_k, dtype, has_resets), m_shape)

    # Shifted: each chunk starts with the multiplier of the element processed
    # just before it (the identity for the first chunk).
    if shift:
        boundary = multiplier(0 if reverse else C - 1)
        one = ops.identity((1,) + m_shape[1:], dtype)
        m_start = (
            jnp.concatenate([boundary[1:], one])
            if reverse
            else jnp.concatenate([one, boundary[:-1]])
        )
    else:
        m_start = jnp.zeros((), dtype)

    def step(j, h, m_prev):
        k = position(j)
        m_k = multiplier(k)
        m = m_prev if shift else m_k
        b_k = at(b_c, k)
        h = ops.apply(m, h) + b_k.astype(dtype)
        return k, h, m, (m_k if shift else m_prev)

    # Pass 1: per-chunk total multiplier and local final state.
    def pass1(j, carry):
        prod, h, m_prev = carry
        _, h, m, m_prev = step(j, h, m_prev)
        return ops.apply(m, prod), h, m_prev

    prod0 = ops.identity(m_shape, dtype)
    h_local0 = jnp.zeros((n,) + state_shape, dtype)
    prod, h_local, _ = lax.fori_loop(0, C, pass1, (prod0, h_local0, m_start))

    # Pass 2: true starting state of every chunk, scanning across chunks.
    def across(c, xs):
        p_i, h_i = xs
        return ops.apply(p_i, c) + h_i, c

    _, starts = lax.scan(across, h0, (prod, h_local), reverse=reverse)

    # Pass 3: rerun inside chunks from the true starts, writing the states.
    def pass3(j, carry):
        out, h, m_prev = carry
        k, h, _, m_prev = step(j, h, m_prev)
        out = lax.dynamic_update_index_in_dim(out, h, k, axis=1)
        return out, h, m_prev

    out0 = jnp.zeros((n, C) + state_shape, dtype)
    out, _, _ = lax.fori_loop(0, C, pass3, (out0, starts, m_start))
    out = out.reshape((n * C,) + state_shape)
    if n * C != T:
        out = out[n * C - T :] if reverse else out[:T]
    return out


def evaluate(a, b, h0, r, *, method, matrix, trans, reverse, shift, has_resets, chunk_size):
    ops = _Ops(matrix=matrix, trans=trans)
    kw = dict(ops=ops, reverse=reverse, shift=shift, has_resets=has_resets)
    if method == "sequential":
        return sequential(a, b, h0, r, **kw)
    if method == "associative":
        return associative(a, b, h0, r, **kw)
    if method == "chunked":
        return chunked(a, b, h0, r, chunk_size=chunk_size, **kw)
    raise AssertionError(method)


def auto_method(T: int, matrix: bool, backend: str | None = None) -> str:
    """The method ``method="auto"`` picks; see the benchmark tables in the README."""
    backend = backend or jax.default_backend()
    if backend == "cpu":
        if T < 64:
            return "sequential"
        return "sequential" if matrix else "chunked"
    return "chunked" if T >= 64 else "sequential"
