"""Packed documents through the chunked operators: `resets` in
`ssm.gated_linear_attention`, `ssm.mlstm` and `ssm.delta_rule`.

Every method (recurrent, and chunked at chunk lengths 4, 5 and 6, the last a per-key
tree with leaves of 3 steps) is compared with a float64 step-by-step loop
written below from the recurrence with the reset rule (where `resets[t]`, the state
before step `t` is the zero state, the initial state included), in values and in
gradients to every input through a loss on the outputs and the final state. The reset
patterns put resets at the first step (with a nonzero initial state), at odd positions,
exactly at chunk starts, inside chunks and twice in one chunk. Then forward mode, the
packing property (one call on two documents equals two calls), `vmap`, float32 with a
huge log decay at the reset steps (which must not cost precision) and bad `resets`.
"""

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm

from .helpers import assert_close, ref_delta, ref_gla, ref_mlstm

T, H, DK, DV = 19, 2, 4, 3
f32, f64 = jnp.float32, jnp.float64
# chunk starts at 0, 4, 8, 12, 16 (C = 4), 0, 5, 10, 15 (C = 5), 0, 6, 12, 18 (C = 6)
PATTERNS = {
    "first-step": [0, 4, 6, 9, 10, 17],  # drops h0; two resets in one chunk
    "odd": [3, 8, 9, 13],  # h0 reaches the first three steps
}


def reset_mask(positions, n=T):
    r = np.zeros(n, bool)
    r[positions] = True
    return jnp.asarray(r)


# The references, float64 loops written from the equations, are `ref_gla`,
# `ref_mlstm` and `ref_delta` in tests/helpers.py.


# ------------------------------------------------------------------------- inputs


@pytest.fixture
def rng():
    return np.random.default_rng(zlib.crc32(os.environ["PYTEST_CURRENT_TEST"].encode()))


def draw(rng, shape, dtype=f64, scale=1.0):
    return jnp.asarray(rng.standard_normal(shape) * scale, dtype)


def gla_args(rng, decay, n=T, dtype=f64):
    q, k = draw(rng, (n, H, DK), dtype), draw(rng, (n, H, DK), dtype)
    v = draw(rng, (n, H, DV), dtype)
    shape = (n, H) if decay == "scalar" else (n, H, DK)
    g = jnp.asarray(-rng.uniform(0.02, 0.8, shape), dtype)
    return q, k, v, g, draw(rng, (H, DK, DV), dtype)


def mlstm_args(rng, n=T, dtype=f64):
    q, k = draw(rng, (n, H, DK), dtype), draw(rng, (n, H, DK), dtype, 0.5)
    v = draw(rng, (n, H, DV), dtype)
    log_f = jax.nn.log_sigmoid(draw(rng, (n, H), dtype) + 2.0)
    log_i = draw(rng, (n, H), dtype)
    h0 = (draw(rng, (H, DK, DV), dtype), draw(rng, (H, DK), dtype), draw(rng, (H,), dtype))
    return q, k, v, log_f, log_i, h0


def delta_args(rng, gated, n=T, dtype=f64):
    q, k = draw(rng, (n, H, DK), dtype), draw(rng, (n, H, DK), dtype)
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    v = draw(rng, (n, H, DV), dtype)
    beta = jnp.asarray(rng.uniform(0.1, 1.0, (n, H)), dtype)
    g = jnp.asarray(-rng.uniform(0.02, 0.8, (n, H)), dtype) if gated else None
    return q, k, v, beta, g, draw(rng, (H, DK, DV), dtype)


# ---------------------------------------------------------------- values, gradients


def values_and_grads(fn, args, resets, weights):
    """`fn(*args, resets)`, and the gradients of `sum(out * weights)` to `args`."""

    def loss(args):
        out = fn(*args, resets)
        terms = jax.tree.map(lambda o, w: jnp.sum(o * w), out, weights)
        return sum(jax.tree.leaves(terms)), out

    (_, out), grads = jax.value_and_grad(loss, has_aux=True)(args)
    return out, grads


