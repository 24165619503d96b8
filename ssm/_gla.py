"""Gated linear attention and mLSTM: chunked, recurrent and one-step forms.

The recurrence, one example at a time, per head ``h``:

    S[t] = diag(alpha[t]) S[t-1] + k[t] v[t]^T,        o[t] = S[t]^T q[t],

with the state ``S[t]`` of shape ``(d_k, d_v)`` and ``alpha[t] = exp(log_decay[t])``
either one scalar per head (linear attention, RetNet, Mamba-2/SSD, mLSTM) or one value
per key dimension (GLA).

The chunked form splits time into chunks of ``C`` steps. Within a chunk it uses masked
matrix products on decays ``exp(b[i] - b[j])``, ``b`` the cumulative log decay inside
the chunk, masked to ``j <= i`` *before* the exponential (so every exponent is <= 0 and
nothing overflows); across chunks it hands the state on with the chunk's total decay, in
one pass (a ``lax.scan`` over groups of chunks, ``ssm.linear_scan`` inside a group).
Per-key decays cannot be factored into one product of rescaled queries and keys without
overflow, so the chunk is halved recursively: the pairs that straddle the middle of a
block use ``exp(b[i] - r) exp(r - b[j])`` with ``r`` the cumulative decay at the middle,
both factors <= 1 (a variant of the secondary chunking of Yang et al. 2024, section 4,
with ``log2 C`` levels of one product each).

Packed documents (``resets``, true at the first step of each document) are masks, never
decays: with ``seg`` the number of resets up to each step inside a chunk, a pair ``(i, j)``
of the chunk counts only when ``seg[i] == seg[j]`` (in the per-key tree, a pair across a
block's middle splits into a condition on ``i`` and one on ``j``, so each stays one matrix
product); the chunk's start state reaches step ``i`` only when ``seg[i] == 0``; only steps
with ``seg[j] == seg[last]`` reach its end state, and a chunk with a reset hands on no
state (total decay 0). A reset step's own log decay multiplies a dropped state, so it
is set to 0 before the cumulative sums (exact, and no large value enters a
difference). The masked factors are their own derivatives, so the hand-written
backward pass carries the masks without further terms.

The reverse-mode derivative is hand-written: the forward pass keeps the state at the
start of each group of chunks (besides the inputs); the backward pass, one reverse pass
over the groups, recomputes a group's chunk-start states, runs the adjoint recurrence of
the chunk states (``G[n] = alpha_{n+1} G[n+1] + (q exp(b))_{n+1}^T do_{n+1}``) and
recomputes each chunk's local products. Nothing of size ``T x d_k x d_v`` is ever stored.
The operator is an ``ssm._autodiff.fast_vjp`` of those two passes and a reference, the
same chunked form traced with the compiled CPU kernels off (plain XLA ops): forward mode
and every second-order derivative are JAX's autodiff of that reference. All of it is
computed in float32 (float64 when an input is float64), whatever the input dtype.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

from . import _cpu_kernel
from ._autodiff import fast_vjp
from ._checks import (
    as_array,
    check_array,
    check_chunk_size,
    check_method,
    check_resets,
    check_shape,
    compute_dtype,
)
from ._cpu_kernel import matmul, per_key_tree
from ._scan import linear_scan

_METHODS = ("chunked", "recurrent")
# Chunks are processed in groups of about this many time steps (a `lax.scan` over
# groups), which bounds the memory of the within-chunk products whatever the length;
# the backward pass keeps one state per group.
_GROUP_STEPS = 256


# --------------------------------------------------------------------------- checks


def _check_qkv(q, k, v):
    check_array("q", q, ndims=(3,), expected="(T, H, d_k)")
    T, H, dk = q.shape
    if T < 1:
        raise ValueError(f"`q` must have at least one time step, got shape {q.shape}.")
    check_array("k", k, ndims=(3,), expected=f"(T, H, d_k) = ({T}, {H}, {dk})")
    check_shape("k", k, q.shape, "(T, H, d_k), the shape of `q`")
    check_array("v", v, ndims=(3,), expected=f"(T, H, d_v) = ({T}, {H}, d_v)")
    if tuple(v.shape[:2]) != (T, H):
        raise ValueError(
            f"`v` must have shape (T, H, d_v) = ({T}, {H}, d_v) to match `q` of shape "
            f"{tuple(q.shape)}, got {tuple(v.shape)}."
        )
    if not (q.dtype == k.dtype == v.dtype):
        raise TypeError(
            f"`q`, `k` and `v` must share a dtype, got {q.dtype}, {k.dtype} and "
            f"{v.dtype}; cast them explicitly."
        )
    return T, H, dk, v.shape[2]


# ------------------------------------------------------------------- chunk helpers


def _lead(x, ndim):
    """`x` with leading unit axes up to rank `ndim` (explicit rank promotion)."""
    return jnp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def _tril(n, ndim, k=0):
    return _lead(jnp.tril(jnp.ones((n, n), bool), k), ndim)


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _cumsum(g):
    """Cumulative sum over the chunk axis (-2), as a product with a triangular matrix
    (XLA fuses `jnp.cumsum` into its consumers and recomputes it there)."""
    C = g.shape[-2]
    ones = _lead(jnp.tril(jnp.ones((C, C), g.dtype)), g.ndim)
    return jnp.matmul(ones, g, precision=lax.Precision.HIGHEST)


def _to_chunks(x, C):
    """`(T, H, d) -> (N, C, H, d)`, zero-padded at the end."""
    return _to_groups(x, C, 1)[:, 0]


def _group_size(T, C):
    """Chunks per group: about `_GROUP_STEPS` steps, at most the number of chunks."""
    return max(1, min(_GROUP_STEPS // C, -(-T // C)))


def _to_groups(x, C, group):
    """`(T, H, d) -> (M, group, C, H, d)`, zero-padded at the end (zero inputs with a
    zero log decay leave the state as it is)."""
    T = x.shape[0]
    steps = group * C
    M = -(-T // steps)
    if M * steps != T:
        x = jnp.pad(x, [(0, M * steps - T)] + [(0, 0)] * (x.ndim - 1))
    return jnp.reshape(x, (M, group, C) + tuple(x.shape[1:]))


def _from_groups(x, T):
    """`(M, group, C, H, d) -> (T, H, d)`, dropping the padding."""
    return jnp.reshape(x, (-1,) + tuple(x.shape[3:]))[:T]


# ------------------------------------------------------- within-chunk products
#
# Each takes one chunk's `q, k` `(..., C, dk)`, `v` `(..., C, dv)` and cumulative log
# decays `b` `(..., C, K)` (K = 1 or dk), and returns the within-chunk outputs
# `sum_{j <= i} (q_i . (k_j * exp(b_i - b_j))) v_j`; the `_bwd` forms return the
# cotangents `(dq, dk, dv, db)` for an output cotangent `do`, recomputing what they need.


def _intra_scalar(q, k, v, b, seg=None):
    """`((q k^T) * L) v` with `L[i, j] = exp(b_i - b_j)` for `j <= i` (and `j` in the
    document of `i`, with resets), else 0."""
    return matmul(_scalar_attention(q, k, b, seg)[0], v)


def _same_document(seg):
    """`seg (..., C, 1)` -> `(..., C, C)`: true where positions `i, j` of a chunk lie
    in the same document (no reset in `(j, i]` for `j <= i`)."""
    seg = seg[..., 0]
    return seg[..., :, None] == seg[..., None, :]


def _scalar_attention(q, k, b, seg=None):
    b = b[..., 0]
    C = b.shape[-1]
    diff = b[..., :, None] - b[..., None, :]
    mask = _tril(C, diff.ndim)
    if seg is not None:
        mask = mask & _same_document(seg)
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    return matmul(q, k, transpose_b=True) * decay, decay


def _intra_scalar_bwd(q, k, v, b, do, seg=None):
    scores, decay = _scalar_attention(q, k, b, seg)
    d_scores = matmul(do, v, transpose_b=True)
    dv = matmul(scores, do, transpose_a=True)
    d_qk = d_scores * decay
    dq = matmul(d_qk, k)
    dk = matmul(d_qk, q, transpose_a=True)
    z = d_scores * scores  # d/d(b_i - b_j), zero above the diagonal
    db = jnp.sum(z, axis=-1) - jnp.sum(z, axis=-2)
    return dq, dk, dv, db[..., None]


def _leaf_size(C):
    """The odd part of `C`: the per-key tree halves blocks down to this size."""
    while C % 2 == 0:
        C //= 2
    return C


def _levels(C):
    """`(s, p)` for the tree: blocks of `2 s` steps, `p` of them per chunk."""
    s = _leaf_size(C)
    while s < C:
        yield s, C // (2 * s)
        s *= 2


def _halves(x, p, s):
    """`(..., C, d) -> (first, second)` halves of the `p` blocks, `(..., p, s, d)` each."""
    x = jnp.reshape(x, x.shape[:-2] + (p, 2, s, x.shape[-1]))
    return x[..., 0, :, :], x[..., 1, :, :]


def _join(first, second):
    """Inverse of `_halves`."""
    x = jnp.stack([first, second], axis=-3)
    return jnp.reshape(x, x.shape[:-4] + (-1, x.shape[-1]))


def _level(q, k, b, p, s, seg=None):
    """Rescaled second-half queries and first-half keys of one tree level.

    With resets (`seg`, the reset count inside the chunk), a pair `(i, j)` across the
    middle is in one document iff no reset lies in `(j, mid]` nor in `(mid, i]`
    (`mid` the end of the first half): a factor of `j` times a factor of `i`, so the
    two rescalings are masked and the pair stays one product."""
    q1, q2 = _halves(q, p, s)
    k1, k2 = _halves(k, p, s)
    b1, b2 = _halves(b, p, s)
    ref = b1[..., -1:, :]  # b at the end of the first half
    e2 = jnp.exp(b2 - ref)
    e1 = jnp.exp(ref - b1)
    if seg is not None:
        s1, s2 = _halves(seg, p, s)
        s_ref = s1[..., -1:, :]
        e2 = jnp.where(s2 == s_ref, e2, 0)
        e1 = jnp.where(s1 == s_ref, e1, 0)
    return q2 * e2, k1 * e1, e2, e1


def _leaf(q, k, b, c, seg=None):
    """The `c x c` leaf blocks, element by element: `(..., n, c, c)` and the decays."""
    qs, ks, bs = (jnp.reshape(x, x.shape[:-2] + (-1, c, x.shape[-1])) for x in (q, k, b))
    diff = bs[..., :, None, :] - bs[..., None, :, :]
    mask = _tril(c, diff.ndim - 1)[..., None]
    if seg is not None:
        ss = jnp.reshape(seg, seg.shape[:-2] + (-1, c, 1))
        mask = mask & (ss[..., :, None, :] == ss[..., None, :, :])
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    return jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * decay, axis=-1), decay


def _intra_per_key(q, k, v, b, seg=None):
    """Within-chunk outputs for a per-key decay: `_tree` in XLA ops, or the compiled
    kernel that does the same on CPU (`ssm._cpu_kernel.per_key_tree`). The kernel
    knows no resets: with them (`seg` given), `_tree` in XLA ops."""
    if seg is not None:
        return _tree(q, k, v, b, seg)
    return per_key_tree(q, k, v, b, xla=_tree)


def _intra_per_key_bwd(q, k, v, b, do, seg=None):
    if seg is not None:
        return _tree_bwd(q, k, v, b, do, seg)
    return per_key_tree(q, k, v, b, do, xla=_tree_bwd)


def _tree(q, k, v, b, seg=None):
    """Within-chunk outputs for a per-key decay: a binary tree over the chunk.

    The chunk is halved recursively down to leaves of `c` steps (`c` the odd part of
    `C`; 1 when `C` is a power of two). A pair `(i, j)`, `j < i`, in the two halves
    of a block is weighted by `exp(b_i - b_j) = exp(b_i - r) exp(r - b_j)` with `r =
    b` at the end of the first half: both factors are <= 1, so each block's pairs are
    one matrix product of rescaled queries and keys. Every pair is counted once, at
    the block where its ends separate; only the leaf blocks (the diagonal when `c =
    1`) are formed element by element.
    """
    C = q.shape[-2]
    c = _leaf_size(C)
    if c == 1:
        o = jnp.sum(q * k, axis=-1, keepdims=True) * v
    else:
        a, _ = _leaf(q, k, b, c, seg)
        o = jnp.reshape(a @ jnp.reshape(v, v.shape[:-2] + (-1, c, v.shape[-1])), v.shape)
    for s, p in _levels(C):
        q_hat, k_hat, _, _ = _level(q, k, b, p, s, seg)
        v1, _ = _halves(v, p, s)
        o1, o2 = _halves(o, p, s)
        o = _join(o1, o2 + matmul(matmul(q_hat, k_hat, transpose_b=True), v1))
    return o


def _tree_bwd(q, k, v, b, do, seg=None):
    C = q.shape[-2]
    c = _leaf_size(C)
    if c == 1:
        a = jnp.sum(q * k, axis=-1, keepdims=True)
        da = jnp.sum(do * v, axis=-1, keepdims=True)
        dq, dk, dv, db = da * k, da * q, a * do, jnp.zeros_like(b)
    else:
        a, decay = _leaf(q, k, b, c, seg)
        split = lambda x: jnp.reshape(x, x.shape[:-2] + (-1, c, x.shape[-1]))  # noqa: E731
        qs, ks, vs, dos = (split(x) for x in (q, k, v, do))
        da = (dos @ _mT(vs)) * _tril(c, a.ndim).astype(a.dtype)
        dv = jnp.reshape(_mT(a) @ dos, v.shape)
        w = da[..., None] * decay  # (..., n, c, c, dk)
        dq = jnp.reshape(jnp.sum(w * ks[..., None, :, :], axis=-2), q.shape)
        dk = jnp.reshape(jnp.sum(w * qs[..., :, None, :], axis=-3), k.shape)
        z = w * qs[..., :, None, :] * ks[..., None, :, :]
        db = jnp.reshape(jnp.sum(z, axis=-2) - jnp.sum(z, axis=-3), b.shape)
    for s, p in _levels(C):
        q_hat, k_hat, e2, e1 = _level(q, k, b, p, s, seg)
        v1, _ = _halves(v, p, s)
        _, do2 = _halves(do, p, s)
        off = matmul(q_hat, k_hat, transpose_b=True)
        d_off = matmul(do2, v1, transpose_b=True)
        dq_hat = matmul(d_off, k_hat)
        dk_hat = matmul(d_off, q_hat, transpose_a=True)
        # b through the factors; the reference r = b at the middle cancels in their
        # product exp(b_i - r) exp(r - b_j), so its cotangent is zero and is left out
        t2 = dq_hat * q_hat
        t1 = dk_hat * k_hat
        dq1, dq2 = _halves(dq, p, s)
        dk1, dk2 = _halves(dk, p, s)
        dv1, dv2 = _halves(dv, p, s)
        db1, db2 = _halves(db, p, s)
        db1 = db1 - t1
        dq = _join(dq1, dq2 + dq_hat * e2)
        dk = _join(dk1 + dk_hat * e1, dk2)
        dv = _join(dv1 + matmul(off, do2, transpose_a=True), dv2)
        db = _join(db1, db2 + t2)
    return dq, dk, dv, db


# ------------------------------------------------------------- chunked, custom vjp


def _to_k(x, K):
    """Reduce a per-key quantity `(..., dk)` to the decay's width `K` (1 or dk)."""
    return jnp.sum(x, axis=-1, keepdims=True) if K == 1 else x


