"""Mamba's selective scan, fused: the state history is never stored.

Per inner channel ``d`` and state index ``n`` (Gu and Dao 2023, equations 2a and 2b
with the zero-order-hold ``A`` and Euler ``B`` of their reference code):

    h[t, d, n] = exp(dt[t, d] A[d, n]) h[t-1, d, n] + dt[t, d] x[t, d] B[t, n]
    y[t, d]    = sum_n h[t, d, n] C[t, n] + D[d] x[t, d]
    out[t, d]  = y[t, d] silu(z[t, d])                      (when ``z`` is given)

The discretised ``exp(dt A)`` and ``dt x B`` are formed one step at a time inside the
loop and never stored, so nothing of size ``T x d_inner x d_state`` exists in memory,
forwards or backwards, as in Mamba's CUDA kernel:

- the forward pass runs over chunks of ``K`` steps (a ``lax.scan`` over chunks, a
  ``lax.scan`` over the steps of a chunk) and keeps only the state at the start of
  each chunk, ``(T/K, d_inner, d_state)``;
- the backward pass visits the chunks in reverse; for each it recomputes the chunk's
  states from its saved start state (one ``(K, d_inner, d_state)`` buffer), then runs
  the adjoint recurrence ``g[t] = dy[t] C[t] + exp(dt[t+1] A) g[t+1]`` backwards over
  the chunk, reducing each step's contributions to ``dx, ddt, dB`` on the spot and
  accumulating ``dA`` in the loop's carry.

The derivative rule is a ``fast_vjp``: reverse mode runs the chunked backward pass
above; forward mode (``jax.jvp``) and second-order derivatives go through a plain
``lax.scan`` over time (the reference), which JAX differentiates itself.

On the CPU backend, where the compiled kernels are available (``ssm._kernels``), the
same two passes run as one compiled kernel each (``ssm/_kernels/selective.cc``) for the
recurrence and its read-out ``h C``; the skip term, the gate and their derivatives stay
in XLA around it, and the derivative rule (what is saved, forward mode, second order)
is the same ``fast_vjp``. ``method="xla"`` keeps the XLA loops above.
"""

from __future__ import annotations

import functools
from typing import Literal

import jax
import jax.numpy as jnp
from jax import lax
from jaxtyping import Array, Float, Shaped

from . import _kernels
from ._autodiff import fast_vjp
from ._checks import check_array, check_chunk_size, check_resets, check_shape, compute_dtype
from ._kernels import selective as _kernel

__all__ = ["selective_scan"]

# The default chunk is about this many steps (adjusted so that padding is small).
_DEFAULT_CHUNK = 64
# Steps of the loops within a chunk unrolled into one loop iteration.
_UNROLL = 1


# --------------------------------------------------------------------------- checks


def _check_args(x, dt, A, B, C, D, z, h0, resets, chunk_size):
    for name, v in (("x", x), ("dt", dt), ("A", A), ("B", B), ("C", C)):
        check_array(name, v, kind="real")
    if x.ndim != 2:
        raise ValueError(
            f"`x` must have shape (T, d_inner), got {tuple(x.shape)}; selective_scan "
            "works on one example with time on axis 0 (use `jax.vmap` for a batch)."
        )
    T, d_inner = x.shape
    if T < 1:
        raise ValueError(f"`x` must have at least one time step, got shape {x.shape}.")
    check_shape("dt", dt, (T, d_inner), "(T, d_inner)")
    if A.ndim != 2 or A.shape[0] != d_inner:
        raise ValueError(
            f"`A` must have shape (d_inner, d_state) = ({d_inner}, d_state), got "
            f"{tuple(A.shape)}."
        )
    N = A.shape[1]
    if B.ndim == 2:
        check_shape("B", B, (T, N), "(T, d_state)")
    elif B.ndim == 3:
        if B.shape[0] != T or B.shape[2] != N or B.shape[1] < 1:
            raise ValueError(
                f"grouped `B` must have shape (T, groups, d_state) = ({T}, G, {N}), got "
                f"{tuple(B.shape)}."
            )
        if d_inner % B.shape[1]:
            raise ValueError(
                f"d_inner = {d_inner} must be divisible by the number of groups of `B` "
                f"and `C` ({B.shape[1]})."
            )
    else:
        raise ValueError(
            f"`B` must have shape (T, d_state) or (T, groups, d_state), got "
            f"{tuple(B.shape)}."
        )
    if tuple(C.shape) != tuple(B.shape):
        raise ValueError(
            f"`C` must have the shape of `B`, {tuple(B.shape)}, got {tuple(C.shape)}."
        )
    if D is not None:
        check_array("D", D, kind="real")
        check_shape("D", D, (d_inner,), "(d_inner,)")
    if z is not None:
        check_array("z", z, kind="real")
        check_shape("z", z, (T, d_inner), "(T, d_inner)")
    if h0 is not None:
        check_array("h0", h0, kind="real")
        check_shape("h0", h0, (d_inner, N), "(d_inner, d_state)")
    check_resets(resets, T)
    check_chunk_size(chunk_size)


