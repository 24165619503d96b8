"""The mLSTM memory cell of xLSTM (Beck et al. 2024): chunked, recurrent and one step.

A gated linear attention (``ssm._gla_chunked``) with the scalar decay ``log_forget[t]
+ m[t-1] - m[t] <= 0``, keys scaled by the input gate ``exp(log_input[t] - m[t]) <= 1``
and a column of ones appended to the values (the normaliser); the max-stabiliser ``m``
is its own max-plus recurrence, computed by chunks (`_stabiliser`).
"""

from __future__ import annotations

from typing import NamedTuple

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

from ._checks import (
    check_array,
    check_method,
    check_qkv,
    check_resets,
    check_shape,
    compute_dtype,
)
from ._chunking import lead, to_groups, tril
from ._gla import _METHODS, _chunk_length, _resolve_chunk
from ._gla_chunked import _gla_chunked, _group_size


def _cumsum(g):
    """Cumulative sum over the chunk axis (-2), as a product with a triangular matrix
    (XLA fuses `jnp.cumsum` into its consumers and recomputes it there)."""
    C = g.shape[-2]
    ones = lead(jnp.tril(jnp.ones((C, C), g.dtype)), g.ndim)
    return jnp.matmul(ones, g, precision=lax.Precision.HIGHEST)


def _to_chunks(x, C):
    """`(T, H, d) -> (N, C, H, d)`, zero-padded at the end."""
    return to_groups(x, C)[:, 0]


class MLSTMState(NamedTuple):
    """The mLSTM state of Beck et al. (2024), stabilised.

    `C` (shape `(H, d_k, d_v)`) and `n` (shape `(H, d_k)`) are the matrix memory and
    the normaliser divided by `exp(m)`, `m` (shape `(H,)`) the max-stabiliser.
    """

    C: Float[Array, "H dk dv"]
    n: Float[Array, "H dk"]
    m: Float[Array, " H"]


def _mlstm_inputs(q, k, v, log_forget, log_input, h0):
    T, H, dk, dv = check_qkv(q, k, v)
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
            return jnp.max(jnp.where(tril(C, 2)[..., None], cand, -jnp.inf), axis=1)

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
        mask = tril(C, 2)[..., None] & (seg[:, None, :] == seg[None, :, :])
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
    return _mlstm_readout(num, den, m_new, eps), MLSTMState(C, n, m_new)


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