def _chunk_cumsum(x, reverse=False):
    """Cumulative sums over the chunk axis of `x (..., C, H, K)` (from the end if
    `reverse`): one product with a triangular matrix per chunk, `(C, C) @ (C, H K)`,
    on the compiled kernel where it is available, elsewhere in full precision (the
    default of accelerators would round the log decays)."""
    C = x.shape[-3]
    flat = jnp.reshape(x, x.shape[:-2] + (-1,))
    ones = jnp.broadcast_to(jnp.tril(jnp.ones((C, C), x.dtype)), x.shape[:-3] + (C, C))
    product = matmul(ones, flat, transpose_a=reverse, precision=lax.Precision.HIGHEST)
    return jnp.reshape(product, x.shape)


def _decays(b, seg=None):
    """The factors built from a chunk's cumulative log decays `b`: `exp(b)` (from the
    chunk's start state to each step), `exp(b_last - b)` (from each step to the
    chunk's end state) and `exp(b_last)` (start to end state). With resets (`seg`,
    the number of resets up to each step inside the chunk, heads first `(..., 1, C,
    1)`), each is zero where a reset lies on its path: no start state reaches a step
    after a reset, no step before the chunk's last reset reaches its end."""
    last = b[..., -1:, :]
    q_decay, k_decay, total = jnp.exp(b), jnp.exp(last - b), jnp.exp(last)
    if seg is None:
        return q_decay, k_decay, total
    seg_last = seg[..., -1:, :]
    return (
        jnp.where(seg == 0, q_decay, 0),
        jnp.where(seg == seg_last, k_decay, 0),
        jnp.where(seg_last == 0, total, 0),
    )


