"""The chunked form of gated linear attention, with its hand-written derivative.

Time is split into chunks of ``C`` steps. Within a chunk the outputs are masked matrix
products (``ssm._gla_intra``); across chunks the state is handed on with the chunk's
total decay, in one pass: a ``lax.scan`` over groups of chunks (about `_GROUP_STEPS`
steps each), ``ssm.linear_scan`` over the few chunks inside a group.

Packed documents (``resets``, true at the first step of each document) are masks, never
decays: with ``seg`` the number of resets up to each step inside a chunk, a pair ``(i, j)``
of the chunk counts only when ``seg[i] == seg[j]``; the chunk's start state reaches step
``i`` only when ``seg[i] == 0``; only steps with ``seg[j] == seg[last]`` reach its end
state, and a chunk with a reset hands on no state (total decay 0). A reset step's own
log decay multiplies a dropped state, so it is set to 0 before the cumulative sums
(exact, and no large value enters a difference). The masked factors are their own
derivatives, so the hand-written backward pass carries the masks without further terms.

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

import jax
import jax.numpy as jnp
from jax import lax

from . import _kernels
from ._autodiff import fast_vjp
from ._chunking import from_groups, heads_first, mT, to_groups
from ._gla_intra import _intra_per_key, _intra_per_key_bwd, _intra_scalar, _intra_scalar_bwd
from ._kernels import matmul
from ._scan import linear_scan

# Chunks are processed in groups of about this many time steps (a `lax.scan` over
# groups), which bounds the memory of the within-chunk products whatever the length;
# the backward pass keeps one state per group.
_GROUP_STEPS = 256


def _group_size(T, C):
    """Chunks per group: about `_GROUP_STEPS` steps, at most the number of chunks."""
    return max(1, min(_GROUP_STEPS // C, -(-T // C)))


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


def _seg_first(seg):
    return None if seg is None else heads_first(seg)


def _summary(k, v, b, seg=None):
    """A chunk's total decay `(..., H, K, 1)` and its input to the state, from its
    cumulative log decays `b` (here and below: `(..., C, H, K)`, see `_chunk_cumsum`;
    `seg` `(..., C, 1, 1)` the reset counts inside the chunk, or `None`)."""
    k, v, b = (heads_first(x) for x in (k, v, b))
    _, k_decay, total = _decays(b, _seg_first(seg))
    return mT(total), matmul(k * k_decay, v, transpose_a=True)


def _outputs(q, k, v, b, s0, seg=None):
    """A chunk's outputs from its start state `s0` `(..., H, dk, dv)`."""
    q, k, v, b = (heads_first(x) for x in (q, k, v, b))
    seg = _seg_first(seg)
    q_decay, _, _ = _decays(b, seg)
    intra = (_intra_scalar if b.shape[-1] == 1 else _intra_per_key)(q, k, v, b, seg)
    return heads_first(intra + matmul(q * q_decay, s0))


def _state_cotangent(q, b, do, seg=None):
    """A chunk's total decay and `(q exp(b))^T do`, the cotangent its outputs send to
    its start state."""
    q, b, do = (heads_first(x) for x in (q, b, do))
    q_decay, _, total = _decays(b, _seg_first(seg))
    return mT(total), matmul(q * q_decay, do, transpose_a=True)


def _local_bwd(q, k, v, b, s0, do, G, seg=None):
    """Cotangents of a chunk's inputs, given those of its outputs (`do`) and of its end
    state (`G`), from its start state `s0`. With resets the masked factors of
    `_decays` and the masked within-chunk products carry the masks into every term
    (a factor that is zero has a zero derivative)."""
    q, k, v, b, do = (heads_first(x) for x in (q, k, v, b, do))
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
    d_last = d_last + _to_k(mT(jnp.sum(s0 * G, axis=-1, keepdims=True)), K) * total
    db = db - t
    db = jnp.concatenate([db[..., :-1, :], db[..., -1:, :] + d_last], axis=-2)
    dq, dk, dv, db = (heads_first(x) for x in (dq, dk, dv, db))
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
    with _kernels.xla_only():
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
        lambda x: to_groups(x, C, group_size), (q, k, v, g, k_scale, resets)
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
    o = jax.tree.map(lambda x: from_groups(x, T), o)
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
        lambda x: to_groups(x.astype(dtype), C, group_size), (q, k, v, g, k_scale, do)
    )
    r_groups = None if resets is None else to_groups(resets, C, group_size)

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
    dq, dk, dv, dg, d_scale = jax.tree.map(lambda x: from_groups(x, T), grads)
    return dq, dk, dv, dg, dh0, d_scale, None
