"""Helpers shared by the multi-head matrix-state mixers (linear attention family)."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
from jaxtyping import Array, Float

from ._mixer import real_dtype


def head_sizes(size: int, num_heads: int, what: str) -> int:
    """`size // num_heads`, with an error that names the sizes when it does not divide."""
    if num_heads < 1 or size % num_heads or size // num_heads < 1:
        raise ValueError(
            f"{what} ({size}) must be a positive multiple of num_heads ({num_heads})."
        )
    return size // num_heads


def split_heads(x: Float[Array, "... hd"], num_heads: int) -> Float[Array, "... H d"]:
    return jnp.reshape(x, x.shape[:-1] + (num_heads, x.shape[-1] // num_heads))


def merge_heads(x: Float[Array, "... H d"]) -> Float[Array, "... hd"]:
    return jnp.reshape(x, x.shape[:-2] + (x.shape[-2] * x.shape[-1],))


def _per_channel(p: Array, x: Array) -> Array:
    """A per-channel parameter `(H * d,)` or `(d,)` shaped to broadcast over `x`."""
    H, d = x.shape[-2], x.shape[-1]
    p = p.astype(x.dtype)
    p = jnp.reshape(p, (H, d) if p.shape[0] == H * d else (1, d))
    return jnp.reshape(p, (1,) * (x.ndim - 2) + p.shape)


def head_rms_norm(
    x: Float[Array, "... H d"], weight: Float[Array, " w"] | None, eps: float = 1e-6
) -> Float[Array, "... H d"]:
    """RMS normalisation of each head's vector, in float32 (float64 for float64)."""
    x = x.astype(real_dtype(x.dtype))
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    return y if weight is None else y * _per_channel(weight, y)


def head_l2_normalise(
    x: Float[Array, "... H d"], eps: float = 1e-6
) -> Float[Array, "... H d"]:
    """`x / ‖x‖` of each head's vector, computed in float32, returned in `x.dtype`."""
    x32 = x.astype(real_dtype(x.dtype))
    norm = jnp.sqrt(jnp.sum(x32 * x32, axis=-1, keepdims=True) + eps)
    return (x32 / norm).astype(x.dtype)


def head_group_norm(
    x: Float[Array, "... H d"],
    weight: Float[Array, " w"] | None,
    bias: Float[Array, " w"] | None = None,
    eps: float = 1e-5,
) -> Float[Array, "... H d"]:
    """GroupNorm with one group per head (mean and variance over each head's vector),
    in float32, with an optional per-channel affine map."""
    x = x.astype(real_dtype(x.dtype))
    x = x - jnp.mean(x, axis=-1, keepdims=True)
    y = x * jax.lax.rsqrt(jnp.mean(x * x, axis=-1, keepdims=True) + eps)
    if weight is not None:
        y = y * _per_channel(weight, y)
    if bias is not None:
        y = y + _per_channel(bias, y)
    return y


def rotary(
    x: Float[Array, "seq H d"], positions: Array, base: float = 10000.0
) -> Float[Array, "seq H d"]:
    """Rotate consecutive pairs of `x` by `position * theta_i` (the `e^{i n theta}` of
    RetNet, as in its reference implementation: `theta_i = base^(-i / (d/2 - 1))`).

    `q_n . k_m` of rotated vectors depends on `n - m` only.
    """
    d = x.shape[-1]
    dtype = real_dtype(x.dtype)
    theta = 1.0 / base ** np.linspace(0.0, 1.0, d // 2)
    angle = positions.astype(dtype)[:, None] * jnp.asarray(theta, dtype)[None, :]
    cos, sin = jnp.cos(angle)[:, None, :], jnp.sin(angle)[:, None, :]
    x = x.astype(dtype)
    even, odd = x[..., 0::2], x[..., 1::2]
    rotated = jnp.stack([even * cos - odd * sin, even * sin + odd * cos], axis=-1)
    return jnp.reshape(rotated, x.shape)


def feature_map(name: str, x: Array) -> Array:
    """The kernel feature maps of linear attention: `elu(x) + 1` (Katharopoulos et al.
    2020), `relu`, or the identity."""
    if name == "elu":
        return jax.nn.elu(x) + 1
    if name == "relu":
        return jax.nn.relu(x)
    return x
