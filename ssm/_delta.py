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
``Wk = (I + A)⁻¹ diag(β γ) K``, one triangular solve per chunk. Then

    O      = diag(γ) Q S0 + (Γ ⊙ QKᵀ ⊙ causal) W
    S_end  = γ[C] S0 + K̃ᵀ W,   K̃ = diag(exp(g[C] - g)) K,

which is the matrix recurrence ``S_end = (γ[C] I - K̃ᵀ Wk) S0 + K̃ᵀ U`` across
chunks. It is applied chunk after chunk by a ``lax.scan`` that carries ``S`` (the
equivalent of ``matrix_scan`` over those transitions, without ever forming the
``d_k × d_k`` matrices: ``W = U - Wk S0`` costs the same), so one chunk of work is
live at a time. Inside a chunk everything is matrix products; the inverse of the
unit-lower-triangular ``I + A`` is formed by blockwise doubling (``log₂ C`` levels of
batched products) rather than a triangular solve, which is far slower on CPU.

The derivative (``jax.custom_vjp``) keeps the inputs and the ``T / C`` chunk-start
states. Backwards, a reverse ``lax.scan`` carries ``dL/dS``; each chunk recomputes
its local factors from the inputs (differentiated by JAX: everything there is of size
``C × C`` or ``C × d`` per head) and backpropagates the bilinear state part by hand,

    dS0 = (diag(γ) Q)ᵀ dO + γ[C] G - Wkᵀ dW,    dW = Pᵀ dO + K̃ G,   G = dL/dS_end.

No array of size ``T × d_k × d_v`` exists in either pass. States and accumulations
are float32 (float64 if an input is) whatever the input dtype; gates enter only as
differences of cumulative log gates inside a chunk, so every exponential is ≤ 1.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

_METHODS = ("chunked", "recurrent")


# ---------------------------------------------------------------------------
# Validation.


def _check_array(name, x):
    if not hasattr(x, "dtype") or not hasattr(x, "shape"):
        raise TypeError(f"`{name}` must be a JAX or NumPy array, got {type(x).__name__}.")
    if not jnp.issubdtype(x.dtype, jnp.floating):
        raise TypeError(
            f"`{name}` must have a floating dtype, got {x.dtype} (shape "
            f"{tuple(x.shape)}); cast it explicitly, e.g. `{name}.astype(jnp.float32)`."
        )


def _check_shape(name, x, expected, names):
    if tuple(x.shape) != tuple(expected):
        raise ValueError(
            f"`{name}` must have shape ({', '.join(names)}) = {tuple(expected)}, got "
            f"{tuple(x.shape)}."
        )


def _validate(q, k, v, beta, log_decay, h0, *, step):
    """Check every argument; returns ``(H, d_k, d_v)`` and the compute/output dtypes."""
    lead_names = () if step else ("T",)
    for name, x in (("q", q), ("k", k), ("v", v), ("beta", beta)):
        _check_array(name, x)
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
        _check_array("log_decay", log_decay)
        _check_shape("log_decay", log_decay, (*lead, H), (*lead_names, "H"))
        dtypes.append(log_decay.dtype)
    state = "state" if step else "h0"
    if h0 is not None:
        _check_array(state, h0)
        _check_shape(state, h0, (H, dk, dv), ("H", "d_k", "d_v"))
        dtypes.append(h0.dtype)
    wide = any(np.dtype(d) == np.dtype(np.float64) for d in dtypes)
    compute = np.dtype(np.float64 if wide else np.float32)
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


def _recurrent(q, k, v, beta, log_decay, h0):
    def body(S, x):
        o, S = _step(S, *x)
        return S, o

    S, o = lax.scan(body, h0, (q, k, v, beta, log_decay))
    return o, S


# ---------------------------------------------------------------------------
# The chunked form.


def _mT(x):
    return jnp.swapaxes(x, -1, -2)


