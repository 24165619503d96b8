"""Every derivative of the chunked operators, not only reverse mode.

`ssm.gated_linear_attention` (scalar and per-key decays), `ssm.mlstm` and
`ssm.delta_rule` (DeltaNet and Gated DeltaNet) are compared with float64 step-by-step
loops written below from their equations, at a length that is not a multiple of the
chunk size and from a random initial state: values, `jax.grad`, `jax.jvp`,
`jax.jacfwd` (a tiny case, and tangents on a few inputs only), a Hessian-vector
product by forward-over-reverse, grad-of-grad (reverse over reverse), `vmap` of
`grad`, and gradients of losses that read only the outputs or only the final state.
Then the layers built on them (`layers.GLA`, `layers.DeltaNet`, `layers.MLSTM`) in
forward mode, against their own `step` run over time and a finite difference.

Each case is one compiled program for the operator and one for its reference.
"""

import functools
import os
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import layers
import ssm

from .helpers import assert_close, ref_delta, ref_gla, ref_mlstm

f64 = jnp.float64
H, DK, DV = 2, 4, 3
T, CHUNK = 19, 8  # two whole chunks and a part
T_TINY, CHUNK_TINY = 6, 4


# The references, float64 loops written from the equations, are `ref_gla`,
# `ref_mlstm` and `ref_delta` in tests/helpers.py.


# ------------------------------------------------------------------------- the cases
# `CASES[name] = (inputs(rng, T), operator(inputs, chunk_size), reference(inputs),
# the inputs that get tangents in the tiny `jacfwd`)`. Inputs are dicts of float64
# arrays drawn with NumPy (eager `jax.random` calls would compile one program each).


def draw(rng, shape, scale=1.0, shift=0.0):
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, f64)


def log_sigmoid(x):
    return jnp.asarray(-np.logaddexp(0.0, -np.asarray(x)), f64)


def qkv(rng, T):
    return dict(
        q=draw(rng, (T, H, DK)), k=draw(rng, (T, H, DK), 0.5), v=draw(rng, (T, H, DV))
    )


def gla_inputs(per_key):
    def inputs(rng, T):
        shape = (T, H, DK) if per_key else (T, H)
        return dict(
            **qkv(rng, T),
            log_decay=log_sigmoid(draw(rng, shape, shift=2.0)),
            h0=draw(rng, (H, DK, DV)),
        )

    return inputs


def gla_op(x, chunk_size):
    return ssm.gated_linear_attention(**x, chunk_size=chunk_size)


def mlstm_inputs(rng, T):
    h0 = ssm.MLSTMState(draw(rng, (H, DK, DV)), draw(rng, (H, DK)), draw(rng, (H,)))
    return dict(
        **qkv(rng, T),
        log_forget=log_sigmoid(draw(rng, (T, H), shift=2.0)),
        log_input=draw(rng, (T, H)),
        h0=h0,
    )


def mlstm_op(x, chunk_size):
    return ssm.mlstm(**x, chunk_size=chunk_size)


def delta_inputs(gated):
    def inputs(rng, T):
        x = qkv(rng, T)
        x["k"] = x["k"] / jnp.linalg.norm(x["k"], axis=-1, keepdims=True)
        x["beta"] = jnp.asarray(1 / (1 + np.exp(-rng.standard_normal((T, H)))), f64)
        x["h0"] = draw(rng, (H, DK, DV))
        if gated:
            x["log_decay"] = log_sigmoid(draw(rng, (T, H), shift=2.0))
        return x

    return inputs


def delta_op(x, chunk_size):
    return ssm.delta_rule(**x, chunk_size=chunk_size)


CASES = {
    "gla-scalar": (gla_inputs(False), gla_op, lambda x: ref_gla(**x), ("log_decay", "h0")),
    "gla-per-key": (gla_inputs(True), gla_op, lambda x: ref_gla(**x), ("log_decay", "h0")),
    "mlstm": (
        mlstm_inputs,
        mlstm_op,
        lambda x: ref_mlstm(**x),
        ("log_forget", "log_input", "h0"),
    ),
    "deltanet": (delta_inputs(False), delta_op, lambda x: ref_delta(**x), ("beta", "k")),
    "gated-deltanet": (
        delta_inputs(True),
        delta_op,
        lambda x: ref_delta(**x),
        ("log_decay", "beta", "h0"),
    ),
}


# --------------------------------------------------------------- the derivatives


def loss(out, w):
    """A nonlinear function of every output (so a Hessian sees the operator's
    first derivative through the loss's curvature, and its second one)."""
    return sum(
        jnp.sum(wi * jnp.tanh(oi))
        for oi, wi in zip(jax.tree.leaves(out), jax.tree.leaves(w), strict=True)
    )


def sq_norm(tree):
    return sum(jnp.sum(x**2) for x in jax.tree.leaves(tree))