def _chunk_length(T: int, chunk_size: int | None) -> int:
    """The chunk length: `chunk_size` (at most `T`), or about `_DEFAULT_CHUNK` steps
    chosen so that the last chunk is nearly full."""
    if chunk_size is not None:
        return min(int(chunk_size), T)
    n = -(-T // _DEFAULT_CHUNK)
    return -(-T // n)


# ---------------------------------------------------------------------- the steps
#
# Inside the operator the state index comes first and the channels last: x, dt, z
# (T, d_inner), A and states (N, d_inner), B, C (T, N, G), D (d_inner,). Sums over the
# state index are then sums of whole rows of channels (vectorised), and the channels
# stay one flat axis (XLA's CPU loops were about 4x slower with a (G, P) pair of axes,
# even for G = 1). A group's B[t] is broadcast over its P = d_inner / G channels.


def _expand(v, P):
    """`(N, G) -> (N, G * P)`: each group's value repeated over its channels."""
    N, G = v.shape
    return v if G == 1 else jnp.broadcast_to(v[:, :, None], (N, G, P)).reshape(N, G * P)


def _group_sum(v, G):
    """`(N, G * P) -> (N, G)`: the sum over each group's channels."""
    N, d = v.shape
    return jnp.sum(v.reshape(N, G, d // G), axis=-1)


def _decay(A, dt_t, r_t):
    a = jnp.exp(dt_t[None] * A)
    return a if r_t is None else jnp.where(r_t, jnp.zeros_like(a), a)


def _step(A, h, inputs):
    """One step of the recurrence: the new state and `h C` (without the skip term)."""
    x_t, dt_t, B_t, C_t, r_t = inputs
    P = x_t.shape[0] // B_t.shape[1]
    h = _decay(A, dt_t, r_t) * h + (dt_t * x_t)[None] * _expand(B_t, P)
    return h, jnp.sum(h * _expand(C_t, P), axis=0)


def _gate(y, x, D, z):
    if D is not None:
        y = y + D[None] * x
    out = y if z is None else y * jax.nn.silu(z)
    return out, y


def _reference(x, dt, A, B, C, D, z, h0, resets):
    """The recurrence as a plain `lax.scan` over time (forward mode, second order)."""
    h = jnp.zeros(A.shape, A.dtype) if h0 is None else h0
    hT, y = lax.scan(functools.partial(_step, A), h, (x, dt, B, C, resets))
    return _gate(y, x, D, z)[0], hT


def _chunks(K, v):
    """`(T, ...) -> (n, K, ...)`, zero-padded at the end (zero `dt` leaves the state
    unchanged; `False` resets nothing)."""
    if v is None:
        return None
    T = v.shape[0]
    n = -(-T // K)
    pad = n * K - T
    if pad:
        v = jnp.concatenate([v, jnp.zeros((pad,) + v.shape[1:], v.dtype)])
    return v.reshape((n, K) + v.shape[1:])


def _unchunk(T, v):
    return None if v is None else v.reshape((-1,) + v.shape[2:])[:T]


def _forward(K, x, dt, A, B, C, D, z, h0, resets):
    """The chunked forward pass: outputs, final state, and each chunk's start state."""
    T = x.shape[0]
    h = jnp.zeros(A.shape, A.dtype) if h0 is None else h0
    xs = tuple(_chunks(K, v) for v in (x, dt, B, C, resets))

    def chunk(h, inputs):
        h_end, y = lax.scan(functools.partial(_step, A), h, inputs, unroll=_UNROLL)
        return h_end, (h, y)

    hT, (starts, y) = lax.scan(chunk, h, xs)
    out, y = _gate(_unchunk(T, y), x, D, z)
    return (out, hT), (starts, None if z is None else y)


def _gate_cotangents(ct_out, x, y, z, w_z):
    """The cotangent of `y` (before the gate) and, if wanted, of `z`."""
    if ct_out is None:
        ct_out = jnp.zeros(x.shape, x.dtype)
    if z is None:
        return ct_out, None
    sz = jax.nn.sigmoid(z)
    gy = ct_out * z * sz
    dz = ct_out * y * sz * (1 + z * (1 - sz)) if w_z else None
    return gy, dz


def _backward(K, args, res, cts, want):
    """The chunked backward pass: recompute each chunk's states, then its adjoints."""
    x, dt, A, B, C, D, z, h0, resets = args
    w_x, w_dt, w_A, w_B, w_C, w_D, w_z, w_h0, _ = want
    starts, y = res
    ct_out, ct_h = cts
    T = x.shape[0]
    gy, dz = _gate_cotangents(ct_out, x, y, z, w_z)
    m = jnp.zeros(A.shape, A.dtype) if ct_h is None else ct_h
    dA = jnp.zeros(A.shape, A.dtype) if w_A else None
    need_u = w_x or w_dt

    G = B.shape[2]
    P = x.shape[1] // G

    def recompute(h, inputs):
        """A forward step that yields the previous state and `dC` (needs `h[t]`)."""
        x_t, dt_t, B_t, C_t, r_t, gy_t = inputs
        h_new = _decay(A, dt_t, r_t) * h + (dt_t * x_t)[None] * _expand(B_t, P)
        dC_t = _group_sum(gy_t[None] * h_new, G) if w_C else None
        return h_new, (h, dC_t)

    def adjoint(carry, inputs):
        m, dA = carry
        x_t, dt_t, B_t, C_t, r_t, gy_t, h_prev = inputs
        B_t = _expand(B_t, P)
        g = gy_t[None] * _expand(C_t, P) + m
        a = _decay(A, dt_t, r_t)
        u = jnp.sum(g * B_t, axis=0) if need_u else None
        dx_t = dt_t * u if w_x else None
        ddt_t = None
        if w_dt or w_A:
            q = g * a * h_prev
            if w_dt:
                ddt_t = jnp.sum(q * A, axis=0) + x_t * u
            if w_A:
                dA = dA + dt_t[None] * q
        dB_t = _group_sum(g * (dt_t * x_t)[None], G) if w_B else None
        return (a * g, dA), (dx_t, ddt_t, dB_t)

    def chunk(carry, inputs):
        h_start, *xs = inputs
        _, (h_prev, dC) = lax.scan(recompute, h_start, tuple(xs), unroll=_UNROLL)
        carry, (dx, ddt, dB) = lax.scan(
            adjoint, carry, (*xs, h_prev), reverse=True, unroll=_UNROLL
        )
        return carry, (dx, ddt, dB, dC)

    xs = tuple(_chunks(K, v) for v in (x, dt, B, C, resets, gy))
    (m, dA), grads = lax.scan(chunk, (m, dA), (starts, *xs), reverse=True)
    dx, ddt, dB, dC = (_unchunk(T, v) for v in grads)
    if D is not None and w_x:
        dx = dx + D[None] * gy
    dD = jnp.sum(gy * x, axis=0) if D is not None and w_D else None
    dh0 = m if h0 is not None and w_h0 else None
    return (dx, ddt, dA, dB, dC, dD, dz, dh0, None)


@functools.cache
def _op(K: int, kernel: bool):
    """The operator for one chunk length, with its derivative rule: on the compiled
    kernel (`kernel`) or on XLA's loops."""
    fwd, bwd = (_kernel_forward, _kernel_backward) if kernel else (_forward, _backward)
    return fast_vjp(functools.partial(fwd, K), functools.partial(bwd, K), _reference)


# ------------------------------------------------------------ the compiled kernel
#
# The same two passes with the recurrence and `h C` in the compiled CPU kernel
# (`ssm._kernels.selective`), the skip term and the gate in XLA around it. Lowered for
# another platform, the kernel's calls become the XLA passes above (without D, z).

_ALL = (True,) * 8 + (False,)


def _xla_core_forward(K, x, dt, A, B, C, h, r):
    (y, hT), (starts, _) = _forward(K, x, dt, A, B, C, None, None, h, r)
    return y, hT, starts


def _xla_core_backward(K, x, dt, A, B, C, r, starts, gy, m):
    args = (x, dt, A, B, C, None, None, jnp.zeros_like(m), r)
    dx, ddt, dA, dB, dC, _, _, dh0, _ = _backward(K, args, (starts, None), (gy, m), _ALL)
    return dx, ddt, dA, dB, dC, dh0


def _no_resets(x, resets):
    return jnp.zeros(x.shape[:1], bool) if resets is None else resets


def _kernel_forward(K, x, dt, A, B, C, D, z, h0, resets):
    h = jnp.zeros(A.shape, A.dtype) if h0 is None else h0
    y, hT, starts = _kernel.forward(
        x,
        dt,
        A,
        B,
        C,
        h,
        _no_resets(x, resets),
        chunk=K,
        xla=functools.partial(_xla_core_forward, K),
    )
    out, y = _gate(y, x, D, z)
    return (out, hT), (starts, None if z is None else y)


def _kernel_backward(K, args, res, cts, want):
    x, dt, A, B, C, D, z, h0, resets = args
    w_x, w_dt, w_A, w_B, w_C, w_D, w_z, w_h0, _ = want
    starts, y = res
    ct_out, ct_h = cts
    gy, dz = _gate_cotangents(ct_out, x, y, z, w_z)
    m = jnp.zeros(A.shape, A.dtype) if ct_h is None else ct_h
    dx, ddt, dA, dB, dC, dh0 = _kernel.backward(
        x,
        dt,
        A,
        B,
        C,
        _no_resets(x, resets),
        starts,
        gy,
        m,
        chunk=K,
        xla=functools.partial(_xla_core_backward, K),
    )
    if D is not None and w_x:
        dx = dx + D[None] * gy
    dD = jnp.sum(gy * x, axis=0) if D is not None and w_D else None
    keep = lambda v, w: v if w else None  # noqa: E731
    return (
        keep(dx, w_x),
        keep(ddt, w_dt),
        keep(dA, w_A),
        keep(dB, w_B),
        keep(dC, w_C),
        dD,
        dz,
        keep(dh0, h0 is not None and w_h0),
        None,
    )


# ---------------------------------------------------------------------- public API


def selective_scan(
    x: Shaped[Array, "..."],
    dt: Shaped[Array, "..."],
    A: Shaped[Array, "..."],
    B: Shaped[Array, "..."],
    C: Shaped[Array, "..."],
    D: Shaped[Array, "..."] | None = None,
    z: Shaped[Array, "..."] | None = None,
    h0: Shaped[Array, "..."] | None = None,
    *,
    resets: Shaped[Array, "..."] | None = None,
    return_state: bool = False,
    chunk_size: int | None = None,
    method: Literal["auto", "kernel", "xla"] = "auto",
) -> (
    Float[Array, "T d_inner"] | tuple[Float[Array, "T d_inner"], Float[Array, "d_inner N"]]
):
    """Mamba's selective scan, with no `T x d_inner x d_state` tensor in memory.

    From Gu and Dao, "Mamba: linear-time sequence modeling with selective state
    spaces" (2023), per inner channel `d`:

    ```
    h[t] = exp(dt[t, d] A[d]) * h[t-1] + dt[t, d] x[t, d] B[t]      # (d_state,)
    y[t, d] = h[t] . C[t] + D[d] x[t, d]
    out[t, d] = y[t, d] * silu(z[t, d])                              # if z is given
    ```

    with `h[-1] = h0` (zeros when None). The discretisation is done on the fly, one
    step at a time; the forward pass keeps only the state at the start of each chunk
    of `chunk_size` steps and the backward pass recomputes a chunk's states from it.
    Reverse mode is a hand-written chunked pass; `jax.jvp`, second-order derivatives
    and `jax.vmap` work too (through a plain `lax.scan` reference, see
    `ssm._autodiff.fast_vjp`).

    **Arguments:**

    - `x`: `(T, d_inner)`, the input.
    - `dt`: `(T, d_inner)`, the (positive) step sizes, after their softplus.
    - `A`: `(d_inner, d_state)`, the continuous-time state matrix (negative).
    - `B`, `C`: `(T, d_state)`, or `(T, G, d_state)` for `G` groups of channels
      (`d_inner` divisible by `G`; channel `d` uses group `d // (d_inner // G)`).
    - `D`: `(d_inner,)`, the skip connection, or None.
    - `z`: `(T, d_inner)`, the gate (the output is multiplied by `silu(z)`), or None.
    - `h0`: `(d_inner, d_state)`, the initial state, or None for zeros.
    - `resets`: boolean `(T,)`, true where the state restarts before step `t` (the
      first token of a packed document): there `h[t] = dt[t] x[t] B[t]`.
    - `return_state`: also return the final state (for prefill).
    - `chunk_size`: the chunk length (default: about 64 steps, balanced so the last
      chunk is nearly full). Memory is `(T / chunk_size + chunk_size) d_inner d_state`.
    - `method`: `"auto"` (the compiled CPU kernel where it is available, that is on the
      CPU backend with a C++ compiler and unless `SSM_CPU_KERNEL=0`; XLA's loops
      elsewhere), `"kernel"` (the kernel, an error where it is unavailable) or
      `"xla"` (XLA's loops everywhere). Both compute the same function with the same
      derivative rule.

    **Returns:**

    `out`, `(T, d_inner)` in the dtype of `x`; with `return_state=True`, the pair
    `(out, h)` with the final state `h` of shape `(d_inner, d_state)` in float32
    (float64 when an input is float64). The states and every accumulation are
    float32 (or float64) whatever the input dtype.

    ```python
    y = ssm.selective_scan(x, jax.nn.softplus(dt), -jnp.exp(A_log), B, C, D, z)
    ```
    """
    _check_args(x, dt, A, B, C, D, z, h0, resets, chunk_size)
    if method not in ("auto", "kernel", "xla"):
        raise ValueError(f"`method` must be 'auto', 'kernel' or 'xla', got {method!r}.")
    T, d_inner = x.shape
    N = A.shape[1]
    G = B.shape[1] if B.ndim == 3 else 1
    floats = [v for v in (x, dt, A, B, C, D, z, h0) if v is not None]
    cdt = compute_dtype(*(v.dtype for v in floats))

    def cast(v, shape):
        return None if v is None else jnp.reshape(jnp.asarray(v).astype(cdt), shape)

    def state_major(v):  # (d_inner, N) -> (N, d_inner)
        return None if v is None else cast(jnp.asarray(v).T, (N, d_inner))

    def groups_last(v):  # (T, N) or (T, G, N) -> (T, N, G)
        return cast(v, (T, G, N)).transpose(0, 2, 1)

    args = (
        cast(x, (T, d_inner)),
        cast(dt, (T, d_inner)),
        state_major(A),
        groups_last(B),
        groups_last(C),
        cast(D, (d_inner,)),
        cast(z, (T, d_inner)),
        state_major(h0),
        None if resets is None else jnp.asarray(resets),
    )
    K = _chunk_length(T, chunk_size)
    use_kernel = method != "xla" and _kernels.available() and _kernel.covers(*args[:5])
    if method == "kernel" and not use_kernel:
        raise ValueError(
            "selective_scan(method='kernel'): the compiled CPU kernel is unavailable "
            "here (it needs JAX's CPU backend, a C++ compiler and SSM_CPU_KERNEL not 0); "
            "use method='auto' or 'xla'."
        )
    out, h = _op(K, use_kernel)(*args)
    out = out.reshape(T, d_inner).astype(x.dtype)
    return (out, h.reshape(N, d_inner).T) if return_state else out
