"""Within-chunk products of gated linear attention: scalar decays and the per-key tree.

Inside a chunk of ``C`` steps, with ``b`` the cumulative log decay inside the chunk,
the outputs are masked matrix products on decays ``exp(b[i] - b[j])``, masked to
``j <= i`` *before* the exponential (so every exponent is <= 0 and nothing overflows).
Per-key decays cannot be factored into one product of rescaled queries and keys without
overflow, so the chunk is halved recursively: the pairs that straddle the middle of a
block use ``exp(b[i] - r) exp(r - b[j])`` with ``r`` the cumulative decay at the middle,
both factors <= 1 (a variant of the secondary chunking of Yang et al. 2024, section 4,
with ``log2 C`` levels of one product each). On CPU the tree is one call of a compiled
kernel (``ssm._kernels``); elsewhere, and with resets, it is the XLA form below.

With resets (``seg``, the number of resets up to each step inside a chunk) a pair
``(i, j)`` counts only when ``seg[i] == seg[j]``; in the per-key tree a pair across a
block's middle splits into a condition on ``i`` and one on ``j``, so each stays one
matrix product.
"""

from __future__ import annotations

import jax.numpy as jnp

from ._chunking import mT, tril
from ._kernels import matmul, per_key_tree

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
    mask = tril(C, diff.ndim)
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
    mask = tril(c, diff.ndim - 1)[..., None]
    if seg is not None:
        ss = jnp.reshape(seg, seg.shape[:-2] + (-1, c, 1))
        mask = mask & (ss[..., :, None, :] == ss[..., None, :, :])
    decay = jnp.exp(jnp.where(mask, diff, -jnp.inf))
    return jnp.sum(qs[..., :, None, :] * ks[..., None, :, :] * decay, axis=-1), decay


def _intra_per_key(q, k, v, b, seg=None):
    """Within-chunk outputs for a per-key decay: `_tree` in XLA ops, or the compiled
    kernel that does the same on CPU (`ssm._kernels.per_key_tree`). The kernel
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
        da = (dos @ mT(vs)) * tril(c, a.ndim).astype(a.dtype)
        dv = jnp.reshape(mT(a) @ dos, v.shape)
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
