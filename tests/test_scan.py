"""``ssm.linear_scan`` and ``ssm.matrix_scan`` against float64 loop references."""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from hypothesis import given, settings, strategies as st
from jax import lax

import ssm

from .helpers import assert_close, decay, normal

METHODS = ["sequential", "associative", "chunked"]
C128 = jnp.complex128
F64 = jnp.float64


# ---------------------------------------------------------------------------
# References: the recurrence written as a plain loop, differentiated by JAX.


def ref_linear_scan(a, b, h0, reverse=False, resets=None):
    T = b.shape[0]
    a = jnp.broadcast_to(a, b.shape)
    keep = jnp.ones((T,), bool) if resets is None else ~resets

    def step(h, xs):
        a_t, b_t, keep_t = xs
        h = jnp.where(keep_t, a_t * h, jnp.zeros_like(h)) + b_t
        return h, h

    _, hs = lax.scan(step, h0, (a, b, keep), reverse=reverse)
    return hs


def ref_matrix_scan(A, b, h0, reverse=False, resets=None):
    T = b.shape[0]
    A = jnp.broadcast_to(A, (T,) + A.shape[-2:])
    keep = jnp.ones((T,), bool) if resets is None else ~resets

    def step(h, xs):
        A_t, b_t, keep_t = xs
        h = jnp.where(keep_t, A_t @ h, jnp.zeros_like(h)) + b_t
        return h, h

    _, hs = lax.scan(step, h0, (A, b, keep), reverse=reverse)
    return hs


def assert_values_vjp_jvp(ours, ref, args, ct, tangents, tol=1e-10):
    """`ours(*args)` equals `ref(*args)` in values, in the VJP of the cotangent `ct`
    and in the JVP of `tangents`, all from one compiled program.
    **Returns:** both outputs."""

    @jax.jit
    def run(*args):
        out, vjp = jax.vjp(ours, *args)
        _, tan = jax.jvp(ours, args, tangents)
        out_ref, vjp_ref = jax.vjp(ref, *args)
        _, tan_ref = jax.jvp(ref, args, tangents)
        return (out, vjp(ct), tan), (out_ref, vjp_ref(ct), tan_ref)

    (out, grads, tan), (out_ref, grads_ref, tan_ref) = run(*args)
    assert_close(out, out_ref, tol, "values")
    assert_close(grads, grads_ref, tol, "vjp")
    assert_close(tan, tan_ref, tol, "jvp")
    return out, out_ref


# ---------------------------------------------------------------------------
# Case tables: each row mixes several features so that every method meets every
# feature without a full cross product of compilations.

# (T, state shape, shape of a, dtype, reverse, h0, resets, chunk_size)
LINEAR_CASES = [
    (1, (3,), "full", F64, False, True, False, None),
    (2, (4, 3), "key", C128, True, False, True, None),
    (3, (4, 3), "scalar", F64, False, True, True, 2),
    (17, (5,), "full", C128, False, True, True, 4),
    (17, (4, 3), "invariant", F64, True, True, False, None),
    (301, (4, 3), "key", F64, True, True, True, None),
    (301, (2, 3), "scalar", C128, False, False, False, 32),
    (257, (6,), "full", F64, False, True, True, None),
    (129, (3,), "invariant", C128, True, True, True, 16),
]


def _a_shape(kind, T, S):
    return {
        "full": (T,) + S,
        "key": (T,) + S[:1] + (1,) * (len(S) - 1),
        "scalar": (T,) + (1,) * len(S),
        "invariant": S,
    }[kind]