def _heads_first(x):
    """`(..., C, H, d) <-> (..., H, C, d)`."""
    return jnp.swapaxes(x, -3, -2)


def _seg_first(seg):
    return None if seg is None else _heads_first(seg)


def _summary(k, v, b, seg=None):
    """A chunk's total decay `(..., H, K, 1)` and its input to the state, from its
    cumulative log decays `b` (here and below: `(..., C, H, K)`, see `_chunk_cumsum`;
    `seg` `(..., C, 1, 1)` the reset counts inside the chunk, or `None`)."""
    k, v, b = (_heads_first(x) for x in (k, v, b))
    _, k_decay, total = _decays(b, _seg_first(seg))
    return _mT(total), matmul(k * k_decay, v, transpose_a=True)


def _outputs(q, k, v, b, s0, seg=None):
    """A chunk's outputs from its start state `s0` `(..., H, dk, dv)`."""
    q, k, v, b = (_heads_first(x) for x in (q, k, v, b))
    seg = _seg_first(seg)
    q_decay, _, _ = _decays(b, seg)
    intra = (_intra_scalar if b.shape[-1] == 1 else _intra_per_key)(q, k, v, b, seg)
    return _heads_first(intra + matmul(q * q_decay, s0))


def _state_cotangent(q, b, do, seg=None):
    """A chunk's total decay and `(q exp(b))^T do`, the cotangent its outputs send to
    its start state."""
    q, b, do = (_heads_first(x) for x in (q, b, do))
    q_decay, _, total = _decays(b, _seg_first(seg))
    return _mT(total), matmul(q * q_decay, do, transpose_a=True)


