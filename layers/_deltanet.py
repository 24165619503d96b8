"""DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang, Kautz and Hatamizadeh 2025)."""

from __future__ import annotations

import abc
from typing import ClassVar

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._conv import ConvState, causal_conv, init_conv
from ._heads import head_l2_normalise, head_rms_norm
from ._init import init_A_log, init_dt_bias
from ._mixer import (
    AbstractMixer,
    linear,
    real_dtype,
)


def _head_sizes(d_model, num_heads, head_dim, expand_v):
    if head_dim is None:
        if d_model % num_heads:
            raise ValueError(
                f"d_model={d_model} is not a multiple of num_heads={num_heads}; pass "
                "`head_dim` explicitly."
            )
        head_dim = d_model // num_heads
    head_dim_v = int(round(expand_v * head_dim))
    if head_dim < 1 or head_dim_v < 1:
        raise ValueError(
            f"head sizes must be positive, got head_dim={head_dim} and "
            f"head_dim_v={head_dim_v} (expand_v={expand_v})."
        )
    return head_dim, head_dim_v


class AbstractDeltaRuleMixer(AbstractMixer):
    """The layer around a (gated) delta rule, shared by DeltaNet and Gated DeltaNet.

    With `H` heads of key size `d_k` and value size `d_v`:

    ```
    q, k, v = silu(causal_conv(W_qkv u))           # short depthwise convolutions
    q, k = q / ‖q‖ · d_k^(-1/2), k / ‖k‖           # L2-normalised per head
    β = σ(W_β u)                                   # (2σ with allow_neg_eigval)
    S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ,  o[t] = S[t]ᵀ q[t]
    y = W_o [RMSNorm(o) (⊙ silu(W_g u) with use_gate)]    # norm per head
    ```

    through `ssm.delta_rule` (chunked, for `__call__`/`prefill`) and
    `ssm.delta_rule_step` (for `step`). Subclasses give the decay `log α`
    (`_log_decay`); `None` means `α = 1`.
    """

    d_model: eqx.AbstractVar[int]
    num_heads: eqx.AbstractVar[int]
    head_dim: eqx.AbstractVar[int]
    head_dim_v: eqx.AbstractVar[int]
    d_conv: eqx.AbstractVar[int]
    chunk_size: eqx.AbstractVar[int | None]
    allow_neg_eigval: eqx.AbstractVar[bool]
    qkv_proj: eqx.AbstractVar[eqx.nn.Linear]
    conv_weight: eqx.AbstractVar[Float[Array, "d_conv channels"]]
    b_proj: eqx.AbstractVar[eqx.nn.Linear]
    g_proj: eqx.AbstractVar[eqx.nn.Linear | None]
    norm_weight: eqx.AbstractVar[Float[Array, " head_dim_v"]]
    o_proj: eqx.AbstractVar[eqx.nn.Linear]

    @abc.abstractmethod
    def _log_decay(self, u: Float[Array, "seq d_model"]) -> Float[Array, "seq H"] | None:
        raise NotImplementedError

    @property
    def _channels(self) -> int:
        return self.num_heads * (2 * self.head_dim + self.head_dim_v)

    def init_state(self) -> ConvState:
        """Zeros: the convolution history and the `(H, d_k, d_v)` delta-rule state."""
        dtype = real_dtype(self.qkv_proj.weight.dtype)
        return ConvState(
            conv=jnp.zeros((self.d_conv - 1, self._channels), dtype),
            ssm=jnp.zeros((self.num_heads, self.head_dim, self.head_dim_v), dtype),
        )

    def _features(self, u, conv_state, resets=None):
        """Everything before the recurrence: `q, k, v, β, log α` and the conv history."""
        T, H, dk, dv = u.shape[0], self.num_heads, self.head_dim, self.head_dim_v
        qkv = linear(self.qkv_proj, u)
        no_bias = jnp.zeros((self._channels,), qkv.dtype)
        qkv, conv_state = causal_conv(self.conv_weight, no_bias, qkv, conv_state, resets)
        qkv = jax.nn.silu(qkv)
        q = qkv[:, : H * dk].reshape(T, H, dk)
        k = qkv[:, H * dk : 2 * H * dk].reshape(T, H, dk)
        v = qkv[:, 2 * H * dk :].reshape(T, H, dv)
        q = (head_l2_normalise(q) * np.asarray(dk**-0.5, q.dtype)).astype(q.dtype)
        k = head_l2_normalise(k)
        beta = jax.nn.sigmoid(linear(self.b_proj, u).astype(real_dtype(u.dtype)))
        if self.allow_neg_eigval:
            beta = 2 * beta
        return q, k, v, beta, self._log_decay(u), conv_state

    def _readout(self, o, u):
        """Per-head RMS norm (gated by `silu(W_g u)` with `use_gate`), then `W_o`."""
        T = o.shape[0]
        o32 = head_rms_norm(o, self.norm_weight, eps=1e-5)
        if self.g_proj is not None:
            gate = linear(self.g_proj, u).astype(o32.dtype)
            o32 = o32 * jax.nn.silu(gate).reshape(o32.shape)
        return linear(self.o_proj, o32.reshape(T, -1).astype(u.dtype))

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: ConvState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], ConvState]:
        """Run `x` from `state` (chunked), restarting the convolutions and the state at
        `resets` (true at the first token of each packed document); returns the
        outputs and the final state."""
        resets = self._check_sequence(x, resets)
        q, k, v, beta, log_decay, conv = self._features(x, state.conv, resets)
        o, S = ssm.delta_rule(
            q, k, v, beta, log_decay, state.ssm, resets=resets, chunk_size=self.chunk_size
        )
        return self._readout(o, x), ConvState(conv, S.astype(state.ssm.dtype))

    def step(
        self, x_t: Float[Array, " d_model"], state: ConvState
    ) -> tuple[Float[Array, " d_model"], ConvState]:
        """One time step: returns `(y_t, state)`."""
        self._check_token(x_t)
        q, k, v, beta, log_decay, conv = self._features(x_t[None], state.conv)
        o, S = ssm.delta_rule_step(
            q[0],
            k[0],
            v[0],
            beta[0],
            None if log_decay is None else log_decay[0],
            state.ssm,
        )
        y = self._readout(o[None], x_t[None])[0]
        return y, ConvState(conv, S.astype(state.ssm.dtype))


