"""Sampling from a language model through the layers' recurrent `step` form."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np


def sample(model, prompt: np.ndarray, length: int, temperature: float, seed: int):
    """Feed `prompt` through `model.prefill`, then sample `length` tokens one `step` at
    a time (temperature 0 is greedy). Returns the sampled tokens as numpy int32."""
    prompt = jnp.asarray(prompt, jnp.int32)
    prefill = eqx.filter_jit(lambda m, x, s: m.prefill(x, s))
    step_fn = eqx.filter_jit(lambda m, x, s: m.step(x, s))
    logits, state = prefill(model, prompt, model.init_state())

    @jax.jit
    def draw(logits, key):
        if temperature == 0:
            return jnp.argmax(logits).astype(jnp.int32)
        return jr.categorical(key, logits / temperature).astype(jnp.int32)

    key = jr.key(seed)
    last = logits[-1]
    out = []
    for i in range(length):
        token = draw(last, jr.fold_in(key, i))
        out.append(token)
        last, state = step_fn(model, token, state)
    return np.asarray(jax.device_get(jnp.stack(out))) if out else np.zeros((0,), np.int32)
