"""RG-LRU and the Hawk recurrent block (De et al. 2024, Griffin)."""

from __future__ import annotations

from typing import ClassVar, Literal, NamedTuple

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._conv import ConvState, causal_conv, init_conv
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
    time_axis,
)


def _row(v, ndim):
    return jnp.reshape(v, (1,) * (ndim - 1) + (-1,))


RESET_RULES = ("paper", "recurrent_gemma")


class RGLRUState(NamedTuple):
    """The state of an `RGLRU` with `reset_rule="recurrent_gemma"`: `ConvState`'s
    `conv` and `ssm`, and `start`, true while the next token is the first of a
    document (from `init_state`, until a token has been run)."""

    conv: Float[Array, "kernel_minus_1 d_rnn"]
    ssm: Float[Array, " d_rnn"]
    start: Bool[Array, ""]


class RGLRU(AbstractMixer):
    """The Hawk recurrent block around a real-gated linear recurrent unit (RG-LRU).

    From De, Smith, Fernando et al., "Griffin: mixing gated linear recurrences with
    local attention for efficient language models" (2024). With `x` the output of a
    linear map and a short causal convolution of the input:

    ```
    r[t] = σ(W_a x[t] + b_a),   i[t] = σ(W_x x[t] + b_x)     # recurrence, input gates
    log a[t] = c · r[t] · log σ(Λ)                           # c = 8, in log space
    h[t] = a[t] ⊙ h[t-1] + sqrt(1 - a[t]²) ⊙ (i[t] ⊙ x[t])
    out = out_proj(gelu(gate_proj(u)) ⊙ h)
    ```

    `W_a`, `W_x` are block-diagonal over `num_heads` blocks; `Λ` is initialised so
    that `σ(Λ)^c` is uniform in `[a_min, a_max] = [0.9, 0.999]`.

    `reset_rule` says what happens at the first token of a document (the first token
    from `init_state`, and each token where `resets` is true): `"paper"` restarts
    from `h = 0` with the equation above, `h[t] = sqrt(1 - a[t]²) ⊙ i[t] ⊙ x[t]`;
    `"recurrent_gemma"` follows RecurrentGemma's code (`transformers`' and DeepMind's
    `recurrentgemma`), which at a document's first position drops the normalisation
    too: `h[t] = i[t] ⊙ x[t]`. Its state (`RGLRUState`) then also records whether
    the next token starts a document, so that `prefill` and `step` continuing a
    document apply the ordinary equation.
    """

    d_model: int = eqx.field(static=True)
    d_rnn: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    c: float = eqx.field(static=True)
    seq_axis: str | None = eqx.field(static=True)
    reset_rule: Literal["paper", "recurrent_gemma"] = eqx.field(static=True)
    gate_proj: eqx.nn.Linear
    in_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv d_rnn"]
    conv_bias: Float[Array, " d_rnn"]
    W_a: Float[Array, "heads head_dim head_dim"]
    b_a: Float[Array, " d_rnn"]
    W_x: Float[Array, "heads head_dim head_dim"]
    b_x: Float[Array, " d_rnn"]
    a_param: Float[Array, " d_rnn"]
    out_proj: eqx.nn.Linear

    ssm_params: ClassVar[tuple[str, ...]] = ("a_param",)

    def __init__(
        self,
        d_model: int,
        d_rnn: int | None = None,
        d_conv: int = 4,
        num_heads: int = 1,
        c: float = 8.0,
        a_min: float = 0.9,
        a_max: float = 0.999,
        seq_axis: str | None = None,
        reset_rule: Literal["paper", "recurrent_gemma"] = "paper",
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `d_rnn`: the recurrence width (default `ceil(4 d_model / 3)`, as in Hawk).
        - `d_conv`: the width of the causal depthwise convolution.
        - `num_heads`: the number of blocks of the block-diagonal gate weights.
        - `c`: the fixed scale of the recurrence gate's exponent.
        - `a_min`, `a_max`: the range of `σ(Λ)^c` at initialisation.
        - `seq_axis`: a mesh axis to split the scan over time across (sequence
          parallelism) when run under a mesh that has it; see `ssm.linear_scan`.
        - `reset_rule`: `"paper"` or `"recurrent_gemma"`, the update at a document's
          first token (see above).
        - `key`: a `jax.random.PRNGKey`.
        """
        d_rnn = -(-4 * d_model // 3) if d_rnn is None else d_rnn
        if d_rnn % num_heads:
            raise ValueError(f"`d_rnn` ({d_rnn}) must be divisible by `num_heads`.")
        if reset_rule not in RESET_RULES:
            raise ValueError(
                f"RGLRU: `reset_rule` must be one of {RESET_RULES}, got {reset_rule!r}."
            )
        self.reset_rule = reset_rule
        k_g, k_in, k_conv, k_cb, k_a, k_x, k_lam, k_out = jr.split(key, 8)
        dh = d_rnn // num_heads
        self.d_model, self.d_rnn, self.d_conv = d_model, d_rnn, d_conv
        self.num_heads, self.c, self.seq_axis = num_heads, float(c), seq_axis
        self.gate_proj = eqx.nn.Linear(d_model, d_rnn, dtype=jnp.float32, key=k_g)
        self.in_proj = eqx.nn.Linear(d_model, d_rnn, dtype=jnp.float32, key=k_in)
        self.conv_weight, self.conv_bias = init_conv(
            d_conv, d_rnn, key=k_conv, bias_key=k_cb
        )
        shape = (num_heads, dh, dh)
        self.W_a = jr.normal(k_a, shape, jnp.float32) / np.float32(np.sqrt(dh))
        self.W_x = jr.normal(k_x, shape, jnp.float32) / np.float32(np.sqrt(dh))
        self.b_a = jnp.zeros((d_rnn,), jnp.float32)
        self.b_x = jnp.zeros((d_rnn,), jnp.float32)
        a_c = jr.uniform(k_lam, (d_rnn,), jnp.float32, a_min, a_max)
        a = a_c ** (1 / self.c)
        self.a_param = jnp.log(a) - jnp.log1p(-a)  # logit: σ(Λ) = a
        self.out_proj = eqx.nn.Linear(d_rnn, d_model, dtype=jnp.float32, key=k_out)

    def init_state(self) -> ConvState | RGLRUState:
        """Zeros (a `ConvState`; an `RGLRUState` with `start=True` for
        `reset_rule="recurrent_gemma"`)."""
        conv = jnp.zeros((self.d_conv - 1, self.d_rnn), jnp.float32)
        ssm_state = jnp.zeros((self.d_rnn,), jnp.float32)
        if self.reset_rule == "recurrent_gemma":
            return RGLRUState(conv, ssm_state, jnp.ones((), jnp.bool_))
        return ConvState(conv=conv, ssm=ssm_state)

    def _state(self, conv, h):
        if self.reset_rule == "recurrent_gemma":
            return RGLRUState(conv, h, jnp.zeros((), jnp.bool_))
        return ConvState(conv, h)

    def log_a(self, dtype=jnp.float32) -> Float[Array, " d_rnn"]:
        """`log σ(Λ)`, the log of the base decay (before the gate's exponent)."""
        return -jax.nn.softplus(-self.a_param.astype(dtype))

    def _gates(self, x, first=None):
        """Gated recurrence inputs: `(log a, b)` with `b = sqrt(1-a²) i x`, float32;
        `b = i x` where `first` (boolean over the leading axes) is true."""
        rdt = real_dtype(x.dtype)
        lead = x.shape[:-1]
        xh = x.reshape(lead + (self.num_heads, -1))
        gate_a = jnp.einsum("...hi,hij->...hj", xh, self.W_a.astype(x.dtype)).reshape(
            x.shape
        )
        gate_x = jnp.einsum("...hi,hij->...hj", xh, self.W_x.astype(x.dtype)).reshape(
            x.shape
        )
        r = jax.nn.sigmoid(gate_a.astype(rdt) + _row(self.b_a.astype(rdt), x.ndim))
        i = jax.nn.sigmoid(gate_x.astype(rdt) + _row(self.b_x.astype(rdt), x.ndim))
        log_a = self.c * r * _row(self.log_a(rdt), x.ndim)
        norm = jnp.sqrt(-jnp.expm1(2 * log_a))
        if first is not None:
            norm = jnp.where(first[..., None], 1, norm)
        return log_a, norm * (i * x.astype(rdt))

    def _pre(self, u, conv_state, resets=None):
        gate = jax.nn.gelu(linear(self.gate_proj, u))
        x, conv_state = causal_conv(
            self.conv_weight, self.conv_bias, linear(self.in_proj, u), conv_state, resets
        )
        return gate, x, conv_state

    def prefill(
        self,
        u: Float[Array, "seq d_model"],
        state: ConvState | RGLRUState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], ConvState | RGLRUState]:
        """Run `u` from `state`, restarting the convolution and the recurrence at
        `resets` (true at the first token of each packed document); returns the outputs
        and the state after the last step."""
        resets = self._check_sequence(u, resets)
        gate, x, conv_state = self._pre(u, state.conv, resets)
        first = None
        if self.reset_rule == "recurrent_gemma":  # restart, and b = i x, at these
            first = jnp.zeros(u.shape[0], jnp.bool_).at[0].set(state.start)
            first = first if resets is None else first | resets
        log_a, b = self._gates(x, first)
        h = ssm.linear_scan(
            jnp.exp(log_a),
            b,
            state.ssm.astype(b.dtype),
            resets=resets if first is None else first,
            mesh_axis=time_axis(self.seq_axis),
        )
        y = linear(self.out_proj, gate * h.astype(u.dtype))
        return y, self._state(conv_state, h[-1].astype(state.ssm.dtype))

    def step(
        self, u_t: Float[Array, " d_model"], state: ConvState | RGLRUState
    ) -> tuple[Float[Array, " d_model"], ConvState | RGLRUState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(u_t)
        gate, x, conv_state = self._pre(u_t[None], state.conv)
        if self.reset_rule == "recurrent_gemma":
            log_a, b = self._gates(x[0], state.start)
            h = jnp.where(state.start, b, jnp.exp(log_a) * state.ssm.astype(b.dtype) + b)
        else:
            log_a, b = self._gates(x[0])
            h = jnp.exp(log_a) * state.ssm.astype(b.dtype) + b
        y = linear(self.out_proj, gate[0] * h.astype(u_t.dtype))
        return y, self._state(conv_state, h.astype(state.ssm.dtype))
