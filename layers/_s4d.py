"""S4D: diagonal state-space layer with ZOH discretisation (Gu et al. 2022)."""

from __future__ import annotations

import math
from typing import ClassVar, Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jax import lax
from jaxtyping import Array, Bool, Complex, Float, PRNGKeyArray

import ssm

from ._init import as_complex, complex_normal, log_uniform
from ._mixer import (
    AbstractMixer,
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
    log-uniform in `[dt_min, dt_max]`. Channels mix in the block's MLP.

    Two ways to compute the parallel form, which agree to float tolerance:

    - **convolution** (how S4 and S4D train): the kernel
      `K[l] = 2 Re(C · Ā^l · B̄)`, `l < T`, from the parameters (a Vandermonde product,
      `Ā^l = exp(l dt A)`), then `y = K * x + D x` by an FFT convolution. `O(T log T)`
      work in a few large operations; the `d_model × modes × T` Vandermonde tensor is
      recomputed in the backward pass rather than stored.
    - **recurrent**: `ssm.linear_scan`, chunk by chunk with rematerialisation, so the
      `T × d_model × state_size/2` state history is never stored. `prefill` and `step`
      always use the recurrence (they carry a state).

    `mode="auto"` (default) takes the convolution from `CONV_MIN_LENGTH` (2) steps on:
    `scripts/bench_s4d.py` finds it 4-7x faster than the recurrence for a training
    step on CPU at every length from 4 to 4096, with no more memory, so there is no
    crossover to wait for.
    """

    CONV_MIN_LENGTH: ClassVar[int] = 2

    d_model: int = eqx.field(static=True)
    state_size: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    mode: Literal["auto", "convolution", "recurrent"] = eqx.field(static=True)
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
        mode: Literal["auto", "convolution", "recurrent"] = "auto",
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the number of channels.
        - `state_size`: the state size `N` per channel (even; `N/2` complex modes).
        - `init`: `"lin"` (S4D-Lin) or `"inv"` (S4D-Inv).
        - `dt_min`, `dt_max`: the range of the log-uniform step-size initialisation.
        - `chunk_size`: the time chunk over which states are rematerialised.
        - `mode`: how the parallel form `__call__` is computed: `"convolution"` (FFT
          with the SSM kernel), `"recurrent"` (the scan) or `"auto"` (the
          convolution from `S4D.CONV_MIN_LENGTH` steps on).
        - `key`: a `jax.random.PRNGKey`.
        """
        if state_size < 2 or state_size % 2:
            raise ValueError(f"`state_size` must be even and >= 2, got {state_size}.")
        if init not in ("lin", "inv"):
            raise ValueError(f"`init` must be 'lin' or 'inv', got {init!r}.")
        if mode not in ("auto", "convolution", "recurrent"):
            raise ValueError(
                f"`mode` must be 'auto', 'convolution' or 'recurrent', got {mode!r}."
            )
        self.mode = mode
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
        self,
        x: Float[Array, "seq d_model"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `resets`: true at the first token of each packed document; the state
          restarts there. Packed sequences always run the recurrence (a convolution
          kernel does not stop at document boundaries), whatever `mode` says.
        - `key`: unused.

        **Returns:** `(seq, d_model)`, causal.
        """
        resets = self._check_sequence(x, resets)
        T = x.shape[0]
        long = self.mode == "auto" and T >= self.CONV_MIN_LENGTH
        conv = resets is None and (self.mode == "convolution" or long)
        if not conv:
            return self.prefill(x, self.init_state(), resets=resets)[0]
        rdt = real_dtype(x.dtype)
        u = x.astype(rdt)
        y = fft_causal_conv(u, self.kernel(T, rdt)) + self.D.astype(rdt)[None] * u
        return y.astype(x.dtype)

    def kernel(self, length: int, dtype=jnp.float32) -> Float[Array, "length d_model"]:
        """The convolution kernel `K[l, c] = 2 Re(sum_m C Ā^l B̄)` for `l < length`.

        `Ā^l` is `exp(l dt A)`, a Vandermonde matrix in `Ā`. With `l = s + j` split into
        blocks of `b ≈ sqrt(length)` steps, `Ā^l = Ā^s Ā^j`: the powers within a block
        `(d_model, modes, b)` and the blocks' starts `(length / b, d_model, modes)` are
        computed once and contracted with `C B̄`, so nothing of size `d_model x modes x
        length` exists and the backward pass stores only those two small tensors.
        """
        rdt = real_dtype(dtype)
        cdt = complex_dtype(rdt)
        block = math.isqrt(length - 1) + 1 if length > 1 else 1  # ceil(sqrt(length))
        n_blocks = -(-length // block)

        def vandermonde(log_dt, log_A_real, A_imag, B, C):
            A = lax.complex(-jnp.exp(log_A_real), A_imag)
            dtA = jnp.exp(log_dt)[:, None].astype(cdt) * A
            CB = as_complex(C, cdt) * (jnp.exp(dtA) - 1) / A * as_complex(B, cdt)
            within = jnp.exp(
                dtA[:, :, None] * jnp.arange(block, dtype=rdt).astype(cdt)[None, None]
            )
            starts = (jnp.arange(n_blocks, dtype=rdt) * block).astype(cdt)
            at_starts = jnp.exp(dtA[None] * starts[:, None, None])
            K = 2 * jnp.einsum("scm,cmj->sjc", CB[None] * at_starts, within).real
            return K.reshape(n_blocks * block, -1)[:length]

        params = (self.log_dt, self.log_A_real, self.A_imag, self.B, self.C)
        return vandermonde(*(p.astype(rdt) for p in params))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: Complex[Array, "d_model modes"],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], Complex[Array, "d_model modes"]]:
        """Run `x` from `state` (`resets` as in `__call__`); returns the outputs and the
        state after the last step."""
        resets = self._check_sequence(x, resets)
        rdt = real_dtype(x.dtype)
        dA, dB, C = self.discretise(rdt)
        u = x.astype(rdt)

        def chunk(h0, inputs):
            u_c, r_c = inputs
            b = dB[None] * u_c[:, :, None].astype(dB.dtype)
            h = ssm.linear_scan(dA, b, h0, resets=r_c)
            return 2 * jnp.sum(C[None] * h, -1).real, h

        y, h = chunked(chunk, state.astype(dA.dtype), (u, resets), self.chunk_size)
        y = y + self.D.astype(rdt)[None] * u
        return y.astype(x.dtype), h.astype(state.dtype)

    def step(
        self, x_t: Float[Array, " d_model"], state: Complex[Array, "d_model modes"]
    ) -> tuple[Float[Array, " d_model"], Complex[Array, "d_model modes"]]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        rdt = real_dtype(x_t.dtype)
        dA, dB, C = self.discretise(rdt)
        u = x_t.astype(rdt)
        h = dA * state.astype(dA.dtype) + dB * u[:, None].astype(dB.dtype)
        y = 2 * jnp.sum(C * h, -1).real + self.D.astype(rdt) * u
        return y.astype(x_t.dtype), h.astype(state.dtype)


def _fft_length(n: int) -> int:
    """The smallest `m >= n` with no prime factor above 5, a length FFTs take fast
    (a power of two can be nearly twice `n`)."""
    m = n
    while True:
        r = m
        for p in (2, 3, 5):
            while r % p == 0:
                r //= p
        if r == 1:
            return m
        m += 1


def fft_causal_conv(
    u: Float[Array, "seq channels"], k: Float[Array, "seq channels"]
) -> Float[Array, "seq channels"]:
    """`y[t] = sum_{l <= t} k[l] u[t - l]` per channel, by FFTs of length `>= 2T`."""
    T = u.shape[0]
    n = _fft_length(2 * T - 1)  # zero padding makes the circular conv causal
    spectrum = jnp.fft.rfft(u, n=n, axis=0) * jnp.fft.rfft(k, n=n, axis=0)
    return jnp.fft.irfft(spectrum, n=n, axis=0)[:T].astype(u.dtype)
