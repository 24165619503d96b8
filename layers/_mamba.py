"""Mamba: the selective state-space block (Gu and Dao 2023)."""

from __future__ import annotations

import math
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._conv import ConvState, causal_conv, init_conv
from ._heads import head_rms_norm
from ._init import init_dt_bias
from ._mixer import (
    AbstractMixer,
    chunked,
    linear,
    real_dtype,
)


class Mamba(AbstractMixer):
    """The Mamba block: a selective SSM between a gated pair of projections.

    From Gu and Dao, "Mamba: linear-time sequence modeling with selective state
    spaces" (2023). With `d_inner = expand · d_model`:

    ```
    x, z = in_proj(u)                                  # (T, d_inner) each
    x = silu(causal_conv(x))                           # depthwise, width d_conv
    Δ, B, C = dt_proj(x_proj(x)) + dt_bias, x_proj(x), x_proj(x)
    Δ = softplus(Δ);  A = -exp(A_log)
    h[t] = exp(Δ[t] A) ⊙ h[t-1] + (Δ[t] x[t]) B[t]ᵀ    # (d_inner, d_state)
    y[t] = h[t] C[t] + D ⊙ x[t]
    out = out_proj(y ⊙ silu(z))
    ```

    initialised with `A_log[d, n] = log(n + 1)` (S4D-Real), `D = 1` and `dt_bias =
    softplus⁻¹(Δ₀)` for `Δ₀` log-uniform in `[dt_min, dt_max]` (floored at
    `dt_floor`). The recurrence runs through `ssm.selective_scan`, which discretises
    on the fly and keeps only the states at the starts of chunks of `chunk_size`
    steps: no `T × d_inner × d_state` tensor is ever stored, in the forward or the
    backward pass.

    With `allow_neg_eigval=True` (Grazzi et al. 2025, "Unlocking state-tracking in
    linear RNNs through negative eigenvalues", ICLR 2025) the transition is
    `a[t] = 2 exp(Δ[t] A) - 1`, in `(-1, 1)` instead of `(0, 1)`, with the input term
    `(Δ[t] x[t]) B[t]ᵀ` unchanged, as in the paper's Mamba variant. `selective_scan`
    cannot carry a negative decay (it forms `exp(Δ A)` itself), so the recurrence then
    runs through `ssm.linear_scan` on the materialised `a` and inputs, one chunk of
    `chunk_size` steps at a time with the chunk rematerialised in the backward pass:
    it holds `chunk_size × d_inner × d_state` transitions, inputs and states at once
    (a few times the chunked `selective_scan`'s working set) and saves one
    `d_inner × d_state` state per chunk, never the `T × d_inner × d_state` history.
    """

    d_model: int = eqx.field(static=True)
    d_state: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    d_inner: int = eqx.field(static=True)
    dt_rank: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    bcdt_norm_eps: float | None = eqx.field(static=True)
    allow_neg_eigval: bool = eqx.field(static=True)
    in_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv d_inner"]
    conv_bias: Float[Array, " d_inner"]
    x_proj: eqx.nn.Linear
    dt_proj: eqx.nn.Linear
    dt_bias: Float[Array, " d_inner"]
    A_log: Float[Array, "d_inner d_state"]
    D: Float[Array, " d_inner"]
    out_proj: eqx.nn.Linear

    ssm_params: ClassVar[tuple[str, ...]] = ("A_log", "D", "dt_bias")

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        dt_rank: int | None = None,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
        dt_scale: float = 1.0,
        chunk_size: int = 64,
        bcdt_norm_eps: float | None = None,
        allow_neg_eigval: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `d_state`: the state size `N` per inner channel.
        - `d_conv`: the width of the causal depthwise convolution.
        - `expand`: `d_inner = expand · d_model`.
        - `dt_rank`: the rank of the step-size projection (default `ceil(d_model/16)`).
        - `dt_min`, `dt_max`, `dt_floor`: the initial step-size range and floor.
        - `dt_scale`: scales the init of `dt_proj`'s weight (`±dt_scale/√dt_rank`).
        - `chunk_size`: the chunk of `ssm.selective_scan` (states are saved at its
          starts and recomputed inside it in the backward pass).
        - `bcdt_norm_eps`: when given, the step-size input and `B`, `C` (the three
          parts of `x_proj`'s output) are each RMS-normalised, without weights, with
          this epsilon: Falcon Mamba (Zuo et al. 2024). `None`: Mamba.
        - `allow_neg_eigval`: the transition `2 exp(Δ A) - 1` in `(-1, 1)` instead of
          `exp(Δ A)` in `(0, 1)` (Grazzi et al. 2025), computed by `ssm.linear_scan`
          chunk by chunk (see above); `False`: Mamba.
        - `key`: a `jax.random.PRNGKey`.
        """
        k_in, k_conv, k_cb, k_x, k_dt, k_dtb, k_out = jr.split(key, 7)
        self.bcdt_norm_eps = bcdt_norm_eps
        self.allow_neg_eigval = allow_neg_eigval
        d_inner = expand * d_model
        dt_rank = math.ceil(d_model / 16) if dt_rank is None else dt_rank
        self.d_model, self.d_state, self.d_conv = d_model, d_state, d_conv
        self.d_inner, self.dt_rank, self.chunk_size = d_inner, dt_rank, chunk_size
        self.in_proj = eqx.nn.Linear(
            d_model, 2 * d_inner, use_bias=False, dtype=jnp.float32, key=k_in
        )
        self.conv_weight, self.conv_bias = init_conv(
            d_conv, d_inner, key=k_conv, bias_key=k_cb
        )
        self.x_proj = eqx.nn.Linear(
            d_inner, dt_rank + 2 * d_state, use_bias=False, dtype=jnp.float32, key=k_x
        )
        dt_proj = eqx.nn.Linear(
            dt_rank, d_inner, use_bias=False, dtype=jnp.float32, key=k_dt
        )
        std = dt_scale / np.sqrt(dt_rank)
        self.dt_proj = eqx.tree_at(
            lambda lin: lin.weight,
            dt_proj,
            jr.uniform(k_dt, (d_inner, dt_rank), jnp.float32, -std, std),
        )
        self.dt_bias = init_dt_bias(k_dtb, (d_inner,), dt_min, dt_max, dt_floor)
        self.A_log = jnp.log(
            jnp.broadcast_to(
                jnp.arange(1, d_state + 1, dtype=jnp.float32), (d_inner, d_state)
            )
        )
        self.D = jnp.ones((d_inner,), jnp.float32)
        self.out_proj = eqx.nn.Linear(
            d_inner, d_model, use_bias=False, dtype=jnp.float32, key=k_out
        )

    def init_state(self) -> ConvState:
        return ConvState(
            conv=jnp.zeros((self.d_conv - 1, self.d_inner), jnp.float32),
            ssm=jnp.zeros((self.d_inner, self.d_state), jnp.float32),
        )

    def _unit_rms(self, x):
        """Weightless RMS norm over the last axis, in float32 (Falcon Mamba)."""
        return head_rms_norm(x, None, self.bcdt_norm_eps).astype(x.dtype)

    def _selective_inputs(self, u, conv_state, resets=None):
        """The projections and convolution: everything before the recurrence."""
        xz = linear(self.in_proj, u)
        x, z = xz[..., : self.d_inner], xz[..., self.d_inner :]
        x, conv_state = causal_conv(self.conv_weight, self.conv_bias, x, conv_state, resets)
        x = jax.nn.silu(x)
        dbc = linear(self.x_proj, x)
        r, n = self.dt_rank, self.d_state
        if self.bcdt_norm_eps is not None:
            parts = (dbc[..., :r], dbc[..., r : r + n], dbc[..., r + n :])
            dbc = jnp.concatenate([self._unit_rms(p) for p in parts], axis=-1)
        rdt = real_dtype(u.dtype)
        dt = linear(self.dt_proj, dbc[..., :r]).astype(rdt)
        delta = jax.nn.softplus(
            dt + jnp.reshape(self.dt_bias.astype(rdt), (1,) * (dt.ndim - 1) + (-1,))
        )
        B = dbc[..., r : r + n].astype(rdt)
        C = dbc[..., r + n :].astype(rdt)
        return x, z, delta, B, C, conv_state

    def _transition(self, dA):
        """`exp(Δ A)`, or `2 exp(Δ A) - 1` with `allow_neg_eigval` (Grazzi et al. 2025;
        written `1 + 2 expm1(Δ A)`, exact near 1)."""
        return 1 + 2 * jnp.expm1(dA) if self.allow_neg_eigval else jnp.exp(dA)

    def _signed_scan(self, x, delta, A, B, C, h0, resets):
        """The recurrence with transitions that may be negative (`allow_neg_eigval`):
        `ssm.linear_scan` on the materialised `(chunk, d_inner, d_state)` transitions
        and inputs, one rematerialised chunk at a time (`chunked`); returns `y[t] =
        h[t] C[t]` (without `D`) and the last state."""

        def chunk(h, inputs):
            x_c, delta_c, B_c, C_c, r_c = inputs
            a = self._transition(delta_c[:, :, None] * A[None])
            b = (delta_c * x_c)[:, :, None] * B_c[:, None, :]
            hs = ssm.linear_scan(a, b, h, resets=r_c)
            return jnp.sum(hs * C_c[:, None, :], axis=-1), hs

        return chunked(chunk, h0, (x, delta, B, C, resets), self.chunk_size)

    def _output(self, y, x, z, u_dtype):
        rdt = y.dtype
        D = jnp.reshape(self.D.astype(rdt), (1,) * (y.ndim - 1) + (-1,))
        y = (y + D * x.astype(rdt)).astype(u_dtype)
        return linear(self.out_proj, y * jax.nn.silu(z))

    def prefill(
        self,
        u: Float[Array, "seq d_model"],
        state: ConvState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], ConvState]:
        """Run `u` from `state`, restarting the convolution and the recurrence at
        `resets` (true at the first token of each packed document); returns the outputs
        and the state after the last step."""
        resets = self._check_sequence(u, resets)
        x, z, delta, B, C, conv_state = self._selective_inputs(u, state.conv, resets)
        rdt = delta.dtype
        A = -jnp.exp(self.A_log.astype(rdt))
        if self.allow_neg_eigval:
            y, h = self._signed_scan(
                x.astype(rdt), delta, A, B, C, state.ssm.astype(rdt), resets
            )
            out = self._output(y, x, z, u.dtype)
            return out, ConvState(conv_state, h.astype(state.ssm.dtype))
        y, h = ssm.selective_scan(
            x.astype(rdt),
            delta,
            A,
            B,
            C,
            self.D.astype(rdt),
            z.astype(rdt),
            state.ssm.astype(rdt),
            resets=resets,
            return_state=True,
            chunk_size=self.chunk_size,
        )
        out = linear(self.out_proj, y.astype(u.dtype))
        return out, ConvState(conv_state, h.astype(state.ssm.dtype))

    def step(
        self, u_t: Float[Array, " d_model"], state: ConvState
    ) -> tuple[Float[Array, " d_model"], ConvState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(u_t)
        x, z, delta, B, C, conv_state = self._selective_inputs(u_t[None], state.conv)
        x, z, delta, B, C = x[0], z[0], delta[0], B[0], C[0]
        rdt = delta.dtype
        A = -jnp.exp(self.A_log.astype(rdt))
        dA = self._transition(delta[:, None] * A)
        h = dA * state.ssm.astype(rdt) + (delta * x.astype(rdt))[:, None] * B[None, :]
        y = self._output(h @ C, x, z, u_t.dtype)
        return y, ConvState(conv_state, h.astype(state.ssm.dtype))