def _local_bwd(q, k, v, b, s0, do, G, seg=None):
    """Cotangents of a chunk's inputs, given those of its outputs (`do`) and of its end
    state (`G`), from its start state `s0`. With resets the masked factors of
    `_decays` and the masked within-chunk products carry the masks into every term
    (a factor that is zero has a zero derivative)."""
    q, k, v, b, do = (_heads_first(x) for x in (q, k, v, b, do))
    seg = _seg_first(seg)
    K = b.shape[-1]
    q_decay, k_decay, total = _decays(b, seg)
    intra_bwd = _intra_scalar_bwd if K == 1 else _intra_per_key_bwd
    dq, dk, dv, db = intra_bwd(q, k, v, b, do, seg)
    # outputs: + (q exp(b)) s0
    dq_bar = matmul(do, s0, transpose_b=True)
    dq = dq + dq_bar * q_decay
    db = db + _to_k(dq_bar * q * q_decay, K)
    # end state: exp(b_last) s0 + (k exp(b_last - b))^T v
    k_bar = k * k_decay
    dk_bar = matmul(v, G, transpose_b=True)
    dk = dk + dk_bar * k_decay
    dv = dv + matmul(k_bar, G)
    t = _to_k(dk_bar * k_bar, K)
    d_last = jnp.sum(t, axis=-2, keepdims=True)
    d_last = d_last + _to_k(_mT(jnp.sum(s0 * G, axis=-1, keepdims=True)), K) * total
    db = db - t
    db = jnp.concatenate([db[..., :-1, :], db[..., -1:, :] + d_last], axis=-2)
    dq, dk, dv, db = (_heads_first(x) for x in (dq, dk, dv, db))
    return dq, dk, dv, _chunk_cumsum(db, reverse=True)  # b = cumsum(g)


def _gla_chunked(q, k, v, g, h0, k_scale, C, ones=False, resets=None):
    """The chunked operator on keys `k * k_scale` (`k_scale` `(T, H, 1)` or `None`),
    with `resets` (bool `(T,)`) or none.

    For the mLSTM, the two extras are applied group by group rather than as copies of
    `k` and `v`: `k_scale` is the input gate and, with `ones`, the values get a column
    of ones appended (the normaliser): `h0` and the state then have `d_v + 1` columns
    and the outputs come as `(o[..., :d_v], o[..., d_v:])`.

    Differentiable in every way (`_gla_chunked_op`): reverse mode by the hand-written
    `_gla_chunked_bwd`, forward mode and second order through `_gla_reference`.
    """
    return _gla_chunked_op(int(C), bool(ones))(q, k, v, g, h0, k_scale, resets)


@functools.cache
def _gla_chunked_op(C, ones):
    """`_gla_chunked` for one chunk length and `ones` (static, closed over), as a
    `fast_vjp`: its value and residuals from `_gla_chunked_fwd`, its reverse mode
    `_gla_chunked_bwd`, everything else JAX's autodiff of `_gla_reference`."""

    def fwd(q, k, v, g, h0, k_scale, resets):
        return _gla_chunked_fwd(q, k, v, g, h0, k_scale, C, ones, resets)

    def bwd(args, s_group, cts, want):
        del want  # every cotangent costs about the same; all are computed
        return _gla_chunked_bwd(C, ones, args, s_group, cts)

    def reference(q, k, v, g, h0, k_scale, resets):
        return _gla_reference(q, k, v, g, h0, k_scale, C, ones, resets)

    return fast_vjp(fwd, bwd, reference)


def _gla_reference(q, k, v, g, h0, k_scale, C, ones, resets):
    """The chunked form in plain XLA ops (the compiled kernels off while it is
    traced), which JAX differentiates to any order: forward mode (`jax.jvp`,
    `jax.jacfwd`) and every second-order derivative of `_gla_chunked` go through it.
    Its forward mode stores nothing; its reverse mode (used only for second order)
    keeps what JAX keeps of a `lax.scan` over groups: every chunk's start state and
    within-chunk products."""
    with _cpu_kernel.xla_only():
        return _gla_chunked_fwd(q, k, v, g, h0, k_scale, C, ones, resets)[0]


# Both passes are one `lax.scan` over groups of chunks (about `_GROUP_STEPS` steps each)
# that carries the state (forward) or its cotangent (backward). A group's chunk-start
# states come from its start state by a `linear_scan` over its few chunks, and the
# backward pass recomputes them (one `k^T v` product per chunk) from the group-start
# states the forward pass keeps: one state per group is the only residual besides the
# inputs, and no other buffer has a length of `T / C` states. Each group's products
# stay in cache.


def _extras(k, v, k_scale, ones):
    """The keys and values the recurrence sees, for one group."""
    if k_scale is not None:
        k = k * k_scale
    if ones:
        v = jnp.concatenate([v, jnp.ones_like(v[..., :1])], axis=-1)
    return k, v


def _segments(resets):
    """The reset count up to each step inside each chunk, `(..., C) -> (..., C, 1, 1)`
    int32 (`None` without resets): steps `i, j` of a chunk are in one document iff
    their counts agree."""
    if resets is None:
        return None
    return jnp.cumsum(resets.astype(jnp.int32), axis=-1)[..., None, None]


def _drop_reset_decays(g, r):
    """The log decays `g (..., C, H, K)` with zeros at the reset steps (`r (..., C)`):
    a reset step's decay multiplies a state that is dropped, so it has no effect and
    no derivative; left out of the cumulative sums, it cannot cost them precision."""
    if r is None:
        return g
    return jnp.where(r[..., None, None], 0, g)


def _chunk_starts(k, v, b, state, seg=None):
    """The start states of a group's chunks, from the group's start `state`, and the
    state at its end (a chunk with a reset hands on no state: its total decay is 0)."""
    total, u = _summary(k, v, b, seg)
    h = linear_scan(total, u, state)  # the state at the end of each chunk
    return jnp.concatenate([state[None], h[:-1]]), h[-1]


