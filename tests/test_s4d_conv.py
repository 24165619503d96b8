"""S4D's convolution mode (Vandermonde kernel, FFT convolution) against a float64 loop
written from the paper's equations, and against the layer's own recurrence."""

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import pytest

import layers

from .helpers import assert_close, raises_as_user

F64 = jnp.float64


def reference(m, x):
    """``h[t] = Ā h[t-1] + B̄ x[t]``, ``y[t] = 2 Re(C h[t]) + D x[t]`` (ZOH), in float64."""
    A = jax.lax.complex(-jnp.exp(m.log_A_real), m.A_imag)
    dt = jnp.exp(m.log_dt)[:, None].astype(A.dtype)
    dA = jnp.exp(dt * A)
    dB = (dA - 1) / A * jax.lax.complex(m.B[..., 0], m.B[..., 1])
    C = jax.lax.complex(m.C[..., 0], m.C[..., 1])

    def step(h, u):
        h = dA * h + dB * u[:, None].astype(dB.dtype)
        return h, 2 * jnp.sum(C * h, -1).real + m.D * u

    return jax.lax.scan(step, jnp.zeros(A.shape, jnp.complex128), x)[1]


def build(mode, key, d_model=3, state_size=8, init="lin"):
    m = layers.S4D(
        d_model, state_size=state_size, init=init, mode=mode, chunk_size=8, key=key
    )
    # Perturb every parameter so no test input is all ones or zeros.
    leaves, treedef = jax.tree.flatten(m)
    keys = jr.split(jr.fold_in(key, 1), len(leaves))
    leaves = [
        x.astype(F64) + 0.1 * jr.normal(k, x.shape, F64)
        for x, k in zip(leaves, keys, strict=True)
    ]
    return jax.tree.unflatten(treedef, leaves)


@pytest.mark.parametrize("T,init", [(37, "lin"), (101, "inv")])
def test_convolution_matches_the_recurrence_and_the_reference(getkey, T, init):
    key = getkey()
    conv, rec = build("convolution", key, init=init), build("recurrent", key, init=init)
    x = jr.normal(getkey(), (T, 3), F64)
    w = jr.normal(getkey(), (T, 3), F64)

    def loss(m, x, fn):
        return jnp.sum(w * jnp.sin(fn(m, x)))

    call = lambda m, x: m(x)
    ref = reference(conv, x)
    assert_close(conv(x), ref, 1e-10, "convolution values")
    assert_close(rec(x), ref, 1e-10, "recurrent values")
    grad = eqx.filter_jit(jax.grad(loss, (0, 1)))
    g, g_ref = grad(conv, x, call), grad(conv, x, reference)
    assert_close(g, g_ref, 1e-9, "convolution gradients")
    # prefill and step keep using the recurrence, from any state.
    y_pre, state = conv.prefill(x[: T // 2], conv.init_state().astype(jnp.complex128))
    y_rest, _ = conv.prefill(x[T // 2 :], state)
    assert_close(jnp.concatenate([y_pre, y_rest]), ref, 1e-10, "prefill in two parts")


def test_auto_mode_switches_at_the_measured_length(getkey):
    m = build("auto", getkey())
    n = layers.S4D.CONV_MIN_LENGTH
    for T in (n - 1, n):
        x = jr.normal(getkey(), (T, 3), F64)
        assert_close(m(x), reference(m, x), 1e-10, f"auto at T={T}")
    jaxpr = str(jax.make_jaxpr(m)(jnp.zeros((n, 3), F64)))
    assert "fft" in jaxpr
    assert "fft" not in str(jax.make_jaxpr(m)(jnp.zeros((n - 1, 3), F64)))


def test_float32_convolution_and_bad_mode(getkey):
    m = layers.S4D(4, state_size=16, mode="convolution", key=getkey())
    x = jr.normal(getkey(), (300, 4), jnp.float32)
    y = m(x)
    assert y.dtype == jnp.float32
    m64 = jax.tree.map(lambda v: v.astype(F64), m)
    assert_close(y, reference(m64, x.astype(F64)), 1e-5, "float32 against float64")
    with raises_as_user(ValueError, match="mode"):
        layers.S4D(4, mode="fft", key=getkey())
