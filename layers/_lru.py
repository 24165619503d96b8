"""LRU: the linear recurrent unit (Orvieto et al. 2023)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Complex, Float, PRNGKeyArray

import ssm

from ._init import as_complex, complex_normal
from ._mixer import (
    AbstractMixer,
    complex_dtype,
    real_dtype,
    time_axis,
)


class LRU(AbstractMixer):
    """The linear recurrent unit.

    From Orvieto, Smith, Gu, Fernando, Gulcehre, Pascanu and De, "Resurrecting
    recurrent neural networks for long sequences" (ICML 2023). A complex diagonal
    recurrence in the exponential parameterisation, with the γ normalisation:

    ```
    λ = exp(-exp(ν_log) + i exp(θ_log)),      γ = exp(γ_log) = sqrt(1 - |λ|²) at init
    h[t] = λ ⊙ h[t-1] + γ ⊙ (B x[t]),         y[t] = Re(C h[t]) + D ⊙ x[t]
    ```

    initialised on the ring `r_min <= |λ| <= r_max` (uniform in area) with phases
    uniform in `[0, max_phase]`, `B ~ CN(0, 1/H)`, `C ~ CN(0, 1/N)`, `D ~ N(0, 1)`.

    The eigenvalues `λ` are complex and fill the unit disc, so they already reach the
    negative reals (phase `π`, within the default `max_phase = 2π`) and there is no
    `allow_neg_eigval` option as on `Mamba`, `Mamba2`, `DeltaNet` and `GatedDeltaNet`
    (Grazzi et al. 2025). They do not depend on the input, though: the state is a
    fixed linear filter of the inputs, which cannot track parity at arbitrary lengths
    in finite precision; the negative eigenvalues help the input-dependent layers.
    """

    d_model: int = eqx.field(static=True)
    state_size: int = eqx.field(static=True)
    seq_axis: str | None = eqx.field(static=True)
    nu_log: Float[Array, " state"]
    theta_log: Float[Array, " state"]
    gamma_log: Float[Array, " state"]
    B: Float[Array, "state d_model 2"]
    C: Float[Array, "d_model state 2"]
    D: Float[Array, " d_model"]

    ssm_params: ClassVar[tuple[str, ...]] = ("nu_log", "theta_log", "gamma_log")

    def __init__(
        self,
        d_model: int,
        state_size: int = 64,
        r_min: float = 0.0,
        r_max: float = 1.0,
        max_phase: float = 2 * np.pi,
        seq_axis: str | None = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the number of channels `H`.
        - `state_size`: the number `N` of complex state dimensions.
        - `r_min`, `r_max`: the ring the eigenvalues' moduli are drawn in.
        - `max_phase`: the largest initial phase.
        - `seq_axis`: a mesh axis to split the scan over time across (sequence
          parallelism) when run under a mesh that has it; see `ssm.linear_scan`.
        - `key`: a `jax.random.PRNGKey`.
        """
        if not 0.0 <= r_min < r_max <= 1.0:
            raise ValueError(f"need 0 <= r_min < r_max <= 1, got {r_min}, {r_max}.")
        k1, k2, k_b, k_c, k_d = jr.split(key, 5)
        u1 = jr.uniform(k1, (state_size,), jnp.float32)
        u2 = jr.uniform(k2, (state_size,), jnp.float32, 1e-6, 1.0)
        nu = -0.5 * jnp.log(u1 * (r_max**2 - r_min**2) + r_min**2)
        self.d_model, self.state_size, self.seq_axis = d_model, state_size, seq_axis
        self.nu_log = jnp.log(nu)
        self.theta_log = jnp.log(max_phase * u2)
        self.gamma_log = 0.5 * jnp.log(-jnp.expm1(-2 * nu))
        self.B = complex_normal(k_b, (state_size, d_model), 1 / np.sqrt(d_model))
        self.C = complex_normal(k_c, (d_model, state_size), 1 / np.sqrt(state_size))
        self.D = jr.normal(k_d, (d_model,), jnp.float32)

    def eigenvalues(self, dtype=jnp.complex64) -> Complex[Array, " state"]:
        """`λ`, the discrete-time eigenvalues."""
        real = jnp.finfo(dtype).dtype
        return jnp.exp(
            lax.complex(
                -jnp.exp(self.nu_log.astype(real)), jnp.exp(self.theta_log.astype(real))
            )
        )

    def _params(self, dtype):
        cdt = complex_dtype(dtype)
        gamma = jnp.exp(self.gamma_log.astype(real_dtype(dtype))).astype(cdt)
        return (
            self.eigenvalues(cdt),
            gamma[:, None] * as_complex(self.B, cdt),
            as_complex(self.C, cdt),
        )

    def init_state(self) -> Complex[Array, " state"]:
        return jnp.zeros((self.state_size,), jnp.complex64)

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: Complex[Array, " state"],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], Complex[Array, " state"]]:
        """Run `x` from `state`, restarting at `resets` (true at the first token of each
        packed document); returns the outputs and the state after the last step."""
        resets = self._check_sequence(x, resets)
        rdt = real_dtype(x.dtype)
        lam, gB, C = self._params(rdt)
        u = x.astype(rdt)
        h = ssm.linear_scan(
            lam,
            u.astype(gB.dtype) @ gB.T,
            state.astype(lam.dtype),
            resets=resets,
            mesh_axis=time_axis(self.seq_axis),
        )
        y = (h @ C.T).real + self.D.astype(rdt)[None] * u
        return y.astype(x.dtype), h[-1].astype(state.dtype)

    def step(
        self, x_t: Float[Array, " d_model"], state: Complex[Array, " state"]
    ) -> tuple[Float[Array, " d_model"], Complex[Array, " state"]]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        rdt = real_dtype(x_t.dtype)
        lam, gB, C = self._params(rdt)
        u = x_t.astype(rdt)
        h = lam * state.astype(lam.dtype) + gB @ u.astype(gB.dtype)
        y = (C @ h).real + self.D.astype(rdt) * u
        return y.astype(x_t.dtype), h.astype(state.dtype)
