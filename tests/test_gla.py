"""Gated linear attention and mLSTM operators (`ssm.gated_linear_attention`, `ssm.mlstm`).

Every chunked form is compared with a float64 step-by-step loop written below from the
recurrence's equations, in values and gradients (to q, k, v, the gates and the initial
state, through a loss on both the outputs and the final state), at lengths that are not
multiples of the chunk size, for two chunk sizes; then bfloat16 inputs, extreme decays,
the one-step forms, input checks and the memory of the backward pass.
"""

import functools
import os
import zlib

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm

from .helpers import assert_close, ref_gla, ref_mlstm, rel_err

H, DK, DV = 2, 8, 5
f32, f64, bf16 = jnp.float32, jnp.float64, jnp.bfloat16


# References: `ref_gla`, `ref_mlstm` (tests/helpers.py), float64 loops written from the
# equations.


# ------------------------------------------------------------------------- inputs
# NumPy draws: eager `jax.random` calls would compile a program per shape.


@pytest.fixture
def rng():
    """A NumPy generator seeded per test."""
    return np.random.default_rng(
        zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode())
    )


def draw(rng, shape, dtype=f64, scale=1.0, shift=0.0):
    return jnp.asarray(rng.standard_normal(shape) * scale + shift, dtype)


def gla_inputs(rng, T, decay, dtype=f64):
    q = draw(rng, (T, H, DK), dtype)
    k = draw(rng, (T, H, DK), dtype, 1 / np.sqrt(DK))
    v = draw(rng, (T, H, DV), dtype)
    shape = {"none": None, "scalar": (T, H), "per_key": (T, H, DK)}[decay]
    # forget gates sigmoid(N(2, 2)): log decays from about -5 to -0.0003
    g = None if shape is None else jax.nn.log_sigmoid(draw(rng, shape, dtype, 2.0, 2.0))
    h0 = draw(rng, (H, DK, DV), dtype)
    return q, k, v, g, h0


def mlstm_inputs(rng, T, dtype=f64):
    q = draw(rng, (T, H, DK), dtype)
    k = draw(rng, (T, H, DK), dtype, 1 / np.sqrt(DK))
    v = draw(rng, (T, H, DV), dtype)
    log_f = jax.nn.log_sigmoid(draw(rng, (T, H), dtype, 1.0, 3.0))
    log_i = draw(rng, (T, H), dtype, 3.0)  # exponential input gate, a wide spread
    state = ssm.MLSTMState(
        draw(rng, (H, DK, DV), dtype), draw(rng, (H, DK), dtype), draw(rng, (H,), dtype)
    )
    return q, k, v, log_f, log_i, state


def loss_and_grads(fn, argnums):
    """jit once: outputs, final state, and the gradients of `sum(w * outputs) + sum(w'
    * final state)` for fixed random weights `w, w'`."""

    @jax.jit
    def run(weights, *args):
        def loss(*args):
            o, state = fn(*args)
            leaves = jax.tree.leaves(state)
            total = jnp.sum(o.astype(f64) * weights[0])
            for x, w in zip(leaves, weights[1:], strict=True):
                total = total + jnp.sum(x.astype(f64) * w)
            return total, (o, state)

        grads, (o, state) = jax.grad(loss, argnums, has_aux=True)(*args)
        return o, state, grads

    return run


def weights(rng, T, d_v, state_shapes):
    """Weights of the loss: one for the outputs `(T, H, d_v)`, one per state leaf."""
    shapes = [(T, H, d_v), *state_shapes]
    return [jnp.asarray(rng.standard_normal(s), f64) for s in shapes]


GLA_STATE = [(H, DK, DV)]
MLSTM_STATE = [(H, DK, DV), (H, DK), (H,)]


# ------------------------------------------------------------------ gated linear attention


@functools.cache
def gla_runner(chunk_size):
    return loss_and_grads(
        lambda *a: ssm.gated_linear_attention(*a, chunk_size=chunk_size), range(5)
    )


@functools.cache
def mlstm_runner(chunk_size):
    return loss_and_grads(lambda *a: ssm.mlstm(*a, chunk_size=chunk_size), range(6))


ref_gla_runner = loss_and_grads(ref_gla, range(5))
ref_mlstm_runner = loss_and_grads(ref_mlstm, range(6))
# (T, chunk_size): one step; a partial chunk; several chunks and a partial one, twice;
# two groups of chunks (the operators scan over groups of 256 steps), the last partial
LENGTHS = [(1, 64), (37, 16), (100, 16), (100, 64), (300, 16)]


