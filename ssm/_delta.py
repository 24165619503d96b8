"""The (gated) delta rule: chunked with the WY/UT representation, recurrent, one step.

The recurrence, per head, with a matrix state ``S`` of shape ``(d_k, d_v)``:

    S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ,     o[t] = S[t]ᵀ q[t],

DeltaNet when ``α = 1`` (Yang et al. 2024, "Parallelizing Linear Transformers with
the Delta Rule over Sequence Length") and Gated DeltaNet otherwise (Yang, Kautz and
Hatamizadeh 2025, "Gated Delta Networks: Improving Mamba2 with Delta Rule").

The chunked form. Write ``S[t] = α[t] S[t-1] + k[t] w[t]ᵀ`` with the "new values"
``w[t] = β[t] (v[t] - α[t] S[t-1]ᵀ k[t])``. Inside a chunk of ``C`` steps that starts
from ``S0``, with cumulative log gates ``g[t] = Σ_{s≤t} log α[s]``, ``γ[t] = exp g[t]``
and ``Γ[t, s] = exp(g[t] - g[s])`` (all ≤ 1), unrolling gives the unit-lower-
triangular system (the UT transform)

    (I + A) W = diag(β) V - diag(β γ) K S0,    A[t, s] = β[t] Γ[t, s] k[t]·k[s]  (s < t)

so ``W = U - Wk S0`` with the WY factors ``U = (I + A)⁻¹ diag(β) V`` and
``Wk = (I + A)⁻¹ diag(β γ) K``: one unit-lower-triangular inverse per chunk. Then

    O      = diag(γ) Q S0 + P W,      P = Γ ⊙ QKᵀ (causal)
    S_end  = γ[C] S0 + K̃ᵀ W,          K̃ = diag(exp(g[C] - g)) K,

which is the matrix recurrence ``S_end = (γ[C] I - K̃ᵀ Wk) S0 + K̃ᵀ U`` across
chunks. It is applied chunk after chunk (the equivalent of ``matrix_scan`` over
those transitions, without forming the ``d_k × d_k`` matrices: ``W = U - Wk S0``
costs the same). Inside a chunk everything is matrix products; the inverse of
``I + A`` is formed by blockwise doubling (``log₂ C`` levels of batched products,
forward substitution reordered) rather than a triangular solve, which is far slower
on CPU.

Packed documents (``resets``, true at the first step of each document) make a reset
step ``α = 0`` exactly, by masks rather than a large negative log gate: with ``seg``
the number of resets up to each step inside the chunk, ``Γ[t, s] = 0`` unless
``seg[t] = seg[s]``, ``γ[t] = 0`` unless ``seg[t] = 0`` and ``exp(g[C] - g[s]) = 0``
unless ``seg[s] = seg[C]``, and the reset steps' own gates are set to 0 before the
cumulative sum. Everything else (the UT transform, the chain across chunks, the
hand-written derivative) is unchanged, since the masked factors enter it as factors.

Both passes are a ``lax.scan`` over groups of chunks of about 256 steps (see
`_group`): a group's factors, which do not depend on the state, are computed in
products batched over its chunks; then the chunks one after another, ``W = U - Wk
S0`` and ``S_end`` (two products per chunk, all of a group's chunks and heads in one
call of `chain`, a compiled kernel on CPU); then the outputs, batched again. So one
group of work is live at a time, and the reverse-mode derivative keeps only the
inputs, the state at the start of each chunk (``T / C`` states, a ``C``-th of
the state history) and its new values ``W`` (as large as ``v``), with each chunk's
``(I + A)⁻¹`` and ``Γ`` (``C × C`` each). Backwards, a reverse ``lax.scan`` carries
``G = dL/dS``; each group recomputes its chunks' other factors from their inputs,
runs the state part of the derivative back through its chunks (the same `chain`,
reversed) and the rest batched, all written by hand: the state part

    dW = Pᵀ dO + K̃ G,     dS0 = (diag(γ) Q)ᵀ dO + γ[C] G - Wkᵀ dW,

the UT transform (``X = (I + A)⁻¹ R`` gives ``dR = (I + A)⁻ᵀ dX``, ``dA = -dR Xᵀ``),
the products, and the gates back through their cumulative sum. No array of size
``T × d_k × d_v`` exists in either pass. The operator is an
``ssm._autodiff.fast_vjp`` of those two passes and a reference, the same chunked form
traced with the compiled CPU kernels off (plain XLA ops): forward mode and every
second-order derivative are JAX's autodiff of that reference. States and
accumulations are float32 (float64 if an input is) whatever the input dtype; gates
enter only as differences of cumulative log gates inside a chunk, so every
exponential is ≤ 1.
"""