def _gla_chunked_fwd(q, k, v, g, h0, k_scale, C, ones, resets=None):
    T = q.shape[0]
    group_size = _group_size(T, C)
    groups = jax.tree.map(
        lambda x: _to_groups(x, C, group_size), (q, k, v, g, k_scale, resets)
    )

    def group(state, xs):
        q, k, v, g, k_scale, r = xs
        seg = _segments(r)
        k, v = _extras(k, v, k_scale, ones)
        b = _chunk_cumsum(_drop_reset_decays(g, r))
        s_start, final = _chunk_starts(k, v, b, state, seg)
        o = _outputs(q, k, v, b, s_start, seg)
        return final, ((o[..., :-1], o[..., -1:]) if ones else o, state)

    final, (o, s_group) = lax.scan(group, h0, groups)
    o = jax.tree.map(lambda x: _from_groups(x, T), o)
    return (o, final), s_group


def _gla_chunked_bwd(C, ones, args, s_group, cts):
    """The cotangents of `args = (q, k, v, g, h0, k_scale)` from those of the outputs
    (`cts`, `None` where zero), with the group-start states `s_group` kept by
    `_gla_chunked_fwd`."""
    q, k, v, g, _, k_scale, resets = args
    do, d_final = cts
    T = q.shape[0]
    dtype = s_group.dtype
    zeros = lambda d, n: jnp.zeros(v.shape[:2] + (n,), dtype) if d is None else d  # noqa: E731
    if ones:  # the cotangents of (numerator, normaliser)
        do = (zeros(do[0], v.shape[-1]), zeros(do[1], 1))
    else:
        do = zeros(do, v.shape[-1])
    if d_final is None:
        d_final = jnp.zeros(s_group.shape[1:], dtype)
    group_size = _group_size(T, C)
    groups = jax.tree.map(
        lambda x: _to_groups(x.astype(dtype), C, group_size), (q, k, v, g, k_scale, do)
    )
    r_groups = None if resets is None else _to_groups(resets, C, group_size)

    def group(G_end, xs):
        q, k_in, v_in, g, k_scale, do, r, s_group = xs
        seg = _segments(r)
        k, v = _extras(k_in, v_in, k_scale, ones)
        b = _chunk_cumsum(_drop_reset_decays(g, r))
        s0, _ = _chunk_starts(k, v, b, s_group, seg)
        do = jnp.concatenate(do, axis=-1) if ones else do
        total, x = _state_cotangent(q, b, do, seg)
        # Cotangents of the chunk-end states: G[last] = G_end (from the next group),
        # G[n] = total[n+1] * G[n+1] + x[n+1].
        a_rev = jnp.concatenate([total[1:], jnp.ones_like(total[:1])])
        x_rev = jnp.concatenate([x[1:], jnp.zeros_like(x[:1])])
        G = linear_scan(a_rev, x_rev, G_end, reverse=True)
        dq, dk, dv, dg = _local_bwd(q, k, v, b, s0, do, G, seg)
        dg = _drop_reset_decays(dg, r)
        d_scale = None
        if k_scale is not None:
            d_scale = jnp.sum(dk * k_in, axis=-1, keepdims=True)
            dk = dk * k_scale
        if ones:
            dv = dv[..., :-1]
        return total[0] * G[0] + x[0], (dq, dk, dv, dg, d_scale)

    dh0, grads = lax.scan(
        group, d_final.astype(dtype), (*groups, r_groups, s_group), reverse=True
    )
    dq, dk, dv, dg, d_scale = jax.tree.map(lambda x: _from_groups(x, T), grads)
    return dq, dk, dv, dg, dh0, d_scale, None


# ------------------------------------------------------------------------- one step


def _step(q_t, k_t, v_t, g_t, state):
    """One step in the compute dtype: `g_t` is `(H, K)`, `state` `(H, dk, dv)`."""
    state = jnp.exp(g_t)[..., None] * state + k_t[..., :, None] * v_t[..., None, :]
    return jnp.einsum("hkv,hk->hv", state, q_t), state


def _recurrent(q, k, v, g, h0, resets=None):
    if resets is None:

        def body(state, xs):
            o, state = _step(*xs, state)
            return state, o

        state, o = lax.scan(body, h0, (q, k, v, g))
        return o, state

    def body_resets(state, xs):
        *xs, r = xs
        o, state = _step(*xs, jnp.where(r, jnp.zeros_like(state), state))
        return state, o

    state, o = lax.scan(body_resets, h0, (q, k, v, g, resets))
    return o, state


# --------------------------------------------------------------------------- public


def _normalise(q, k, v, log_decay, h0, what):
    """Validate; return the inputs in the compute dtype, `log_decay` as `(T, H, K)`."""
    T, H, dk, dv = _check_qkv(q, k, v)
    dtypes = [q.dtype]
    if log_decay is None:
        g = jnp.zeros((T, H, 1), q.dtype)
    else:
        check_array(
            "log_decay", log_decay, ndims=(2, 3), expected=f"({T}, {H}) or ({T}, {H}, {dk})"
        )
        if tuple(log_decay.shape) not in ((T, H), (T, H, dk)):
            raise ValueError(
                f"`log_decay` must have shape (T, H) = ({T}, {H}) (one decay per head) "
                f"or (T, H, d_k) = ({T}, {H}, {dk}) (per key), got "
                f"{tuple(log_decay.shape)}."
            )
        g = log_decay if log_decay.ndim == 3 else log_decay[..., None]
        dtypes.append(g.dtype)
    if h0 is not None:
        h0 = as_array(h0)
        check_array("h0", h0, ndims=(3,), expected=f"(H, d_k, d_v) = ({H}, {dk}, {dv})")
        check_shape("h0", h0, (H, dk, dv), f"(H, d_k, d_v) for {what}")
        dtypes.append(h0.dtype)
    dtype = compute_dtype(*dtypes)
    h0 = jnp.zeros((H, dk, dv), dtype) if h0 is None else h0.astype(dtype)
    cast = [x.astype(dtype) for x in (q, k, v, g)]
    return (*cast, h0)


def _resolve_chunk(chunk_size):
    """`chunk_size`, `None` meaning 64, or 32 on the CPU backend (measured faster
    there for per-key decays and no slower otherwise; see the README)."""
    check_chunk_size(chunk_size)
    if chunk_size is None:
        return 32 if jax.default_backend() == "cpu" else 64
    return chunk_size


