"""Initialisers shared by the diagonal layers: HiPPO, log-uniform step sizes, etc."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Float, PRNGKeyArray


def hippo_legs(N: int) -> np.ndarray:
    """The HiPPO-LegS matrix (Gu et al. 2020), shape `(N, N)`.

    `A[n, k] = -sqrt(2n+1) sqrt(2k+1)` for `n > k`, `-(n+1)` for `n = k`, 0 above.
    """
    q = np.sqrt(1 + 2 * np.arange(N, dtype=np.float64))
    A = q[:, None] * q[None, :]
    A = np.tril(A) - np.diag(np.arange(N, dtype=np.float64))
    return -A


def hippo_normal(N: int) -> tuple[np.ndarray, np.ndarray]:
    """Diagonalise the normal part of HiPPO-LegS (HiPPO-N), as S5 initialises.

    HiPPO-N is `A + P P^T` with `P[n] = sqrt(n + 1/2)`, which equals `-I/2 + S` with
    `S` skew-symmetric, so it is unitarily diagonalisable.

    **Returns:** the eigenvalues `Lambda` (shape `(N,)`, real part `-1/2`) and the
    unitary eigenvectors `V` (shape `(N, N)`), ordered so that `Lambda[N//2:]` are the
    complex conjugates of `Lambda[:N//2]` in reverse order.
    """
    A = hippo_legs(N)
    P = np.sqrt(np.arange(N, dtype=np.float64) + 0.5)
    S = A + P[:, None] * P[None, :]
    real = np.mean(np.diagonal(S))
    imag, V = np.linalg.eigh(S * -1j)
    return real + 1j * imag, V


def log_uniform(
    key: PRNGKeyArray, shape: tuple[int, ...], low: float, high: float
) -> Float[Array, "..."]:
    """Log-step sizes `log(dt)` with `dt` log-uniform in `[low, high]`."""
    return jr.uniform(key, shape, jnp.float32, np.log(low), np.log(high))


def inverse_softplus(y: Array) -> Array:
    """`x` with `softplus(x) = y`, i.e. `y + log(-expm1(-y))`."""
    return y + jnp.log(-jnp.expm1(-y))


def complex_normal(key: PRNGKeyArray, shape: tuple[int, ...], std: float) -> Array:
    """Complex Gaussian with `E|z|^2 = std^2`, stored as a real `(..., 2)` array."""
    return jr.normal(key, shape + (2,), jnp.float32) * np.float32(std / np.sqrt(2.0))


def as_complex(x: Float[Array, "... 2"], dtype) -> Array:
    """A real `(..., 2)` array as a complex array of `dtype`."""
    real = jnp.finfo(dtype).dtype
    return jax.lax.complex(x[..., 0].astype(real), x[..., 1].astype(real))


def init_dt_bias(
    key: PRNGKeyArray,
    shape: tuple[int, ...],
    dt_min: float,
    dt_max: float,
    dt_floor: float,
) -> Float[Array, "..."]:
    """Mamba's step-size bias: `softplus⁻¹(max(Δ₀, dt_floor))` with `Δ₀` log-uniform in
    `[dt_min, dt_max]`, so that `softplus(dt_bias)` starts at `Δ₀` (Gu and Dao 2023)."""
    dt = jnp.exp(log_uniform(key, shape, dt_min, dt_max))
    return inverse_softplus(jnp.maximum(dt, dt_floor))


def init_A_log(key: PRNGKeyArray, num_heads: int) -> Float[Array, " num_heads"]:
    """Mamba-2's per-head decay rates: `log A` with `A` uniform in `[1, 16]`."""
    return jnp.log(jr.uniform(key, (num_heads,), jnp.float32, 1.0, 16.0))