from __future__ import annotations

import functools
from typing import NamedTuple

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

from . import _kernels
from ._autodiff import fast_vjp
from ._checks import (
    check_array,
    check_chunk_size,
    check_method,
    check_resets,
    check_shape,
    compute_dtype,
)
from ._chunking import heads_first as _heads_first
from ._kernels import chain, matmul

_METHODS = ("chunked", "recurrent")
# Chunks are taken in groups of about this many steps (see `_group`): a scan step's
# factors are computed together, in products batched over the group.
_GROUP_STEPS = 256


# ---------------------------------------------------------------------------
# Validation.


def _check_shape(name, x, expected, names):
    check_shape(name, x, expected, f"({', '.join(names)})")


def _validate(q, k, v, beta, log_decay, h0, *, step):
    """Check every argument; returns ``(H, d_k, d_v)`` and the compute/output dtypes."""
    lead_names = () if step else ("T",)
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        check_array(name, x)
    rank = 2 if step else 3
    if q.ndim != rank:
        names = ", ".join((*lead_names, "H", "d_k"))
        raise ValueError(
            f"`q` must have shape ({names}), got {tuple(q.shape)}"
            + ("" if step else "; for a batch use `jax.vmap`.")
        )
    lead = tuple(q.shape[:-2])
    H, dk = q.shape[-2:]
    _check_shape("k", k, (*lead, H, dk), (*lead_names, "H", "d_k"))
    if v.ndim != rank or tuple(v.shape[:-1]) != (*lead, H):
        raise ValueError(
            f"`v` must have shape ({', '.join((*lead_names, 'H', 'd_v'))}) = "
            f"{(*lead, H, 'd_v')}, got {tuple(v.shape)}."
        )
    dv = v.shape[-1]
    _check_shape("beta", beta, (*lead, H), (*lead_names, "H"))
    dtypes = [q.dtype, k.dtype, v.dtype, beta.dtype]
    if log_decay is not None:
        check_array("log_decay", log_decay)
        _check_shape("log_decay", log_decay, (*lead, H), (*lead_names, "H"))
        dtypes.append(log_decay.dtype)
    state = "state" if step else "h0"
    if h0 is not None:
        check_array(state, h0)
        _check_shape(state, h0, (H, dk, dv), ("H", "d_k", "d_v"))
        dtypes.append(h0.dtype)
    compute = compute_dtype(*dtypes)
    same = q.dtype == k.dtype == v.dtype
    out = np.dtype(q.dtype) if same else compute
    return (H, dk, dv), compute, out


# ---------------------------------------------------------------------------
# The recurrent and one-step forms.


def _step(S, q, k, v, beta, log_decay):
    """One step of every head: ``S (H, dk, dv)``, ``q, k (H, dk)``, ``v (H, dv)``."""
    kS = jnp.einsum("hk,hkv->hv", k, S)
    if log_decay is None:
        S = S + (beta[:, None] * k)[:, :, None] * (v - kS)[:, None, :]
    else:
        alpha = jnp.exp(log_decay)[:, None]
        u = v - alpha * kS
        S = alpha[:, :, None] * S + (beta[:, None] * k)[:, :, None] * u[:, None, :]
    return jnp.einsum("hk,hkv->hv", q, S), S


def _recurrent(q, k, v, beta, log_decay, h0, resets=None):
    if resets is None:

        def body(S, x):
            o, S = _step(S, *x)
            return S, o

        S, o = lax.scan(body, h0, (q, k, v, beta, log_decay))
        return o, S

    def body_resets(S, x):
        *x, r = x
        o, S = _step(jnp.where(r, jnp.zeros_like(S), S), *x)
        return S, o

    S, o = lax.scan(body_resets, h0, (q, k, v, beta, log_decay, resets))
    return o, S


