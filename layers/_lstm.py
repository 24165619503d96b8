"""The LSTM sequence mixer (Hochreiter & Schmidhuber 1997), run by ``ssm.scan``."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._gru import _uniform
from ._mixer import AbstractMixer, keep_mask

LSTMState = tuple[Float[Array, " d_hidden"], Float[Array, " d_hidden"]]
"""The LSTM's `(h, c)`: hidden and cell state."""


class LSTM(AbstractMixer):
    """A long short-term memory as a sequence mixer.

    Hochreiter & Schmidhuber (1997), "Long Short-Term Memory", with the forget gate of
    Gers, Schmidhuber & Cummins (2000). With `x_t` the input and `(h, c)` the state:

    ```
    i, f, g, o = W x_t + b + U h            (split in four)
    c = sigmoid(f) * c + sigmoid(i) * tanh(g)
    h = sigmoid(o) * tanh(c)
    y_t = W_o h
    ```

    The forget-gate bias starts at 1 (Jozefowicz, Zaremba & Sutskever 2015). The input
    projections of every step are one matrix product; the recurrence runs in
    `ssm.scan` with the `checkpoints` setting chosen here.

    **Arguments:**

    - `d_model`: the width of inputs and outputs.
    - `d_hidden`: the width of `h` and `c` (default `d_model`).
    - `checkpoints`: `ssm.scan`'s reverse-mode memory setting.
    - `dtype`: the parameters' dtype (default: JAX's default float).
    - `key`: a `jax.random` key for the initialisation.

    ```python
    lstm = layers.LSTM(64, key=jr.key(0))
    y = lstm(x)                                 # x: (seq, 64)
    y_t, state = lstm.step(x[0], lstm.init_state())
    ```
    """

    weight_ih: Float[Array, "4*d_hidden d_model"]
    weight_hh: Float[Array, "4*d_hidden d_hidden"]
    bias: Float[Array, " 4*d_hidden"]
    weight_out: Float[Array, "d_model d_hidden"]
    d_model: int = eqx.field(static=True)
    d_hidden: int = eqx.field(static=True)
    checkpoints: str | int = eqx.field(static=True)

    def __init__(
        self,
        d_model: int,
        d_hidden: int | None = None,
        *,
        checkpoints: str | int = "all",
        dtype=None,
        key: PRNGKeyArray,
    ):
        k_ih, k_hh, k_b, k_out = jr.split(key, 4)
        d_hidden = d_model if d_hidden is None else d_hidden
        dtype = jnp.result_type(float) if dtype is None else dtype
        bound = 1 / math.sqrt(d_hidden)
        H = d_hidden
        self.weight_ih = _uniform(k_ih, (4 * H, d_model), bound, dtype)
        self.weight_hh = _uniform(k_hh, (4 * H, H), bound, dtype)
        bias = _uniform(k_b, (4 * H,), bound, dtype)
        self.bias = bias.at[H : 2 * H].add(1)
        self.weight_out = _uniform(k_out, (d_model, H), bound, dtype)
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.checkpoints = checkpoints

    def init_state(self) -> LSTMState:
        """The zero state `(h, c)`."""
        zeros = jnp.zeros((self.d_hidden,), self.weight_hh.dtype)
        return zeros, zeros

    def _cell(self, state, gx):
        h, c = state
        H = self.d_hidden
        g = gx + self.weight_hh @ h
        i = jax.nn.sigmoid(g[:H])
        f = jax.nn.sigmoid(g[H : 2 * H])
        n = jnp.tanh(g[2 * H : 3 * H])
        o = jax.nn.sigmoid(g[3 * H :])
        c = f * c + i * n
        return o * jnp.tanh(c), c

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: LSTMState,
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], LSTMState]:
        """Run over a sequence from `state`, restarting from the zero state at `resets`
        (true at the first token of each packed document); returns the outputs and the
        final state."""
        resets = self._check_sequence(x, resets)
        gx = x.astype(self.weight_ih.dtype) @ self.weight_ih.T + self.bias[None]

        def step(s, inputs):
            g, keep = inputs
            if keep is not None:
                s = (keep * s[0], keep * s[1])
            s = self._cell(s, g)
            return s, s[0]

        state, hs = ssm.scan(
            step, state, (gx, keep_mask(resets, gx.dtype)), checkpoints=self.checkpoints
        )
        return hs @ self.weight_out.T, state

    def step(
        self, x_t: Float[Array, " d_model"], state: LSTMState
    ) -> tuple[Float[Array, " d_model"], LSTMState]:
        """One token: returns its output and the next state."""
        self._check_token(x_t)
        gx = self.weight_ih @ x_t.astype(self.weight_ih.dtype) + self.bias
        state = self._cell(state, gx)
        return self.weight_out @ state[0], state
