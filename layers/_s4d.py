"""S4D: diagonal state-space layer with ZOH discretisation (Gu et al. 2022)."""

from __future__ import annotations

from typing import ClassVar, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Complex, Float, PRNGKeyArray

import ssm

from ._init import as_complex, complex_normal, log_uniform
from ._mixer import (
    AbstractMixer,
    check_sequence,
    check_token,
    chunked,
    complex_dtype,
    real_dtype,
)


class S4D(AbstractMixer):
    """S4D, the diagonal structured state-space layer.

    From Gu, Gupta, Goel and Ré, "On the parameterization and initialization of
    diagonal state space models" (NeurIPS 2022). Each of the `d_model` channels runs
    its own single-input single-output SSM with `state_size // 2` complex modes
    (conjugate symmetry: the other half are the complex conjugates, so the output is
    `2 Re(C h)`):

    ```
    A = -exp(log_A_real) + i A_imag,    dt = exp(log_dt)
    Ā = exp(dt A),                      B̄ = (Ā - 1) / A · B          (ZOH)
    h[t] = Ā h[t-1] + B̄ x[t],           y[t] = 2 Re(C · h[t]) + D x[t]
    ```

    initialised with S4D-Lin (`A_n = -1/2 + iπn`) or S4D-Inv
    (`A_n = -1/2 + i N/π (N/(2n+1) - 1)`), `B = 1`, `C ~ CN(0, 1)` and `dt`
    log-uniform in `[dt_min, dt_max]`. The recurrence runs through
    `ssm.linear_scan`, chunk by chunk with rematerialisation, so the `T × d_model ×
    state_size/2` state history is never stored. Channels mix in the block's MLP.
    """

    d_model: int = eqx.field(static=True)
    state_size: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    log_dt: Float[Array, " d_model"]
    log_A_real: Float[Array, "d_model modes"]
    A_imag: Float[Array, "d_model modes"]
    B: Float[Array, "d_model modes 2"]
    C: Float[Array, "d_model modes 2"]
    D: Float[Array, " d_model"]

    ssm_params: ClassVar[tuple[str, ...]] = ("log_dt", "log_A_real", "A_imag", "B")

    def __init__(
        self,
        d_model: int,
        state_size: int = 64,
        init: Literal["lin", "inv"] = "lin",
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        chunk_size: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the number of channels.
        - `state_size`: the state size `N` per channel (even; `N/2` complex modes).
        - `init`: `"lin"` (S4D-Lin) or `"inv"` (S4D-Inv).
        - `dt_min`, `dt_max`: the range of the log-uniform step-size initialisation.
        - `chunk_size`: the time chunk over which states are rematerialised.
        - `key`: a `jax.random.PRNGKey`.
        """
        if state_size < 2 or state_size % 2:
            raise ValueError(f"`state_size` must be even and >= 2, got {state_size}.")
        if init not in ("lin", "inv"):
            raise ValueError(f"`init` must be 'lin' or 'inv', got {init!r}.")
        k_dt, k_c, k_d = jr.split(key, 3)
        N, M = state_size, state_size // 2
        n = np.arange(M, dtype=np.float64)
        if init == "lin":
            imag = np.pi * n
        else:
            imag = N / np.pi * (N / (2 * n + 1) - 1)
        self.d_model, self.state_size, self.chunk_size = d_model, state_size, chunk_size
        self.log_dt = log_uniform(k_dt, (d_model,), dt_min, dt_max)
        self.log_A_real = jnp.full((d_model, M), np.log(0.5), jnp.float32)
        self.A_imag = jnp.broadcast_to(jnp.asarray(imag, jnp.float32), (d_model, M))
        self.B = jnp.stack(
            [jnp.ones((d_model, M), jnp.float32), jnp.zeros((d_model, M), jnp.float32)], -1
        )
        self.C = complex_normal(k_c, (d_model, M), 1.0)
        self.D = jr.normal(k_d, (d_model,), jnp.float32)

    def eigenvalues(self, dtype=jnp.complex64) -> Complex[Array, "d_model modes"]:
        """The continuous-time eigenvalues `A` (half of them; the rest are conjugates)."""
        real = jnp.finfo(dtype).dtype
        return lax.complex(-jnp.exp(self.log_A_real.astype(real)), self.A_imag.astype(real))

    def discretise(self, dtype=jnp.float32):
        """`(Ā, B̄, C)` by zero-order hold, each `(d_model, modes)` complex."""
        cdt = complex_dtype(dtype)
        A = self.eigenvalues(cdt)
        dt = jnp.exp(self.log_dt.astype(real_dtype(dtype)))[:, None].astype(cdt)
        dA = jnp.exp(dt * A)
        dB = (dA - 1) / A * as_complex(self.B, cdt)
        return dA, dB, as_complex(self.C, cdt)

    def init_state(self) -> Complex[Array, "d_model modes"]:
        return jnp.zeros((self.d_model, self.state_size // 2), jnp.complex64)

    def __call__(
        self, x: Float[Array, "seq d_model"], *, key: PRNGKeyArray | None = None
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:** `x`, one sequence `(seq, d_model)`; `key` is unused.

        **Returns:** `(seq, d_model)`, causal.
        """
        return self.prefill(x, self.init_state())[0]

    def prefill(
        self, x: Float[Array, "seq d_model"], state: Complex[Array, "d_model modes"]
    ):
        """Run `x` from `state`; returns the outputs and the state after the last step."""
        check_sequence(x, self.d_model, "S4D")
        rdt = real_dtype(x.dtype)
        dA, dB, C = self.discretise(rdt)
        u = x.astype(rdt)

        def chunk(h0, u_c):
            h = ssm.linear_scan(dA, dB[None] * u_c[:, :, None].astype(dB.dtype), h0)
            return 2 * jnp.sum(C[None] * h, -1).real, h

        y, h = chunked(chunk, state.astype(dA.dtype), u, self.chunk_size)
        y = y + self.D.astype(rdt)[None] * u
        return y.astype(x.dtype), h.astype(state.dtype)

    def step(self, x_t: Float[Array, " d_model"], state: Complex[Array, "d_model modes"]):
        """One time step: returns `(y_t, state)`."""
        check_token(x_t, self.d_model, "S4D")
        rdt = real_dtype(x_t.dtype)
        dA, dB, C = self.discretise(rdt)
        u = x_t.astype(rdt)
        h = dA * state.astype(dA.dtype) + dB * u[:, None].astype(dB.dtype)
        y = 2 * jnp.sum(C * h, -1).real + self.D.astype(rdt) * u
        return y.astype(x_t.dtype), h.astype(state.dtype)