# ---------------------------------------------------------------------------
# The chunked form.


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _tril(shape, k=0):
    """The lower-triangular mask (below diagonal ``k``), broadcast to ``shape``."""
    return jnp.broadcast_to(jnp.tril(jnp.ones(shape[-2:], bool), k), shape)


def _unit_lower_inverse(A):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A (..., C, C)``, in matrix products.

    Blockwise doubling: the inverse of a unit-lower-triangular ``[[L₁, 0], [M, L₂]]``
    is ``[[L₁⁻¹, 0], [-L₂⁻¹ M L₁⁻¹, L₂⁻¹]]``, applied to diagonal blocks of size 1, 2,
    4, ... (``log₂ C`` levels of batched products; forward substitution, reordered,
    so as stable). Batched triangular solves are far slower on CPU.
    """
    C = A.shape[-1]
    Cp = 1 << max(C - 1, 0).bit_length()
    if Cp != C:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, Cp - C), (0, Cp - C)])
    lead = A.shape[:-2]
    # Top down: the sub-diagonal blocks M of every level, from the diagonal blocks.
    below, diagonal, b = {}, A[..., None, :, :], Cp // 2
    while b >= 1:
        n = diagonal.shape[-3]
        below[b] = diagonal[..., b:, :b]  # (..., n, b, b)
        quarters = diagonal.reshape(lead + (n, 2, b, 2, b))
        diagonal = jnp.stack([quarters[..., 0, :, 0, :], quarters[..., 1, :, 1, :]], -3)
        diagonal = diagonal.reshape(lead + (2 * n, b, b))
        b //= 2
    # Bottom up: the inverses of the diagonal blocks, doubling their size each level.
    inv, b = jnp.ones(lead + (Cp, 1, 1), A.dtype), 1
    while b < Cp:
        pairs = inv.reshape(lead + (Cp // (2 * b), 2, b, b))
        X1, X2 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        top = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
        bottom = jnp.concatenate([-matmul(matmul(X2, below[b]), X1), X2], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        b *= 2
    return inv[..., 0, :C, :C]


class _Factors(NamedTuple):
    """The chunk-local factors (everything that does not depend on the chunk's state)
    and the intermediates the backward pass reuses; shapes per head."""

    Qg: Array  # diag(γ) Q, (C, dk)
    P: Array  # Γ ⊙ QKᵀ, causal, (C, C)
    X: Array  # the WY factors [U | Wk] = (I + A)⁻¹ [diag(β) V | diag(βγ) K], (C, dv + dk)
    Kd: Array  # diag(exp(g[C] - g)) K, (C, dk)
    gam_C: Array  # γ[C], ()
    inverse: Array  # (I + A)⁻¹, (C, C)
    KK: Array
    QK: Array
    Gam: Array | None  # Γ[t, s] = exp(g[t] - g[s]) for s ≤ t (None without gates)
    gam: Array | None  # γ = exp(g)
    e: Array | None  # exp(g[C] - g)


def _factors(q, k, v, beta, log_decay, saved=None, seg=None) -> _Factors:
    """The factors of chunks, heads first: ``q, k (..., C, dk)``, ``v (..., C, dv)``,
    ``beta, log_decay (..., C)``; ``saved``, if given, is ``(inverse, Gam)`` as an
    earlier call returned them (the backward pass reuses them rather than compute
    the exponentials and the inverse again).

    With resets, ``seg (..., 1, C)`` counts them up to each step of the chunk, and a
    reset acts as ``α = 0`` exactly, by masks: ``Γ[t, s] = 0`` when a reset lies in
    ``(s, t]`` (``seg`` differs), ``γ[t] = 0`` after the chunk's first reset, ``exp(g[C]
    - g[s]) = 0`` before its last (and so ``γ[C] = 0`` in a chunk with a reset)."""
    KK = matmul(k, k, transpose_b=True)
    QK = matmul(q, k, transpose_b=True)
    causal, strict = _tril(QK.shape), _tril(QK.shape, -1)
    if seg is not None:
        same = seg[..., :, None] == seg[..., None, :]
        causal, strict = causal & same, strict & same
    if log_decay is None:
        Gam = gam = e = None
        A = jnp.where(strict, beta[..., :, None] * KK, 0)
        P = jnp.where(causal, QK, 0)
        rhs = beta[..., None] * jnp.concatenate([v, k], axis=-1)
        Qg, Kd = q, k
        gam_C = jnp.ones(q.shape[:-2], q.dtype)
    else:
        g = jnp.cumsum(log_decay, axis=-1)
        if saved is None:
            # the differences materialised first: fused with them, XLA's exponential
            # costs twice as long (index arithmetic of the broadcasts, measured)
            diff = lax.optimization_barrier(g[..., :, None] - g[..., None, :])
            Gam = jnp.where(causal, jnp.exp(jnp.minimum(diff, 0)), 0)  # ≤ 0 where kept
        else:
            Gam = saved[1]
        A = jnp.where(strict, beta[..., :, None] * Gam * KK, 0)
        P = Gam * QK
        gam = jnp.exp(g)
        e = jnp.exp(g[..., -1:] - g)
        if seg is not None:
            gam = jnp.where(seg == 0, gam, 0)
            e = jnp.where(seg == seg[..., -1:], e, 0)
        rhs = jnp.concatenate([beta[..., None] * v, (beta * gam)[..., None] * k], -1)
        Qg = gam[..., None] * q
        Kd = e[..., None] * k
        gam_C = gam[..., -1]
    inverse = _unit_lower_inverse(A) if saved is None else saved[0]
    return _Factors(Qg, P, matmul(inverse, rhs), Kd, gam_C, inverse, KK, QK, Gam, gam, e)


def _prepare(compute, q, k, v, beta, log_decay):
    """Chunks in the compute dtype, heads first: ``(..., C, H, d) -> (..., H, C, d)``
    and ``(..., C, H) -> (..., H, C)``."""
    q, k, v = (_heads_first(x.astype(compute)) for x in (q, k, v))
    beta = _mT(beta.astype(compute))
    log_decay = None if log_decay is None else _mT(log_decay.astype(compute))
    return q, k, v, beta, log_decay


def _state_vjp(f, dO, G):
    """The state part of a group's derivative, given the cotangents ``dO`` of its
    outputs and ``G`` of the state at its end. With ``W = U - Wk S0``, ``O = Qg S0 +
    P W`` and ``S_end = γ[C] S0 + Kdᵀ W``, chunk after chunk backwards

        dW = Pᵀ dO + Kd G,     dS0 = Qgᵀ dO + γ[C] G - Wkᵀ dW,

    the same chain as forwards (`chain`), with ``Pᵀ dO`` and ``Qgᵀ dO`` batched over
    the group. Returns ``dW`` and the cotangents of the chunks' end states (``(g,
    ...)`` each), and that of the group's start state."""
    dv = dO.shape[-1]
    PdO = matmul(f.P, dO, transpose_a=True)
    QdO = matmul(f.Qg, dO, transpose_a=True)
    ends, dW, G = chain(
        PdO, f.Kd, f.X, f.gam_C, G, QdO, b_offset=dv, negate_b=True, reverse=True
    )
    return dW, ends, G


