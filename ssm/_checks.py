"""Argument checks and dtype rules shared by every operator of ``ssm``.

Each check raises a `TypeError` (not an array, wrong dtype) or a `ValueError` (wrong
shape or value) whose message names the argument, what it should be and what it is,
so that every operator reports a bad argument the same way.

Two dtype rules:

- `state_dtype`, for the linear scans: float32/complex64 at least, 64-bit if any input
  is 64-bit, complex if any input is complex;
- `compute_dtype`, for the chunked operators (real only): float32, or float64 if any
  input is float64. bfloat16 and float16 inputs compute in float32 under both.
"""

from __future__ import annotations

import jax.numpy as jnp
import numpy as np

_F64, _C128 = np.dtype("float64"), np.dtype("complex128")
# The dtype kinds an argument may be asked to have, and how a message names them.
_KINDS = {
    "floating": (jnp.floating, "floating"),
    "real": (jnp.floating, "real floating"),
    "inexact": (jnp.inexact, "floating or complex"),
}


def state_dtype(*dtypes) -> np.dtype:
    """float32/complex64 at least; 64-bit if any input is 64-bit; complex if any is."""
    dtypes = [np.dtype(d) for d in dtypes]
    is_complex = any(jnp.issubdtype(d, jnp.complexfloating) for d in dtypes)
    wide = any(d in (_F64, _C128) for d in dtypes)
    if is_complex:
        return np.dtype("complex128" if wide else "complex64")
    return np.dtype("float64" if wide else "float32")


def compute_dtype(*dtypes) -> np.dtype:
    """float32, or float64 if any of `dtypes` is float64."""
    wide = any(np.dtype(d) == _F64 for d in dtypes)
    return np.dtype("float64" if wide else "float32")


def as_array(x):
    """`x` as a JAX array unless it already is one (or a NumPy array); `None` stays."""
    if x is None or hasattr(x, "shape"):
        return x
    return jnp.asarray(x)


def check_array(name, x, *, kind="floating", ndims=None, expected=None):
    """`x` must be an array whose dtype is of `kind` (`"floating"`, `"real"` or
    `"inexact"`) and, if `ndims` is given, whose rank is one of `ndims`; `expected`
    (a string such as `"(T, H, d_k)"`) is the shape the messages name."""
    if not hasattr(x, "shape") or not hasattr(x, "dtype"):
        of_shape = "" if expected is None else f" of shape {expected}"
        raise TypeError(
            f"`{name}` must be a JAX or NumPy array{of_shape}, got {type(x).__name__}."
        )
    dtype, words = _KINDS[kind]
    if not jnp.issubdtype(x.dtype, dtype):
        raise TypeError(
            f"`{name}` must have a {words} dtype, got {x.dtype} (shape "
            f"{tuple(x.shape)}); cast it explicitly, e.g. `{name}.astype(jnp.float32)`."
        )
    if ndims is not None and x.ndim not in ndims:
        raise ValueError(
            f"`{name}` must have shape {expected}, got {tuple(x.shape)}; the operator "
            "works on one example with time on axis 0 (use `jax.vmap` for a batch)."
        )


def check_shape(name, x, shape, expected):
    """`x` must have exactly `shape`; `expected` names its axes, e.g. `"(T, H)"`."""
    if tuple(x.shape) != tuple(shape):
        raise ValueError(
            f"`{name}` must have shape {expected} = {tuple(shape)}, got {tuple(x.shape)}."
        )


def check_method(method, methods):
    if method not in methods:
        raise ValueError(f"`method` must be one of {methods}, got {method!r}.")


def check_chunk_size(chunk_size):
    """`chunk_size` must be `None` or a positive int (not a bool)."""
    if chunk_size is None:
        return
    if isinstance(chunk_size, bool) or not isinstance(chunk_size, (int, np.integer)):
        raise TypeError(f"`chunk_size` must be a positive int or None, got {chunk_size!r}.")
    if chunk_size < 1:
        raise ValueError(f"`chunk_size` must be at least 1, got {chunk_size}.")


def check_resets(resets, T):
    """`resets` as a boolean `(T,)` array (or `None`), else a clear error."""
    if resets is None:
        return None
    if not hasattr(resets, "shape") or not hasattr(resets, "dtype"):
        raise TypeError(
            f"`resets` must be a boolean JAX or NumPy array of shape ({T},) (true at the "
            f"first step of each packed document), got {type(resets).__name__}."
        )
    if resets.dtype != jnp.bool_:
        raise TypeError(
            f"`resets` must have dtype bool, got {resets.dtype} (shape "
            f"{tuple(resets.shape)}); expected a boolean array of shape ({T},), true at "
            "the first step of each packed document."
        )
    if tuple(resets.shape) != (T,):
        raise ValueError(
            f"`resets` must have shape (T,) = ({T},) (one flag per time step), got "
            f"{tuple(resets.shape)}."
        )
    return jnp.asarray(resets)


def check_qkv(q, k, v):
    """`q`, `k` of shape `(T, H, d_k)` and `v` of shape `(T, H, d_v)`, one dtype, `T >=
    1` (the arguments of gated linear attention and the mLSTM); returns `(T, H, d_k,
    d_v)`."""
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
