"""The GRU sequence mixer (Cho et al. 2014), its recurrence run by ``ssm.scan``."""

from __future__ import annotations

import math

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
from jaxtyping import Array, Bool, Float, PRNGKeyArray

import ssm

from ._mixer import AbstractMixer, keep_mask


def _uniform(key, shape, bound, dtype):
    return jr.uniform(key, shape, dtype, -bound, bound)


class GRU(AbstractMixer):
    """A gated recurrent unit as a sequence mixer.

    Cho, van Merrienboer, Gulcehre, Bahdanau, Bougares, Schwenk & Bengio (2014),
    "Learning Phrase Representations using RNN Encoder-Decoder for Statistical Machine
    Translation". With `x_t` the input and `h` the state (PyTorch's convention):

    ```
    r = sigmoid(W_r x_t + b_r + U_r h + c_r)
    z = sigmoid(W_z x_t + b_z + U_z h + c_z)
    n = tanh(W_n x_t + b_n + r * (U_n h + c_n))
    h = (1 - z) * n + z * h
    y_t = W_o h
    ```

    The input projections of every step are one matrix product; the recurrence runs
    in `ssm.scan` with the `checkpoints` setting chosen here (see `ssm.scan`).

    **Arguments:**

    - `d_model`: the width of inputs and outputs.
    - `d_hidden`: the state width (default `d_model`).
    - `checkpoints`: `ssm.scan`'s reverse-mode memory setting, `"all"`, `"auto"` or an
      int budget of stored states.
    - `dtype`: the parameters' dtype (default: JAX's default float); the state is
      carried in it too.
    - `key`: a `jax.random` key for the initialisation.

    ```python
    gru = layers.GRU(64, key=jr.key(0))
    y = gru(x)                                  # x: (seq, 64)
    y1, state = gru.prefill(x[:10], gru.init_state())
    y2, state = gru.step(x[10], state)
    ```
    """

    weight_ih: Float[Array, "3*d_hidden d_model"]
    weight_hh: Float[Array, "3*d_hidden d_hidden"]
    bias_ih: Float[Array, " 3*d_hidden"]
    bias_hh: Float[Array, " 3*d_hidden"]
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
        k_ih, k_hh, k_bih, k_bhh, k_out = jr.split(key, 5)
        d_hidden = d_model if d_hidden is None else d_hidden
        dtype = jnp.result_type(float) if dtype is None else dtype
        bound = 1 / math.sqrt(d_hidden)
        self.weight_ih = _uniform(k_ih, (3 * d_hidden, d_model), bound, dtype)
        self.weight_hh = _uniform(k_hh, (3 * d_hidden, d_hidden), bound, dtype)
        self.bias_ih = _uniform(k_bih, (3 * d_hidden,), bound, dtype)
        self.bias_hh = _uniform(k_bhh, (3 * d_hidden,), bound, dtype)
        self.weight_out = _uniform(k_out, (d_model, d_hidden), bound, dtype)
        self.d_model = d_model
        self.d_hidden = d_hidden
        self.checkpoints = checkpoints

    def init_state(self) -> Float[Array, " d_hidden"]:
        """The zero state."""
        return jnp.zeros((self.d_hidden,), self.weight_hh.dtype)

    def _cell(self, h, gx):
        H = self.d_hidden
        gh = self.weight_hh @ h + self.bias_hh
        r = jax.nn.sigmoid(gx[:H] + gh[:H])
        z = jax.nn.sigmoid(gx[H : 2 * H] + gh[H : 2 * H])
        n = jnp.tanh(gx[2 * H :] + r * gh[2 * H :])
        return (1 - z) * n + z * h

    def prefill(
        self,
        x: Float[Array, "seq d_model"],
        state: Float[Array, " d_hidden"],
        *,
        resets: Bool[Array, " seq"] | None = None,
    ) -> tuple[Float[Array, "seq d_model"], Float[Array, " d_hidden"]]:
        """Run over a sequence from `state`, restarting from the zero state at `resets`
        (true at the first token of each packed document); returns the outputs and the
        final state."""
        resets = self._check_sequence(x, resets)
        gx = x.astype(self.weight_ih.dtype) @ self.weight_ih.T + self.bias_ih[None]

        def step(h, inputs):
            g, keep = inputs
            h = self._cell(h if keep is None else keep * h, g)
            return h, h

        state, hs = ssm.scan(
            step, state, (gx, keep_mask(resets, gx.dtype)), checkpoints=self.checkpoints
        )
        return hs @ self.weight_out.T, state

    def step(
        self, x_t: Float[Array, " d_model"], state: Float[Array, " d_hidden"]
    ) -> tuple[Float[Array, " d_model"], Float[Array, " d_hidden"]]:
        """One token: returns its output and the next state."""
        self._check_token(x_t)
        gx = self.weight_ih @ x_t.astype(self.weight_ih.dtype) + self.bias_ih
        h = self._cell(state, gx)
        return self.weight_out @ h, h