def _linear_inputs(getkey, T, S, kind, dtype, with_h0, with_resets):
    a = decay(getkey(), _a_shape(kind, T, S), dtype)
    b = normal(getkey(), (T,) + S, dtype)
    h0 = normal(getkey(), S, dtype) if with_h0 else None
    resets = jax.random.bernoulli(getkey(), 0.15, (T,)) if with_resets else None
    return a, b, h0, resets


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", LINEAR_CASES, ids=lambda c: f"T{c[0]}-{c[2]}")
def test_linear_scan_values_vjp_jvp(getkey, method, case):
    T, S, kind, dtype, reverse, with_h0, with_resets, chunk = case
    a, b, h0, resets = _linear_inputs(getkey, T, S, kind, dtype, with_h0, with_resets)
    h0_ref = jnp.zeros(S, dtype) if h0 is None else h0
    ct = normal(getkey(), (T,) + S, dtype)
    tangents = tuple(normal(getkey(), x.shape, dtype) for x in (a, b, h0_ref))

    ours = functools.partial(
        ssm.linear_scan, reverse=reverse, resets=resets, method=method, chunk_size=chunk
    )
    ref = functools.partial(ref_linear_scan, reverse=reverse, resets=resets)

    out, out_ref = assert_values_vjp_jvp(ours, ref, (a, b, h0_ref), ct, tangents)
    assert out.dtype == dtype
    if h0 is None:  # the default state really is zero
        assert_close(ours(a, b), out_ref, 1e-10, "h0=None")


# (T, N, M or None, time-varying A, dtype, reverse, h0, resets, chunk_size)
MATRIX_CASES = [
    (1, 3, None, True, F64, False, True, False, None),
    (2, 3, 2, True, C128, True, True, True, None),
    (17, 4, None, True, F64, True, False, True, 4),
    (17, 3, 2, False, F64, False, True, True, None),
    (131, 4, 3, True, F64, False, True, False, 16),
    (131, 2, None, True, C128, True, True, True, None),
]


@pytest.mark.parametrize("method", METHODS)
@pytest.mark.parametrize("case", MATRIX_CASES, ids=lambda c: f"T{c[0]}-N{c[1]}-M{c[2]}")
def test_matrix_scan_values_vjp_jvp(getkey, method, case):
    T, N, M, varying, dtype, reverse, with_h0, with_resets, chunk = case
    state = (N,) if M is None else (N, M)
    # Transitions with spectral norm < 1, so long products stay bounded.
    A = normal(getkey(), ((T,) if varying else ()) + (N, N), dtype) * (
        1 / (1.5 * np.sqrt(N))
    ).astype(dtype)
    b = normal(getkey(), (T,) + state, dtype)
    h0 = normal(getkey(), state, dtype) if with_h0 else jnp.zeros(state, dtype)
    resets = jax.random.bernoulli(getkey(), 0.15, (T,)) if with_resets else None
    ct = normal(getkey(), (T,) + state, dtype)
    tangents = tuple(normal(getkey(), x.shape, dtype) for x in (A, b, h0))

    ours = functools.partial(
        ssm.matrix_scan, reverse=reverse, resets=resets, method=method, chunk_size=chunk
    )
    ref = functools.partial(ref_matrix_scan, reverse=reverse, resets=resets)

    assert_values_vjp_jvp(ours, ref, (A, b, h0), ct, tangents)


@pytest.mark.parametrize("method", METHODS)
def test_vmap(getkey, method):
    B, T, S = 3, 19, (4, 2)
    a = decay(getkey(), (B, T, 4, 1))
    b = normal(getkey(), (B, T) + S)
    h0 = normal(getkey(), S)
    resets = jax.random.bernoulli(getkey(), 0.2, (T,))
    ours = functools.partial(ssm.linear_scan, resets=resets, method=method)
    ref = functools.partial(ref_linear_scan, resets=resets)
    # Batched a and b with a shared h0; then a shared a with batched b, batch axis 1.
    out = jax.jit(jax.vmap(ours, in_axes=(0, 0, None)))(a, b, h0)
    expect = jax.jit(jax.vmap(ref, in_axes=(0, 0, None)))(a, b, h0)
    assert_close(out, expect, 1e-10, "vmap 1")
    b1 = jnp.moveaxis(b, 0, 1)
    out = jax.jit(jax.vmap(ours, in_axes=(None, 1, None), out_axes=1))(a[0], b1, h0)
    expect = jax.jit(jax.vmap(ref, in_axes=(None, 1, None), out_axes=1))(a[0], b1, h0)
    assert_close(out, expect, 1e-10, "vmap 2")
    # Gradients through vmap, and vmap of gradients.
    loss = lambda f: lambda a, b: jnp.sum(jnp.sin(jax.vmap(f, (0, 0, None))(a, b, h0)))
    assert_close(
        jax.jit(jax.grad(loss(ours), (0, 1)))(a, b),
        jax.jit(jax.grad(loss(ref), (0, 1)))(a, b),
        1e-10,
        "grad",
    )
    A = normal(getkey(), (B, T, 3, 3)) / 3
    x = normal(getkey(), (B, T, 3))
    mat = functools.partial(ssm.matrix_scan, method=method)
    assert_close(
        jax.jit(jax.vmap(mat))(A, x),
        jax.vmap(ref_matrix_scan, (0, 0, None))(A, x, jnp.zeros(3)),
        1e-10,
        "matrix vmap",
    )