def _subdiagonal_blocks(A, b):
    """The ``b × b`` blocks ``(2i+1, 2i)`` of ``A (..., 2nb, 2nb)``: ``(..., n, b, b)``."""
    n = A.shape[-1] // (2 * b)
    lead = A.shape[:-2]
    A = A.reshape(lead + (n, 2, b, n, 2, b))[..., :, 1, :, :, 0, :]
    eye = jnp.eye(n, dtype=A.dtype).reshape((1,) * len(lead) + (n, 1, n, 1))
    return jnp.sum(A * eye, axis=-2)  # the diagonal over the block indices, no gather


def _tril(shape, k=0):
    """The lower-triangular mask (below diagonal ``k``), broadcast to ``shape``."""
    return jnp.broadcast_to(jnp.tril(jnp.ones(shape[-2:], bool), k), shape)


@jax.custom_vjp
def _unit_lower_inverse(A):
    """``(I + A)⁻¹`` for strictly lower-triangular ``A (..., C, C)``, in matrix products.

    Blockwise doubling: the inverse of a unit-lower-triangular ``[[L₁, 0], [M, L₂]]``
    is ``[[L₁⁻¹, 0], [-L₂⁻¹ M L₁⁻¹, L₂⁻¹]]``, applied to blocks of size 1, 2, 4, ...
    (``log₂ C`` levels of batched products; exact forward substitution, reordered).
    Batched triangular solves are far slower on CPU, and this keeps to matmuls.
    """
    C = A.shape[-1]
    Cp = 1 << max(C - 1, 0).bit_length()
    if Cp != C:
        A = jnp.pad(A, [(0, 0)] * (A.ndim - 2) + [(0, Cp - C), (0, Cp - C)])
    lead = A.shape[:-2]
    inv = jnp.ones(lead + (Cp, 1, 1), A.dtype)  # the inverses of the 1 × 1 blocks
    b = 1
    while b < Cp:
        pairs = inv.reshape(lead + (Cp // (2 * b), 2, b, b))
        X1, X2 = pairs[..., 0, :, :], pairs[..., 1, :, :]
        M = _subdiagonal_blocks(A, b)
        top = jnp.concatenate([X1, jnp.zeros_like(X1)], axis=-1)
        bottom = jnp.concatenate([-(X2 @ M @ X1), X2], axis=-1)
        inv = jnp.concatenate([top, bottom], axis=-2)
        b *= 2
    return inv[..., 0, :C, :C]


def _unit_lower_inverse_fwd(A):
    inv = _unit_lower_inverse(A)
    return inv, inv


def _unit_lower_inverse_bwd(inv, d_inv):
    # d(L⁻¹) = -L⁻¹ dL L⁻¹, restricted to the strictly lower triangle of dL.
    dA = -(_mT(inv) @ d_inv @ _mT(inv))
    return (jnp.where(_tril(dA.shape, -1), dA, 0),)


_unit_lower_inverse.defvjp(_unit_lower_inverse_fwd, _unit_lower_inverse_bwd)


def _local(q, k, v, beta, log_decay):
    """The chunk-local factors: everything that does not depend on the chunk's state.

    Inputs ``(..., C, d)`` (``beta``, ``log_decay``: ``(..., C)``). Returns

    - ``Qg = diag(γ) Q`` ``(..., C, dk)``, ``P = Γ ⊙ QKᵀ`` causal ``(..., C, C)``,
    - ``U``, ``Wk``: the WY factors ``(..., C, dv)``, ``(..., C, dk)``,
    - ``Kd = diag(exp(g[C] - g)) K`` ``(..., C, dk)`` and ``γ[C]`` ``(...)``.
    """
    KK = k @ _mT(k)
    QK = q @ _mT(k)
    causal, strict = _tril(QK.shape), _tril(QK.shape, -1)
    if log_decay is None:
        A = jnp.where(strict, beta[..., :, None] * KK, 0)
        P = jnp.where(causal, QK, 0)
        rhs = beta[..., None] * jnp.concatenate([v, k], axis=-1)
        Qg, Kd = q, k
        gam_C = jnp.ones(q.shape[:-2], q.dtype)
    else:
        g = jnp.cumsum(log_decay, axis=-1)
        diff = jnp.where(causal, g[..., :, None] - g[..., None, :], 0)
        Gam = jnp.where(causal, jnp.exp(diff), 0)  # Γ[t, s] = exp(g[t] - g[s]) ≤ 1
        A = jnp.where(strict, beta[..., :, None] * Gam * KK, 0)
        P = Gam * QK
        gam = jnp.exp(g)
        rhs = jnp.concatenate([beta[..., None] * v, (beta * gam)[..., None] * k], -1)
        Qg = gam[..., None] * q
        Kd = jnp.exp(g[..., -1:] - g)[..., None] * k
        gam_C = gam[..., -1]
    X = _unit_lower_inverse(A) @ rhs
    dv = v.shape[-1]
    U, Wk = X[..., :dv], X[..., dv:]
    return Qg, P, U, Wk, Kd, gam_C


def _prepare(compute, q, k, v, beta, log_decay):
    """One chunk in the compute dtype, heads first: ``(C, H, d) -> (H, C, d)``."""
    q, k, v = (jnp.swapaxes(x.astype(compute), 0, 1) for x in (q, k, v))
    beta = beta.astype(compute).T
    log_decay = None if log_decay is None else log_decay.astype(compute).T
    return q, k, v, beta, log_decay


def _chunk(S0, xs):
    """One chunk from its start state ``S0 (H, dk, dv)``: ``(O (C, H, dv), S_end)``."""
    Qg, P, U, Wk, Kd, gam_C = _local(*_prepare(S0.dtype, *xs))
    W = U - Wk @ S0
    out = Qg @ S0 + P @ W
    S = gam_C[:, None, None] * S0 + _mT(Kd) @ W
    return jnp.swapaxes(out, 0, 1), S


def _chunk_vjp(S0, xs, dO, G):
    """The cotangents ``(dS0, dxs)`` of one chunk, given those of its ``O`` and ``S_end``.

    The chunk-local factors are differentiated by JAX; the bilinear state part
    (``W = U - Wk S0``, ``O = Qg S0 + P W``, ``S_end = γ[C] S0 + Kdᵀ W``) by hand.
    """
    local = lambda *xs: _local(*_prepare(S0.dtype, *xs))  # noqa: E731
    (Qg, P, U, Wk, Kd, gam_C), local_vjp = jax.vjp(local, *xs)
    dO = jnp.swapaxes(dO.astype(S0.dtype), 0, 1)
    W = U - Wk @ S0
    dW = _mT(P) @ dO + Kd @ G
    dS0 = _mT(Qg) @ dO + gam_C[:, None, None] * G - _mT(Wk) @ dW
    d_local = (
        dO @ _mT(S0),  # Qg
        dO @ _mT(W),  # P
        dW,  # U
        -dW @ _mT(S0),  # Wk
        W @ _mT(G),  # Kd
        jnp.sum(S0 * G, axis=(-2, -1)),  # γ[C]
    )
    return dS0, local_vjp(d_local)


def _to_chunks(x, C):
    """``(T, ...) -> (n, C, ...)``, zero-padded at the end to a whole number of chunks.

    Zero padding is inert: with ``k = β = 0`` and ``log α = 0`` a step leaves the
    state as it is, so the state after the last chunk is the state at ``T``.
    """
    if x is None:
        return None
    T = x.shape[0]
    n = -(-T // C)
    if n * C != T:
        x = jnp.concatenate([x, jnp.zeros((n * C - T,) + x.shape[1:], x.dtype)])
    return x.reshape((n, C) + x.shape[1:])


def _from_chunks(x, T):
    return x.reshape((-1,) + x.shape[2:])[:T]


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1))
def _chunked(C, out_dtype, q, k, v, beta, log_decay, h0):
    return _chunked_fwd(C, out_dtype, q, k, v, beta, log_decay, h0)[0]


def _chunked_fwd(C, out_dtype, q, k, v, beta, log_decay, h0):
    """Chunks in order: a ``lax.scan`` that carries the state and keeps its chunk starts."""
    xs = (q, k, v, beta, log_decay)

    def body(S0, xs_c):
        o, S = _chunk(S0, xs_c)
        return S, (o.astype(out_dtype), S0)

    S, (o, S0s) = lax.scan(body, h0, tuple(_to_chunks(x, C) for x in xs))
    return (_from_chunks(o, q.shape[0]), S), (xs, S0s)


def _chunked_bwd(C, out_dtype, residuals, cotangents):
    """Chunks in reverse order, carrying ``dL/dS``; each chunk is recomputed from the
    state saved at its start, so nothing of size ``T × d_k × d_v`` is ever held."""
    xs, S0s = residuals
    do, G = cotangents

    def body(G, inputs):
        xs_c, S0, dO = inputs
        return _chunk_vjp(S0, xs_c, dO, G)

    chunks = (tuple(_to_chunks(x, C) for x in xs), S0s, _to_chunks(do, C))
    dh0, dxs = lax.scan(body, G.astype(S0s.dtype), chunks, reverse=True)
    T = xs[0].shape[0]
    return (*(None if dx is None else _from_chunks(dx, T) for dx in dxs), dh0)


_chunked.defvjp(_chunked_fwd, _chunked_bwd)


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
    chunk_size: int = 64,
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
    - `chunk_size`: the chunk length `C` of the chunked form (any `T` works; the last
      chunk is zero-padded, and `C` shrinks to `T` for short sequences).
    - `method`: `"chunked"` (the WY/UT chunk-parallel form, for training) or
      `"recurrent"` (a `lax.scan` of `delta_rule_step`, differentiated by JAX, which
      keeps every state: a reference and a fallback).

    **Returns:**

    `(o, final_state)`: the outputs, shape `(T, H, d_v)`, in the dtype of `q`, `k`
    and `v` when they agree (float32 otherwise), and the state after the last step,
    shape `(H, d_k, d_v)`, float32 (float64 if any input is float64).

    The chunked form costs `O(T C (d_k + d_v) + T d_k d_v)` per head in matrix
    products; its derivative keeps only the inputs and one state per chunk, and
    differentiates through `h0` and the final state. It is reverse-mode only
    (`jax.grad`, `jax.vjp`), and composes with `jax.vmap` and `jax.jit`.

    ```python
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    o, state = ssm.delta_rule(q, k, v, jax.nn.sigmoid(b), -jnp.exp(a), chunk_size=64)
    ```
    """
    q, k, v, beta = (x if hasattr(x, "shape") else jnp.asarray(x) for x in (q, k, v, beta))
    (H, dk, dv), compute, out = _validate(q, k, v, beta, log_decay, h0, step=False)
    if method not in _METHODS:
        raise ValueError(f"`method` must be one of {_METHODS}, got {method!r}.")
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"`chunk_size` must be a positive int, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be positive, got {chunk_size}.")
    T = q.shape[0]
    h0 = jnp.zeros((H, dk, dv), compute) if h0 is None else h0.astype(compute)
    if T == 0:
        return jnp.zeros((0, H, dv), out), h0
    if method == "recurrent":
        xs = (q, k, v, beta, log_decay)
        xs = tuple(None if x is None else x.astype(compute) for x in xs)
        o, S = _recurrent(*xs, h0)
        return o.astype(out), S
    C = int(min(chunk_size, T))
    return _chunked(C, out, q, k, v, beta, log_decay, h0)


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
