"""RetNet: multi-scale retention (Sun et al. 2023)."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, Int, PRNGKeyArray

import ssm

from ._heads import head_group_norm, head_sizes, merge_heads, rotary, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


class RetNetState(NamedTuple):
    """The retention state `S` `(H, d_k, d_v)` and the number of steps seen so far (the
    position the rotation of the next step uses)."""

    S: Float[Array, "H dk dv"]
    position: Int[Array, ""]


def _positions(position, T, resets=None):
    """The rotary positions of `T` steps after `position` steps: counted from each
    document's first token where `resets` marks one (positions restart there)."""
    index = jnp.arange(T, dtype=jnp.int32)
    if resets is None:
        return position + index
    start = jax.lax.cummax(jnp.where(resets, index, -1))  # the latest reset, or -1
    return jnp.where(start >= 0, index - start, position + index)


class RetNet(AbstractMixer):
    """Multi-scale retention, the token mixer of RetNet.

    From Sun, Dong, Huang, Ma, Xia, Xue, Wang and Wei, "Retentive network: a successor
    to Transformer for large language models" (2023). Head `h` of `H` has a fixed decay
    `γ_h = 1 - 2^(-5-h)`; queries and keys are rotated by their position (`Θ_n =
    e^{inθ}`, relative positions) and keys scaled by `d_k^(-1/2)`:

    ```
    q, k, v = rot(W_Q x, n), rot(W_K x, n) / √d_k, W_V x
    S[n] = γ S[n-1] + k[n] v[n]ᵀ,   o[n] = S[n]ᵀ q[n]             # retention
    y = W_O (swish(W_G x) ⊙ GroupNorm_h(o))                       # one group per head
    ```

    with value heads `expand_v` times wider than key heads (2 in the paper). The
    recurrence runs through `ssm.gated_linear_attention` with a scalar decay per head.

    ```python
    mixer = layers.RetNet(64, num_heads=4, key=key)
    y = jax.vmap(mixer)(x)                           # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    head_dim_v: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    g_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    norm_weight: Float[Array, " hdv"]
    norm_bias: Float[Array, " hdv"]

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        expand_v: int = 2,
        chunk_size: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width; key heads have `d_model / num_heads` dimensions
          (even: the rotation acts on pairs), value heads `expand_v` times more.
        - `num_heads`: the number of heads, each with its own decay `1 - 2^(-5-h)`.
        - `expand_v`: the value width over the key width.
        - `chunk_size`: the chunk length of the chunked operator.
        - `key`: a `jax.random.PRNGKey`.
        """
        dk = head_sizes(d_model, num_heads, "d_model")
        if dk % 2:
            raise ValueError(
                f"RetNet rotates pairs of key dimensions: d_model / num_heads = {dk} "
                "must be even."
            )
        kq, kk, kv, kg, ko = jr.split(key, 5)
        self.d_model, self.num_heads, self.chunk_size = d_model, num_heads, chunk_size
        self.head_dim, self.head_dim_v = dk, expand_v * dk
        dv_total = num_heads * self.head_dim_v

        def proj(d_in, d_out, k):
            return eqx.nn.Linear(d_in, d_out, use_bias=False, dtype=jnp.float32, key=k)

        self.q_proj, self.k_proj = proj(d_model, d_model, kq), proj(d_model, d_model, kk)
        self.v_proj, self.g_proj = proj(d_model, dv_total, kv), proj(d_model, dv_total, kg)
        self.o_proj = proj(dv_total, d_model, ko)
        self.norm_weight = jnp.ones((dv_total,), jnp.float32)
        self.norm_bias = jnp.zeros((dv_total,), jnp.float32)

    def log_decays(self) -> Float[Array, " H"]:
        """`log γ_h = log(1 - 2^(-5-h))`, the fixed decay of each head."""
        gamma = 1 - 2.0 ** (-5.0 - np.arange(self.num_heads))
        return jnp.asarray(np.log(gamma), real_dtype(self.q_proj.weight.dtype))

    def init_state(self) -> RetNetState:
        dtype = real_dtype(self.q_proj.weight.dtype)
        S = jnp.zeros((self.num_heads, self.head_dim, self.head_dim_v), dtype)
        return RetNetState(S, jnp.zeros((), jnp.int32))

    def _features(self, x, position, resets=None):
        positions = _positions(position, x.shape[0], resets)
        H = self.num_heads
        q = rotary(split_heads(linear(self.q_proj, x), H), positions).astype(x.dtype)
        k = rotary(split_heads(linear(self.k_proj, x), H), positions)
        k = (k * np.asarray(self.head_dim**-0.5, k.dtype)).astype(x.dtype)
        v = split_heads(linear(self.v_proj, x), H)
        log_decay = jnp.broadcast_to(self.log_decays()[None], (x.shape[0], H))
        return q, k, v, log_decay

    def _readout(self, o, x):
        y = head_group_norm(o, self.norm_weight, self.norm_bias, eps=1e-6)
        gate = jax.nn.silu(linear(self.g_proj, x).astype(y.dtype))
        return linear(self.o_proj, (gate * merge_heads(y)).astype(x.dtype))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: RetNetState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], RetNetState]:
        """Run `x` from `state` (chunked), restarting the state and the rotary positions
        at `resets` (true at the first token of each packed document); returns the
        outputs and the final state."""
        resets = self._check_sequence(x, resets)
        q, k, v, log_decay = self._features(x, state.position, resets)
        o, S = ssm.gated_linear_attention(
            q, k, v, log_decay, state.S, resets=resets, chunk_size=self.chunk_size
        )
        position = _positions(state.position, x.shape[0], resets)[-1] + 1
        new = RetNetState(S.astype(state.S.dtype), position)
        return self._readout(o, x), new

    def step(
        self, x_t: Float[Array, " d_model"], state: RetNetState
    ) -> tuple[Float[Array, " d_model"], RetNetState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        q, k, v, log_decay = self._features(x_t[None], state.position)
        o, S = ssm.gated_linear_attention_step(q[0], k[0], v[0], log_decay[0], state.S)
        new = RetNetState(S.astype(state.S.dtype), state.position + 1)
        return self._readout(o[None], x_t[None])[0], new