def check_against_reference(op, ref, args, rng, tol=1e-10):
    run = jax.jit(functools.partial(values_and_grads, op))
    run_ref = jax.jit(functools.partial(values_and_grads, ref))
    out_shape = jax.eval_shape(ref, *args, reset_mask([]))
    for name, positions in PATTERNS.items():
        resets = reset_mask(positions)
        w = jax.tree.map(lambda s: draw(rng, s.shape), out_shape)
        out, grads = run(args, resets, w)
        out_ref, grads_ref = run_ref(args, resets, w)
        assert_close(out, out_ref, tol, f"{name}: values")
        assert_close(grads, grads_ref, tol, f"{name}: gradients")
        if positions[0] == 0:  # the initial state is dropped: no gradient reaches it
            assert all(float(jnp.max(jnp.abs(x))) == 0 for x in jax.tree.leaves(grads[-1]))
        else:
            assert all(float(jnp.max(jnp.abs(x))) > 0 for x in jax.tree.leaves(grads[-1]))


@pytest.mark.parametrize("decay", ["scalar", "per_key"])
@pytest.mark.parametrize("method, C", [("recurrent", 4), ("chunked", 4), ("chunked", 6)])
def test_gla(rng, decay, method, C):
    def op(q, k, v, g, h0, resets):
        fn = ssm.gated_linear_attention
        return fn(q, k, v, g, h0, resets=resets, chunk_size=C, method=method)

    check_against_reference(op, ref_gla, gla_args(rng, decay), rng)


@pytest.mark.parametrize("method, C", [("recurrent", 4), ("chunked", 4), ("chunked", 5)])
def test_mlstm(rng, method, C):
    def op(q, k, v, log_f, log_i, h0, resets):
        h0 = ssm.MLSTMState(*h0)
        out = ssm.mlstm(
            q, k, v, log_f, log_i, h0, resets=resets, chunk_size=C, method=method
        )
        return out

    check_against_reference(op, ref_mlstm, mlstm_args(rng), rng)


@pytest.mark.parametrize(
    "gated, method, C",
    [
        (True, "recurrent", 4),
        (False, "chunked", 4),
        (True, "chunked", 4),
        (True, "chunked", 5),
    ],
)
def test_delta(rng, gated, method, C):
    def op(q, k, v, beta, g, h0, resets):
        fn = ssm.delta_rule
        return fn(q, k, v, beta, g, h0, resets=resets, chunk_size=C, method=method)

    check_against_reference(op, ref_delta, delta_args(rng, gated), rng)


# ------------------------------------------------------------------------ forward mode


def test_jvp(rng):
    resets = reset_mask(PATTERNS["odd"])
    cases = [
        (
            lambda *a: ssm.gated_linear_attention(*a, resets=resets, chunk_size=4),
            lambda *a: ref_gla(*a, resets),
            gla_args(rng, "per_key"),
        ),
        (
            lambda *a: ssm.delta_rule(*a, resets=resets, chunk_size=5),
            lambda *a: ref_delta(*a, resets),
            delta_args(rng, True),
        ),
    ]
    for op, ref, args in cases:
        tangents = jax.tree.map(lambda x: draw(rng, x.shape), args)
        out, t_out = jax.jit(lambda a, t: jax.jvp(op, a, t))(args, tangents)  # noqa: B023
        out_ref, t_ref = jax.jit(lambda a, t: jax.jvp(ref, a, t))(args, tangents)  # noqa: B023
        assert_close(tuple(jax.tree.leaves(out)), tuple(jax.tree.leaves(out_ref)), 1e-10)
        assert_close(tuple(jax.tree.leaves(t_out)), tuple(jax.tree.leaves(t_ref)), 1e-10)


# ------------------------------------------------------------------- packed documents


HALF = 7  # two documents of 7 steps: the boundary at an odd position inside a chunk


def _packing_cases(rng):
    n = 2 * HALF

    def gla(decay):
        def op(q, k, v, g, resets):
            return ssm.gated_linear_attention(q, k, v, g, resets=resets, chunk_size=4)

        return op, gla_args(rng, decay, n)[:4]

    def mlstm(*a):
        *a, resets = a
        out = ssm.mlstm(*a, resets=resets, chunk_size=4)
        return out

    def delta(gated):
        def op(q, k, v, beta, *rest):
            *g, resets = rest
            return ssm.delta_rule(q, k, v, beta, *g, resets=resets, chunk_size=4)

        return op, delta_args(rng, gated, n)[: 5 if gated else 4]

    return {
        "gla-scalar": gla("scalar"),
        "gla-per-key": gla("per_key"),
        "mlstm": (mlstm, mlstm_args(rng, n)[:5]),
        "deltanet": delta(False),
        "gated-deltanet": delta(True),
    }


