"""``ssm.scan`` against ``lax.scan`` on cases in the manner of JAX's own scan tests.

JAX's ``tests/lax_control_flow_test.py`` checks ``lax.scan`` on pytrees of carries,
``xs=None``, ``reverse``, ``unroll``, closures, nested scans, integer leaves, ``vmap``
and derivatives of every order. The cases below are written anew in that spirit, and
each runs through every memory-bounded mode of ``ssm.scan`` (binomial budgets,
``"auto"``, the parallel backward), comparing values, ``grad``, ``jvp``, a
Hessian-vector product (forward over reverse) and reverse over reverse with
``lax.scan``'s, in float64.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ssm

from .helpers import assert_close

F64 = jnp.float64

MODES = {
    "budget1": dict(checkpoints=1),
    "budget3": dict(checkpoints=3),
    "auto": dict(checkpoints="auto"),
    "parallel": dict(backward="parallel"),
    "parallel_diag": dict(backward="parallel", jacobian="diagonal"),
}


def _normal(seed, shape):
    return jax.random.normal(jax.random.key(seed), shape, F64)


# Each case: (build, params). ``build(scan)`` returns ``loss(params) -> scalar`` that
# runs its recurrence with ``scan`` (``lax.scan`` or a mode of ``ssm.scan``).


def pytree_carry(scan):
    """A tuple carry, dict inputs and outputs, closures over arrays."""

    def loss(p):
        W, U, xs = p["W"], p["U"], p["xs"]

        def cell(carry, x):
            h, c = carry
            h = jnp.tanh(W @ h + U @ x["u"] * x["s"] + 0.1 * c)
            c = c + jnp.sum(h) * 0.3
            return (h, c), {"sq": h * h, "c": c}

        (h, c), ys = scan(cell, (p["h0"], jnp.asarray(0.2, F64)), xs)
        return jnp.sum(jnp.sin(h)) + c + jnp.sum(jnp.cos(ys["sq"])) + jnp.sum(ys["c"] ** 2)

    params = {
        "W": _normal(0, (3, 3)) * 0.6,
        "U": _normal(1, (3, 2)),
        "h0": _normal(2, (3,)),
        "xs": {"u": _normal(3, (7, 2)), "s": 1 + 0.1 * _normal(4, (7,))},
    }
    return loss, params


def xs_none_reverse(scan):
    """No inputs (``length`` given), run from the end."""

    def loss(p):
        def cell(h, _):
            h = jnp.tanh(p["W"] @ h + p["b"])
            return h, h[0] * h[1]

        h, ys = scan(cell, p["h0"], None, length=9, reverse=True)
        return jnp.sum(h**2) + jnp.sum(ys * jnp.arange(9, dtype=F64))

    params = {"W": _normal(5, (2, 2)), "b": _normal(6, (2,)), "h0": _normal(7, (2,))}
    return loss, params


def unrolled(scan):
    """``unroll`` that does not divide the length."""

    def loss(p):
        def cell(h, x):
            h = jnp.sin(p["a"] * h + x)
            return h, h

        h, ys = scan(cell, p["h0"], p["xs"], unroll=3)
        return jnp.sum(h) + jnp.sum(ys**3)

    params = {"a": _normal(8, (4,)), "h0": _normal(9, (4,)), "xs": _normal(10, (10, 4))}
    return loss, params


def integer_leaves(scan):
    """An integer counter in the carry, integer inputs and outputs."""

    def loss(p):
        def cell(carry, x):
            h, i = carry
            h = jnp.tanh(p["W"] @ h * (1 + 0.1 * i.astype(F64)) + x["u"])
            return (h, i + x["k"]), (i, h)

        xs = {"u": p["xs"], "k": jnp.arange(11, dtype=jnp.int32) % 3}
        (h, i), (idx, hs) = scan(cell, (p["h0"], jnp.int32(1)), xs)
        return jnp.sum(h) * i.astype(F64) + jnp.sum(hs * idx[:, None].astype(F64))

    params = {
        "W": _normal(11, (3, 3)) * 0.5,
        "h0": _normal(12, (3,)),
        "xs": _normal(13, (11, 3)),
    }
    return loss, params


def ys_unused(scan):
    """Only the final carry enters the loss; the outputs are discarded."""

    def loss(p):
        def cell(h, x):
            h = jnp.tanh(p["W"] @ h + x)
            return h, jnp.outer(h, h)

        return jnp.sum(scan(cell, p["h0"], p["xs"])[0] ** 2)

    params = {"W": _normal(14, (3, 3)), "h0": _normal(15, (3,)), "xs": _normal(16, (13, 3))}
    return loss, params


def no_outputs(scan):
    """The step returns ``None`` as its output; a single step."""

    def loss(p):
        def cell(h, x):
            return jnp.cos(p["W"] @ h) + x, None

        h, ys = scan(cell, p["h0"], p["xs"])
        assert ys is None
        return jnp.sum(h**2)

    params = {"W": _normal(17, (2, 2)), "h0": _normal(18, (2,)), "xs": _normal(19, (1, 2))}
    return loss, params


def mixed_dtypes(scan):
    """A float32 and a float64 leaf in one carry."""

    def loss(p):
        def cell(carry, x):
            a, b = carry
            a = jnp.tanh(a * p["w"].astype(jnp.float32) + x.astype(jnp.float32))
            b = jnp.sin(b + a.astype(F64))
            return (a, b), b

        (a, b), ys = scan(cell, (jnp.ones(2, jnp.float32), p["b0"]), p["xs"])
        return jnp.sum(a.astype(F64)) + jnp.sum(b) + jnp.sum(ys)

    params = {"w": _normal(20, (2,)), "b0": _normal(21, (2,)), "xs": _normal(22, (6, 2))}
    return loss, params


def nested(scan):
    """A scan inside the step of a scan, both in the mode under test."""

    def loss(p):
        def inner(h, x):
            return jnp.tanh(p["W"] @ h + x), h

        def outer(h, xrow):
            h2, hs = scan(inner, h, xrow)
            return h2 * 0.9, jnp.sum(hs)

        h, ys = scan(outer, p["h0"], p["xs"])
        return jnp.sum(h) + jnp.sum(ys**2)

    params = {
        "W": _normal(23, (2, 2)),
        "h0": _normal(24, (2,)),
        "xs": _normal(25, (5, 3, 2)),
    }
    return loss, params


def batched(scan):
    """``vmap`` over a batch of input sequences, parameters shared."""

    def loss(p):
        def one(h0, xs):
            def cell(h, x):
                h = jnp.tanh(p["a"] * h + x)
                return h, h

            return scan(cell, h0, xs)

        h, ys = jax.vmap(one)(p["h0"], p["xs"])
        return jnp.sum(h**2) + jnp.sum(jnp.sin(ys))

    params = {
        "a": _normal(26, (3,)),
        "h0": _normal(27, (4, 3)),
        "xs": _normal(28, (4, 8, 3)),
    }
    return loss, params


CASES = {
    f.__name__: f
    for f in (
        pytree_carry,
        xs_none_reverse,
        unrolled,
        integer_leaves,
        ys_unused,
        no_outputs,
        mixed_dtypes,
        nested,
        batched,
    )
}
# Cases whose carry Jacobian is diagonal (elementwise), for jacobian="diagonal".
DIAGONAL = ("unrolled", "batched")
# First order (value, grad, jvp) for every case in the main modes; the two binomial
# budgets share their code, so budget 1 sees a few cases only.
FIRST = (
    [(case, mode) for case in CASES for mode in ("budget3", "auto", "parallel")]
    + [(case, "parallel_diag") for case in DIAGONAL]
    + [(case, "budget1") for case in ("pytree_carry", "integer_leaves", "nested")]
)
# Second order (HVP, reverse over reverse): every mode, on a spread of cases.
SECOND = [
    ("pytree_carry", "budget3"),
    ("pytree_carry", "parallel"),
    ("integer_leaves", "auto"),
    ("nested", "budget1"),
    ("xs_none_reverse", "parallel"),
    ("unrolled", "parallel_diag"),
    ("batched", "auto"),
]
# float32 leaves in the carry: float32 rounding, not float64.
TOL = {"mixed_dtypes": 1e-5}


def dot(a, b):
    return sum(jnp.vdot(x, y) for x, y in zip(*map(jax.tree.leaves, (a, b)), strict=True))


def first_order(loss, params, direction):
    value, tangent = jax.jvp(loss, (params,), (direction,))
    return value, jax.grad(loss)(params), tangent


def second_order(loss, params, direction):
    """HVP (forward over reverse) and the gradient of <grad, v> (reverse over reverse)."""
    grad = jax.grad(loss)
    hvp = jax.jvp(grad, (params,), (direction,))[1]
    return hvp, jax.grad(lambda p: dot(grad(p), direction))(params)


def direction_for(params):
    leaves, treedef = jax.tree.flatten(params)
    return treedef.unflatten([_normal(100 + i, x.shape) for i, x in enumerate(leaves)])


@functools.cache
def reference(case, order):
    loss, params = CASES[case](lax.scan)
    fn = first_order if order == 1 else second_order
    return jax.jit(fn, static_argnums=0)(loss, params, direction_for(params))


def check(case, mode, order, names):
    loss, params = CASES[case](functools.partial(ssm.scan, **MODES[mode]))
    fn = first_order if order == 1 else second_order
    ours = jax.jit(fn, static_argnums=0)(loss, params, direction_for(params))
    for name, a, b in zip(names, ours, reference(case, order), strict=True):
        assert_close(a, b, TOL.get(case, 1e-11), f"{case}/{mode}: {name}")


@pytest.mark.parametrize("case,mode", FIRST)
def test_first_order_matches_lax_scan(case, mode):
    check(case, mode, 1, ("value", "grad", "jvp"))


@pytest.mark.parametrize("case,mode", SECOND)
def test_second_order_matches_lax_scan(case, mode):
    check(case, mode, 2, ("hvp (forward over reverse)", "reverse over reverse"))


@pytest.mark.parametrize("mode", ["budget3", "auto", "parallel"])
def test_closure_over_python_float_outside_jit(mode):
    """The pattern that used to return a float0 zero: the differentiated value is a
    Python float closed over by the step, and no ``jit`` is in sight."""
    h0 = jnp.asarray(0.3, F64)
    xs = jnp.linspace(0.1, 1.0, 9, dtype=F64)
    kw = MODES[mode]

    def loss(scan, c):
        return scan(lambda h, x: (jnp.sin(h * c) + x, h), h0, xs)[0].sum()

    ours = functools.partial(loss, functools.partial(ssm.scan, **kw))
    ref = functools.partial(loss, lax.scan)
    g, g_ref = jax.grad(ours)(2.0), jax.grad(ref)(2.0)
    assert jnp.result_type(g) == jnp.result_type(g_ref)
    assert_close(g, g_ref, 1e-12, "grad")
    assert_close(
        jax.grad(jax.grad(ours))(2.0), jax.grad(jax.grad(ref))(2.0), 1e-12, "grad2"
    )
    if mode == "auto":  # the other transforms take the same path in every mode
        assert_close(jax.hessian(ours)(2.0), jax.hessian(ref)(2.0), 1e-12, "hessian")
        assert_close(jax.jacfwd(ours)(2.0), jax.jacfwd(ref)(2.0), 1e-12, "jacfwd")
    # A weak-typed array closed over, and a closed-over constant that is not differentiated.
    w = jnp.asarray(2.0)
    k = 0.5
    f = lambda scan, w: scan(lambda h, x: (k * jnp.tanh(h * w) + x, h), h0, xs)[1].sum()
    assert_close(
        jax.grad(functools.partial(f, functools.partial(ssm.scan, **kw)))(w),
        jax.grad(functools.partial(f, lax.scan))(w),
        1e-6,
        "weak-typed closure",
    )


def test_forward_outputs_and_dtypes_match():
    """Every mode returns lax.scan's pytree, dtypes and values (integers included)."""
    loss, params = integer_leaves(lax.scan)

    def run(scan):
        def cell(carry, x):
            h, i = carry
            h = jnp.tanh(params["W"] @ h + x)
            return (h, i + 1), {"i": i, "h": h.astype(jnp.float32)}

        return scan(cell, (params["h0"], jnp.int32(0)), params["xs"], reverse=True)

    ref = run(lax.scan)
    for mode, kw in MODES.items():
        out = run(functools.partial(ssm.scan, **kw))
        assert jax.tree.structure(out) == jax.tree.structure(ref), mode
        for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True):
            assert a.dtype == b.dtype, mode
            np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-13)