@pytest.mark.parametrize("method", METHODS)
def test_second_order(getkey, method):
    T = 6
    a = decay(getkey(), (T, 2))
    b = normal(getkey(), (T, 2))
    h0 = normal(getkey(), (2,))

    def loss(scan):
        return lambda a, b, h0: jnp.sum(jnp.sin(scan(a, b, h0)) ** 2)

    ours = loss(functools.partial(ssm.linear_scan, method=method, reverse=True))
    ref = loss(functools.partial(ref_linear_scan, reverse=True))
    # Forward-over-reverse (jax.hessian) and reverse-over-reverse.
    assert_close(
        jax.jit(jax.hessian(ours, (0, 1, 2)))(a, b, h0),
        jax.jit(jax.hessian(ref, (0, 1, 2)))(a, b, h0),
        1e-9,
        "hessian",
    )
    v = normal(getkey(), a.shape)
    rr = lambda f: jax.grad(lambda a, b: jnp.vdot(jax.grad(f)(a, b, h0), v), (0, 1))
    assert_close(jax.jit(rr(ours))(a, b), jax.jit(rr(ref))(a, b), 1e-9, "grad of grad")
    A = normal(getkey(), (T, 2, 2)) / 2
    mloss = lambda scan: lambda A, b: jnp.sum(jnp.cos(scan(A, b, h0)))
    m_ours = mloss(functools.partial(ssm.matrix_scan, method=method))
    assert_close(
        jax.jit(jax.hessian(m_ours, (0, 1)))(A, b),
        jax.jit(jax.hessian(mloss(ref_matrix_scan), (0, 1)))(A, b),
        1e-9,
        "matrix hessian",
    )


def test_methods_agree_and_auto(getkey):
    a = decay(getkey(), (1000, 8), jnp.float32)
    b = normal(getkey(), (1000, 8), jnp.float32)
    outs = {m: ssm.linear_scan(a, b, method=m) for m in METHODS + ["auto"]}
    ref = ref_linear_scan(a.astype(F64), b.astype(F64), jnp.zeros(8))
    for m, out in outs.items():
        assert out.dtype == jnp.float32
        assert_close(out, ref, 1e-5, m)


def test_bfloat16_long_scan_accumulates_in_float32(getkey):
    T, D = 65536, 8
    a = jax.random.uniform(getkey(), (T, D), F64, 0.5, 0.9999).astype(jnp.bfloat16)
    b = normal(getkey(), (T, D)).astype(jnp.bfloat16)
    out = jax.jit(ssm.linear_scan)(a, b)
    assert out.dtype == jnp.float32
    assert bool(jnp.all(jnp.isfinite(out)))
    ref = ref_linear_scan(a.astype(F64), b.astype(F64), jnp.zeros(D))
    assert_close(out, ref, 1e-2, "bfloat16")
    # Gradients come back in the inputs' dtype and stay finite.
    da, db = jax.grad(lambda a, b: jnp.sum(ssm.linear_scan(a, b)[-100:]), (0, 1))(a, b)
    assert da.dtype == db.dtype == jnp.bfloat16
    assert bool(jnp.all(jnp.isfinite(da.astype(F64))))


def test_mixed_real_decay_complex_input(getkey):
    T = 23
    a = decay(getkey(), (T, 3))
    b = normal(getkey(), (T, 3), C128)
    f = lambda a, b: jnp.sum(jnp.abs(ssm.linear_scan(a, b)) ** 2)
    g = lambda a, b: jnp.sum(
        jnp.abs(ref_linear_scan(a.astype(C128), b, jnp.zeros(3, C128))) ** 2
    )
    ga, gb = jax.grad(f, (0, 1))(a, b)
    ra, rb = jax.grad(g, (0, 1))(a, b)
    assert ga.dtype == F64
    assert_close((ga, gb), (jnp.real(ra), rb), 1e-10, "mixed grads")


