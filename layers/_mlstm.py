"""The mLSTM block of xLSTM (Beck et al. 2024)."""

from __future__ import annotations

from typing import NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._conv import causal_conv, init_conv
from ._heads import head_group_norm, head_sizes, merge_heads, split_heads
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


class MLSTMLayerState(NamedTuple):
    """The convolution history `(d_conv - 1, d_inner)` and the cell's `ssm.MLSTMState`."""

    conv: Float[Array, "kernel_minus_1 d_inner"]
    cell: ssm.MLSTMState


def _headwise(weight: Float[Array, "nb bs bs"], x: Float[Array, "... d"]):
    """A block-diagonal linear map (`nb` blocks of `bs x bs`), as xLSTM's q/k/v maps."""
    nb, bs, _ = weight.shape
    xb = jnp.reshape(x, x.shape[:-1] + (nb, bs))
    y = jnp.einsum("...ni,noi->...no", xb, weight.astype(x.dtype))
    return jnp.reshape(y, x.shape)


class MLSTM(AbstractMixer):
    """The mLSTM block: a matrix-memory LSTM with exponential input gates between an
    up- and a down-projection.

    From Beck, Pöppel, Spanring, Auer, Prudnikova, Kopp, Klambauer, Brandstetter and
    Hochreiter, "xLSTM: extended long short-term memory" (NeurIPS 2024), the
    pre-up-projection mLSTM block. With `d_inner = proj_factor · d_model` and `H` heads:

    ```
    x_m, z = W_up x                                      # (d_inner,) each
    c = swish(causal_conv(x_m))                          # width d_conv
    q, k, v = W_q c, W_k c, W_v x_m                      # block-diagonal, blocks of 4
    ĩ, f̃ = W_i [q, k, v] + b_i,  W_f [q, k, v] + b_f     # one gate per head
    h = mLSTM(q, k / √d_k, v, log σ(f̃), ĩ)               # stabilised, normalised cell
    y = W_down ((GroupNorm_h(h) + skip ⊙ c) ⊙ swish(z))
    ```

    initialised as the paper's code does: gate weights zero, forget-gate biases spaced
    from 3 to 6 over the heads, input-gate biases `N(0, 0.1²)`, skip ones. The cell
    runs through `ssm.mlstm` (chunked; `ssm.mlstm_step` for `step`).

    ```python
    mixer = layers.MLSTM(64, num_heads=4, key=key)
    y = jax.vmap(mixer)(x)                           # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    d_inner: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    chunk_size: int = eqx.field(static=True)
    up_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv d_inner"]
    conv_bias: Float[Array, " d_inner"]
    q_weight: Float[Array, "nb bs bs"]
    k_weight: Float[Array, "nb bs bs"]
    v_weight: Float[Array, "nb bs bs"]
    igate: eqx.nn.Linear
    fgate: eqx.nn.Linear
    norm_weight: Float[Array, " d_inner"]
    skip: Float[Array, " d_inner"]
    down_proj: eqx.nn.Linear

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        proj_factor: float = 2.0,
        d_conv: int = 4,
        qkv_block_size: int = 4,
        chunk_size: int = 64,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: the number of heads of the cell (`d_k = d_v = d_inner / H`).
        - `proj_factor`: `d_inner / d_model`.
        - `d_conv`: the width of the causal convolution.
        - `qkv_block_size`: the block size of the block-diagonal q, k, v maps.
        - `chunk_size`: the chunk length of the chunked cell.
        - `key`: a `jax.random.PRNGKey`.
        """
        k_up, k_conv, k_cb, k_q, k_k, k_v, k_i, k_f, k_ib, k_down = jr.split(key, 10)
        d_inner = int(round(proj_factor * d_model))
        self.d_model, self.d_inner, self.num_heads = d_model, d_inner, num_heads
        self.head_dim = head_sizes(d_inner, num_heads, "proj_factor * d_model")
        self.d_conv, self.chunk_size = d_conv, chunk_size
        if d_inner % qkv_block_size:
            raise ValueError(
                f"d_inner ({d_inner}) must be a multiple of qkv_block_size "
                f"({qkv_block_size})."
            )
        nb, bs = d_inner // qkv_block_size, qkv_block_size
        self.up_proj = eqx.nn.Linear(
            d_model, 2 * d_inner, use_bias=False, dtype=jnp.float32, key=k_up
        )
        self.conv_weight, self.conv_bias = init_conv(
            d_conv, d_inner, key=k_conv, bias_key=k_cb
        )
        std = float(np.sqrt(2 / (5 * bs)))  # the small init of the paper's code
        self.q_weight = jr.normal(k_q, (nb, bs, bs), jnp.float32) * std
        self.k_weight = jr.normal(k_k, (nb, bs, bs), jnp.float32) * std
        self.v_weight = jr.normal(k_v, (nb, bs, bs), jnp.float32) * std
        igate = eqx.nn.Linear(3 * d_inner, num_heads, dtype=jnp.float32, key=k_i)
        fgate = eqx.nn.Linear(3 * d_inner, num_heads, dtype=jnp.float32, key=k_f)
        def zeros():  # one array per gate: shared leaves cannot both be donated
            return jnp.zeros((num_heads, 3 * d_inner), jnp.float32)

        self.igate = eqx.tree_at(
            lambda g: (g.weight, g.bias),
            igate,
            (zeros(), 0.1 * jr.normal(k_ib, (num_heads,), jnp.float32)),
        )
        self.fgate = eqx.tree_at(
            lambda g: (g.weight, g.bias),
            fgate,
            (zeros(), jnp.linspace(3.0, 6.0, num_heads, dtype=jnp.float32)),
        )
        self.norm_weight = jnp.ones((d_inner,), jnp.float32)
        self.skip = jnp.ones((d_inner,), jnp.float32)
        self.down_proj = eqx.nn.Linear(
            d_inner, d_model, use_bias=False, dtype=jnp.float32, key=k_down
        )

    def init_state(self) -> MLSTMLayerState:
        """Zeros, with the stabiliser `m = 0`."""
        H, d = self.num_heads, self.head_dim
        dtype = real_dtype(self.up_proj.weight.dtype)
        cell = ssm.MLSTMState(
            jnp.zeros((H, d, d), dtype), jnp.zeros((H, d), dtype), jnp.zeros((H,), dtype)
        )
        return MLSTMLayerState(jnp.zeros((self.d_conv - 1, self.d_inner), dtype), cell)

    def _features(self, x, conv_state, resets=None):
        xz = linear(self.up_proj, x)
        x_m, z = xz[..., : self.d_inner], xz[..., self.d_inner :]
        c, conv_state = causal_conv(
            self.conv_weight, self.conv_bias, x_m, conv_state, resets
        )
        c = jax.nn.silu(c)
        q, k = _headwise(self.q_weight, c), _headwise(self.k_weight, c)
        v = _headwise(self.v_weight, x_m)
        qkv = jnp.concatenate([q, k, v], axis=-1)
        log_i = linear(self.igate, qkv).astype(real_dtype(x.dtype))
        log_f = jax.nn.log_sigmoid(linear(self.fgate, qkv).astype(real_dtype(x.dtype)))
        H = self.num_heads
        k = k * np.asarray(self.head_dim**-0.5, k.dtype)
        heads = (split_heads(q, H), split_heads(k, H), split_heads(v, H))
        return heads, log_f, log_i, c, z, conv_state

    def _readout(self, h, c, z, x):
        y = merge_heads(head_group_norm(h, self.norm_weight, eps=1e-5))
        y = y + self.skip.astype(y.dtype)[None] * c.astype(y.dtype)
        y = y * jax.nn.silu(z.astype(y.dtype))
        return linear(self.down_proj, y.astype(x.dtype))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: MLSTMLayerState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], MLSTMLayerState]:
        """Run `x` from `state` (chunked), restarting the convolution and the memory at
        `resets` (true at the first token of each packed document); returns the
        outputs and the final state."""
        resets = self._check_sequence(x, resets)
        (q, k, v), log_f, log_i, c, z, conv = self._features(x, state.conv, resets)
        h, cell = ssm.mlstm(
            q, k, v, log_f, log_i, state.cell, resets=resets, chunk_size=self.chunk_size
        )
        return self._readout(h, c, z, x), MLSTMLayerState(conv, cell)

    def step(
        self, x_t: Float[Array, " d_model"], state: MLSTMLayerState
    ) -> tuple[Float[Array, " d_model"], MLSTMLayerState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        (q, k, v), log_f, log_i, c, z, conv = self._features(x_t[None], state.conv)
        h, cell = ssm.mlstm_step(q[0], k[0], v[0], log_f[0], log_i[0], state.cell)
        return self._readout(h[None], c, z, x_t[None])[0], MLSTMLayerState(conv, cell)
