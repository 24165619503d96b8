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

from . import _kernels


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


def _mult_shape(a_shape, r_shape, has_resets):
    shape = tuple(a_shape)
    if has_resets:
        shape = jnp.broadcast_shapes(shape, tuple(r_shape))
    return shape


# Scans of at most this many steps are unrolled (see `sequential`).
UNROLLED_STEPS = 16


def sequential(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets, unroll=None):
    """One step per time index: the chunked kernel with a single chunk.

    Forwards, rows are read one at a time in ascending order (the fastest pattern
    on CPUs). In reverse, reading rows one at a time in descending order is about
    3x slower on our CPU (hardware prefetchers follow ascending streams), so rows
    are read in blocks of ``unroll`` = 64 in ascending memory order and stepped
    through backwards inside the block (see ``scripts/bench_scan.py``).

    Scans of at most `UNROLLED_STEPS` steps (the chunked operators hand their state
    across a group's few chunks with one) are a Python loop instead, which XLA fuses
    into a few ops: a loop costs several small ops per step, each a call of its own.
    """
    if b.shape[0] <= UNROLLED_STEPS:
        return _unrolled(
            a, b, h0, r, ops=ops, reverse=reverse, shift=shift, has_resets=has_resets
        )
    if unroll is None:
        unroll = 64 if reverse else 1
    return chunked(
        a,
        b,
        h0,
        r,
        ops=ops,
        reverse=reverse,
        shift=shift,
        has_resets=has_resets,
        chunk_size=b.shape[0],
        unroll=unroll,
    )


def _unrolled(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets):
    """The recurrence step by step in a Python loop (short scans)."""
    dtype = h0.dtype

    def row(x, t):
        return x[0] if x.shape[0] == 1 else x[t]

    out, h, previous = [None] * b.shape[0], h0, None
    for t in reversed(range(b.shape[0])) if reverse else range(b.shape[0]):
        at = previous if shift else t  # the step whose multiplier applies
        if at is not None:
            h = ops.apply(ops.mult(row(a, at), row(r, at), dtype, has_resets), h)
        h = h + b[t].astype(dtype)
        out[t], previous = h, t
    return jnp.stack(out)


def _combine_diag(x, y):
    (a1, b1), (a2, b2) = x, y
    return a2 * a1, a2 * b1 + b2


def _combine_matrix(x, y):
    (a1, b1), (a2, b2) = x, y
    hi = lax.Precision.HIGHEST
    return jnp.matmul(a2, a1, precision=hi), jnp.matmul(a2, b1, precision=hi) + b2