@pytest.mark.parametrize("decay", ["scalar", "per_key"])
@pytest.mark.parametrize("T, chunk_size", LENGTHS)
def test_gla_matches_float64_loop(decay, T, chunk_size, rng):
    q, k, v, g, h0 = gla_inputs(rng, T, decay)
    w = weights(rng, T, DV, GLA_STATE)
    o, S, grads = gla_runner(chunk_size)(w, q, k, v, g, h0)
    o_ref, S_ref, grads_ref = ref_gla_runner(w, q, k, v, g, h0)
    assert o.dtype == S.dtype == f64 and o.shape == (T, H, DV)
    assert_close(o, o_ref, 1e-12, "outputs")
    assert_close(S, S_ref, 1e-12, "final state")
    for name, d, d_ref in zip(
        ("q", "k", "v", "log_decay", "h0"), grads, grads_ref, strict=True
    ):
        assert_close(d, d_ref, 1e-11, f"gradient of {name}")


def test_gla_no_decay_and_methods_agree(rng):
    """`log_decay=None` is plain linear attention; recurrent == chunked == steps."""
    q, k, v, _, h0 = gla_inputs(rng, 37, "none")

    @jax.jit
    def forms(q, k, v, h0):
        chunked = ssm.gated_linear_attention(q, k, v, None, h0, chunk_size=8)
        recurrent = ssm.gated_linear_attention(q, k, v, None, h0, method="recurrent")

        def body(S, x):
            o, S = ssm.gated_linear_attention_step(*x, None, S)
            return S, o

        S, o = jax.lax.scan(body, h0, (q, k, v))
        return chunked, recurrent, (o, S)

    chunked, recurrent, stepped = forms(q, k, v, h0)
    zeros = jnp.zeros((37, H), f64)
    assert_close(chunked, ref_gla(q, k, v, zeros, h0), 1e-12, "no decay")
    assert_close(recurrent, chunked, 1e-12, "recurrent")
    assert_close(stepped, chunked, 1e-12, "steps")


def test_gla_step_per_key(rng):
    q, k, v, g, h0 = gla_inputs(rng, 11, "per_key")

    @jax.jit
    def stepped(q, k, v, g, h0):
        def body(S, x):
            o, S = ssm.gated_linear_attention_step(*x, S)
            return S, o

        S, o = jax.lax.scan(body, h0, (q, k, v, g))
        return o, S

    assert_close(stepped(q, k, v, g, h0), ref_gla(q, k, v, g, h0), 1e-12, "per-key steps")


@pytest.mark.parametrize("decay", ["scalar", "per_key"])
def test_gla_bfloat16_inputs(decay, rng):
    """bfloat16 in: outputs in bfloat16, state and accumulation in float32; gradients
    (to q, k, v and the decays in bfloat16, to the float32 `h0` in float32) close."""
    q, k, v, g, h0 = gla_inputs(rng, 100, decay, f32)
    q, k, v, g = (x.astype(bf16) for x in (q, k, v, g))
    w = weights(rng, 100, DV, GLA_STATE)
    o, S, grads = gla_runner(16)(w, q, k, v, g, h0)
    up = [x.astype(f64) for x in (q, k, v, g, h0)]
    o_ref, S_ref, grads_ref = ref_gla_runner(w, *up)
    assert o.dtype == bf16 and S.dtype == f32
    assert grads[0].dtype == grads[3].dtype == bf16 and grads[4].dtype == f32
    assert rel_err(o.astype(f64), o_ref) < 1e-2
    assert rel_err(S, S_ref) < 1e-5  # float32 accumulation
    for d, d_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(d.astype(f64), d_ref) < 2e-2


@pytest.mark.parametrize("decay", ["scalar", "per_key"])
def test_gla_extreme_decays_do_not_overflow(decay, rng):
    """Log decays down to -300 per step (products far below float32's range), float32."""
    q, k, v, g, h0 = gla_inputs(rng, 150, decay, f32)
    g = g * 50 + jnp.asarray(np.where(rng.random(g.shape) < 0.2, -40.0, 0.0), f32)
    w = weights(rng, 150, DV, GLA_STATE)
    o, S, grads = gla_runner(16)(w, q, k, v, g, h0)
    up = [x.astype(f64) for x in (q, k, v, g, h0)]
    o_ref, S_ref, grads_ref = ref_gla_runner(w, *up)
    assert float(jnp.min(g)) < -60
    for x in (o, S, *grads):
        assert bool(jnp.all(jnp.isfinite(x)))
    assert rel_err(o, o_ref) < 1e-4 and rel_err(S, S_ref) < 1e-4
    for d, d_ref in zip(grads, grads_ref, strict=True):
        assert rel_err(d, d_ref) < 1e-3