def _common_init(
    self,
    d_model,
    num_heads,
    head_dim,
    expand_v,
    d_conv,
    use_gate,
    allow_neg_eigval,
    chunk_size,
    keys,
):
    """Set the fields every delta-rule mixer has; `keys` = (qkv, conv, b, g, o)."""
    k_qkv, k_conv, k_b, k_g, k_o = keys
    dk, dv = _head_sizes(d_model, num_heads, head_dim, expand_v)
    self.d_model, self.num_heads, self.head_dim, self.head_dim_v = (
        d_model,
        num_heads,
        dk,
        dv,
    )
    self.d_conv, self.chunk_size = d_conv, chunk_size
    channels = num_heads * (2 * dk + dv)
    self.qkv_proj = eqx.nn.Linear(
        d_model, channels, use_bias=False, dtype=jnp.float32, key=k_qkv
    )
    self.conv_weight, _ = init_conv(d_conv, channels, key=k_conv)
    self.b_proj = eqx.nn.Linear(
        d_model, num_heads, use_bias=False, dtype=jnp.float32, key=k_b
    )
    self.norm_weight = jnp.ones((dv,), jnp.float32)
    self.o_proj = eqx.nn.Linear(
        num_heads * dv, d_model, use_bias=False, dtype=jnp.float32, key=k_o
    )
    self.allow_neg_eigval = allow_neg_eigval
    self.g_proj = (
        eqx.nn.Linear(d_model, num_heads * dv, use_bias=False, dtype=jnp.float32, key=k_g)
        if use_gate
        else None
    )


