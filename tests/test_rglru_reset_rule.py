"""`RGLRU(reset_rule="recurrent_gemma")`: RecurrentGemma's first-token rule (no decay
and no `sqrt(1 - a²)` normalisation at a document's first token) against a float64
loop written from the reference's equations, in the parallel form, `prefill` + `step`,
a `prefill` continued from a state, packed documents, and gradients."""

from __future__ import annotations

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import layers
from layers._rglru import RGLRUState

from .helpers import raises_as_user, rel_err

T, D, R, H, K = 13, 6, 8, 2, 3
RESET = 7  # a packed document starts here


@eqx.filter_jit
def reference(m, u, starts):
    """RecurrentGemma's recurrent block, token by token in float64: `starts` (boolean
    `(T,)`) is true where a document (its segment position 0) begins."""
    with jax.numpy_rank_promotion("allow"):
        gate = jax.nn.gelu(u @ m.gate_proj.weight.T + m.gate_proj.bias)
        xs = u @ m.in_proj.weight.T + m.in_proj.bias
        W_a = jax.scipy.linalg.block_diag(*m.W_a)
        W_x = jax.scipy.linalg.block_diag(*m.W_x)
        p = -m.a_param  # their parameter: log a = -8 r softplus(p)

        def step(carry, inputs):
            h, hist = carry
            x_t, start = inputs
            hist = jnp.where(start, 0.0, hist)  # our convolution stays in a document
            window = jnp.concatenate([hist, x_t[None]])
            x = m.conv_bias + jnp.sum(m.conv_weight * window, axis=0)
            r = jax.nn.sigmoid(x @ W_a + m.b_a)
            i = jax.nn.sigmoid(x @ W_x + m.b_x)
            log_a = -8.0 * r * jax.nn.softplus(p)
            ordinary = jnp.exp(log_a) * h + jnp.sqrt(1 - jnp.exp(2 * log_a)) * (i * x)
            h = jnp.where(start, i * x, ordinary)
            return (h, window[1:]), h

        init = (jnp.zeros(R, jnp.float64), jnp.zeros((K - 1, R), jnp.float64))
        _, hs = jax.lax.scan(step, init, (xs, starts))
        return (gate * hs) @ m.out_proj.weight.T + m.out_proj.bias


def starts_at(*positions):
    return jnp.zeros(T, bool).at[jnp.asarray(positions)].set(True)


@pytest.fixture(scope="module")
def mixer_and_input():
    """A float64 mixer with random values (built from its shapes, not eagerly)."""
    skeleton = eqx.filter_eval_shape(
        lambda: layers.RGLRU(
            D, d_rnn=R, d_conv=K, num_heads=H, reset_rule="recurrent_gemma",
            key=jr.key(0),
        )
    )  # fmt: skip
    rng = np.random.default_rng(3)
    leaves, treedef = jax.tree.flatten(skeleton)
    leaves = [rng.normal(size=a.shape) / np.sqrt(max(a.shape[-1], 1)) for a in leaves]
    m = jax.tree.unflatten(treedef, [jnp.asarray(a, jnp.float64) for a in leaves])
    m = eqx.tree_at(lambda m: m.a_param, m, m.a_param + 2.0)  # decays near 0.9 and up
    return m, jnp.asarray(rng.normal(size=(T, D)), jnp.float64)


def test_recurrent_gemma_rule_against_reference(mixer_and_input):
    m, u = mixer_and_input
    resets = jnp.zeros(T, bool).at[RESET].set(True)

    @eqx.filter_jit
    def run(m, u):
        whole = m(u, resets=resets)
        plain = m(u)
        # prefill 4 tokens, continue with a prefill of 2, then step the rest
        y1, s = m.prefill(u[:4], m.init_state())
        y2, s = m.prefill(u[4:6], s)
        s, tail = jax.lax.scan(lambda s, u_t: m.step(u_t, s)[::-1], s, u[6:])
        y0, _ = m.step(u[0], m.init_state())
        return whole, plain, jnp.concatenate([y1, y2, tail]), s, y0

    whole, plain, generated, state, y0 = run(m, u)
    assert rel_err(whole, reference(m, u, starts_at(0, RESET))) <= 1e-12
    assert rel_err(plain, reference(m, u, starts_at(0))) <= 1e-12
    # the carried state is float32 (as every layer's), rounded at each hand-over
    assert rel_err(generated, reference(m, u, starts_at(0))) <= 1e-6
    assert isinstance(state, RGLRUState) and not bool(state.start)
    # the rule differs from the paper's: the same weights with reset_rule="paper"
    skeleton = eqx.filter_eval_shape(
        lambda: layers.RGLRU(D, d_rnn=R, d_conv=K, num_heads=H, key=jr.key(0))
    )
    paper = jax.tree.unflatten(jax.tree.structure(skeleton), jax.tree.leaves(m))
    assert rel_err(eqx.filter_jit(lambda p, u: p(u))(paper, u), plain) > 1e-3
    # a step from init_state is the rule's first token
    assert rel_err(y0, plain[0]) <= 1e-6


def test_recurrent_gemma_rule_gradients(mixer_and_input):
    m, u = mixer_and_input
    resets = jnp.zeros(T, bool).at[RESET].set(True)
    w = jr.normal(jr.key(5), (T, D), jnp.float64)

    def loss(m, u):
        return jnp.sum(w * m(u, resets=resets))

    def loss_ref(m, u):
        return jnp.sum(w * reference(m, u, starts_at(0, RESET)))

    g, gu = eqx.filter_jit(jax.grad(loss, argnums=(0, 1)))(m, u)
    g_ref, gu_ref = eqx.filter_jit(jax.grad(loss_ref, argnums=(0, 1)))(m, u)
    assert rel_err(gu, gu_ref) <= 1e-10
    for name in ("a_param", "W_a", "b_x", "conv_weight"):
        assert rel_err(getattr(g, name), getattr(g_ref, name)) <= 1e-10, name


def test_reset_rule_is_checked():
    with raises_as_user(ValueError, match="reset_rule"):
        layers.RGLRU(4, reset_rule="gemma", key=jr.key(0))
    # the default state is unchanged
    state = eqx.filter_eval_shape(lambda: layers.RGLRU(4, key=jr.key(0))).init_state()
    assert not isinstance(state, RGLRUState) and len(state) == 2
    np.testing.assert_array_equal(state.ssm, np.zeros(6, np.float32))