def test_gla_vmap_and_zero_initial_state(rng):
    q, k, v, g, _ = gla_inputs(rng, 20, "per_key", f32)
    batch = jax.tree.map(lambda x: jnp.stack([x, 2 * x]), (q, k, v))

    def fn(q, k, v):
        return ssm.gated_linear_attention(q, k, v, g, chunk_size=8)

    @jax.jit
    def run(b):
        return jax.vmap(fn)(*b), fn(b[0][1], b[1][1], b[2][1])

    (o, S), (o1, S1) = run(batch)
    assert o.shape == (2, 20, H, DV) and S.shape == (2, H, DK, DV)
    assert_close(o[1], o1, 1e-5, "vmap")
    assert_close(S[1], S1, 1e-5, "vmap state")
    assert_close(o[1], 8 * o[0], 1e-5, "scaling")  # o(2q, 2k, 2v) = 8 o(q, k, v)


def test_default_chunk_size(rng):
    """`chunk_size=None` is 32 on the CPU backend (64 elsewhere), for both operators."""
    assert jax.default_backend() == "cpu"
    q, k, v, g, h0 = gla_inputs(rng, 70, "per_key", f64)
    default = ssm.gated_linear_attention(q, k, v, g, h0)
    for C, same in ((32, True), (64, False)):
        other = ssm.gated_linear_attention(q, k, v, g, h0, chunk_size=C)
        assert same == all(
            np.array_equal(x, y)
            for x, y in zip(jax.tree.leaves(default), jax.tree.leaves(other), strict=True)
        ), C
        assert_close(other, default, 1e-10, f"chunk {C}")
    log_f, log_i = g[..., 0], g[..., 1]
    default = ssm.mlstm(q, k, v, log_f, log_i)
    assert_close(ssm.mlstm(q, k, v, log_f, log_i, chunk_size=32), default, 0.0, "mlstm")


def test_gla_backward_memory_is_chunk_bounded():
    """Forward+backward temp memory stays far below the state history `T x S`, and
    grows with `T` by much less than one state per step."""
    h, d = 2, 32

    def temp(T):
        x = jax.ShapeDtypeStruct((T, h, d), f32)

        def loss(q, k, v, g):
            o, S = ssm.gated_linear_attention(q, k, v, g)
            return jnp.sum(o**2) + jnp.sum(S)

        f = jax.jit(jax.grad(loss, argnums=(0, 1, 2, 3)))
        g = jax.ShapeDtypeStruct((T, h), f32)
        return f.lower(x, x, x, g).compile().memory_analysis().temp_size_in_bytes

    state = h * d * d * 4
    t1, t2 = temp(2048), temp(4096)
    assert t2 < 4096 * state / 8, (t2, 4096 * state)
    assert (t2 - t1) / 2048 < state / 4, ((t2 - t1) / 2048, state)


def test_gla_input_errors():
    q = jnp.zeros((5, H, DK))
    v = jnp.zeros((5, H, DV))
    with pytest.raises(ValueError, match=r"`k` must have shape.*\(5, 2, 8\)"):
        ssm.gated_linear_attention(q, q[:, :, :3], v)
    with pytest.raises(ValueError, match=r"`v` must have shape \(T, H, d_v\) = \(5, 2"):
        ssm.gated_linear_attention(q, q, v[:4])
    with pytest.raises(
        ValueError, match=r"`log_decay` must have shape \(T, H\) = \(5, 2\)"
    ):
        ssm.gated_linear_attention(q, q, v, jnp.zeros((5, H, DV + 1)))
    with pytest.raises(ValueError, match=r"`h0` must have shape.*\(2, 8, 5\)"):
        ssm.gated_linear_attention(q, q, v, None, jnp.zeros((H, DV, DK)))
    with pytest.raises(ValueError, match="jax.vmap"):
        ssm.gated_linear_attention(q[None], q[None], v[None])
    with pytest.raises(TypeError, match="floating"):
        ssm.gated_linear_attention(q.astype(jnp.int32), q, v)
    with pytest.raises(TypeError, match="share a dtype"):
        ssm.gated_linear_attention(q, q.astype(f32), v)
    with pytest.raises(ValueError, match="method"):
        ssm.gated_linear_attention(q, q, v, method="parallel")
    with pytest.raises(ValueError, match="chunk_size"):
        ssm.gated_linear_attention(q, q, v, chunk_size=0)


# -------------------------------------------------------------------------------- mLSTM


