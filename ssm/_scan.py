"""The linear scans on one device: argument checks, then the ``linear_recurrence``
primitive (``_primitive.py``) with the method resolved (``_loops.auto_method``).

``ssm.linear_scan`` and ``ssm.matrix_scan`` are these functions behind a thin wrapper in
``_sharded.py`` that adds ``mesh_axis`` (time-sharded scans); this module does not import
that one, so the scans built on these (GLA, DEER, ``ssm.scan``) and the sharded scans
depend on them without a cycle."""

from __future__ import annotations

from typing import Literal

import jax.numpy as jnp
import numpy as np

from . import _loops
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
    return _loops.auto_method(T, matrix) if method == "auto" else method


def linear_scan(
    a, b, h0=None, *, reverse=False, resets=None, method="auto", chunk_size=None
):
    """The diagonal linear recurrence on one device: `ssm.linear_scan` without
    `mesh_axis` (which `ssm._sharded` adds), for the operators built on it."""
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
    A, b, h0=None, *, reverse=False, resets=None, method="auto", chunk_size=None
):
    """The matrix linear recurrence on one device: `ssm.matrix_scan` without
    `mesh_axis` (which `ssm._sharded` adds), for the operators built on it."""
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
