"""A port of `scripts/bench_train.py` computes our layer's function.

The script itself checks every port's loss and gradients against our model before it
times anything; this test keeps one port (attention, the cheapest to compile) honest
in the suite, in float64, values and gradients.
"""

import importlib.util
import sys
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import layers

_spec = importlib.util.spec_from_file_location(
    "bench_train", Path(__file__).parents[1] / "scripts" / "bench_train.py"
)
bench_train = importlib.util.module_from_spec(_spec)
sys.modules["bench_train"] = bench_train  # dataclasses look their module up
_spec.loader.exec_module(bench_train)


def _rel(a, b):
    return float(jnp.max(jnp.abs(a - b)) / jnp.max(jnp.abs(b)))


def _assert_port_equals_layer(mixer, x, w, ours, port):
    """`port(m, x)` equals `ours(m, x)` in float64, in values and in the gradients of
    `sum(y * w)` to the input and every parameter."""

    @eqx.filter_jit
    def both(m, x):
        def loss(m, x, fn):
            y = fn(m, x)
            return jnp.sum(y * w), y

        grad = eqx.filter_value_and_grad(loss, has_aux=True)
        return grad(m, x, ours), grad(m, x, port)

    ((_, y_ours), g_ours), ((_, y_port), g_port) = both(mixer, x)
    assert y_port.dtype == jnp.float64
    assert _rel(y_port, y_ours) < 1e-6
    leaves = zip(jax.tree.leaves(g_port), jax.tree.leaves(g_ours), strict=True)
    for a, b in leaves:
        assert _rel(a, b) < 1e-6


def test_attention_port_equals_layer(getkey):
    """Values and gradients (to the input and every parameter), odd length, GQA."""
    mixer = layers.Attention(16, num_heads=4, num_kv_heads=2, key=getkey())
    x = jr.normal(getkey(), (13, 16), jnp.float64)
    w = jr.normal(getkey(), (13, 16), jnp.float64)
    # (jax.nn.dot_product_attention, off CPU, takes its softmax in float32: 2e-8.)
    _assert_port_equals_layer(mixer, x, w, lambda m, x: m(x), bench_train.attention_port)


def test_s4d_port_equals_layer(getkey):
    """The FFT-kernel S4D port: values and gradients, odd length, float64."""
    mixer = layers.S4D(6, state_size=8, key=getkey())
    mixer = eqx.tree_at(lambda m: m.B, mixer, jr.normal(getkey(), mixer.B.shape))
    x = jr.normal(getkey(), (37, 6), jnp.float64)
    w = jr.normal(getkey(), (37, 6), jnp.float64)
    recurrence = lambda m, x: m.prefill(x, m.init_state())[0]  # noqa: E731
    _assert_port_equals_layer(mixer, x, w, recurrence, bench_train.s4d_port)
