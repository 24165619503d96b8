"""The short causal convolution that several mixers run before their recurrence."""

from __future__ import annotations

from typing import NamedTuple

import jax.numpy as jnp
import jax.random as jr
import numpy as np
from jaxtyping import Array, Bool, Float, PRNGKeyArray

from ._mixer import segments


class ConvState(NamedTuple):
    """State of a layer with a short causal convolution before its recurrence.

    `conv` holds the last `kernel_size - 1` inputs of the convolution (oldest first),
    `ssm` the recurrent state.
    """

    conv: Float[Array, "kernel_minus_1 channels"]
    ssm: Array


def init_conv(
    d_conv: int, channels: int, *, key: PRNGKeyArray, bias_key: PRNGKeyArray | None = None
) -> tuple[Float[Array, "d_conv channels"], Float[Array, " channels"] | None]:
    """The weights (and, given `bias_key`, the bias) of a depthwise causal convolution of
    width `d_conv`, uniform in `±1/√d_conv` (PyTorch's `Conv1d` default for one input
    channel per group), in float32.

    **Returns:** `weight` of shape `(d_conv, channels)` and `bias` of shape
    `(channels,)`, or None without `bias_key`.
    """
    bound = 1 / np.sqrt(d_conv)
    weight = jr.uniform(key, (d_conv, channels), jnp.float32, -bound, bound)
    if bias_key is None:
        return weight, None
    return weight, jr.uniform(bias_key, (channels,), jnp.float32, -bound, bound)


def causal_conv(
    weight: Float[Array, "kernel channels"],
    bias: Float[Array, " channels"],
    x: Float[Array, "seq channels"],
    history: Float[Array, "kernel_minus_1 channels"],
    resets: Bool[Array, " seq"] | None = None,
) -> tuple[Float[Array, "seq channels"], Float[Array, "kernel_minus_1 channels"]]:
    """Depthwise causal convolution `y[t] = bias + sum_k weight[k] x[t - K + 1 + k]`.

    `history` holds the `K - 1` inputs before `x` (zeros at the start of a sequence);
    returns the outputs and the new history. With `resets` (true at the first token
    of each packed document) an output reads only inputs of its own document, as if
    each document were convolved alone from zero history; the returned history keeps
    only inputs of the last document.
    """
    K, T = weight.shape[0], x.shape[0]
    xp = jnp.concatenate([history.astype(x.dtype), x], axis=0)
    w = weight.astype(x.dtype)
    if resets is None:
        y = bias.astype(x.dtype)[None] + sum(w[k][None] * xp[k : k + T] for k in range(K))
        new_history = xp[xp.shape[0] - (K - 1) :].astype(history.dtype)
        return y, new_history
    seg = segments(resets)
    seg_p = jnp.concatenate([jnp.zeros((K - 1,), seg.dtype), seg])
    y = bias.astype(x.dtype)[None] + sum(
        jnp.where((seg_p[k : k + T] == seg)[:, None], w[k][None] * xp[k : k + T], 0)
        for k in range(K)
    )
    tail = xp.shape[0] - (K - 1)
    keep = (seg_p[tail:] == seg[-1])[:, None]
    new_history = jnp.where(keep, xp[tail:], 0).astype(history.dtype)
    return y, new_history