def test_packing(rng):
    """`op(concat(x1, x2), resets=start of x2) == concat(op(x1), op(x2))`, outputs and
    final state (the two separate calls as one `vmap` over the documents)."""
    for name, (op, args) in _packing_cases(rng).items():
        packed = jax.jit(op)(*args, reset_mask([HALF], 2 * HALF))

        @jax.jit
        def separate(args, op=op):
            docs = [jnp.reshape(x, (2, HALF) + x.shape[1:]) for x in args]
            o, state = jax.vmap(lambda *a: op(*a, None))(*docs)
            o = jnp.reshape(o, (2 * HALF,) + o.shape[2:])
            return o, jax.tree.map(lambda s: s[1], state)

        o, state = separate(args)
        assert_close(packed[0], o, 1e-12, f"{name}: outputs")
        assert_close(packed[1], state, 1e-12, f"{name}: final state")


def test_vmap_gradients(rng):
    """A batch of rows with different resets (as the layers call the operators)."""
    q, k, v, g = (jnp.stack([x, x[::-1]]) for x in gla_args(rng, "per_key")[:4])
    resets = jnp.stack([reset_mask([5]), reset_mask([0, 11, 12])])
    w = draw(rng, v.shape)

    def loss(fn, q, k, v, g, resets):
        return jnp.sum(jax.vmap(fn)(q, k, v, g, resets)[0] * w)

    def op(q, k, v, g, r):
        return ssm.gated_linear_attention(q, k, v, g, resets=r, chunk_size=4)

    def ref(q, k, v, g, r):
        return ref_gla(q, k, v, g, jnp.zeros((H, DK, DV), f64), r)

    grads = jax.jit(jax.grad(functools.partial(loss, op), argnums=(0, 1, 2, 3)))
    grads_ref = jax.jit(jax.grad(functools.partial(loss, ref), argnums=(0, 1, 2, 3)))
    assert_close(grads(q, k, v, g, resets), grads_ref(q, k, v, g, resets), 1e-10)


# -------------------------------------------------------------------------- precision


def test_float32_huge_decay_at_resets(rng):
    """A reset step's log decay has no effect, however large: it is not folded into
    the cumulative decays (a large negative log decay standing in for a reset would
    lose float32 precision in every difference after it)."""
    positions = PATTERNS["first-step"]
    resets = reset_mask(positions)
    for decay in ("per_key",):
        q, k, v, g, h0 = gla_args(rng, decay)
        g = g.at[jnp.asarray(positions)].set(-1e4)
        o_ref, _ = ref_gla(q, k, v, g, h0, resets)
        args = (x.astype(f32) for x in (q, k, v, g, h0))
        o, _ = ssm.gated_linear_attention(*args, resets=resets, chunk_size=8)
        assert_close(o.astype(f64), o_ref, 1e-5, decay)
    q, k, v, beta, g, h0 = delta_args(rng, True)
    g = g.at[jnp.asarray(positions)].set(-1e4)
    o_ref, _ = ref_delta(q, k, v, beta, g, h0, resets)
    args = (x.astype(f32) for x in (q, k, v, beta, g, h0))
    o, _ = ssm.delta_rule(*args, resets=resets, chunk_size=8)
    assert_close(o.astype(f64), o_ref, 1e-5, "delta")


# ------------------------------------------------------------------------- bad inputs


@pytest.mark.parametrize(
    "resets, error, match",
    [
        (np.zeros(T, np.int32), TypeError, "dtype bool"),
        (np.zeros(T + 1, bool), ValueError, r"shape \(T,\) = \(19,\)"),
        (np.zeros((T, 1), bool), ValueError, r"shape \(T,\) = \(19,\)"),
    ],
)
def test_bad_resets(rng, resets, error, match):
    q, k, v, g, _ = gla_args(rng, "scalar")
    beta = jnp.ones((T, H), f64)
    with pytest.raises(error, match=match):
        ssm.gated_linear_attention(q, k, v, g, resets=resets)
    with pytest.raises(error, match=match):
        ssm.mlstm(q, k, v, g, g, resets=resets)
    with pytest.raises(error, match=match):
        ssm.delta_rule(q, k, v, beta, g, resets=resets)