@pytest.mark.parametrize("T, chunk_size", [(1, 16), (37, 16), (100, 64), (300, 16)])
def test_mlstm_matches_float64_loop(T, chunk_size, rng):
    args = mlstm_inputs(rng, T)
    w = weights(rng, T, DV, MLSTM_STATE)
    h, state, grads = mlstm_runner(chunk_size)(w, *args)
    h_ref, state_ref, grads_ref = ref_mlstm_runner(w, *args)
    assert h.dtype == f64 and isinstance(state, ssm.MLSTMState)
    assert_close(h, h_ref, 1e-11, "outputs")
    assert_close(tuple(state), state_ref, 1e-11, "final state (C, n, m)")
    names = ("q", "k", "v", "log_forget", "log_input", "initial state")
    for name, d, d_ref in zip(names, grads, grads_ref, strict=True):
        assert_close(d, d_ref, 1e-10, f"gradient of {name}")


def test_mlstm_is_the_unstabilised_cell(rng):
    """With `eps = 0` the stabilised cell equals `h = C^T q / max(|n . q|, 1)` with
    `C[t] = f C[t-1] + exp(i~) k v^T` computed directly (moderate gates, float64)."""
    q, k, v, log_f, log_i, _ = mlstm_inputs(rng, 30)

    @jax.jit
    def both(q, k, v, log_f, log_i):
        log_i = log_i / 3
        h = ssm.mlstm(q, k, v, log_f, log_i, eps=0.0, chunk_size=8)[0]
        F = jnp.cumsum(log_f, axis=0)
        w = jnp.exp(F[:, None] - F[None, :] + log_i[None, :])  # (t, s, H)
        w = jnp.where(jnp.tril(jnp.ones((30, 30), bool))[:, :, None], w, 0.0)
        num = jnp.einsum("tsh,shk,shv,thk->thv", w, k, v, q)
        den = jnp.einsum("tsh,shk,thk->th", w, k, q)
        return h, num / jnp.maximum(jnp.abs(den), 1.0)[..., None]

    h, h_direct = both(q, k, v, log_f, log_i)
    assert_close(h, h_direct, 1e-12)


def test_mlstm_recurrent_and_step_forms(rng):
    q, k, v, log_f, log_i, state = mlstm_inputs(rng, 23)

    @jax.jit
    def forms(*args):
        chunked = ssm.mlstm(*args, chunk_size=8)
        recurrent = ssm.mlstm(*args, method="recurrent")

        def body(s, x):
            h, s = ssm.mlstm_step(*x, s)
            return s, h

        s, h = jax.lax.scan(body, args[-1], args[:-1])
        # the default initial state: zeros and m = 0
        zero = jax.tree.map(jnp.zeros_like, args[-1])
        default = (
            ssm.mlstm(*args[:-1], chunk_size=8),
            ssm.mlstm(*args[:-1], zero, chunk_size=8),
        )
        return chunked, recurrent, (h, s), default

    chunked, recurrent, stepped, default = forms(q, k, v, log_f, log_i, state)
    assert_close(recurrent, chunked, 1e-12, "recurrent")
    assert_close(stepped, chunked, 1e-12, "steps")
    assert_close(default[0], default[1], 1e-14, "default state")


def test_mlstm_bfloat16(rng):
    args = mlstm_inputs(rng, 100, f32)
    low = [x.astype(bf16) for x in args[:5]]
    h, state = jax.jit(lambda *a: ssm.mlstm(*a, args[5], chunk_size=16))(*low)
    h_ref, state_ref = ref_mlstm(
        *[x.astype(f64) for x in low], [x.astype(f64) for x in args[5]]
    )
    assert h.dtype == bf16 and state.C.dtype == f32
    assert rel_err(h.astype(f64), h_ref) < 1e-2
    assert rel_err(tuple(state), state_ref) < 1e-5


def test_mlstm_input_errors():
    q = jnp.zeros((5, H, DK))
    v = jnp.zeros((5, H, DV))
    gate = jnp.zeros((5, H))
    with pytest.raises(ValueError, match=r"`log_input` must have shape \(T, H\)"):
        ssm.mlstm(q, q, v, gate, gate[:, :1])
    with pytest.raises(TypeError, match="MLSTMState"):
        ssm.mlstm(q, q, v, gate, gate, jnp.zeros((H, DK, DV)))
    bad = ssm.MLSTMState(jnp.zeros((H, DK, DV)), jnp.zeros((H, DV)), jnp.zeros((H,)))
    with pytest.raises(ValueError, match=r"`h0.n` must have shape"):
        ssm.mlstm(q, q, v, gate, gate, bad)