def _local_vjp(S0, W, dW, G, dO, inputs, f):
    """The cotangents of a group's chunk inputs (heads first, as `_prepare` returns
    them), given their start states ``S0``, new values ``W = U - Wk S0``, the
    cotangents ``dW`` of ``W``, ``G`` of their end states and ``dO`` of their outputs;
    batched over the group's chunks: the products, then the UT transform (``X = (I +
    A)⁻¹ R`` gives ``dR = (I + A)⁻ᵀ dX`` and ``dA = -dR Xᵀ``, strictly lower), the
    gates and the cumulative sum of the log gates back to the inputs."""
    q, k, v, beta, log_decay = inputs
    dv = v.shape[-1]
    dP = matmul(dO, W, transpose_b=True)
    dQg = matmul(dO, S0, transpose_b=True)
    dKd = matmul(W, G, transpose_b=True)
    dX = jnp.concatenate([dW, -matmul(dW, S0, transpose_b=True)], axis=-1)
    dR = matmul(f.inverse, dX, transpose_a=True)
    dA = -jnp.where(_tril(dP.shape, -1), matmul(dR, f.X, transpose_b=True), 0)
    dR_v, dR_k = dR[..., :dv], dR[..., dv:]
    if log_decay is None:
        dKK = beta[..., :, None] * dA
        dQK = jnp.where(_tril(dP.shape), dP, 0)
        dbeta = jnp.sum(dA * f.KK, -1)
        dq = matmul(dQK, k) + dQg
        dk = dR_k * beta[..., None] + dKd
        dbeta = dbeta + jnp.sum(dR_k * k, -1)
        dlog_decay = None
    else:
        Gam, gam, e = f.Gam, f.gam, f.e
        dAG = dA * Gam
        dKK = beta[..., :, None] * dAG
        dQK = dP * Gam
        dk_rk = jnp.sum(dR_k * k, -1)
        dbeta = jnp.sum(dAG * f.KK, -1) + dk_rk * gam
        dq = matmul(dQK, k) + dQg * gam[..., None]
        dk = dR_k * (beta * gam)[..., None] + dKd * e[..., None]
        # the gates: γ = exp(g), e = exp(g[C] - g), Γ = exp(g[t] - g[s]), g = cumsum
        dgam = beta * dk_rk + jnp.sum(dQg * q, -1)
        dgam = dgam.at[..., -1].add(jnp.sum(S0 * G, axis=(-2, -1)))
        de = jnp.sum(dKd * k, -1) * e
        dG = (beta[..., :, None] * dA * f.KK + dP * f.QK) * Gam
        dg = dgam * gam - de + jnp.sum(dG, -1) - jnp.sum(dG, -2)
        dg = dg.at[..., -1].add(jnp.sum(de, -1))
        dlog_decay = jnp.flip(jnp.cumsum(jnp.flip(dg, -1), -1), -1)
    dk = dk + matmul(dQK, q, transpose_a=True) + matmul(dKK + _mT(dKK), k)
    dv_ = dR_v * beta[..., None]
    dbeta = dbeta + jnp.sum(dR_v * v, -1)
    return dq, dk, dv_, dbeta, dlog_decay


