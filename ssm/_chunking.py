"""Cutting the time axis into chunks and groups of chunks, and the small array helpers
the chunked operators (gated linear attention, mLSTM, the delta rule) share.

A sequence of `T` steps becomes `M` groups of `group` chunks of `C` steps each,
zero-padded at the end: zero inputs with a zero log decay leave every operator's state
as it is, so the state after the last chunk is the state at step `T`.
"""

from __future__ import annotations

import jax.numpy as jnp


def lead(x, ndim):
    """`x` with leading unit axes up to rank `ndim` (explicit rank promotion)."""
    return jnp.reshape(x, (1,) * (ndim - x.ndim) + tuple(x.shape))


def tril(n, ndim, k=0):
    """The `(n, n)` lower-triangular boolean mask (below diagonal `k`) at rank `ndim`."""
    return lead(jnp.tril(jnp.ones((n, n), bool), k), ndim)


def mT(x):
    """The transpose of the last two axes."""
    return jnp.swapaxes(x, -1, -2)


def heads_first(x):
    """`(..., C, H, d) <-> (..., H, C, d)`."""
    return jnp.swapaxes(x, -3, -2)


def to_groups(x, C, group=1):
    """`(T, ...) -> (M, group, C, ...)`, zero-padded at the end to a whole number of
    groups; `None` stays `None`."""
    if x is None:
        return None
    T = x.shape[0]
    steps = group * C
    M = -(-T // steps)
    if M * steps != T:
        x = jnp.pad(x, [(0, M * steps - T)] + [(0, 0)] * (x.ndim - 1))
    return jnp.reshape(x, (M, group, C) + tuple(x.shape[1:]))


def from_groups(x, T):
    """`(M, group, C, ...) -> (T, ...)`, dropping the padding."""
    return jnp.reshape(x, (-1,) + tuple(x.shape[3:]))[:T]
