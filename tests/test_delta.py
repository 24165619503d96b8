"""The (gated) delta rule: `ssm.delta_rule` (chunked, recurrent) and `ssm.delta_rule_step`.

Every form is compared with a float64 reference written below from the papers'
equation, `S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ`, `o[t] = S[t]ᵀ q[t]`
(the transition formed as a full matrix, one step at a time), in values and in the
gradients to q, k, v, β, the gates and the initial state, at lengths that are not
multiples of the chunk size.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm

from .helpers import assert_close, normal, rel_err

H, DK, DV = 3, 8, 5
f32, f64, bf16 = jnp.float32, jnp.float64, jnp.bfloat16


def inputs(key, T, gated, dtype=f64, log_low=-1.2):
    """Random inputs as layers make them: unit keys, β in (0.05, 1), α in (0.3, 0.99)."""
    kq, kk, kv, kb, kg, kh = jax.random.split(key, 6)
    k = normal(kk, (T, H, DK))
    k = k / jnp.linalg.norm(k, axis=-1, keepdims=True)
    log_decay = None
    if gated:
        log_decay = jax.random.uniform(kg, (T, H), f64, log_low, -0.01).astype(dtype)
    return dict(
        q=normal(kq, (T, H, DK)).astype(dtype),
        k=k.astype(dtype),
        v=normal(kv, (T, H, DV)).astype(dtype),
        beta=jax.random.uniform(kb, (T, H), f64, 0.05, 1.0).astype(dtype),
        log_decay=log_decay,
        h0=normal(kh, (H, DK, DV)).astype(dtype),
    )


def reference(q, k, v, beta, log_decay, h0):
    """The recurrence as written in the papers, in a time loop over full matrices."""
    eye = jnp.eye(DK, dtype=f64)
    alpha = jnp.ones(beta.shape, f64) if log_decay is None else jnp.exp(log_decay)

    def step(S, x):
        q_t, k_t, v_t, b_t, a_t = x
        kk = k_t[:, :, None] * k_t[:, None, :]
        transition = a_t[:, None, None] * (eye[None] - b_t[:, None, None] * kk)
        S = transition @ S + b_t[:, None, None] * k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    S, o = jax.lax.scan(step, h0, (q, k, v, beta, alpha))
    return o, S


def with_grads(fn):
    """jit once: `(o, S)` and the gradients of a random projection of both."""

    @jax.jit
    def run(x, w_o, w_S):
        def loss(x):
            o, S = fn(**x)
            return jnp.sum(o.astype(f64) * w_o) + jnp.sum(S.astype(f64) * w_S)

        return fn(**x), jax.grad(loss)(x)

    return run


run_reference = with_grads(reference)


@functools.cache
def run_delta(chunk_size, method="chunked"):
    return with_grads(
        functools.partial(ssm.delta_rule, chunk_size=chunk_size, method=method)
    )


def weights(key, T):
    k1, k2 = jax.random.split(key)
    return normal(k1, (T, H, DV)), normal(k2, (H, DK, DV))


# ---------------------------------------------------------------------------- values


@pytest.mark.parametrize(
    "T, chunk_size, gated",
    [(263, 8, False), (150, 16, True), (300, 4, True), (37, 64, True), (1, 16, False)],
    ids=["deltanet-263-8", "gated-150-16", "gated-300-4", "gated-37-64", "deltanet-1-16"],
)
def test_chunked_matches_float64_reference(T, chunk_size, gated, getkey):
    """Values and gradients to every input, including `h0`, through `o` and the final
    state, at lengths that are not multiples of the chunk size (a padded last chunk;
    a single chunk shorter than `chunk_size`), in one group of chunks or several (263
    steps in chunks of 8: two groups of 18 chunks, the second padded by three; 300 in
    chunks of 4: two of 42, the second padded by nine). Some gates are so strong (`log α =
    -400`) that their products underflow to exact zeros."""
    x = inputs(getkey(), T, gated)
    if gated:
        x["log_decay"] = x["log_decay"].at[5::11].set(-400.0)
    w = weights(getkey(), T)
    (o, S), g = run_delta(chunk_size)(x, *w)
    (o_ref, S_ref), g_ref = run_reference(x, *w)
    assert o.dtype == S.dtype == f64
    assert o.shape == (T, H, DV) and S.shape == (H, DK, DV)
    assert_close(o, o_ref, 1e-10, "outputs")
    assert_close(S, S_ref, 1e-10, "final state")
    for name in x:
        if x[name] is not None:
            assert_close(g[name], g_ref[name], 1e-9, f"gradient of {name}")
            assert np.max(np.abs(np.asarray(g[name]))) > 0, name


@pytest.mark.parametrize("gated", [False, True], ids=["deltanet", "gated"])
def test_recurrent_and_step_forms(gated, getkey):
    T = 37
    x = inputs(getkey(), T, gated)
    w = weights(getkey(), T)
    (o, S), g = run_delta(64, "recurrent")(x, *w)
    (o_ref, S_ref), g_ref = run_reference(x, *w)
    assert_close((o, S), (o_ref, S_ref), 1e-10, "recurrent values")
    assert_close(g, g_ref, 1e-9, "recurrent gradients")

    @jax.jit
    def steps(x):
        xs = (x["q"], x["k"], x["v"], x["beta"], x["log_decay"])

        def body(S, x_t):
            o_t, S = ssm.delta_rule_step(*x_t, S)
            return S, o_t

        S, o = jax.lax.scan(body, x["h0"], xs)
        return o, S

    assert_close(steps(x), (o_ref, S_ref), 1e-10, "step by step")


def test_chained_calls_and_vmap(getkey):
    """Two calls chained through the state (different chunk sizes) equal the reference
    over the whole sequence, in values and gradients (to `h0` and through the state
    handed from one call to the next), for every member of a `vmap`ped batch."""
    T, split = 45, 21
    names = ("q", "k", "v", "beta", "log_decay")

    def chained(q, k, v, beta, log_decay, h0):
        first = [x[:split] for x in (q, k, v, beta, log_decay)]
        second = [x[split:] for x in (q, k, v, beta, log_decay)]
        o1, S1 = ssm.delta_rule(*first, h0=h0, chunk_size=8)
        o2, S2 = ssm.delta_rule(*second, h0=S1, chunk_size=16)
        return jnp.concatenate([o1, o2]), S2

    batch = [inputs(getkey(), T, True) for _ in range(2)]
    xs = jax.tree.map(lambda *a: jnp.stack(a), *batch)
    ws = jax.tree.map(lambda *a: jnp.stack(a), *[weights(getkey(), T) for _ in range(2)])
    ys, gs = jax.vmap(with_grads(chained))(xs, *ws)
    ys_ref, gs_ref = jax.vmap(run_reference)(xs, *ws)
    assert_close(ys, ys_ref, 1e-10, "values")
    assert_close(gs, gs_ref, 1e-9, "gradients")
    assert set(gs) == {*names, "h0"}


def test_bfloat16_inputs(getkey):
    """bfloat16 in: outputs and gradients in bfloat16, the state in float32, and all
    close to the float64 reference on the same (rounded) inputs: states accumulate in
    float32, and strong gates (α = e^-60, whose products underflow float32) stay
    finite."""
    T = 200
    x = inputs(getkey(), T, True, log_low=-0.1)
    x["log_decay"] = x["log_decay"].at[7::13].set(-60.0)
    w = weights(getkey(), T)
    x16 = jax.tree.map(lambda a: a.astype(bf16), x)
    (o, S), g = run_delta(64)(x16, *w)
    exact = jax.tree.map(lambda a: a.astype(f64), x16)
    (o_ref, S_ref), g_ref = run_reference(exact, *w)
    assert o.dtype == bf16 and S.dtype == f32
    assert all(g[n].dtype == bf16 for n in x)
    assert all(np.all(np.isfinite(np.asarray(a))) for a in jax.tree.leaves((o, S, g)))
    assert rel_err(o.astype(f64), o_ref) < 1e-2
    assert rel_err(S, S_ref) < 1e-4
    for n in x:
        assert rel_err(g[n].astype(f64), g_ref[n]) < 2e-2, n


# ----------------------------------------------------------------------------- memory


def test_groups_of_chunks():
    """A group is at most `_GROUP_STEPS` steps of chunks and pads `T` by at most an
    eighth (the cases of the value test above among them)."""
    from ssm import _delta

    assert _delta._group(263, 8) == 18 and _delta._group(300, 4) == 42
    for C in (4, 8, 16, 32, 64):
        for T in range(1, 1200, 7):
            n, g = -(-T // C), _delta._group(T, C)
            assert 1 <= g <= max(1, _delta._GROUP_STEPS // C)
            assert (-(-n // g) * g - n) * 8 <= n, (T, C, g)


def test_memory_is_chunk_bounded():
    """Forward+backward temp memory at T = 2048 is a small fraction of the `T × d_k ×
    d_v` state history that autodiff of the recurrence keeps (one state per chunk of
    64 is 1/64 of it; the rest is `O(T · d)` activations and one group's `O(256 · (C
    + d))` chunk factors)."""
    h, d, T = 2, 64, 2048

    def loss(q, k, v, beta, g):
        o, S = ssm.delta_rule(q, k, v, beta, g, chunk_size=64)
        return jnp.sum(o**2) + jnp.sum(S)

    args = [jax.ShapeDtypeStruct(s, f32) for s in [(T, h, d)] * 3 + [(T, h)] * 2]
    f = jax.jit(jax.grad(loss, argnums=range(5)))
    temp = f.lower(*args).compile().memory_analysis().temp_size_in_bytes
    history = T * h * d * d * 4
    assert temp < history / 8, (temp, history)


# ------------------------------------------------------------------------------ errors


def test_errors_name_the_argument():
    T = 10
    x = dict(
        q=np.ones((T, H, DK), np.float32),
        k=np.ones((T, H, DK), np.float32),
        v=np.ones((T, H, DV), np.float32),
        beta=np.ones((T, H), np.float32),
        log_decay=np.ones((T, H), np.float32),
        h0=np.ones((H, DK, DV), np.float32),
    )
    with pytest.raises(ValueError, match=r"`k` must have shape \(T, H, d_k\)"):
        ssm.delta_rule(x["q"], x["k"][:, :, :4], x["v"], x["beta"])
    with pytest.raises(ValueError, match=r"`v`.*\(10, 3, 'd_v'\).*\(10, 2, 5\)"):
        ssm.delta_rule(x["q"], x["k"], x["v"][:, :2], x["beta"])
    with pytest.raises(ValueError, match=r"`beta` must have shape \(T, H\) = \(10, 3\)"):
        ssm.delta_rule(x["q"], x["k"], x["v"], x["beta"][:, :, None])
    with pytest.raises(ValueError, match="`log_decay`"):
        ssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], x["log_decay"][:5])
    with pytest.raises(ValueError, match=r"`h0` must have shape \(H, d_k, d_v\)"):
        ssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], None, x["h0"].T)
    with pytest.raises(ValueError, match="vmap"):
        ssm.delta_rule(x["q"][None], x["k"][None], x["v"][None], x["beta"][None])
    with pytest.raises(TypeError, match="`beta` must have a floating dtype"):
        ssm.delta_rule(x["q"], x["k"], x["v"], np.ones((T, H), np.int32))
    with pytest.raises(ValueError, match="`method`"):
        ssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], method="parallel")
    with pytest.raises(ValueError, match="`chunk_size`"):
        ssm.delta_rule(x["q"], x["k"], x["v"], x["beta"], chunk_size=0)
    with pytest.raises(ValueError, match=r"`state` must have shape \(H, d_k, d_v\)"):
        ssm.delta_rule_step(x["q"][0], x["k"][0], x["v"][0], x["beta"][0], None, x["h0"][0])
    with pytest.raises(ValueError, match=r"`q` must have shape \(H, d_k\)"):
        ssm.delta_rule_step(x["q"], x["k"], x["v"], x["beta"], None, x["h0"])
    o, S = ssm.delta_rule(x["q"][:0], x["k"][:0], x["v"][:0], x["beta"][:0])
    assert o.shape == (0, H, DV) and S.shape == (H, DK, DV) and S.dtype == f32
    assert not np.any(np.asarray(S))