def associative(a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets, blocks=16):
    """``lax.associative_scan`` over (multiplier, input) pairs: O(log T) depth.

    The sequence is cut into a fixed number of ``blocks`` run one after the other,
    each an associative scan started from the previous block's last state. The depth
    stays O(log T) (``blocks * log(T / blocks)``) while the scan's intermediate
    partial products, which a single associative scan over all of T would hold at
    several times the input's size, shrink to ``1 / blocks`` of that.
    """
    dtype = h0.dtype
    T = b.shape[0]
    B = -(-T // min(blocks, T))  # block length; blocks may overlap at the end
    K = -(-T // B)
    lag = 1 if shift else 0
    combine = _combine_matrix if ops.matrix else _combine_diag

    def multipliers(s, first):
        """Multipliers of positions s..s+B-1 (in time), shifted when asked."""

        def window(x, start, size):
            if x.shape[0] == 1:
                return jnp.broadcast_to(x, (size,) + x.shape[1:])
            return lax.dynamic_slice_in_dim(x, start, size, axis=0)

        if shift and first:
            size = B - 1
            start = s + 1 if reverse else s
        else:
            size = B
            start = s + lag if reverse else s - lag
        m = ops.mult(window(a, start, size), window(r, start, size), dtype, has_resets)
        if shift and first:
            one = ops.identity((1,) + m.shape[1:], dtype)
            m = jnp.concatenate([m, one] if reverse else [one, m])
        return m

    def run_block(s, h_in, first):
        m = multipliers(s, first)
        blk = lax.dynamic_slice_in_dim(b, s, B, axis=0).astype(dtype)
        i0 = B - 1 if reverse else 0
        blk = blk.at[i0].add(ops.apply(m[i0], h_in))
        if not ops.matrix:
            m = jnp.broadcast_to(m, jnp.broadcast_shapes(m.shape, blk.shape))
        return lax.associative_scan(combine, (m, blk), reverse=reverse)[1]

    def start_of(q):
        return jnp.maximum(T - (q + 1) * B, 0) if reverse else jnp.minimum(q * B, T - B)

    out = jnp.zeros((T,) + h0.shape, dtype)
    out = lax.dynamic_update_slice_in_dim(
        out, run_block(start_of(0), h0, True), start_of(0), 0
    )

    def body(q, out):
        s = start_of(q)
        # The block's incoming state was already written by the previous block,
        # also when the last block overlaps it.
        h_in = lax.dynamic_index_in_dim(out, s + B if reverse else s - 1, 0, False)
        return lax.dynamic_update_slice_in_dim(out, run_block(s, h_in, False), s, 0)

    return lax.fori_loop(1, K, body, out)


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


def chunked(
    a, b, h0, r, *, ops: _Ops, reverse, shift, has_resets, chunk_size=None, unroll=64
):
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
    m_shape = (n,) + _mult_shape(a.shape[1:], r.shape[1:], has_resets)

    # Positions per block (single-chunk runs only: with many chunks a step already
    # reads a slab of rows, and blocks of them would cost a T-sized buffer).
    U = max(1, min(unroll, C - 1, T // 16)) if n == 1 else 1
    lag = 1 if shift else 0  # the multiplier of position j sits at position j - lag

    def position(j):
        return C - 1 - j if reverse else j

    def at(x, k):
        return lax.dynamic_index_in_dim(x, k, axis=1, keepdims=False)

    def multiplier(a_k, r_k):
        m = ops.mult(
            a_k if a_varies else a[0], r_k if r_varies else r[0], dtype, has_resets
        )
        return jnp.broadcast_to(m, m_shape)

    def multiplier_at(k):
        return multiplier(
            at(a_c, k) if a_varies else None, at(r_c, k) if r_varies else None
        )

    # The multiplier of each chunk's first processed element. Shifted, it is that
    # of the element processed just before the chunk (identity for the first).
    if shift:
        boundary = multiplier_at(0 if reverse else C - 1)
        one = ops.identity((1,) + m_shape[1:], dtype)
        m_first = (
            jnp.concatenate([boundary[1:], one])
            if reverse
            else jnp.concatenate([one, boundary[:-1]])
        )
    else:
        m_first = multiplier_at(position(0))

    # Positions 1..C-1 go in blocks of U: each block is read (and written) as one
    # contiguous slice in ascending memory order, also when running in reverse
    # (reading rows backwards one at a time is about 2x slower on CPUs), and an
    # inner loop steps through it in processing order. The last C - 1 - U * n_blocks
    # positions go one at a time.
    n_blocks = (C - 1) // U

    def load(x, j0, s):
        start = C - j0 - U + s if reverse else j0 - s
        return lax.dynamic_slice_in_dim(x, start, U, axis=1)

    def run_block(q, h, prod, write):
        j0 = 1 + q * U
        b_blk = load(b_c, j0, 0)
        a_blk = load(a_c, j0, lag) if a_varies else None
        r_blk = load(r_c, j0, lag) if r_varies else None

        def inner(i, carry):
            h, prod, out_blk = carry
            i_mem = U - 1 - i if reverse else i
            m = multiplier(
                None if a_blk is None else at(a_blk, i_mem),
                None if r_blk is None else at(r_blk, i_mem),
            )
            h = ops.apply(m, h) + at(b_blk, i_mem).astype(dtype)
            if prod is not None:
                prod = ops.apply(m, prod)
            if out_blk is not None:
                out_blk = lax.dynamic_update_index_in_dim(out_blk, h, i_mem, axis=1)
            return h, prod, out_blk

        out_blk = jnp.zeros((n, U) + h.shape[1:], dtype) if write else None
        return lax.fori_loop(0, U, inner, (h, prod, out_blk))

    def run_tail(h, prod, out):
        def element(j, carry):
            h, prod, out = carry
            m = multiplier_at(position(j - lag))
            h = ops.apply(m, h) + at(b_c, position(j)).astype(dtype)
            if prod is not None:
                prod = ops.apply(m, prod)
            if out is not None:
                out = lax.dynamic_update_index_in_dim(out, h, position(j), axis=1)
            return h, prod, out

        return lax.fori_loop(1 + n_blocks * U, C, element, (h, prod, out))

    state_shape = h0.shape
    if n > 1:
        # Pass 1: per-chunk total multiplier and local final state, from zero.
        def pass1(q, carry):
            h, prod = carry
            h, prod, _ = run_block(q, h, prod, write=False)
            return h, prod

        h_local = jnp.broadcast_to(at(b_c, position(0)).astype(dtype), (n,) + state_shape)
        h_local, prod = lax.fori_loop(0, n_blocks, pass1, (h_local, m_first))
        h_local, prod, _ = run_tail(h_local, prod, None)

        # Pass 2: the true starting state of every chunk, scanning across chunks.
        def across(c, xs):
            p_i, h_i = xs
            return ops.apply(p_i, c) + h_i, c

        _, starts = lax.scan(across, h0, (prod, h_local), reverse=reverse)
    else:
        starts = h0[None]

    # Pass 3: run inside every chunk from its true start, writing the states.
    def pass3(q, carry):
        out, h = carry
        h, _, blk = run_block(q, h, None, write=True)
        start = C - (1 + q * U) - U if reverse else 1 + q * U
        return lax.dynamic_update_slice_in_dim(out, blk, start, axis=1), h

    h = ops.apply(m_first, starts) + at(b_c, position(0)).astype(dtype)
    out = jnp.zeros((n, C) + state_shape, dtype)
    out = lax.dynamic_update_index_in_dim(out, h, position(0), axis=1)
    out, h = lax.fori_loop(0, n_blocks, pass3, (out, h))
    _, _, out = run_tail(h, None, out)
    out = out.reshape((n * C,) + state_shape)
    if n * C != T:
        out = out[n * C - T :] if reverse else out[:T]
    return out


def evaluate(
    a, b, h0, r, *, method, matrix, trans, reverse, shift, has_resets, chunk_size, kernel
):
    ops = _Ops(matrix=matrix, trans=trans)
    kw = dict(ops=ops, reverse=reverse, shift=shift, has_resets=has_resets)
    if method == "sequential":
        if kernel and _kernels.covers(a, b, h0, r, matrix=matrix, has_resets=has_resets):
            return _kernels.scan(
                a, b, h0, r, reverse=reverse, shift=shift, has_resets=has_resets
            )
        return sequential(a, b, h0, r, **kw)
    if method == "associative":
        return associative(a, b, h0, r, **kw)
    if method == "chunked":
        return chunked(a, b, h0, r, chunk_size=chunk_size, **kw)
    raise AssertionError(method)


def auto_method(T: int, matrix: bool, backend: str | None = None) -> str:
    """The method ``method="auto"`` picks, from ``scripts/bench_scan.py``'s tables.

    On CPU the recurrence is memory-bound and one pass over the data beats every
    parallel form (which read the inputs at least twice), so it is sequential. On
    accelerators, where a step of the sequential loop costs a kernel launch, the
    chunked form (about ``2 sqrt(T)`` steps) is used for all but short sequences.
    """
    backend = backend or jax.default_backend()
    if backend == "cpu" or T < 64:
        return "sequential"
    return "chunked"
