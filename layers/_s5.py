"""S5: simplified MIMO state-space layer (Smith, Warrington and Linderman 2023)."""

from __future__ import annotations

from typing import ClassVar, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import scipy.linalg
from jax import lax
from jaxtyping import Array, Bool, Complex, Float, PRNGKeyArray

import ssm

from ._init import as_complex, hippo_normal, log_uniform
from ._mixer import (
    AbstractMixer,
    complex_dtype,
    real_dtype,
)


class S5(AbstractMixer):
    """S5, one multi-input multi-output diagonal SSM shared by all channels.

    From Smith, Warrington and Linderman, "Simplified state space layers for sequence
    modeling" (ICLR 2023). A state of `state_size` complex modes (stored as
    `state_size // 2` by conjugate symmetry) is driven by all `d_model` channels:

    ```
    Ā = exp(Λ Δ),        B̄ = (Ā - 1) / Λ · B̃                  (ZOH), or
    Ā = (1 + ΔΛ/2) / (1 - ΔΛ/2),  B̄ = Δ / (1 - ΔΛ/2) · B̃       (bilinear)
    h[t] = Ā h[t-1] + B̄ x[t],      y[t] = 2 Re(C̃ h[t]) + D x[t]
    ```

    with `Λ` and `V` from the diagonalised HiPPO-N matrix (optionally `blocks`
    independent HiPPO-N blocks on the diagonal), `B̃ = V⁻¹ B` and `C̃ = C V` for
    Lecun-normal `B` and `C`, and one learned step size `Δ` per mode, log-uniform in
    `[dt_min, dt_max]`. With `bidirectional=True` a second, reversed pass with its own
    `C̃` is added (non-causal; for classification; no `prefill`/`step`).
    """

    d_model: int = eqx.field(static=True)
    state_size: int = eqx.field(static=True)
    discretisation: Literal["zoh", "bilinear"] = eqx.field(static=True)
    bidirectional: bool = eqx.field(static=True)
    Lambda_re: Float[Array, " modes"]
    Lambda_im: Float[Array, " modes"]
    log_step: Float[Array, " modes"]
    B: Float[Array, "modes d_model 2"]
    C: Float[Array, "directions d_model modes 2"]
    D: Float[Array, " d_model"]

    ssm_params: ClassVar[tuple[str, ...]] = ("Lambda_re", "Lambda_im", "log_step", "B")

    def __init__(
        self,
        d_model: int,
        state_size: int = 64,
        blocks: int = 1,
        discretisation: Literal["zoh", "bilinear"] = "zoh",
        bidirectional: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the number of input/output channels `H`.
        - `state_size`: the state size `P` (even); `P/2` modes are stored.
        - `blocks`: the number `J` of HiPPO-N blocks of size `P/J` (each even) the
          initial `Λ` is made of.
        - `discretisation`: `"zoh"` or `"bilinear"`.
        - `bidirectional`: add a reversed pass (non-causal).
        - `dt_min`, `dt_max`: the range of the log-uniform step-size initialisation.
        - `key`: a `jax.random.PRNGKey`.
        """
        if state_size % blocks or (state_size // blocks) % 2:
            raise ValueError(
                f"`state_size` ({state_size}) must split into {blocks} blocks of even size."
            )
        if discretisation not in ("zoh", "bilinear"):
            raise ValueError(
                f"`discretisation` must be 'zoh' or 'bilinear', got {discretisation!r}."
            )
        k_b, k_c, k_d, k_dt = jr.split(key, 4)
        size = state_size // blocks
        Lam, V = hippo_normal(size)
        half = size // 2
        Lam, V = np.tile(Lam[:half], blocks), V[:, :half]
        V_all = scipy.linalg.block_diag(*([V] * blocks))  # (P, P/2)
        Vinv_all = scipy.linalg.block_diag(*([V.conj().T] * blocks))  # (P/2, P)
        H, M = d_model, state_size // 2
        n_dir = 2 if bidirectional else 1
        V_all = jnp.asarray(V_all, jnp.complex64)
        Vinv_all = jnp.asarray(Vinv_all, jnp.complex64)
        B = jr.normal(k_b, (state_size, H), jnp.float32) / np.float32(np.sqrt(H))
        C = jr.normal(k_c, (n_dir, H, state_size, 2), jnp.float32)
        C = as_complex(C, jnp.complex64) / float(np.sqrt(state_size))
        B_tilde = Vinv_all @ B.astype(jnp.complex64)
        C_tilde = C @ V_all
        self.d_model, self.state_size = d_model, state_size
        self.discretisation, self.bidirectional = discretisation, bidirectional
        self.Lambda_re = jnp.asarray(Lam.real, jnp.float32)
        self.Lambda_im = jnp.asarray(Lam.imag, jnp.float32)
        self.log_step = log_uniform(k_dt, (M,), dt_min, dt_max)
        self.B = jnp.stack([B_tilde.real, B_tilde.imag], -1)
        self.C = jnp.stack([C_tilde.real, C_tilde.imag], -1)
        self.D = jr.normal(k_d, (H,), jnp.float32)

    def eigenvalues(self, dtype=jnp.complex64) -> Complex[Array, " modes"]:
        real = jnp.finfo(dtype).dtype
        return lax.complex(self.Lambda_re.astype(real), self.Lambda_im.astype(real))

    def discretise(self, dtype=jnp.float32):
        """`(Ā, B̄)`: shapes `(modes,)` and `(modes, d_model)`, complex."""
        cdt = complex_dtype(dtype)
        Lam = self.eigenvalues(cdt)
        dt = jnp.exp(self.log_step.astype(real_dtype(dtype))).astype(cdt)
        B = as_complex(self.B, cdt)
        if self.discretisation == "zoh":
            dA = jnp.exp(Lam * dt)
            dB = ((dA - 1) / Lam)[:, None] * B
        else:
            inv = 1 / (1 - dt / 2 * Lam)
            dA = inv * (1 + dt / 2 * Lam)
            dB = (inv * dt)[:, None] * B
        return dA, dB

    def init_state(self) -> Complex[Array, " modes"]:
        if self.bidirectional:
            raise ValueError("A bidirectional S5 is not causal: it has no recurrent state.")
        return jnp.zeros((self.state_size // 2,), jnp.complex64)

    def _run(self, x, h0, reverse, C, resets=None):
        rdt = real_dtype(x.dtype)
        dA, dB = self.discretise(rdt)
        u = x.astype(rdt)
        Bu = u.astype(dB.dtype) @ dB.T
        h = ssm.linear_scan(dA, Bu, h0, reverse=reverse, resets=resets)
        y = 2 * (h @ as_complex(C, dB.dtype).T).real
        return y, h, u

    def __call__(
        self,
        x: Float[Array, "seq d_model"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `resets`: true at the first token of each packed document; both directions
          of a bidirectional S5 stay inside documents.
        - `key`: unused.

        **Returns:** `(seq, d_model)`; causal unless `bidirectional`.
        """
        resets = self._check_sequence(x, resets)
        if not self.bidirectional:
            return self.prefill(x, self.init_state(), resets=resets)[0]
        # Backwards, a document's chain is cut at its last token: the next one starts
        # another document.
        ends = None if resets is None else jnp.append(resets[1:], False)
        y, _, u = self._run(x, None, False, self.C[0], resets)
        y_rev, _, _ = self._run(x, None, True, self.C[1], ends)
        y = y + y_rev + self.D.astype(u.dtype)[None] * u
        return y.astype(x.dtype)

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: Complex[Array, " modes"],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], Complex[Array, " modes"]]:
        """Run `x` from `state` (`resets` as in `__call__`); returns the outputs and the
        state after the last step."""
        resets = self._check_sequence(x, resets)
        self._check_causal()
        h0 = state.astype(complex_dtype(x.dtype))
        y, h, u = self._run(x, h0, False, self.C[0], resets)
        y = y + self.D.astype(u.dtype)[None] * u
        return y.astype(x.dtype), h[-1].astype(state.dtype)

    def step(
        self, x_t: Float[Array, " d_model"], state: Complex[Array, " modes"]
    ) -> tuple[Float[Array, " d_model"], Complex[Array, " modes"]]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        self._check_causal()
        rdt = real_dtype(x_t.dtype)
        dA, dB = self.discretise(rdt)
        u = x_t.astype(rdt)
        h = dA * state.astype(dA.dtype) + dB @ u.astype(dB.dtype)
        y = 2 * (as_complex(self.C[0], dB.dtype) @ h).real + self.D.astype(rdt) * u
        return y.astype(x_t.dtype), h.astype(state.dtype)

    def _check_causal(self):
        if self.bidirectional:
            raise ValueError(
                "A bidirectional S5 is not causal, so it has no `prefill`/`step`; "
                "construct it with `bidirectional=False` for recurrent inference."
            )
