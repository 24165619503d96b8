"""Mamba-2: the state-space dual block (Dao and Gu 2024)."""

from __future__ import annotations

from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._conv import ConvState, causal_conv, init_conv
from ._heads import head_rms_norm, head_sizes, split_heads
from ._init import init_A_log, init_dt_bias
from ._mixer import (
    AbstractMixer,
    chunked,
    linear,
    real_dtype,
)


class Mamba2(AbstractMixer):
    """The Mamba-2 block: a selective SSM with a scalar decay per head (SSD), computed as
    gated linear attention.

    From Dao and Gu, "Transformers are SSMs: generalized models and efficient algorithms
    through structured state space duality" (ICML 2024). With `d_inner = expand ·
    d_model` split into `H` heads of `P = d_inner / H` channels, and one group of `B, C`
    of size `N = d_state` shared by the heads:

    ```
    z, xBC, dt = W_in u                                   # one projection
    x, B, C = silu(causal_conv(xBC))                      # width d_conv
    Δ = softplus(dt + dt_bias);  A = -exp(A_log)          # (H,) each
    S[t] = exp(Δ[t] A) S[t-1] + B[t] (Δ[t] x[t])ᵀ         # (N, P) per head
    y[t] = S[t]ᵀ C[t] + D ⊙ x[t]
    out = W_out RMSNorm(y ⊙ silu(z))
    ```

    initialised as the paper's code: `A` uniform in `[1, 16]`, `Δ` log-uniform in
    `[dt_min, dt_max]` (floored at `dt_floor`) through `dt_bias`, `D = 1`. The
    recurrence runs through `ssm.gated_linear_attention` (`q = C`, `k = B`, `v = Δ x`,
    `log α = Δ A`), chunked.

    With `allow_neg_eigval=True` (Grazzi et al. 2025, "Unlocking state-tracking in
    linear RNNs through negative eigenvalues", ICLR 2025) the decay is `α[t] = 2
    exp(Δ[t] A) - 1`, in `(-1, 1)` instead of `(0, 1)`, with the input term `B[t]
    (Δ[t] x[t])ᵀ` unchanged (the paper's change to Mamba, here per head). The
    chunked operator works in log space and cannot carry a negative decay, so the
    recurrence then runs through `ssm.linear_scan` on the materialised `(H, N, P)`
    inputs, one chunk of `chunk_size` steps at a time with the chunk rematerialised in
    the backward pass: it holds `chunk_size × d_inner × d_state` inputs and states at
    once and saves one `(H, N, P)` state per chunk, never the `T × d_inner × d_state`
    history; it is slower than the chunked operator (no matrix products).

    ```python
    mixer = layers.Mamba2(64, key=key)
    y = jax.vmap(mixer)(x)                           # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    d_inner: int = eqx.field(static=True)
    d_state: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    n_groups: int = eqx.field(static=True)
    norm_eps: float = eqx.field(static=True)
    allow_neg_eigval: bool = eqx.field(static=True)
    in_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv channels"]
    conv_bias: Float[Array, " channels"]
    dt_bias: Float[Array, " H"]
    A_log: Float[Array, " H"]
    D: Float[Array, " H"]
    norm_weight: Float[Array, " d_inner"]
    out_proj: eqx.nn.Linear

    ssm_params: ClassVar[tuple[str, ...]] = ("A_log", "D", "dt_bias")

    def __init__(
        self,
        d_model: int,
        d_state: int = 16,
        d_conv: int = 4,
        expand: int = 2,
        num_heads: int = 4,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
        chunk_size: int = 64,
        n_groups: int = 1,
        norm_eps: float = 1e-5,
        allow_neg_eigval: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `d_state`: `N`, the state size per head channel (the size of `B` and `C`).
        - `d_conv`: the width of the causal convolution over `x, B, C`.
        - `expand`: `d_inner = expand · d_model`.
        - `num_heads`: `H`; each head has `d_inner / H` channels and its own `A`, `Δ`.
        - `dt_min`, `dt_max`, `dt_floor`: the initial step-size range and floor.
        - `chunk_size`: the chunk length of the chunked operator.
        - `n_groups`: `G`, the number of `B, C` groups; the heads are split into `G`
          contiguous runs that share one group's `B, C`, and the gated RMS norm
          normalises each of the `G` slices of `d_inner` channels separately (as the
          reference code, `RMSNormGated(group_size=d_inner / G)`).
        - `norm_eps`: the epsilon of the gated RMS norm.
        - `allow_neg_eigval`: the decay `2 exp(Δ A) - 1` in `(-1, 1)` instead of
          `exp(Δ A)` in `(0, 1)` (Grazzi et al. 2025), computed by `ssm.linear_scan`
          chunk by chunk (see above); `False`: Mamba-2.
        - `key`: a `jax.random.PRNGKey`.
        """
        k_in, k_conv, k_cb, k_dt, k_a, k_out = jr.split(key, 6)
        d_inner = expand * d_model
        self.d_model, self.d_inner, self.d_state = d_model, d_inner, d_state
        self.d_conv, self.num_heads, self.chunk_size = d_conv, num_heads, chunk_size
        self.head_dim = head_sizes(d_inner, num_heads, "expand * d_model")
        if n_groups < 1 or num_heads % n_groups:
            raise ValueError(
                f"Mamba2: n_groups must divide num_heads={num_heads}, got {n_groups}."
            )
        self.n_groups, self.norm_eps = n_groups, norm_eps
        self.allow_neg_eigval = allow_neg_eigval
        channels = d_inner + 2 * n_groups * d_state
        self.in_proj = eqx.nn.Linear(
            d_model,
            d_inner + channels + num_heads,
            use_bias=False,
            dtype=jnp.float32,
            key=k_in,
        )
        self.conv_weight, self.conv_bias = init_conv(
            d_conv, channels, key=k_conv, bias_key=k_cb
        )
        self.dt_bias = init_dt_bias(k_dt, (num_heads,), dt_min, dt_max, dt_floor)
        self.A_log = init_A_log(k_a, num_heads)
        self.D = jnp.ones((num_heads,), jnp.float32)
        self.norm_weight = jnp.ones((d_inner,), jnp.float32)
        self.out_proj = eqx.nn.Linear(
            d_inner, d_model, use_bias=False, dtype=jnp.float32, key=k_out
        )

    def init_state(self) -> ConvState:
        """Zeros: the convolution history and the `(H, N, P)` state."""
        dtype = real_dtype(self.in_proj.weight.dtype)
        return ConvState(
            conv=jnp.zeros(
                (self.d_conv - 1, self.d_inner + 2 * self.n_groups * self.d_state), dtype
            ),
            ssm=jnp.zeros((self.num_heads, self.d_state, self.head_dim), dtype),
        )

    def _features(self, u, conv_state, resets=None):
        """Everything before the recurrence, as gated-linear-attention inputs."""
        d, N, H, G = self.d_inner, self.d_state, self.num_heads, self.n_groups
        GN = G * N
        zxbcdt = linear(self.in_proj, u)
        z, xbc, dt = (
            zxbcdt[:, :d],
            zxbcdt[:, d : 2 * d + 2 * GN],
            zxbcdt[:, 2 * d + 2 * GN :],
        )
        xbc, conv_state = causal_conv(
            self.conv_weight, self.conv_bias, xbc, conv_state, resets
        )
        xbc = jax.nn.silu(xbc)
        x, B, C = xbc[:, :d], xbc[:, d : d + GN], xbc[:, d + GN :]
        rdt = real_dtype(u.dtype)
        delta = jax.nn.softplus(dt.astype(rdt) + self.dt_bias.astype(rdt)[None])  # (T, H)
        log_decay = -delta * jnp.exp(self.A_log.astype(rdt))[None]
        x = split_heads(x, H)  # (T, H, P)
        v = (x.astype(rdt) * delta[:, :, None]).astype(u.dtype)
        T = u.shape[0]  # heads h of group h // (H / G) share its B, C
        q = jnp.repeat(jnp.reshape(C, (T, G, N)), H // G, axis=1, total_repeat_length=H)
        k = jnp.repeat(jnp.reshape(B, (T, G, N)), H // G, axis=1, total_repeat_length=H)
        return q, k, v, log_decay, x, z, conv_state

    def _signed_scan(self, q, k, v, log_decay, S0, resets):
        """The recurrence with decays `2 exp(Δ A) - 1` that may be negative
        (`allow_neg_eigval`): `ssm.linear_scan` on the materialised `(chunk, H, N, P)`
        inputs `k vᵀ`, one rematerialised chunk at a time (`chunked`); returns `y[t] =
        S[t]ᵀ q[t]` (without `D`) and the last state."""
        rdt = log_decay.dtype

        def chunk(S, inputs):
            q_c, k_c, v_c, g_c, r_c = inputs
            a = (1 + 2 * jnp.expm1(g_c))[:, :, None, None]  # (C, H, 1, 1)
            b = k_c.astype(rdt)[:, :, :, None] * v_c.astype(rdt)[:, :, None, :]
            Ss = ssm.linear_scan(a, b, S, resets=r_c)
            return jnp.sum(Ss * q_c.astype(rdt)[:, :, :, None], axis=2), Ss

        xs = (q, k, v, log_decay, resets)
        return chunked(chunk, S0.astype(rdt), xs, self.chunk_size)

    def _output(self, y, x, z, u):
        rdt = real_dtype(u.dtype)
        y = y.astype(rdt) + self.D.astype(rdt)[None, :, None] * x.astype(rdt)
        T, G = y.shape[0], self.n_groups
        y = jnp.reshape(y, (T, G, self.d_inner // G)) * jnp.reshape(
            jax.nn.silu(z.astype(rdt)), (T, G, self.d_inner // G)
        )
        y = head_rms_norm(y, self.norm_weight, self.norm_eps)  # per group
        y = jnp.reshape(y, (T, self.d_inner))
        return linear(self.out_proj, y.astype(u.dtype))

    def prefill(
        self,
        u: Float[Array, "seq d_model"],
        state: ConvState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], ConvState]:
        """Run `u` from `state` (chunked), restarting the convolution and the state at
        `resets` (true at the first token of each packed document); returns the
        outputs and the final state."""
        resets = self._check_sequence(u, resets)
        q, k, v, log_decay, x, z, conv = self._features(u, state.conv, resets)
        if self.allow_neg_eigval:
            y, S = self._signed_scan(q, k, v, log_decay, state.ssm, resets)
            return self._output(y, x, z, u), ConvState(conv, S.astype(state.ssm.dtype))
        y, S = ssm.gated_linear_attention(
            q, k, v, log_decay, state.ssm, resets=resets, chunk_size=self.chunk_size
        )
        return self._output(y, x, z, u), ConvState(conv, S.astype(state.ssm.dtype))

    def step(
        self, u_t: Float[Array, " d_model"], state: ConvState
    ) -> tuple[Float[Array, " d_model"], ConvState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(u_t)
        q, k, v, log_decay, x, z, conv = self._features(u_t[None], state.conv)
        if self.allow_neg_eigval:
            rdt = log_decay.dtype
            a = 1 + 2 * jnp.expm1(log_decay[0])  # (H,), in (-1, 1)
            S = a[:, None, None] * state.ssm.astype(rdt) + (
                k[0].astype(rdt)[:, :, None] * v[0].astype(rdt)[:, None, :]
            )
            y = jnp.sum(S * q[0].astype(rdt)[:, :, None], axis=1)  # Sᵀ q: (H, P)
        else:
            y, S = ssm.gated_linear_attention_step(
                q[0], k[0], v[0], log_decay[0], state.ssm
            )
        out = self._output(y[None], x, z, u_t[None])[0]
        return out, ConvState(conv, S.astype(state.ssm.dtype))
