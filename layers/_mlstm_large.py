"""The mLSTM layer of xLSTM 7B (Beck et al. 2025): projections straight from the
residual stream, soft-capped gates, an output gate, no convolution."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._heads import head_group_norm, head_sizes, merge_heads, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


def soft_cap(x: Array, cap: float | None) -> Array:
    """`cap · tanh(x / cap)` (the identity when `cap` is None)."""
    if cap is None:
        return x
    c = np.asarray(cap, x.dtype)
    return c * jnp.tanh(x / c)


class MLSTMLarge(AbstractMixer):
    """The mLSTM layer of xLSTM 7B, with `H` heads, `d_qk = qk_dim_factor · d_model`
    and `d_v = v_dim_factor · d_model` channels:

    ```
    q, k, v, o = W_q x, W_k x, W_v x, W_o x                    # (d_qk,), (d_qk,), (d_v,) x2
    ĩ, f̃ = cap(W_i x + b_i), cap(W_f x + b_f)                  # one gate per head
    h = mLSTM(q, k / √(d_qk / H), v, log σ(f̃), ĩ)              # stabilised cell
    y = W_out (σ(o) ⊙ LayerNorm_h(h))                          # norm per head
    ```

    with `cap(x) = c · tanh(x / c)`. From Beck, Kohl, Pöppel, Hochreiter et al.,
    "xLSTM 7B: a recurrent LLM for fast and efficient inference" (2025), as in their
    code (`xlstm_large`) and `transformers`' `xLSTMLayer`. The cell runs through
    `ssm.mlstm` (chunked; `ssm.mlstm_step` for `step`). Initialised small (the
    checkpoints are what matter): weights `N(0, 1/d_in)`, forget-gate biases spaced
    from 3 to 6 over the heads, input-gate biases `-10`.
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    d_qk: int = eqx.field(static=True)
    d_v: int = eqx.field(static=True)
    gate_soft_cap: float | None = eqx.field(static=True)
    norm_eps: float = eqx.field(static=True)
    cell_eps: float = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    q: eqx.nn.Linear
    k: eqx.nn.Linear
    v: eqx.nn.Linear
    ogate: eqx.nn.Linear
    igate: eqx.nn.Linear
    fgate: eqx.nn.Linear
    norm_weight: Float[Array, " d_v"]
    norm_bias: Float[Array, " d_v"] | None
    out_proj: eqx.nn.Linear

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        qk_dim_factor: float = 0.5,
        v_dim_factor: float = 1.0,
        gate_soft_cap: float | None = 15.0,
        norm_eps: float = 1e-6,
        cell_eps: float = 1e-6,
        use_bias: bool = False,
        chunk_size: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: `H`, each with its own gates and memory.
        - `qk_dim_factor`, `v_dim_factor`: `d_qk` and `d_v` over `d_model`.
        - `gate_soft_cap`: `c` of the gates' soft cap (`None`: no cap).
        - `norm_eps`: the epsilon of the per-head LayerNorm.
        - `cell_eps`: added to the cell's normaliser (`ssm.mlstm`'s `eps`).
        - `use_bias`: biases on the q/k/v/o and output projections and the norm.
        - `chunk_size`: the chunk length of `ssm.mlstm`.
        - `key`: a `jax.random.PRNGKey`.
        """
        kq, kk, kv, ko, ki, kf, kout = jr.split(key, 7)
        d_qk, d_v = int(d_model * qk_dim_factor), int(d_model * v_dim_factor)
        head_sizes(d_qk, num_heads, "qk_dim_factor * d_model")
        head_sizes(d_v, num_heads, "v_dim_factor * d_model")
        self.d_model, self.num_heads, self.d_qk, self.d_v = d_model, num_heads, d_qk, d_v
        self.gate_soft_cap, self.norm_eps, self.cell_eps = gate_soft_cap, norm_eps, cell_eps
        self.chunk_size = chunk_size

        def lin(n_in, n_out, bias, k):
            return eqx.nn.Linear(n_in, n_out, use_bias=bias, dtype=jnp.float32, key=k)

        self.q, self.k = lin(d_model, d_qk, use_bias, kq), lin(d_model, d_qk, use_bias, kk)
        self.v, self.ogate = (
            lin(d_model, d_v, use_bias, kv),
            lin(d_model, d_v, use_bias, ko),
        )
        igate, fgate = lin(d_model, num_heads, True, ki), lin(d_model, num_heads, True, kf)
        self.igate = eqx.tree_at(
            lambda g: g.bias, igate, jnp.full((num_heads,), -10.0, jnp.float32)
        )
        self.fgate = eqx.tree_at(
            lambda g: g.bias, fgate, jnp.linspace(3.0, 6.0, num_heads, dtype=jnp.float32)
        )
        self.norm_weight = jnp.ones((d_v,), jnp.float32)
        self.norm_bias = jnp.zeros((d_v,), jnp.float32) if use_bias else None
        self.out_proj = lin(d_v, d_model, use_bias, kout)

    def init_state(self) -> ssm.MLSTMState:
        """Zeros, with the stabiliser `m = 0`."""
        H = self.num_heads
        dk, dv = self.d_qk // H, self.d_v // H
        dtype = real_dtype(self.q.weight.dtype)
        return ssm.MLSTMState(
            jnp.zeros((H, dk, dv), dtype), jnp.zeros((H, dk), dtype), jnp.zeros((H,), dtype)
        )

    def _features(self, x):
        H, rdt = self.num_heads, real_dtype(x.dtype)
        q, k, v = linear(self.q, x), linear(self.k, x), linear(self.v, x)
        k = k * np.asarray((self.d_qk // H) ** -0.5, k.dtype)
        log_i = soft_cap(linear(self.igate, x).astype(rdt), self.gate_soft_cap)
        f = soft_cap(linear(self.fgate, x).astype(rdt), self.gate_soft_cap)
        heads = (split_heads(q, H), split_heads(k, H), split_heads(v, H))
        return heads, jax.nn.log_sigmoid(f), log_i

    def _readout(self, h, x):
        y = merge_heads(head_group_norm(h, self.norm_weight, self.norm_bias, self.norm_eps))
        y = jax.nn.sigmoid(linear(self.ogate, x).astype(y.dtype)) * y
        return linear(self.out_proj, y.astype(x.dtype))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: ssm.MLSTMState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], ssm.MLSTMState]:
        """Run `x` from `state` (chunked), restarting the memory at `resets`; returns
        the outputs and the final state."""
        resets = self._check_sequence(x, resets)
        (q, k, v), log_f, log_i = self._features(x)
        h, state = ssm.mlstm(
            q, k, v, log_f, log_i, state, resets=resets, eps=self.cell_eps,
            chunk_size=self.chunk_size,
        )  # fmt: skip
        return self._readout(h, x), state

    def step(
        self, x_t: Float[Array, " d_model"], state: ssm.MLSTMState
    ) -> tuple[Float[Array, " d_model"], ssm.MLSTMState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        (q, k, v), log_f, log_i = self._features(x_t[None])
        h, state = ssm.mlstm_step(
            q[0], k[0], v[0], log_f[0], log_i[0], state, eps=self.cell_eps
        )
        return self._readout(h[None], x_t[None])[0], state
