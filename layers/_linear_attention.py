"""Linear attention (Katharopoulos et al. 2020)."""

from __future__ import annotations

from typing import Literal

import equinox as eqx
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._heads import feature_map, head_rms_norm, head_sizes, merge_heads, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)

_FEATURE_MAPS = ("elu", "relu", "identity")
_NORMALIZATIONS = ("sum", "rms", "none")


class LinearAttention(AbstractMixer):
    """Causal linear attention: softmax attention with its kernel replaced by a feature
    map, as a recurrence with a `(d_k, d_v)` matrix state per head.

    From Katharopoulos, Vyas, Pappas and Fleuret, "Transformers are RNNs: fast
    autoregressive transformers with linear attention" (ICML 2020). Per head,

    ```
    q, k, v = φ(W_q x), φ(W_k x), W_v x                  # φ(x) = elu(x) + 1
    S[t] = S[t-1] + k[t] v[t]ᵀ,    z[t] = z[t-1] + k[t]
    o[t] = S[t]ᵀ q[t] / (z[t] · q[t] + eps)               # normalization="sum"
    y = W_o o
    ```

    `normalization="sum"` is the paper's; `"rms"` replaces the denominator by an RMS
    norm of each head's output (as TransNormer and later linear-attention models do),
    `"none"` keeps the raw `S[t]ᵀ q[t]`. The normaliser `z` rides along as an extra
    value column of the state. The recurrence runs through
    `ssm.gated_linear_attention` (no decay), chunked.

    ```python
    mixer = layers.LinearAttention(64, num_heads=4, key=key)
    y = jax.vmap(mixer)(x)                           # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    feature_map: Literal["elu", "relu", "identity"] = eqx.field(static=True)
    normalization: Literal["sum", "rms", "none"] = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    eps: float = eqx.field(static=True)
    q_proj: eqx.nn.Linear
    k_proj: eqx.nn.Linear
    v_proj: eqx.nn.Linear
    o_proj: eqx.nn.Linear
    norm_weight: Float[Array, " head_dim"] | None

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        feature_map: Literal["elu", "relu", "identity"] = "elu",
        normalization: Literal["sum", "rms", "none"] = "sum",
        chunk_size: int = 64,
        eps: float = 1e-6,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width; each of the `num_heads` heads has `d_model /
          num_heads` key and value dimensions.
        - `feature_map`: `"elu"` (`elu(x) + 1`, the paper's), `"relu"` or `"identity"`.
        - `normalization`: `"sum"` (divide by `φ(q) · Σ φ(k)`, the paper's), `"rms"`
          (RMS norm per head, with a learned scale) or `"none"`.
        - `chunk_size`: the chunk length of the chunked operator.
        - `eps`: added to the denominator (or inside the RMS norm).
        - `key`: a `jax.random.PRNGKey`.
        """
        if feature_map not in _FEATURE_MAPS:
            raise ValueError(
                f"feature_map must be one of {_FEATURE_MAPS}, got {feature_map!r}."
            )
        if normalization not in _NORMALIZATIONS:
            raise ValueError(
                f"normalization must be one of {_NORMALIZATIONS}, got {normalization!r}."
            )
        if normalization == "sum" and feature_map == "identity":
            raise ValueError(
                'normalization="sum" needs a positive feature map ("elu" or "relu"): '
                "with the identity the denominator can vanish or change sign."
            )
        kq, kk, kv, ko = jr.split(key, 4)
        self.d_model, self.num_heads = d_model, num_heads
        self.head_dim = head_sizes(d_model, num_heads, "d_model")
        self.feature_map, self.normalization = feature_map, normalization
        self.chunk_size, self.eps = chunk_size, eps

        def proj(k):
            return eqx.nn.Linear(d_model, d_model, use_bias=False, dtype=jnp.float32, key=k)

        self.q_proj, self.k_proj, self.v_proj, self.o_proj = map(proj, (kq, kk, kv, ko))
        rms = normalization == "rms"
        self.norm_weight = jnp.ones((self.head_dim,), jnp.float32) if rms else None

    @property
    def _value_width(self) -> int:
        return self.head_dim + (self.normalization == "sum")

    def init_state(self) -> Float[Array, "H dk dv"]:
        """The `(H, d_k, d_v)` state (with one more value column, the normaliser, for
        `normalization="sum"`), zeros."""
        dtype = real_dtype(self.q_proj.weight.dtype)
        return jnp.zeros((self.num_heads, self.head_dim, self._value_width), dtype)

    def _features(self, x):
        H = self.num_heads
        q = split_heads(feature_map(self.feature_map, linear(self.q_proj, x)), H)
        k = split_heads(feature_map(self.feature_map, linear(self.k_proj, x)), H)
        v = split_heads(linear(self.v_proj, x), H)
        if self.normalization == "sum":
            v = jnp.concatenate([v, jnp.ones(v.shape[:-1] + (1,), v.dtype)], axis=-1)
        return q, k, v

    def _readout(self, o, x):
        o = o.astype(real_dtype(o.dtype))
        if self.normalization == "sum":
            o = o[..., :-1] / (o[..., -1:] + self.eps)
        elif self.normalization == "rms":
            o = head_rms_norm(o, self.norm_weight, self.eps)
        return linear(self.o_proj, merge_heads(o).astype(x.dtype))

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
        q, k, v = self._features(x)
        o, S = ssm.gated_linear_attention(
            q, k, v, None, state, resets=resets, chunk_size=self.chunk_size
        )
        return self._readout(o, x), S.astype(state.dtype)

    def step(
        self, x_t: Float[Array, " d_model"], state: Float[Array, "H dk dv"]
    ) -> tuple[Float[Array, " d_model"], Float[Array, "H dk dv"]]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        q, k, v = self._features(x_t[None])
        o, S = ssm.gated_linear_attention_step(q[0], k[0], v[0], None, state)
        return self._readout(o[None], x_t[None])[0], S.astype(state.dtype)