def _chunk_length(T, per_key, chunk_size):
    """The chunk length used for `T` steps: `chunk_size`, or less for short inputs."""
    if T >= chunk_size:
        return chunk_size
    if not per_key:
        return T
    C = chunk_size  # keep the tree's shape: halve while the chunk still covers T
    while C % 2 == 0 and C // 2 >= T:
        C //= 2
    return C


def _gla(q, k, v, g, h0, chunk_size, method, resets=None):
    """The operator on normalised inputs (compute dtype); outputs in compute dtype."""
    check_method(method, _METHODS)
    if method == "recurrent":
        return _recurrent(q, k, v, g, h0, resets)
    C = _chunk_length(q.shape[0], g.shape[-1] != 1, chunk_size)
    return _gla_chunked(q, k, v, g, h0, None, C, resets=resets)


def gated_linear_attention(
    q: Shaped[Array, "..."],
    k: Shaped[Array, "..."],
    v: Shaped[Array, "..."],
    log_decay: Shaped[Array, "..."] | None = None,
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    resets: Shaped[ArrayLike, "..."] | None = None,
    chunk_size: int | None = None,
    method: str = "chunked",
) -> tuple[Float[Array, "T H dv"], Float[Array, "H dk dv"]]:
    """Gated linear attention, `S[t] = diag(exp(log_decay[t])) S[t-1] + k[t] v[t]^T`,
    `o[t] = S[t]^T q[t]`, per head.

    Covers linear attention (`log_decay=None`), RetNet and Mamba-2/SSD (one decay per
    head) and GLA (one per key dimension).

    **Arguments:**

    - `q`, `k`: queries and keys, shape `(T, H, d_k)`: time on axis 0, `H` heads (one
      example; `jax.vmap` for a batch).
    - `v`: values, shape `(T, H, d_v)`.
    - `log_decay`: the log of the decays, `<= 0`: shape `(T, H)` (scalar per head) or
      `(T, H, d_k)` (per key dimension); `None` for no decay.
    - `h0`: the state before the first step, shape `(H, d_k, d_v)`; zeros if `None`.
    - `resets`: packed documents, a boolean array of shape `(T,)`, true at the first
      step of each document; where true the state restarts before step `t`
      (`S[t] = k[t] v[t]^T`: the previous state, `h0` included, is dropped and
      `log_decay[t]` has no effect), so `o` on `concat(x1, x2)` with a reset at the
      start of `x2` is `concat(o(x1), o(x2))`. `None`: no resets (and no extra cost).
    - `chunk_size`: the chunk length `C` of the chunked form (any `T` works; the last
      chunk is padded). `None`: 64, or 32 on CPU, where it is measured to be faster
      for per-key decays at `d_k = d_v = 64` (see the README).
    - `method`: `"chunked"` (training: matrix products inside chunks, the state
      handed across chunks by `ssm.linear_scan`) or `"recurrent"` (a `lax.scan` of
      `gated_linear_attention_step`, for reference and short sequences).

    **Returns:**

    `(o, final_state)`: the outputs, shape `(T, H, d_v)` in the dtype of `q`, and the
    state after the last step, shape `(H, d_k, d_v)` in float32 (float64 if an input
    is float64).

    The chunked form computes in float32 whatever the input dtype, keeps cumulative
    log decays inside each chunk and exponentiates only differences `b[i] - b[j] <= 0`.
    Resets are masks, not decays: inside a chunk a pair `(i, j)` counts only when no
    reset lies in `(j, i]`, the chunk's start state reaches only the steps before its
    first reset, and only the steps from its last reset on reach its end state (exact;
    no large negative log decay stands in for a reset). With resets, per-key decays
    use the XLA form of the within-chunk tree rather than the compiled CPU kernel,
    which takes no masks (about as fast at small `d_k`, slower at large). Every
    derivative works (to `q`, `k`, `v`, `log_decay` and `h0`), with `jit` and
    `vmap`:

    - reverse mode (`jax.grad`, `jax.vjp`): a hand-written backward pass that keeps
      only the inputs and one state per group of chunks (about 256 steps) and
      recomputes the rest;
    - forward mode (`jax.jvp`, `jax.jacfwd`): the fast forward pass plus JAX's JVP of
      the same chunked form in XLA ops (the CPU kernels off), a few forward passes'
      time, nothing stored;
    - second order (Hessian-vector products by `jax.jvp` of `jax.grad`, grad of grad,
      `jax.hessian`): JAX's autodiff of that XLA form, which keeps what autodiff keeps
      of it (each chunk's start state and within-chunk products: far less than the
      recurrence's `T x d_k x d_v` states, far more than the first-order backward).

    ```python
    o, state = ssm.gated_linear_attention(q, k, v, log_decay)      # training
    o_t, state = ssm.gated_linear_attention_step(q_t, k_t, v_t, g_t, state)
    ```
    """
    q32, k32, v32, g, h0 = _normalise(q, k, v, log_decay, h0, "`q` and `v`")
    resets = check_resets(resets, q.shape[0])
    o, state = _gla(q32, k32, v32, g, h0, _resolve_chunk(chunk_size), method, resets)
    return o.astype(q.dtype), state


def gated_linear_attention_step(
    q_t: Shaped[Array, "..."],
    k_t: Shaped[Array, "..."],
    v_t: Shaped[Array, "..."],
    log_decay_t: Shaped[Array, "..."] | None,
    state: Shaped[ArrayLike, "..."],
) -> tuple[Float[Array, "H dv"], Float[Array, "H dk dv"]]:
    """One step of `gated_linear_attention`, for generation.

    **Arguments:** `q_t`, `k_t` of shape `(H, d_k)`, `v_t` of shape `(H, d_v)`,
    `log_decay_t` of shape `(H,)` or `(H, d_k)` (or `None`), `state` of shape
    `(H, d_k, d_v)`.

    **Returns:** `(o_t, state)`: the output `(H, d_v)` in the dtype of `q_t`, and the
    new state (float32 or wider).
    """
    g = None if log_decay_t is None else log_decay_t[None]
    q, k, v, g, s = _normalise(q_t[None], k_t[None], v_t[None], g, state, "`q_t`, `v_t`")
    o, s = _step(q[0], k[0], v[0], g[0], s)
    return o.astype(q_t.dtype), s


