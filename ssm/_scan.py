"""Public linear scans: ``linear_scan`` (diagonal) and ``matrix_scan``."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, ArrayLike, Inexact, Shaped

from . import _kernels
from ._checks import (
    as_array,
    check_array,
    check_chunk_size,
    check_method,
    check_resets,
    state_dtype,
)
from ._primitive import linear_recurrence

Method = Literal["auto", "sequential", "associative", "chunked"]
_METHODS = ("auto", "sequential", "associative", "chunked")


def _prepare_resets(resets, T, ndim):
    """Resets as a bool array of shape (T, 1, ..., 1) with ``ndim`` dims."""
    resets = check_resets(resets, T)
    if resets is None:
        return jnp.zeros((1,) * ndim, bool), False
    return jnp.reshape(resets, (T,) + (1,) * (ndim - 1)), True


def _resolve(method, T, matrix):
    return _kernels.auto_method(T, matrix) if method == "auto" else method


def linear_scan(
    a: Shaped[ArrayLike, "..."],
    b: Shaped[Array, "T *S"],
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    reverse: bool = False,
    resets: Shaped[ArrayLike, "..."] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    mesh_axis: str | None = None,
) -> Inexact[Array, "T *S"]:
    """Diagonal linear recurrence ``h[t] = a[t] * h[t-1] + b[t]``.

    **Arguments:**

    - `a`: the decays. Broadcasts against `b` by NumPy rules, so a scalar decay per
      step over a matrix state is `(T, 1, 1)`, a key-wise one `(T, N, 1)`, and a
      time-invariant one `(1, *S)` or `S` (never materialised over time).
    - `b`: the inputs, shape `(T, *S)`.
    - `h0`: the state before the first step, broadcastable to `S`; zeros if `None`.
    - `reverse`: run from the end, `h[t] = a[t] * h[t+1] + b[t]`.
    - `resets`: boolean `(T,)`; where true the state restarts before step `t`
      (`h[t] = b[t]`), for packed sequences.
    - `method`: `"sequential"`, `"associative"` (O(log T) depth), `"chunked"` or
      `"auto"` (chosen per backend and size, see the README's benchmark tables).
      All give the same values and share one derivative rule.
    - `chunk_size`: the chunk length of the chunked method (default about
      `sqrt(T)`, a divisor of `T` when one is near).
    - `mesh_axis`: the name of a mesh axis over which the time axis is split
      (sequence parallelism): each device scans its shard and the devices exchange
      only per-shard summaries (see `ssm.sharded_linear_scan`). The mesh comes from
      `jax.set_mesh` or the inputs' shardings; `T` must be a multiple of the axis
      size. Inside a `shard_map` over that axis the inputs are taken as the shards.

    **Returns:**

    The states `h`, shape `(T, *S)`, in float32/complex64 (float64/complex128 if
    any input is 64-bit): bfloat16 and float16 inputs accumulate in float32.

    The backward pass is the reverse linear scan of the adjoints,
    `g[t] = dL/dh[t] + a[t+1] g[t+1]`, `da[t] = g[t] h[t-1]`, `db[t] = g[t]`
    (JAX's transpose convention for complex numbers), run with the same method;
    it keeps only `a` and the states. `jit`, `vmap`, `grad`, `jvp` and
    higher-order derivatives all compose.

    ```python
    h = ssm.linear_scan(jnp.full((T, D), 0.9), x)        # leaky integrator
    h = ssm.linear_scan(decay[:, None, None], k[:, :, None] * v[:, None, :])
    ```
    """
    if mesh_axis is not None:
        from ._sharded import on_mesh

        return on_mesh(
            "linear",
            a,
            b,
            h0,
            mesh_axis=mesh_axis,
            reverse=reverse,
            resets=resets,
            method=method,
            chunk_size=chunk_size,
        )
    check_array("b", b, kind="inexact")
    if b.ndim < 1:
        raise ValueError("`b` must have a leading time axis, shape (T, *S); got a scalar.")
    a = as_array(a)
    check_array("a", a, kind="inexact")
    check_method(method, _METHODS)
    check_chunk_size(chunk_size)
    T, state_shape = b.shape[0], tuple(b.shape[1:])
    try:
        full = np.broadcast_shapes(tuple(a.shape), tuple(b.shape))
    except ValueError:
        full = None
    if full != tuple(b.shape):
        raise ValueError(
            f"`a` of shape {tuple(a.shape)} does not broadcast against `b` of shape "
            f"{tuple(b.shape)}; expected a shape such as ({T}, *S), (1, *S), "
            f"({T}, 1, ..., 1) or S = {state_shape}, where every axis is 1 or "
            "matches `b`."
        )
    a = jnp.reshape(a, (1,) * (b.ndim - a.ndim) + tuple(a.shape))
    if a.shape[0] not in (1, T):
        raise ValueError(
            f"`a` has {a.shape[0]} time steps but `b` has {T}: the lengths differ."
        )
    dtypes = [a.dtype, b.dtype]
    if h0 is not None:
        h0 = as_array(h0)
        check_array("h0", h0, kind="inexact")
        dtypes.append(h0.dtype)
    dtype = state_dtype(*dtypes)
    if h0 is None:
        h0 = jnp.zeros(state_shape, dtype)
    else:
        try:
            ok = np.broadcast_shapes(tuple(h0.shape), state_shape) == state_shape
        except ValueError:
            ok = False
        if not ok:
            raise ValueError(
                f"`h0` of shape {tuple(h0.shape)} does not broadcast to the state "
                f"shape {state_shape} (the shape of `b` without its time axis)."
            )
        h0 = jnp.broadcast_to(h0.astype(dtype), state_shape)
    r, has_resets = _prepare_resets(resets, T, b.ndim)
    return linear_recurrence(
        a,
        b,
        h0,
        r,
        matrix=False,
        trans=False,
        reverse=bool(reverse),
        shift=False,
        has_resets=has_resets,
        method=_resolve(method, T, matrix=False),
        chunk_size=None if chunk_size is None else int(chunk_size),
    )


def matrix_scan(
    A: Shaped[ArrayLike, "..."],
    b: Shaped[Array, "..."],
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    reverse: bool = False,
    resets: Shaped[ArrayLike, "..."] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    mesh_axis: str | None = None,
) -> Inexact[Array, "T N *M"]:
    """Matrix linear recurrence ``h[t] = A[t] @ h[t-1] + b[t]``.

    **Arguments:**

    - `A`: the transitions, shape `(T, N, N)` (or `(1, N, N)` / `(N, N)` for a
      time-invariant transition, never materialised over time).
    - `b`: the inputs, shape `(T, N)` (vector state) or `(T, N, M)` (matrix state).
    - `h0`: the state before the first step, shape `(N,)` or `(N, M)`; zeros if
      `None`.
    - `reverse`, `resets`, `method`, `chunk_size`, `mesh_axis`: as for `linear_scan`
      (time-sharded, the summaries exchanged are the shards' `N x N` products).

    **Returns:**

    The states, shape `(T, N)` or `(T, N, M)`, float32/complex64 or wider.

    The backward pass is the reverse scan `g[t] = dL/dh[t] + A[t+1]^T g[t+1]`,
    `dA[t] = g[t] h[t-1]^T`, `db[t] = g[t]`.
    """
    if mesh_axis is not None:
        from ._sharded import on_mesh

        return on_mesh(
            "matrix",
            A,
            b,
            h0,
            mesh_axis=mesh_axis,
            reverse=reverse,
            resets=resets,
            method=method,
            chunk_size=chunk_size,
        )
    check_array("b", b, kind="inexact")
    A = as_array(A)
    check_array("A", A, kind="inexact")
    check_method(method, _METHODS)
    check_chunk_size(chunk_size)
    if b.ndim not in (2, 3):
        raise ValueError(f"`b` must have shape (T, N) or (T, N, M), got {tuple(b.shape)}.")
    T, N = b.shape[0], b.shape[1]
    if A.ndim == 2:
        A = A[None]
    if A.ndim != 3 or A.shape[1:] != (N, N):
        raise ValueError(
            f"`A` must have shape ({T}, {N}, {N}) to act on `b` of shape "
            f"{tuple(b.shape)}, got {tuple(A.shape)}."
        )
    if A.shape[0] not in (1, T):
        raise ValueError(
            f"`A` has {A.shape[0]} time steps but `b` has {T}: the lengths differ."
        )
    vector = b.ndim == 2
    b3 = b[..., None] if vector else b
    state_shape = tuple(b3.shape[1:])
    dtypes = [A.dtype, b.dtype]
    if h0 is not None:
        h0 = as_array(h0)
        check_array("h0", h0, kind="inexact")
        dtypes.append(h0.dtype)
        if tuple(h0.shape) != tuple(b.shape[1:]):
            raise ValueError(
                f"`h0` must have shape {tuple(b.shape[1:])} (the state shape of `b`), "
                f"got {tuple(h0.shape)}."
            )
    dtype = state_dtype(*dtypes)
    h0 = (
        jnp.zeros(state_shape, dtype)
        if h0 is None
        else jnp.reshape(h0.astype(dtype), state_shape)
    )
    r, has_resets = _prepare_resets(resets, T, 3)
    h = linear_recurrence(
        A,
        b3,
        h0,
        r,
        matrix=True,
        trans=False,
        reverse=bool(reverse),
        shift=False,
        has_resets=has_resets,
        method=_resolve(method, T, matrix=True),
        chunk_size=None if chunk_size is None else int(chunk_size),
    )
    return h[..., 0] if vector else h