class DeltaNet(AbstractDeltaRuleMixer):
    """DeltaNet: linear attention whose state is updated by the delta rule.

    From Yang, Wang, Zhang, Shen and Kim, "Parallelizing Linear Transformers with the
    Delta Rule over Sequence Length" (NeurIPS 2024). Each head keeps a `(d_k, d_v)`
    matrix state and writes to it by the delta rule,

    ```
    S[t] = (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ,    o[t] = S[t]ᵀ q[t]
    ```

    (the value stored under `k[t]` moves a fraction `β[t]` of the way to `v[t]`), with
    the short convolutions with SiLU on `q, k, v`, L2-normalised `q, k` (`q` scaled by
    `d_k^(-1/2)`), `β = σ(W_β u)` and the per-head RMS norm before the output
    projection of the paper's architecture. Training uses the chunked WY form of
    `ssm.delta_rule`, generation `ssm.delta_rule_step`.

    The transition `I - β k kᵀ` (`‖k‖ = 1`) has the eigenvalue `1 - β` along `k` and
    1 elsewhere: in `(0, 1)` with `β = σ(·)`, in `(-1, 1)` with `allow_neg_eigval`
    (`β = 2σ(·)`; Grazzi et al. 2025, "Unlocking state-tracking in linear RNNs
    through negative eigenvalues", ICLR 2025): near `β = 2` the transition is a
    reflection, which flips the sign of what is stored under `k`, as tracking parity
    needs. The chunked and the step form take any `β` in `(0, 2)` at the same cost.

    ```python
    mixer = layers.DeltaNet(128, num_heads=4, key=jr.key(0))
    y = mixer(x)                                   # x: (seq, 128)
    y_t, state = mixer.step(x_t, state)            # state = mixer.init_state()
    ```
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    head_dim_v: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    allow_neg_eigval: bool = eqx.field(static=True)
    qkv_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv channels"]
    b_proj: eqx.nn.Linear
    g_proj: eqx.nn.Linear | None
    norm_weight: Float[Array, " head_dim_v"]
    o_proj: eqx.nn.Linear

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: int | float = 1.0,
        d_conv: int = 4,
        use_gate: bool = False,
        allow_neg_eigval: bool = False,
        chunk_size: int | None = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: the number of heads `H`.
        - `head_dim`: the key size `d_k` per head (default `d_model // num_heads`).
        - `expand_v`: the value size per head is `d_v = expand_v · d_k`.
        - `d_conv`: the width of the short causal convolutions on `q, k, v`.
        - `use_gate`: multiply the normalised output by `silu(W_g u)` (off in the
          DeltaNet paper, on in Gated DeltaNet).
        - `allow_neg_eigval`: `β = 2σ(·)` in `(0, 2)`, so that `I - β k kᵀ` can have a
          negative eigenvalue (Grazzi et al. 2025, "Unlocking State-Tracking in
          Linear RNNs Through Negative Eigenvalues").
        - `chunk_size`: the chunk length of the chunked (training) form; `None` for
          `ssm.delta_rule`'s default (64, or 32 on CPU).
        - `key`: a `jax.random.PRNGKey`.
        """
        keys = jr.split(key, 5)
        _common_init(
            self,
            d_model,
            num_heads,
            head_dim,
            expand_v,
            d_conv,
            use_gate,
            allow_neg_eigval,
            chunk_size,
            keys,
        )

    def _log_decay(self, u):
        return None


