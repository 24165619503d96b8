"""`Block`: pre-norm, mixer, residual, gated MLP, residual."""

from __future__ import annotations

from typing import Any, Literal

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray, PyTree

from ._mixer import AbstractMixer, check_sequence, check_token, linear, real_dtype
from ._registry import make_mixer


def rms_norm(
    norm: eqx.nn.RMSNorm, x: Float[Array, "... d"], offset: float = 0.0
) -> Float[Array, "... d"]:
    """RMS normalisation over the last axis, computed in float32, returned in `x.dtype`;
    the scale is `offset + weight` (Gemma's norms: `offset=1`)."""
    x32 = x.astype(real_dtype(x.dtype))
    ms = jnp.mean(x32 * x32, axis=-1, keepdims=True)
    y = x32 * jax.lax.rsqrt(ms + norm.eps)
    shape = (1,) * (x.ndim - 1) + (-1,)
    if norm.weight is not None:
        scale = norm.weight.astype(y.dtype)
        if offset:
            scale = np.asarray(offset, y.dtype) + scale
        y = y * jnp.reshape(scale, shape)
    if norm.bias is not None:
        y = y + jnp.reshape(norm.bias.astype(y.dtype), shape)
    return y.astype(x.dtype)


_ACTIVATIONS = {"gelu": jax.nn.gelu, "silu": jax.nn.silu}


class GatedMLP(eqx.Module):
    """`down(act(gate(x)) ⊙ up(x))`, position-wise: GeGLU with `act = gelu` (the
    default), SwiGLU with `"silu"` (Shazeer 2020)."""

    activation: Literal["gelu", "silu"] = eqx.field(static=True)
    gate: eqx.nn.Linear
    up: eqx.nn.Linear
    down: eqx.nn.Linear

    def __init__(
        self,
        d_model: int,
        d_hidden: int,
        activation: Literal["gelu", "silu"] = "gelu",
        use_bias: bool = False,
        *,
        key: PRNGKeyArray,
    ):
        if activation not in _ACTIVATIONS:
            raise ValueError(
                f"GatedMLP: activation must be one of {sorted(_ACTIVATIONS)}, got "
                f"{activation!r}."
            )
        self.activation = activation
        k1, k2, k3 = jr.split(key, 3)
        self.gate = eqx.nn.Linear(
            d_model, d_hidden, use_bias=use_bias, dtype=jnp.float32, key=k1
        )
        self.up = eqx.nn.Linear(
            d_model, d_hidden, use_bias=use_bias, dtype=jnp.float32, key=k2
        )
        self.down = eqx.nn.Linear(
            d_hidden, d_model, use_bias=use_bias, dtype=jnp.float32, key=k3
        )

    def __call__(self, x: Float[Array, "... d_model"]) -> Float[Array, "... d_model"]:
        act = _ACTIVATIONS[self.activation]
        return linear(self.down, act(linear(self.gate, x)) * linear(self.up, x))


def make_norm(d_model: int, eps: float, offset: float) -> eqx.nn.RMSNorm:
    """An RMS norm whose scale `offset + weight` starts at one."""
    norm = eqx.nn.RMSNorm(d_model, eps=eps, use_bias=False, dtype=jnp.float32)
    if offset:
        norm = eqx.tree_at(lambda n: n.weight, norm, norm.weight - np.float32(offset))
    return norm