def _to_chunks(x, C, g=1):
    """``(T, ...) -> (n, g, C, ...)``, zero-padded at the end to a whole number of groups
    of ``g`` chunks.

    Zero padding is inert: with ``k = β = 0`` and ``log α = 0`` a step leaves the
    state as it is, so the state after the last chunk is the state at ``T``.
    """
    if x is None:
        return None
    T = x.shape[0]
    n = -(-T // (g * C))
    if n * g * C != T:
        x = jnp.concatenate([x, jnp.zeros((n * g * C - T,) + x.shape[1:], x.dtype)])
    return x.reshape((n, g, C) + x.shape[1:])


def _from_chunks(x, T):
    return x.reshape((-1,) + x.shape[3:])[:T]


def _group(T, C):
    """How many chunks one step of the scans takes: about `_GROUP_STEPS` steps' worth
    (their factors are computed together, in products batched over the group), but
    fewer where padding ``T`` to a whole number of groups would add more than an
    eighth."""
    n = -(-T // C)
    g = max(1, min(n, _GROUP_STEPS // C))
    while g > 1 and (-(-n // g) * g - n) * 8 > n:
        g -= 1
    return g


def _chunked(C, out_dtype, q, k, v, beta, log_decay, h0, resets=None):
    """The chunked form; differentiable in every way (`_chunked_op`): reverse mode by
    the hand-written `_chunked_bwd`, forward mode and second order through
    `_reference`. With `resets`, `log_decay` must be given (zeros for none)."""
    op = _chunked_op(int(C), np.dtype(out_dtype))
    return op(q, k, v, beta, log_decay, h0, resets)


@functools.cache
def _chunked_op(C, out_dtype):
    """`_chunked` for one chunk length and output dtype (static, closed over), as a
    `fast_vjp`: its value and residuals from `_chunked_fwd`, its reverse mode
    `_chunked_bwd`, everything else JAX's autodiff of `_reference`."""

    def fwd(*args):
        return _chunked_fwd(C, out_dtype, *args)

    def bwd(args, saved, cts, want):
        del want  # every cotangent costs about the same; all are computed
        return _chunked_bwd(C, out_dtype, args, saved, cts)

    def reference(*args):
        return _reference(C, out_dtype, *args)

    return fast_vjp(fwd, bwd, reference)


def _reference(C, out_dtype, q, k, v, beta, log_decay, h0, resets):
    """The chunked form in plain XLA ops (the compiled kernels off while it is
    traced), which JAX differentiates to any order: forward mode (`jax.jvp`,
    `jax.jacfwd`) and every second-order derivative of `_chunked` go through it. Its
    forward mode stores nothing; its reverse mode (used only for second order) keeps
    what JAX keeps of a `lax.scan` over groups: each chunk's start state, factors and
    inverse."""
    with _kernels.xla_only():
        return _chunked_fwd(C, out_dtype, q, k, v, beta, log_decay, h0, resets)[0]


def _segments(r):
    """The chunks' reset flags ``r (..., C)`` -> the reset counts up to each step,
    heads first ``(..., 1, C)`` int32 (steps of a chunk with equal counts are in one
    document)."""
    return jnp.cumsum(r.astype(jnp.int32), axis=-1)[..., None, :]


def _drop_reset_decays(log_decay, r):
    """Zeros at the reset steps of ``log_decay (..., C, H)``: a reset step's gate
    multiplies a dropped state (no effect, no derivative), and left out of the
    cumulative sums it cannot cost them precision."""
    return jnp.where(r[..., None], 0, log_decay)


def _chunked_fwd(C, out_dtype, q, k, v, beta, log_decay, h0, resets=None):
    """Groups of chunks in order: a ``lax.scan`` that carries the state. A group's
    factors come first, batched; then its chunks' states, one after another; then
    its outputs, batched. The chunks' start states are kept for the backward pass
    (``T / C`` states, a ``C``-th of the state history), with their new values ``W``
    (``T × d_v`` per head), the inverses ``(I + A)⁻¹`` and gate matrices ``Γ`` (``T ×
    C`` numbers per head each)."""
    xs = (q, k, v, beta, log_decay)
    g = _group(q.shape[0], C)
    if resets is not None:
        xs = (*xs, resets)

    def body(S0, xs_g):
        if resets is None:
            f = _factors(*_prepare(S0.dtype, *xs_g))
        else:
            *xs_g, r = xs_g
            xs_g[4] = _drop_reset_decays(xs_g[4], r)
            f = _factors(*_prepare(S0.dtype, *xs_g), seg=_segments(r))
        dv = S0.shape[-1]  # chunk after chunk: W = U - Wk S0, S_end = γ[C] S0 + Kdᵀ W
        starts, W, S = chain(f.X, f.X, f.Kd, f.gam_C, S0, a_offset=dv, negate_a=True)
        o = matmul(f.Qg, starts) + matmul(f.P, W)
        return S, (_heads_first(o).astype(out_dtype), (starts, W, f.inverse, f.Gam))

    S, (o, saved) = lax.scan(body, h0, tuple(_to_chunks(x, C, g) for x in xs))
    return (_from_chunks(o, q.shape[0]), S), saved


def _chunked_bwd(C, out_dtype, args, saved, cotangents):
    """Groups of chunks in reverse order, carrying ``dL/dS``: the cotangents of ``args
    = (q, k, v, beta, log_decay, h0)`` from those of the outputs (``None`` where
    zero) and what `_chunked_fwd` saved. Each group recomputes its chunks' factors
    from their inputs, runs the state part of the derivative backward through its
    chunks and the rest batched over them; nothing of size ``T × d_k × d_v`` is ever
    held."""
    xs, h0, resets = args[:5], args[5], args[6]
    do, G = cotangents
    T = xs[0].shape[0]
    dtype = saved[0].dtype
    do = jnp.zeros(xs[2].shape, dtype) if do is None else do  # v: (T, H, d_v)
    G = jnp.zeros(h0.shape, dtype) if G is None else G
    g = _group(T, C)

    def body(G, inputs):
        xs_g, (S0, W, inverse, Gam), dO, r = inputs
        seg = None
        if r is not None:
            xs_g = (*xs_g[:4], _drop_reset_decays(xs_g[4], r))
            seg = _segments(r)
        prepared = _prepare(S0.dtype, *xs_g)
        f = _factors(*prepared, saved=(inverse, Gam), seg=seg)
        dO = _heads_first(dO.astype(S0.dtype))
        dW, ends, G = _state_vjp(f, dO, G)
        grads = _local_vjp(S0, W, dW, ends, dO, prepared, f)
        dxs = tuple(  # back to the inputs' layout (g, C, H, ...) and dtypes
            None
            if d is None
            else (_heads_first(d) if d.ndim == 4 else _mT(d)).astype(x.dtype)
            for d, x in zip(grads, xs_g, strict=True)
        )
        if r is not None:  # through the zeros of `_drop_reset_decays`
            dxs = (*dxs[:4], _drop_reset_decays(dxs[4], r))
        return G, dxs

    chunks = (
        tuple(_to_chunks(x, C, g) for x in xs),
        saved,
        _to_chunks(do, C, g),
        _to_chunks(resets, C, g),
    )
    dh0, dxs = lax.scan(body, G.astype(dtype), chunks, reverse=True)
    return (*(None if dx is None else _from_chunks(dx, T) for dx in dxs), dh0, None)


# ---------------------------------------------------------------------------
# Public functions.


def delta_rule(
    q: Shaped[ArrayLike, "..."],
    k: Shaped[ArrayLike, "..."],
    v: Shaped[ArrayLike, "..."],
    beta: Shaped[ArrayLike, "..."],
    log_decay: Shaped[ArrayLike, "..."] | None = None,
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    resets: Shaped[ArrayLike, "..."] | None = None,
    chunk_size: int | None = None,
    method: str = "chunked",
) -> tuple[Float[Array, "T H d_v"], Float[Array, "H d_k d_v"]]:
    """The (gated) delta rule over a sequence, every head at once.

    Per head, with a matrix state `S` of shape `(d_k, d_v)`:

    ```
    S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ,    S[-1] = h0
    o[t] = S[t]ᵀ q[t]
    ```

    with `α = exp(log_decay)`: DeltaNet (Yang et al. 2024, "Parallelizing Linear
    Transformers with the Delta Rule over Sequence Length") when `log_decay` is
    `None`, Gated DeltaNet (Yang, Kautz and Hatamizadeh 2025, "Gated Delta Networks:
    Improving Mamba2 with Delta Rule") otherwise.

    **Arguments:**

    - `q`, `k`: queries and keys, shape `(T, H, d_k)`. The recurrence is a
      contraction when `‖k‖ = 1` and `0 ≤ β ≤ 2` (the layers L2-normalise `k`).
    - `v`: values, shape `(T, H, d_v)`.
    - `beta`: the write strengths `β`, shape `(T, H)`.
    - `log_decay`: `log α`, shape `(T, H)`, at most 0; `None` for `α = 1`.
    - `h0`: the state before the first step, shape `(H, d_k, d_v)`; zeros if `None`.
    - `resets`: packed documents, a boolean array of shape `(T,)`, true at the first
      step of each document; where true the state restarts before step `t` (`S[t-1]`
      is taken as 0, `h0` included, so `S[t] = β[t] k[t] v[t]ᵀ` and `log_decay[t]`
      has no effect), and `o` on `concat(x1, x2)` with a reset at the start of `x2`
      is `concat(o(x1), o(x2))`. In the chunked form a reset is `α = 0` applied by
      masks (exact: no large negative log decay stands in for it), with the same
      compiled kernels; without `log_decay` it runs the gated form with `α = 1`.
      `None`: no resets (and no extra cost).
    - `chunk_size`: the chunk length `C` of the chunked form (any `T` works; the last
      chunk is zero-padded, and `C` shrinks to `T` for short sequences). `None`: 64
      (the papers' choice, for accelerators), or 32 on CPU, where it is measured to be
      faster at `d_k = d_v = 64` (see the README).
    - `method`: `"chunked"` (the WY/UT chunk-parallel form, for training) or
      `"recurrent"` (a `lax.scan` of `delta_rule_step`, differentiated by JAX, which
      keeps every state: a reference and a fallback).

    **Returns:**

    `(o, final_state)`: the outputs, shape `(T, H, d_v)`, in the dtype of `q`, `k`
    and `v` when they agree (float32 otherwise), and the state after the last step,
    shape `(H, d_k, d_v)`, float32 (float64 if any input is float64).

    The chunked form costs `O(T C (d_k + d_v) + T d_k d_v)` per head in matrix
    products. Every derivative works (through `h0` and the final state too), with
    `jax.vmap` and `jax.jit`:

    - reverse mode (`jax.grad`, `jax.vjp`): a hand-written backward pass that keeps
      the inputs, one state per chunk and `O(T (C + d_v))` chunk factors (nothing of
      size `T × d_k × d_v`);
    - forward mode (`jax.jvp`, `jax.jacfwd`): the fast forward pass plus JAX's JVP of
      the same chunked form in XLA ops (the CPU kernels off), a few forward passes'
      time, nothing stored;
    - second order (Hessian-vector products by `jax.jvp` of `jax.grad`, grad of grad,
      `jax.hessian`): JAX's autodiff of that XLA form, which keeps what autodiff keeps
      of it (each chunk's start state, factors and inverse: far less than the
      recurrence's `T × d_k × d_v` states, more than the first-order backward).

    ```python
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    o, state = ssm.delta_rule(q, k, v, jax.nn.sigmoid(b), -jnp.exp(a))
    ```
    """
    q, k, v, beta = (x if hasattr(x, "shape") else jnp.asarray(x) for x in (q, k, v, beta))
    (H, dk, dv), compute, out = _validate(q, k, v, beta, log_decay, h0, step=False)
    check_method(method, _METHODS)
    check_chunk_size(chunk_size)
    if chunk_size is None:
        chunk_size = 32 if jax.default_backend() == "cpu" else 64
    T = q.shape[0]
    resets = check_resets(resets, T)
    h0 = jnp.zeros((H, dk, dv), compute) if h0 is None else h0.astype(compute)
    if T == 0:
        return jnp.zeros((0, H, dv), out), h0
    if method == "recurrent":
        xs = (q, k, v, beta, log_decay)
        xs = tuple(None if x is None else x.astype(compute) for x in xs)
        o, S = _recurrent(*xs, h0, resets)
        return o.astype(out), S
    C = int(min(chunk_size, T))
    if resets is not None and log_decay is None:
        log_decay = jnp.zeros((T, H), compute)
    return _chunked(C, out, q, k, v, beta, log_decay, h0, resets)


def delta_rule_step(
    q: Shaped[ArrayLike, "..."],
    k: Shaped[ArrayLike, "..."],
    v: Shaped[ArrayLike, "..."],
    beta: Shaped[ArrayLike, "..."],
    log_decay: Shaped[ArrayLike, "..."] | None,
    state: Shaped[ArrayLike, "..."],
) -> tuple[Float[Array, "H d_v"], Float[Array, "H d_k d_v"]]:
    """One step of the (gated) delta rule, for generation.

    **Arguments:**

    - `q`, `k`: shape `(H, d_k)`; `v`: shape `(H, d_v)`; `beta`: shape `(H,)`;
      `log_decay`: shape `(H,)` or `None` (no decay), as in `delta_rule`.
    - `state`: the state `S[t-1]`, shape `(H, d_k, d_v)`.

    **Returns:**

    `(o, state)`: `o[t] = S[t]ᵀ q[t]` of shape `(H, d_v)` (in the dtype of `q`, `k`,
    `v` when they agree) and `S[t]`, float32 (float64 if any input is).

    ```python
    o_t, state = ssm.delta_rule_step(q_t, k_t, v_t, beta_t, log_decay_t, state)
    ```
    """
    if state is None:
        raise TypeError("`state` must be an array of shape (H, d_k, d_v), got None.")
    _, compute, out = _validate(q, k, v, beta, log_decay, state, step=True)
    xs = (q, k, v, beta, log_decay)
    xs = tuple(None if x is None else x.astype(compute) for x in xs)
    o, S = _step(state.astype(compute), *xs)
    return o.astype(out), S