def test_parallel_backward_names_custom_vjp_steps():
    """BPPSA needs forward-mode Jacobians of the step: a custom_vjp inside is refused
    with a message naming the mode and the alternative."""

    @jax.custom_vjp
    def g(h):
        return jnp.tanh(h)

    g.defvjp(lambda h: (jnp.tanh(h), h), lambda h, ct: (ct * (1 - jnp.tanh(h) ** 2),))
    xs = jnp.ones((5, 2), F64)
    loss = lambda h0: ssm.scan(lambda h, x: (g(h) + x, h), h0, xs, backward="parallel")[
        0
    ].sum()
    with pytest.raises(TypeError, match='backward="sequential"'):
        jax.grad(loss)(jnp.zeros(2, F64))
    # A nested checkpointed ssm.scan is forward-differentiable, so it is accepted.
    inner = lambda h: ssm.scan(
        lambda c, _: (jnp.tanh(c), None), h, None, length=3, checkpoints=2
    )[0]
    nested = lambda h0: ssm.scan(
        lambda h, x: (inner(h) + x, h), h0, xs, backward="parallel"
    )[0].sum()
    plain = lambda h0: lax.scan(
        lambda h, x: (
            lax.scan(lambda c, _: (jnp.tanh(c), None), h, None, length=3)[0] + x,
            h,
        ),
        h0,
        xs,
    )[0].sum()
    h0 = jnp.asarray([0.3, -0.2], F64)
    assert_close(jax.grad(nested)(h0), jax.grad(plain)(h0), 1e-12, "nested in parallel")


