"""Gated linear attention: the public operator and its recurrent and one-step forms.

The recurrence, one example at a time, per head ``h``:

    S[t] = diag(alpha[t]) S[t-1] + k[t] v[t]^T,        o[t] = S[t]^T q[t],

with the state ``S[t]`` of shape ``(d_k, d_v)`` and ``alpha[t] = exp(log_decay[t])``
either one scalar per head (linear attention, RetNet, Mamba-2/SSD, mLSTM) or one value
per key dimension (GLA). The chunked form, for training, and its derivative are in
``ssm._gla_chunked`` (the within-chunk products in ``ssm._gla_intra``); the mLSTM,
a gated linear attention with a stabiliser, in ``ssm._mlstm``.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, ArrayLike, Float, Shaped

from ._checks import (
    as_array,
    check_array,
    check_chunk_size,
    check_method,
    check_qkv,
    check_resets,
    check_shape,
    compute_dtype,
)
from ._gla_chunked import _gla_chunked

_METHODS = ("chunked", "recurrent")


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


def _normalise(q, k, v, log_decay, h0, what):
    """Validate; return the inputs in the compute dtype, `log_decay` as `(T, H, K)`."""
    T, H, dk, dv = check_qkv(q, k, v)
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