class GatedDeltaNet(AbstractDeltaRuleMixer):
    """Gated DeltaNet: the delta rule with a Mamba-2-style decay gate.

    From Yang, Kautz and Hatamizadeh, "Gated Delta Networks: Improving Mamba2 with
    Delta Rule" (ICLR 2025). Each head keeps a `(d_k, d_v)` matrix state,

    ```
    S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ,    o[t] = S[t]ᵀ q[t]
    log α[t] = -exp(A_log) · softplus(W_a u[t] + dt_bias)          # per head
    ```

    so the gate `α` erases the whole memory quickly when needed and the delta rule
    edits single associations. As in the paper: short convolutions with SiLU on
    `q, k, v`, L2-normalised `q, k` (`q` scaled by `d_k^(-1/2)`), `β = σ(W_β u)`
    (`2σ(W_β u)` with `allow_neg_eigval`: the transition's eigenvalue along `k`,
    `α (1 - β)`, then ranges in `(-α, α)`; see `DeltaNet`), and the output
    `W_o (RMSNorm(o) ⊙ silu(W_g u))` per head. `A = exp(A_log)` is
    initialised uniform in `[1, 16]` and `softplus(dt_bias)` log-uniform in
    `[dt_min, dt_max]` (Mamba-2's initialisation); both are `ssm_params`. Training
    uses the chunked WY form of `ssm.delta_rule` with cumulative log gates,
    generation `ssm.delta_rule_step`.

    ```python
    mixer = layers.GatedDeltaNet(128, num_heads=4, key=jr.key(0))
    y = mixer(x)                                   # x: (seq, 128)
    ```
    """

    d_model: int = eqx.field(static=True)
    num_heads: int = eqx.field(static=True)
    head_dim: int = eqx.field(static=True)
    head_dim_v: int = eqx.field(static=True)
    d_conv: int = eqx.field(static=True)
    chunk_size: int | None = eqx.field(static=True)
    allow_neg_eigval: bool = eqx.field(static=True)
    qkv_proj: eqx.nn.Linear
    conv_weight: Float[Array, "d_conv channels"]
    b_proj: eqx.nn.Linear
    a_proj: eqx.nn.Linear
    A_log: Float[Array, " num_heads"]
    dt_bias: Float[Array, " num_heads"]
    g_proj: eqx.nn.Linear | None
    norm_weight: Float[Array, " head_dim_v"]
    o_proj: eqx.nn.Linear

    ssm_params: ClassVar[tuple[str, ...]] = ("A_log", "dt_bias")

    def __init__(
        self,
        d_model: int,
        num_heads: int = 4,
        head_dim: int | None = None,
        expand_v: int | float = 2.0,
        d_conv: int = 4,
        use_gate: bool = True,
        allow_neg_eigval: bool = False,
        dt_min: float = 1e-3,
        dt_max: float = 1e-1,
        dt_floor: float = 1e-4,
        chunk_size: int | None = None,
        *,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `num_heads`: the number of heads `H`.
        - `head_dim`: the key size `d_k` per head (default `d_model // num_heads`).
        - `expand_v`: the value size per head is `d_v = expand_v · d_k` (2 in the
          paper).
        - `d_conv`: the width of the short causal convolutions on `q, k, v`.
        - `use_gate`: multiply the normalised output by `silu(W_g u)`.
        - `allow_neg_eigval`: `β = 2σ(·)` in `(0, 2)` (see `DeltaNet`).
        - `dt_min`, `dt_max`, `dt_floor`: the initial range (and floor) of
          `softplus(dt_bias)`.
        - `chunk_size`: the chunk length of the chunked (training) form; `None` for
          `ssm.delta_rule`'s default (64, or 32 on CPU).
        - `key`: a `jax.random.PRNGKey`.
        """
        *keys, k_a, k_A, k_dt = jr.split(key, 8)
        _common_init(
            self,
            d_model,
            num_heads,
            head_dim,
            expand_v,
            d_conv,
            use_gate,
            allow_neg_eigval,
            chunk_size,
            keys,
        )
        self.a_proj = eqx.nn.Linear(
            d_model, num_heads, use_bias=False, dtype=jnp.float32, key=k_a
        )
        self.A_log = init_A_log(k_A, num_heads)
        self.dt_bias = init_dt_bias(k_dt, (num_heads,), dt_min, dt_max, dt_floor)

    def _log_decay(self, u):
        rdt = real_dtype(u.dtype)
        a = linear(self.a_proj, u).astype(rdt) + self.dt_bias.astype(rdt)[None]
        return -jnp.exp(self.A_log.astype(rdt))[None] * jax.nn.softplus(a)
