"""``ssm._autodiff.fast_vjp``: which derivative goes through which function, under every
transform, on a small nonlinear recurrence in float64."""

import functools

import jax
import jax.numpy as jnp
import pytest
from jax import lax

from ssm._autodiff import fast_vjp

from .helpers import assert_close

F64 = jnp.float64


def reference(w, h0, xs):
    return lax.scan(lambda h, x: (jnp.tanh(w * h + x), h * h), h0, xs)


def make(scale=1.0):
    """``fast_vjp`` with a backward pass that is ``scale`` times the true one, so a
    test can tell which derivatives use it (``scale != 1``) and which do not."""

    def fwd(w, h0, xs):
        return reference(w, h0, xs), ()

    def bwd(args, res, cts, want):
        out, vjp = jax.vjp(reference, *args)
        cts = jax.tree.map(
            lambda o, c: jnp.zeros_like(o) if c is None else c,
            out,
            cts,
            is_leaf=lambda x: x is None,
        )
        grads = vjp(cts)
        return jax.tree.map(lambda g, w: g * scale if w else None, grads, want)

    return fast_vjp(fwd, bwd, reference)


def loss(fn, w, h0, xs):
    h, ys = fn(w, h0, xs)
    return h + jnp.sum(jnp.sin(ys))


W, H0 = jnp.asarray(0.7, F64), jnp.asarray(0.3, F64)
XS = jnp.linspace(-1.0, 1.0, 7, dtype=F64)


def test_reverse_mode_runs_bwd_forward_mode_does_not():
    doubled = functools.partial(loss, make(2.0))
    ref = functools.partial(loss, reference)
    args = (W, H0, XS)
    assert_close(doubled(*args), ref(*args), 1e-14, "value")
    g, g_ref = jax.grad(doubled, (0, 1, 2))(*args), jax.grad(ref, (0, 1, 2))(*args)
    assert_close(g, jax.tree.map(lambda x: 2 * x, g_ref), 1e-13, "grad through bwd")
    tangents = (1.0, 0.5, jnp.cos(XS))
    assert_close(
        jax.jvp(doubled, args, tangents)[1], jax.jvp(ref, args, tangents)[1], 1e-13, "jvp"
    )


@pytest.mark.parametrize(
    "name",
    ["hessian", "grad_of_grad", "jvp_of_jvp", "grad_of_jvp", "vmap_grad", "grad_vmap"],
)
def test_every_transform_agrees_with_the_reference(name):
    ours = functools.partial(loss, make())
    ref = functools.partial(loss, reference)
    ws = jnp.linspace(0.1, 0.9, 3, dtype=F64)

    def run(f):
        if name == "hessian":
            return jax.hessian(f, (0, 1, 2))(W, H0, XS)
        if name == "grad_of_grad":
            return jax.grad(jax.grad(f), (0, 2))(W, H0, XS)
        if name == "jvp_of_jvp":
            inner = lambda w: jax.jvp(lambda v: f(v, H0, XS), (w,), (1.0,))[1]
            return jax.jvp(inner, (W,), (1.0,))
        if name == "grad_of_jvp":
            tangent = lambda w, xs: jax.jvp(f, (w, H0, xs), (1.0, 0.0, jnp.sin(xs)))[1]
            return jax.grad(tangent, (0, 1))(W, XS)
        if name == "vmap_grad":  # batched parameters, shared inputs (summed cotangent)
            return jax.vmap(jax.grad(f, (0, 1, 2)), (0, None, None))(ws, H0, XS)
        batch = lambda ws, xs: jnp.sum(jax.vmap(f, (0, None, None))(ws, H0, xs))
        return jax.grad(batch, (0, 1))(ws, XS)

    run = jax.jit(run, static_argnums=0)
    assert_close(run(ours), run(ref), 1e-12, name)


def test_python_float_argument_and_integer_outputs():
    """Python floats become arrays; integer outputs pass through with no tangent."""

    def ref(w, h0, xs):
        h, ys = reference(w, h0, xs)
        return h, jnp.int32(3), ys

    def fwd(*args):
        return ref(*args), ()

    def bwd(args, res, cts, want):
        assert cts[1] is None  # integer output: no cotangent
        out, vjp = jax.vjp(lambda *a: reference(*a), *args)
        cts = (cts[0], jnp.zeros_like(out[1]) if cts[2] is None else cts[2])
        return vjp(cts)

    f = fast_vjp(fwd, bwd, ref)
    g = jax.grad(lambda w: f(w, H0, XS)[0])(0.7)
    g_ref = jax.grad(lambda w: reference(w, H0, XS)[0])(0.7)
    assert_close(g, g_ref, 1e-13, "grad in a Python float")
    assert f(0.7, H0, XS)[1].dtype == jnp.int32