def derivatives(op, tiny_op, x, w, t, x_batch, tiny, tiny_keys):
    """Everything compared, for `op(x)` (one operator or its reference). The value and
    the gradient come as the primal outputs of `jvp` and of the Hessian-vector
    product. The losses of `grad_of_grad` (the final state only) and `vmap_grad` (the
    outputs only) leave one output without a cotangent."""
    L = lambda x: loss(op(x), w)  # noqa: E731
    L_outputs = lambda x: loss(op(x)[0], w[0])  # noqa: E731
    L_state = lambda x: loss(op(x)[1], w[1])  # noqa: E731
    value, jvp = jax.jvp(op, (x,), (t,))
    grad, hvp = jax.jvp(jax.grad(L), (x,), (t,))  # forward over reverse

    def tiny_fn(sub):
        return tiny_op({**tiny, **sub})

    return dict(
        value=value,
        jvp=jvp,
        grad=grad,
        hvp=hvp,
        grad_of_grad=jax.grad(lambda x: sq_norm(jax.grad(L_state)(x)))(x),
        vmap_grad=jax.vmap(jax.grad(L_outputs))(x_batch),
        jacfwd=jax.jacfwd(tiny_fn)({key: tiny[key] for key in tiny_keys}),
    )


TOLERANCES = dict(  # relative errors, float64
    value=1e-12,
    jvp=1e-11,
    grad=1e-11,
    hvp=1e-9,
    grad_of_grad=1e-9,
    vmap_grad=1e-11,
    jacfwd=1e-11,
)
# Compiled without LLVM's optimisations: these programs run once, on tiny inputs, and
# compile in about half the time.
FAST_COMPILE = {
    "xla_backend_optimization_level": 0,
    "xla_llvm_disable_expensive_passes": True,
}


@pytest.fixture
def rng():
    return np.random.default_rng(
        zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    )


@pytest.mark.parametrize("case", list(CASES))
def test_every_derivative_matches_recurrence(case, rng):
    inputs, operator, reference, tiny_keys = CASES[case]
    x = inputs(rng, T)
    x_batch = jax.tree.map(lambda a, b: jnp.stack([a, b]), x, inputs(rng, T))
    tiny = inputs(rng, T_TINY)
    t = jax.tree.map(lambda a: draw(rng, a.shape), x)
    o, state = reference(x)
    w = jax.tree.map(lambda a: draw(rng, a.shape), (o, state))
    args = (x, w, t, x_batch, tiny)

    fast = functools.partial(operator, chunk_size=CHUNK)
    fast_tiny = functools.partial(operator, chunk_size=CHUNK_TINY)
    run, run_ref = (
        jax.jit(
            functools.partial(derivatives, op, tiny_op, tiny_keys=tiny_keys),
            compiler_options=FAST_COMPILE,
        )
        for op, tiny_op in ((fast, fast_tiny), (reference, reference))
    )
    got, want = run(*args), run_ref(*args)

    for name, tol in TOLERANCES.items():
        assert_close(got[name], want[name], tol, f"{case}: {name}")
    # every input gets a second-order tangent that is not zero
    for name in ("hvp",):
        for leaf in jax.tree.leaves(got[name]):
            assert float(jnp.max(jnp.abs(leaf))) > 0, (case, name)


# ------------------------------------------------------------------- the layers

LAYERS = {
    "gla": lambda key: layers.GLA(8, num_heads=2, chunk_size=4, key=key),
    "deltanet": lambda key: layers.DeltaNet(8, num_heads=2, chunk_size=4, key=key),
    "mlstm": lambda key: layers.MLSTM(8, num_heads=2, chunk_size=4, key=key),
}


def cast(tree, dtype):
    return jax.tree.map(lambda v: v.astype(dtype) if eqx.is_inexact_array(v) else v, tree)


def layer_forward_mode(mixer, x, t_params, t_x, eps):
    """`jvp` (to the parameters and the input) through the layer, through its own
    `step` scanned over time (plain JAX), and by central differences."""
    params, static = eqx.partition(mixer, eqx.is_inexact_array)

    def chunked(p, x):
        return eqx.combine(p, static)(x)

    def stepped(p, x):
        m = eqx.combine(p, static)
        return jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], m.init_state(), x)[1]

    def shifted(h):
        p = jax.tree.map(lambda a, d: a + h * d, params, t_params)
        return chunked(p, x + h * t_x)

    return dict(
        jvp=jax.jvp(chunked, (params, x), (t_params, t_x))[1],
        jvp_step=jax.jvp(stepped, (params, x), (t_params, t_x))[1],
        jvp_fd=(shifted(eps) - shifted(-eps)) / (2 * eps),
    )


@pytest.mark.parametrize("name", list(LAYERS))
def test_layer_forward_mode(name, rng):
    """Forward mode runs end to end through a layer on a chunked operator (odd length,
    chunks of 4; tangents on every parameter and the input) and agrees with the
    layer's step-by-step form and a finite difference."""
    mixer = eqx.filter_jit(lambda key: cast(LAYERS[name](key), f64))(jr.key(0))
    params = eqx.filter(mixer, eqx.is_inexact_array)
    t_params = jax.tree.map(lambda a: draw(rng, a.shape, 0.1), params)
    x, t_x = draw(rng, (11, 8)), draw(rng, (11, 8), 0.1)
    run = eqx.filter_jit(layer_forward_mode, compiler_options=FAST_COMPILE)
    r = run(mixer, x, t_params, t_x, 1e-5)
    assert float(jnp.max(jnp.abs(r["jvp"]))) > 0
    assert_close(r["jvp"], r["jvp_step"], 1e-10, f"{name}: jvp")
    assert_close(r["jvp"], r["jvp_fd"], 1e-7, f"{name}: jvp against finite differences")