# ---------------------------------------------------------------------------- mLSTM


class MLSTMState(NamedTuple):
    """The mLSTM state of Beck et al. (2024), stabilised.

    `C` (shape `(H, d_k, d_v)`) and `n` (shape `(H, d_k)`) are the matrix memory and
    the normaliser divided by `exp(m)`, `m` (shape `(H,)`) the max-stabiliser.
    """

    C: Float[Array, "H dk dv"]
    n: Float[Array, "H dk"]
    m: Float[Array, " H"]


def _mlstm_inputs(q, k, v, log_forget, log_input, h0):
    T, H, dk, dv = _check_qkv(q, k, v)
    for name, x in (("log_forget", log_forget), ("log_input", log_input)):
        check_array(name, x, ndims=(2,), expected=f"(T, H) = ({T}, {H})")
        check_shape(name, x, (T, H), "(T, H), one gate per head and step")
    dtypes = [q.dtype, log_forget.dtype, log_input.dtype]
    if h0 is not None:
        if not isinstance(h0, tuple) or len(h0) != 3:
            raise TypeError(
                f"`h0` must be an `ssm.MLSTMState(C, n, m)`, got {type(h0).__name__}."
            )
        h0 = MLSTMState(*h0)
        for name, x, shape in (
            ("h0.C", h0.C, (H, dk, dv)),
            ("h0.n", h0.n, (H, dk)),
            ("h0.m", h0.m, (H,)),
        ):
            check_array(name, x, ndims=(len(shape),), expected=str(shape))
            check_shape(name, x, shape, "the state of these `q` and `v`")
            dtypes.append(x.dtype)
    dtype = compute_dtype(*dtypes)
    if h0 is None:
        h0 = MLSTMState(
            jnp.zeros((H, dk, dv), dtype), jnp.zeros((H, dk), dtype), jnp.zeros((H,), dtype)
        )
    h0 = MLSTMState(*(x.astype(dtype) for x in h0))
    cast = (x.astype(dtype) for x in (q, k, v, log_forget, log_input))
    return (*cast, h0)


def _stabiliser(log_forget, log_input, m0, chunk_size, resets=None):
    """`m[t] = max(log_forget[t] + m[t-1], log_input[t])`, `m[-1] = m0`, by chunks.

    With `resets`, `m[t-1]` is 0 where `resets[t]` (as at the start of a sequence):
    the reset step `j` adds the candidate `log_forget[j]` to its own `log_input[j]`,
    pairs across a reset and paths from the chunk's start across one are dropped.

    Inside a chunk, `m[i] = max(b[i] + m_start, max_{j <= i} (log_input[j] + b[i] -
    b[j]))` with `b` the cumulative log forget gate of the chunk (a masked `C x C` max,
    formed for about `_GROUP_STEPS` steps at a time and recomputed in the backward pass,
    so no `T x C` buffer is kept); across chunks, the chunk-start values follow the
    same max-plus recurrence, a `lax.scan` over the `T / C` chunks. Differentiable like
    the recurrence.
    """
    T, H = log_forget.shape
    C = min(chunk_size, T)
    f, i = (_to_chunks(x[..., None], C)[..., 0] for x in (log_forget, log_input))
    b = _cumsum(f)  # (N, C, H)
    if resets is None:

        @jax.checkpoint
        def local_max(x):
            i, b = x  # one chunk, (C, H) each
            cand = i[None, :, :] + b[:, None, :] - b[None, :, :]  # (C_i, C_j, H)
            return jnp.max(jnp.where(_tril(C, 2)[..., None], cand, -jnp.inf), axis=1)

        local = lax.map(local_max, (i, b), batch_size=_group_size(T, C))

        def chunk(m, x):
            b_last, local_last = x
            return jnp.maximum(b_last + m, local_last), m

        _, m_start = lax.scan(chunk, m0, (b[:, -1], local[:, -1]))
        m = jnp.maximum(b + m_start[:, None], local)
        return jnp.reshape(m, (-1, H))[:T]

    r = _to_chunks(resets[:, None, None], C)[..., 0, 0]  # (N, C)
    seg = jnp.cumsum(r.astype(jnp.int32), axis=-1)[..., None]  # (N, C, 1)
    i = jnp.where(r[..., None], jnp.maximum(i, f), i)  # m[j-1] = 0 at a reset j
    # the forget gate of a reset step is in that candidate only: left out of `b`, which
    # is then exact where it is used (no large gate cancels out of a difference)
    b = _cumsum(jnp.where(r[..., None], 0, f))

    @jax.checkpoint
    def local_max_resets(x):
        i, b, seg = x  # one chunk, (C, H), (C, H), (C, 1)
        cand = i[None, :, :] + b[:, None, :] - b[None, :, :]  # (C_i, C_j, H)
        mask = _tril(C, 2)[..., None] & (seg[:, None, :] == seg[None, :, :])
        return jnp.max(jnp.where(mask, cand, -jnp.inf), axis=1)

    local = lax.map(local_max_resets, (i, b, seg), batch_size=_group_size(T, C))

    def chunk_resets(m, x):
        b_last, local_last, reset = x
        from_start = jnp.where(reset, -jnp.inf, b_last + m)
        return jnp.maximum(from_start, local_last), m

    has_reset = jnp.any(r, axis=-1)[:, None]  # (N, 1)
    _, m_start = lax.scan(chunk_resets, m0, (b[:, -1], local[:, -1], has_reset))
    m = jnp.where(seg == 0, jnp.maximum(b + m_start[:, None], local), local)
    return jnp.reshape(m, (-1, H))[:T]


def _mlstm_readout(num, den, m, eps):
    """`h = C q / max(|n q|, exp(-m))` from the numerator `C q` and denominator `n q`."""
    scale = jnp.maximum(jnp.abs(den), jnp.exp(-m)[..., None]) + eps
    return num / scale