class Block(eqx.Module):
    """A residual block: `x + mixer(norm(x))`, then `x + mlp(norm(x))`.

    The pre-norm residual block of the Transformer/S4/Mamba families: RMS norm, a
    sequence mixer from `layers.MIXERS`, optional dropout on each branch, and a
    gated MLP (set `mlp_ratio=0` for a mixer-only block as in Mamba). With
    `remat=True` the block is rematerialised (`jax.checkpoint`) in the backward pass,
    for long sequences.

    ```python
    block = layers.Block(64, "mamba", key=key)
    y = jax.vmap(block)(x)            # x: (batch, seq, 64)
    ```
    """

    d_model: int = eqx.field(static=True)
    remat: bool = eqx.field(static=True)
    norm_offset: float = eqx.field(static=True)
    norm1: eqx.nn.RMSNorm
    mixer: AbstractMixer
    norm2: eqx.nn.RMSNorm | None
    mlp: GatedMLP | None
    dropout: eqx.nn.Dropout

    def __init__(
        self,
        d_model: int,
        mixer: str | type[AbstractMixer] | AbstractMixer = "s4d",
        mixer_kwargs: dict[str, Any] | None = None,
        mlp_ratio: int | float = 4.0,
        dropout: float = 0.0,
        remat: bool = False,
        *,
        norm_eps: float = 1e-5,
        mlp_hidden: int | None = None,
        mlp_activation: Literal["gelu", "silu"] = "gelu",
        mlp_bias: bool = False,
        norm_offset: float = 0.0,
        key: PRNGKeyArray,
    ):
        """**Arguments:**

        - `d_model`: the model width.
        - `mixer`: a registry name (`"s4d"`, `"mamba"`, ...), a mixer class, or a
          mixer instance.
        - `mixer_kwargs`: keyword arguments for the mixer's constructor.
        - `mlp_ratio`: the gated MLP's hidden width over `d_model` (GeGLU: the
          hidden width is `2/3` of it, so the parameter count matches a plain MLP);
          0 for no MLP.
        - `dropout`: the dropout rate on both residual branches.
        - `remat`: rematerialise the block in the backward pass.
        - `norm_eps`: the epsilon of both RMS norms (added to the mean square).
        - `mlp_hidden`: the MLP's exact hidden width (overrides `mlp_ratio`).
        - `mlp_activation`: `"gelu"` (GeGLU) or `"silu"` (SwiGLU).
        - `mlp_bias`: biases on the MLP's three maps (RecurrentGemma).
        - `norm_offset`: both norms scale by `norm_offset + weight` (Gemma: 1, with
          the weights initialised at 0 then; default 0, weights at 1).
        - `key`: a `jax.random.PRNGKey`.
        """
        k_mix, k_mlp = jr.split(key)
        self.d_model, self.remat, self.norm_offset = d_model, remat, float(norm_offset)
        self.norm1 = make_norm(d_model, norm_eps, norm_offset)
        self.mixer = make_mixer(mixer, d_model, mixer_kwargs, key=k_mix)
        if mlp_ratio > 0 or mlp_hidden is not None:
            hidden = max(1, int(round(2 * mlp_ratio * d_model / 3)))
            hidden = hidden if mlp_hidden is None else mlp_hidden
            self.norm2 = make_norm(d_model, norm_eps, norm_offset)
            self.mlp = GatedMLP(d_model, hidden, mlp_activation, mlp_bias, key=k_mlp)
        else:
            self.norm2, self.mlp = None, None
        self.dropout = eqx.nn.Dropout(dropout)

    def _drop(self, x, key):
        if self.dropout.p == 0 or self.dropout.inference:
            return x
        return self.dropout(x, key=key)

    def _mlp(self, x, key, train=True):
        if self.mlp is None:
            return x
        y = self.mlp(rms_norm(self.norm2, x, self.norm_offset))
        return x + (self._drop(y, key) if train else y)

    def _forward(self, x, resets, key):
        k1, k2 = (None, None) if key is None else jr.split(key)
        u = rms_norm(self.norm1, x, self.norm_offset)
        y = self.mixer(u) if resets is None else self.mixer(u, resets=resets)
        return self._mlp(x + self._drop(y, k1), k2)

    def __call__(
        self,
        x: Float[Array, "seq d_model"],
        *,
        resets: Bool[Array, " seq"] | None = None,
        key: PRNGKeyArray | None = None,
    ) -> Float[Array, "seq d_model"]:
        """**Arguments:**

        - `x`: one sequence `(seq, d_model)`.
        - `resets`: true at the first token of each packed document, passed to the
          mixer (only when given: not every mixer takes it yet).
        - `key`: for dropout (needed only when training with `dropout > 0`).

        **Returns:** `(seq, d_model)`.
        """
        check_sequence(x, self.d_model, "Block")
        if self.remat:
            return eqx.filter_checkpoint(type(self)._forward)(self, x, resets, key)
        return self._forward(x, resets, key)

    def init_state(self) -> PyTree[Array]:
        return self.mixer.init_state()

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: PyTree[Array],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], PyTree[Array]]:
        """Run `x` from `state` (inference: no dropout); returns `(y, state)`.
        `resets` as in `__call__`."""
        check_sequence(x, self.d_model, "Block")
        u = rms_norm(self.norm1, x, self.norm_offset)
        if resets is None:
            y, state = self.mixer.prefill(u, state)
        else:
            y, state = self.mixer.prefill(u, state, resets=resets)
        return self._mlp(x + y, None, train=False), state

    def step(
        self, x_t: Float[Array, " d_model"], state: PyTree[Array]
    ) -> tuple[Float[Array, " d_model"], PyTree[Array]]:
        """One token (inference: no dropout); returns `(y_t, state)`."""
        check_token(x_t, self.d_model, "Block")
        y, state = self.mixer.step(rms_norm(self.norm1, x_t, self.norm_offset), state)
        return self._mlp(x_t + y, None, train=False), state