def test_unused_outputs_are_not_kept():
    """Loss on the final carry only: the compiled gradient's temp memory holds no
    ``T x D`` buffer (measured: a fraction of one such buffer, against lax.scan's)."""
    T, D = 4096, 32
    W = jnp.eye(D, dtype=jnp.float32) * 0.5
    xs = jnp.ones((T, D), jnp.float32)
    h0 = jnp.zeros((D,), jnp.float32)

    def temp_bytes(scan):
        def loss(W, h0):
            return jnp.sum(scan(lambda h, x: (jnp.tanh(W @ h + x), h), h0, xs)[0] ** 2)

        compiled = jax.jit(jax.grad(loss, (0, 1))).lower(W, h0).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    one_buffer = T * D * 4
    assert temp_bytes(lax.scan) >= one_buffer
    assert temp_bytes(functools.partial(ssm.scan, checkpoints="auto")) < one_buffer / 4
    assert temp_bytes(functools.partial(ssm.scan, checkpoints=6)) < one_buffer / 4


def test_integer_inputs_get_float0_cotangents():
    """``grad(..., allow_int=True)`` through an integer carry leaf: a float0 cotangent
    there, the true gradient elsewhere, as with lax.scan."""
    xs = jnp.linspace(0.0, 1.0, 5, dtype=F64)

    def loss(scan, h0, i0):
        def cell(c, x):
            h, i = c
            return (jnp.sin(h) + x * i.astype(F64), i + 1), None

        return scan(cell, (h0, i0), xs)[0][0]

    args = (jnp.asarray(0.2, F64), jnp.int32(1))
    ref = jax.grad(functools.partial(loss, lax.scan), (0, 1), allow_int=True)(*args)
    for mode in ("budget3", "auto", "parallel"):
        scan = functools.partial(ssm.scan, **MODES[mode])
        g = jax.grad(functools.partial(loss, scan), (0, 1), allow_int=True)(*args)
        assert_close(g[0], ref[0], 1e-13, mode)
        assert g[1].dtype == jax.dtypes.float0, mode