def mlstm(
    q: Shaped[Array, "..."],
    k: Shaped[Array, "..."],
    v: Shaped[Array, "..."],
    log_forget: Shaped[Array, "..."],
    log_input: Shaped[Array, "..."],
    h0: MLSTMState | None = None,
    *,
    resets: Shaped[ArrayLike, "..."] | None = None,
    eps: float = 1e-6,
    chunk_size: int | None = None,
    method: str = "chunked",
) -> tuple[Float[Array, "T H dv"], MLSTMState]:
    """The mLSTM memory cell (Beck et al. 2024, "xLSTM"), per head:

    ```
    m[t] = max(log_forget[t] + m[t-1], log_input[t])          # stabiliser
    f[t] = exp(log_forget[t] + m[t-1] - m[t]);  i[t] = exp(log_input[t] - m[t])
    C[t] = f[t] C[t-1] + i[t] k[t] v[t]^T;      n[t] = f[t] n[t-1] + i[t] k[t]
    h[t] = C[t]^T q[t] / (max(|n[t] . q[t]|, exp(-m[t])) + eps)
    ```

    (the stabilised form of `C[t] = f C[t-1] + exp(i~) k v^T`, `h = C^T q /
    max(|n^T q|, 1)`). Computed as a gated linear attention with the scalar decay
    `log_forget[t] + m[t-1] - m[t] <= 0`, keys scaled by `i[t] <= 1` and a column of
    ones appended to the values (which carries the normaliser); the stabiliser is its
    max-plus recurrence, by chunks. Gradients flow through `m` as in the recurrence.
    Derivatives of every order and mode work, at the costs given for
    `gated_linear_attention` (the stabiliser is plain JAX).

    **Arguments:**

    - `q`, `k`: `(T, H, d_k)`; `v`: `(T, H, d_v)` (scale `k` by `1/sqrt(d_k)` as the
      paper does, before the call).
    - `log_forget`: `(T, H)`, the log forget gate (`log_sigmoid` of its pre-activation,
      or the pre-activation itself for an exponential forget gate).
    - `log_input`: `(T, H)`, the input gate pre-activation (the gate is `exp` of it).
    - `h0`: an `MLSTMState` (zeros, with `m = 0`, if `None`).
    - `resets`: boolean `(T,)`, true at the first step of each packed document: the
      whole state restarts before those steps as at the start of a sequence (`C = 0`,
      `n = 0` and the stabiliser `m[t-1] = 0`, so `m[t] = max(log_forget[t],
      log_input[t])`), `h0` included. By masks inside the chunked form, as for
      `gated_linear_attention`. `None`: no resets.
    - `eps`: added to the normaliser (as in the official implementation).
    - `chunk_size`, `method`: as for `gated_linear_attention`.

    **Returns:** `(h, state)`: `h` of shape `(T, H, d_v)` in the dtype of `q`, and the
    final `MLSTMState` (float32 or wider).
    """
    check_method(method, _METHODS)
    q32, k32, v32, log_f, log_i, h0 = _mlstm_inputs(q, k, v, log_forget, log_input, h0)
    resets = check_resets(resets, q.shape[0])
    if method == "recurrent":
        if resets is None:

            def body(state, xs):
                h, state = _mlstm_step(*xs, state, eps)
                return state, h

            state, h = lax.scan(body, h0, (q32, k32, v32, log_f, log_i))
            return h.astype(q.dtype), state

        def body_resets(state, xs):
            *xs, r = xs
            state = jax.tree.map(lambda x: jnp.where(r, jnp.zeros_like(x), x), state)
            h, state = _mlstm_step(*xs, state, eps)
            return state, h

        state, h = lax.scan(body_resets, h0, (q32, k32, v32, log_f, log_i, resets))
        return h.astype(q.dtype), MLSTMState(*state)
    chunk_size = _resolve_chunk(chunk_size)
    m = _stabiliser(log_f, log_i, h0.m, chunk_size, resets)
    m_prev = jnp.concatenate([h0.m[None], m[:-1]])
    if resets is not None:  # the decay at a reset step is masked; keep it finite
        m_prev = jnp.where(resets[:, None], m, m_prev)
    decay = log_f + m_prev - m
    i = jnp.exp(log_i - m)[..., None]  # the input gate, <= 1
    s0 = jnp.concatenate([h0.C, h0.n[..., None]], axis=-1)
    C = _chunk_length(q.shape[0], False, chunk_size)
    (num, den), s = _gla_chunked(
        q32, k32, v32, decay[..., None], s0, i, C, True, resets=resets
    )
    h = _mlstm_readout(num, den, m, eps)
    return h.astype(q.dtype), MLSTMState(s[..., :-1], s[..., -1], m[-1])


def _mlstm_step(q_t, k_t, v_t, log_f, log_i, state, eps):
    C, n, m = state
    m_new = jnp.maximum(log_f + m, log_i)
    f = jnp.exp(log_f + m - m_new)
    i = jnp.exp(log_i - m_new)
    C = f[:, None, None] * C + i[:, None, None] * (k_t[:, :, None] * v_t[:, None, :])
    n = f[:, None] * n + i[:, None] * k_t
    num = jnp.einsum("hkv,hk->hv", C, q_t)
    den = jnp.sum(n * q_t, axis=-1, keepdims=True)
    h = num / (jnp.maximum(jnp.abs(den), jnp.exp(-m_new)[:, None]) + eps)
    return h, MLSTMState(C, n, m_new)


def mlstm_step(
    q_t: Shaped[Array, "..."],
    k_t: Shaped[Array, "..."],
    v_t: Shaped[Array, "..."],
    log_forget_t: Shaped[Array, "..."],
    log_input_t: Shaped[Array, "..."],
    state: MLSTMState,
    *,
    eps: float = 1e-6,
) -> tuple[Float[Array, "H dv"], MLSTMState]:
    """One step of `mlstm`, for generation.

    **Arguments:** `q_t`, `k_t` `(H, d_k)`, `v_t` `(H, d_v)`, the gates `(H,)`, and the
    `MLSTMState`.

    **Returns:** `(h_t, state)`, `h_t` of shape `(H, d_v)` in the dtype of `q_t`.
    """
    q, k, v, log_f, log_i, state = _mlstm_inputs(
        q_t[None], k_t[None], v_t[None], log_forget_t[None], log_input_t[None], state
    )
    h, state = _mlstm_step(q[0], k[0], v[0], log_f[0], log_i[0], state, eps)
    return h.astype(q_t.dtype), state
