"""GLA: gated linear attention (Yang et al. 2024)."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._heads import head_rms_norm, head_sizes, merge_heads, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


class GLA(AbstractMixer):
    """Gated linear attention: linear attention with a data-dependent decay per key
    dimension.

    From Yang, Wang, Shen, Panda and Kim, "Gated linear attention Transformers with
    hardware-efficient training" (ICML 2024). Per head, with a low-rank gate
    projection and the normaliser `τ = 16` of the paper:

    ```
    q, k, v = W_q x / √d_k, W_k x, W_v x
    log α = log σ(W_α2 W_α1 x + b_α) / τ                    # (d_k,), per key dimension
    S[t] = diag(α[t]) S[t-1] + k[t] v[t]ᵀ,   o[t] = S[t]ᵀ q[t]
    y = W_o (RMSNorm_h(o) ⊙ swish(W_r x + b_r))
    ```

    with `d_k = expand_k · d_model / H` and `d_v = expand_v · d_model / H` (0.5 and 1 in
    the paper). The recurrence runs through `ssm.gated_linear_attention` with per-key
    decays (chunked, with its secondary level inside chunks).

    ```python
    mixer = layers.GLA(64, num_heads=4, key=key)
    y = jax.vmap(mixer)(x)                           # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    head_dim_v: int = eqx.field(static=True)
    gate_normalizer: float = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    gk_proj1: eqx.nn.Linear
    gk_proj2: eqx.nn.Linear
    g_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    norm_weight: Float[Array, " head_dim_v"]

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_k: float = 0.5,
        expand_v: float = 1.0,
        gate_low_rank: int = 16,
        gate_normalizer: float = 16.0,
        chunk_size: int | None = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: the number of heads.
        - `expand_k`, `expand_v`: the total key and value widths over `d_model`.
        - `gate_low_rank`: the rank of the decay's projection.
        - `gate_normalizer`: `τ`, the exponent `1/τ` on the sigmoid gate (keeps the
          initial decays near 1).
        - `chunk_size`: the chunk length of the chunked operator (a power of two is
          fastest); `None` for the operator's default (32 on CPU, 64 elsewhere).
        - `key`: a `jax.random.PRNGKey`.
        """
        kq, kk, kv, k1, k2, kg, ko = jr.split(key, 7)
        d_k, d_v = int(round(expand_k * d_model)), int(round(expand_v * d_model))
        self.d_model, self.num_heads, self.chunk_size = d_model, num_heads, chunk_size
        self.head_dim = head_sizes(d_k, num_heads, "expand_k * d_model")
        self.head_dim_v = head_sizes(d_v, num_heads, "expand_v * d_model")
        self.gate_normalizer = float(gate_normalizer)

        def proj(d_in, d_out, k, bias=False):
            return eqx.nn.Linear(d_in, d_out, use_bias=bias, dtype=jnp.float32, key=k)

        self.q_proj, self.k_proj = proj(d_model, d_k, kq), proj(d_model, d_k, kk)
        self.v_proj = proj(d_model, d_v, kv)
        self.gk_proj1 = proj(d_model, gate_low_rank, k1)
        self.gk_proj2 = proj(gate_low_rank, d_k, k2, bias=True)
        self.g_proj = proj(d_model, d_v, kg, bias=True)
        self.o_proj = proj(d_v, d_model, ko)
        self.norm_weight = jnp.ones((self.head_dim_v,), jnp.float32)

    def init_state(self) -> Float[Array, "H dk dv"]:
        """The `(H, d_k, d_v)` state, zeros."""
        dtype = real_dtype(self.q_proj.weight.dtype)
        return jnp.zeros((self.num_heads, self.head_dim, self.head_dim_v), dtype)

    def _features(self, x):
        H = self.num_heads
        q = linear(self.q_proj, x) * np.asarray(self.head_dim**-0.5, x.dtype)
        q, k = split_heads(q, H), split_heads(linear(self.k_proj, x), H)
        v = split_heads(linear(self.v_proj, x), H)
        gate = linear(self.gk_proj2, linear(self.gk_proj1, x)).astype(real_dtype(x.dtype))
        log_decay = split_heads(jax.nn.log_sigmoid(gate) / self.gate_normalizer, H)
        return q, k, v, log_decay

    def _readout(self, o, x):
        y = head_rms_norm(o, self.norm_weight, eps=1e-5)
        gate = jax.nn.silu(linear(self.g_proj, x).astype(y.dtype))
        return linear(self.o_proj, (merge_heads(y) * gate).astype(x.dtype))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: Float[Array, "H dk dv"],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], Float[Array, "H dk dv"]]:
        """Run `x` from `state` (chunked), restarting the state at `resets` (true at the
        first token of each packed document); returns the outputs and the final
        state."""
        resets = self._check_sequence(x, resets)
        q, k, v, log_decay = self._features(x)
        o, S = ssm.gated_linear_attention(
            q, k, v, log_decay, state, resets=resets, chunk_size=self.chunk_size
        )
        return self._readout(o, x), S.astype(state.dtype)

    def step(
        self, x_t: Float[Array, " d_model"], state: Float[Array, "H dk dv"]
    ) -> tuple[Float[Array, " d_model"], Float[Array, "H dk dv"]]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        q, k, v, log_decay = self._features(x_t[None])
        o, S = ssm.gated_linear_attention_step(q[0], k[0], v[0], log_decay[0], state)
        return self._readout(o[None], x_t[None])[0], S.astype(state.dtype)