# ---------------------------------------------------------------------------
# Bad input.


@pytest.mark.parametrize(
    "args, kwargs, err, match",
    [
        ((np.ones((5, 3)), np.ones((4, 3))), {}, ValueError, r"`a`.*\(5, 3\).*\(4, 3\)"),
        ((np.ones((4, 2)), np.ones((4, 3))), {}, ValueError, r"does not broadcast"),
        ((np.ones((4, 3)), np.ones((4, 3), np.int32)), {}, TypeError, r"`b`.*int32"),
        ((np.ones((4, 3), np.int32), np.ones((4, 3))), {}, TypeError, r"`a`.*int32"),
        ((np.ones((4, 3)), np.ones((4, 3))), {"method": "magic"}, ValueError, r"magic"),
        (
            (np.ones((4, 3)), np.ones((4, 3))),
            {"resets": np.ones(4)},
            TypeError,
            r"resets.*bool",
        ),
        (
            (np.ones((4, 3)), np.ones((4, 3))),
            {"resets": np.ones(5, bool)},
            ValueError,
            r"resets.*\(4,\).*\(5,\)",
        ),
        ((np.ones((4, 3)), np.ones((4, 3)), np.ones(2)), {}, ValueError, r"`h0`.*\(2,\)"),
        ((np.ones((4, 3)), np.ones((4, 3))), {"chunk_size": 0}, ValueError, r"chunk_size"),
    ],
)
def test_linear_scan_bad_input(args, kwargs, err, match):
    with pytest.raises(err, match=match):
        ssm.linear_scan(*[jnp.asarray(x) for x in args], **kwargs)


@pytest.mark.parametrize(
    "A, b, match",
    [
        ((4, 3, 2), (4, 3), r"`A`.*\(4, 3, 3\)"),
        ((5, 3, 3), (4, 3), r"lengths differ"),
        ((4, 3, 3), (4,), r"`b`.*\(T, N\)"),
    ],
)
def test_matrix_scan_bad_input(A, b, match):
    with pytest.raises(ValueError, match=match):
        ssm.matrix_scan(jnp.ones(A), jnp.ones(b))


# ---------------------------------------------------------------------------
# Property-based: random lengths, state shapes, broadcasting and chunk sizes.


@st.composite
def _scan_problem(draw):
    T = draw(st.integers(1, 40))
    S = tuple(draw(st.lists(st.integers(1, 3), min_size=0, max_size=2)))
    # Each state axis of `a` is either full or broadcast; its time axis too.
    a_shape = tuple(n if draw(st.booleans()) else 1 for n in S)
    a_time = T if draw(st.booleans()) else 1
    method = draw(st.sampled_from(METHODS))
    chunk = draw(st.one_of(st.none(), st.integers(1, T)))
    reverse = draw(st.booleans())
    seed = draw(st.integers(0, 2**31 - 1))
    return T, S, (a_time,) + a_shape, method, chunk, reverse, seed


@settings(max_examples=25, deadline=None, derandomize=True)
@given(_scan_problem())
def test_linear_scan_property(problem):
    T, S, a_shape, method, chunk, reverse, seed = problem
    rng = np.random.default_rng(seed)
    a = rng.uniform(-1, 1, a_shape)
    b = rng.normal(size=(T,) + S)
    h0 = rng.normal(size=S)
    resets = rng.random(T) < 0.2
    out = ssm.linear_scan(
        jnp.asarray(a),
        jnp.asarray(b),
        jnp.asarray(h0),
        reverse=reverse,
        resets=jnp.asarray(resets),
        method=method,
        chunk_size=chunk,
    )
    # Reference: the recurrence as a plain Python loop in float64.
    a_full = np.broadcast_to(a, b.shape)
    expect = np.empty_like(b)
    h = h0
    for t in range(T - 1, -1, -1) if reverse else range(T):
        h = (0.0 if resets[t] else a_full[t]) * h + b[t]
        expect[t] = h
    np.testing.assert_allclose(np.asarray(out), expect, rtol=1e-10, atol=1e-12)
