"""Diagonal SSM layers (S4D, S5, LRU, Mamba, RG-LRU), Block and SequenceModel.

Each layer's parallel form is compared with a float64 reference recurrence written
below from its paper's equations (a plain loop over time on the layer's own
parameters), in values and gradients; then the recurrent trio, causality, shift
equivariance, gradients, vmap and bfloat16 are checked on every mixer.
"""

import functools
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import layers

from .helpers import (
    assert_close,
    assert_gradient_reaches_every_parameter,
    normal,
    numpy_rules,
    raises_as_user,
    rel_err,
    value_and_grads,
)

D_MODEL, T = 8, 37  # odd length, not a multiple of any chunk size used below
f32, f64 = jnp.float32, jnp.float64

CASES = {  # every test runs on these
    "s4d": ("s4d", dict(state_size=8, init="lin", chunk_size=8)),
    "s5": ("s5", dict(state_size=8, blocks=2)),
    "lru": ("lru", dict(state_size=8, r_min=0.5, r_max=0.95)),
    "mamba": ("mamba", dict(d_state=4, chunk_size=8)),
    "rglru": ("rglru", dict(d_rnn=12, num_heads=2)),
}
VARIANTS = {  # other options, checked against the reference only
    "s4d-inv-unchunked": ("s4d", dict(state_size=8, init="inv")),
    "s5-bilinear": ("s5", dict(state_size=8, discretisation="bilinear")),
    "s5-bidirectional": ("s5", dict(state_size=8, bidirectional=True)),
    "mamba-unchunked": ("mamba", dict(d_state=4, chunk_size=64)),
}
TIME_INVARIANT = ("s4d", "s5", "lru")


def cast(tree, dtype):
    def f(v):
        return v.astype(dtype) if eqx.is_inexact_array(v) else v

    return jax.tree.map(f, tree)


def build(cls, *args, key, **kwargs):
    """`cls(*args, **kwargs, key=key)` in one compiled call (see `make`)."""
    return eqx.filter_jit(lambda key: cls(*args, **kwargs, key=key))(key)


@functools.cache
def make(case, dtype=f32):
    """The layer of a case, built (and cast) in one compiled call: eager JAX would
    compile every small op of the initialisation separately."""
    if dtype != f32:
        return eqx.filter_jit(cast)(make(case), dtype)
    name, kwargs = {**CASES, **VARIANTS}[case]
    return build(
        layers.MIXERS[name], D_MODEL, **kwargs, key=jr.key(zlib.crc32(case.encode()))
    )


def cplx(v):
    return v[..., 0] + 1j * v[..., 1]


def loop(step, h0, xs):
    """The reference time loop: `step(h, x_t) -> (h, y_t)`."""
    return jax.lax.scan(step, h0, xs)[1]


# ---------------------------------------------------------------- references (float64)


def ref_s4d(m, x):
    A = -jnp.exp(m.log_A_real) + 1j * m.A_imag
    dt = jnp.exp(m.log_dt)[:, None]
    dA = jnp.exp(dt * A)
    dB = (dA - 1) / A * cplx(m.B)
    C = cplx(m.C)

    def step(h, u):
        h = dA * h + dB * u[:, None]
        return h, 2 * jnp.sum(C * h, -1).real + m.D * u

    return loop(step, jnp.zeros(A.shape, jnp.complex128), x)


def _s5_discrete(m):
    Lam = m.Lambda_re + 1j * m.Lambda_im
    dt = jnp.exp(m.log_step)
    if m.discretisation == "zoh":
        dA = jnp.exp(Lam * dt)
        dB = ((dA - 1) / Lam)[:, None] * cplx(m.B)
    else:
        dA = (1 + dt * Lam / 2) / (1 - dt * Lam / 2)
        dB = (dt / (1 - dt * Lam / 2))[:, None] * cplx(m.B)
    return dA, dB


def ref_s5(m, x):
    dA, dB = _s5_discrete(m)
    h0 = jnp.zeros(dA.shape, jnp.complex128)

    def run(C, xs):
        def step(h, u):
            h = dA * h + dB @ u
            return h, 2 * (cplx(C) @ h).real

        return loop(step, h0, xs)

    y = run(m.C[0], x) + x * m.D
    if m.bidirectional:
        y = y + run(m.C[1], x[::-1])[::-1]
    return y


def ref_lru(m, x):
    lam = jnp.exp(-jnp.exp(m.nu_log) + 1j * jnp.exp(m.theta_log))
    gamma = jnp.exp(m.gamma_log)
    B, C = cplx(m.B), cplx(m.C)

    def step(h, u):
        h = lam * h + gamma * (B @ u)
        return h, (C @ h).real + m.D * u

    return loop(step, jnp.zeros(lam.shape, jnp.complex128), x)


def _conv(w, b, x):
    """Causal depthwise convolution, zero history."""
    K, n = w.shape[0], x.shape[0]
    xp = jnp.concatenate([jnp.zeros((K - 1, x.shape[1]), x.dtype), x])
    return b + sum(w[k] * xp[k : k + n] for k in range(K))


def ref_mamba(m, u, *, transitions=False):
    """Mamba, `h[t] = a[t] ⊙ h[t-1] + (Δ[t] x[t]) B[t]ᵀ` with `a = exp(Δ A)`, or
    `2 exp(Δ A) - 1` with `allow_neg_eigval`; with `transitions` also returns `a`
    `(T, d_inner, d_state)`."""
    xz = u @ m.in_proj.weight.T
    x, z = xz[:, : m.d_inner], xz[:, m.d_inner :]
    x = jax.nn.silu(_conv(m.conv_weight, m.conv_bias, x))
    dbc = x @ m.x_proj.weight.T
    r, n = m.dt_rank, m.d_state
    delta = jax.nn.softplus(dbc[:, :r] @ m.dt_proj.weight.T + m.dt_bias)
    Bs, Cs = dbc[:, r : r + n], dbc[:, r + n :]
    a = jnp.exp(delta[:, :, None] * -jnp.exp(m.A_log))
    if m.allow_neg_eigval:
        a = 2 * a - 1

    def step(h, inp):
        a_t, d, b, c, xt = inp
        h = a_t * h + (d * xt)[:, None] * b[None, :]
        return h, h @ c + m.D * xt

    y = loop(step, jnp.zeros((m.d_inner, n), f64), (a, delta, Bs, Cs, x))
    out = (y * jax.nn.silu(z)) @ m.out_proj.weight.T
    return (out, a) if transitions else out


def ref_rglru(m, u):
    gate = jax.nn.gelu(u @ m.gate_proj.weight.T + m.gate_proj.bias)
    x = _conv(m.conv_weight, m.conv_bias, u @ m.in_proj.weight.T + m.in_proj.bias)
    W_a = jax.scipy.linalg.block_diag(*m.W_a)
    W_x = jax.scipy.linalg.block_diag(*m.W_x)
    a = jax.nn.sigmoid(m.a_param)

    def step(h, xt):
        r = jax.nn.sigmoid(xt @ W_a + m.b_a)
        i = jax.nn.sigmoid(xt @ W_x + m.b_x)
        a_t = a ** (m.c * r)
        h = a_t * h + jnp.sqrt(1 - a_t**2) * (i * xt)
        return h, h

    h = loop(step, jnp.zeros((m.d_rnn,), f64), x)
    return (gate * h) @ m.out_proj.weight.T + m.out_proj.bias


REFERENCES = {
    "s4d": ref_s4d,
    "s5": ref_s5,
    "lru": ref_lru,
    "mamba": ref_mamba,
    "rglru": ref_rglru,
}


run_layer = value_and_grads(lambda m, x: m(x))


run_reference = {k: value_and_grads(numpy_rules(f)) for k, f in REFERENCES.items()}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", [*CASES, *VARIANTS])
def test_matches_float64_reference(case, getkey):
    """Values and gradients (to every parameter and the input) at an odd length."""
    m = make(case, f64)
    x = normal(getkey(), (T, D_MODEL))
    w = normal(getkey(), (T, D_MODEL))
    y, g = run_layer(m, x, w)
    y_ref, g_ref = run_reference[{**CASES, **VARIANTS}[case][0]](m, x, w)
    assert y.dtype == f64
    assert_close(y, y_ref, 1e-10, "values")
    assert_close(g, g_ref, 1e-9, "gradients")
    assert_gradient_reaches_every_parameter(g[0], m)


def test_bidirectional_s5_is_not_causal(getkey):
    m = make("s5-bidirectional")
    x = normal(getkey(), (T, D_MODEL), f32)
    y, y_pert = eqx.filter_jit(lambda m, x: (m(x), m(x.at[-1].add(1.0))))(m, x)
    assert rel_err(y_pert[0], y[0]) > 1e-6  # the first output sees the last input
    with raises_as_user(ValueError, match="not causal"):
        m.prefill(x, None)


@eqx.filter_jit
def recurrent_forms(m, x, split):
    y = m(x)
    y1, s1 = m.prefill(x[:split], m.init_state())
    y2, s2 = m.prefill(x[split:], s1)
    s_full = m.prefill(x, m.init_state())[1]
    s_step, y_step = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], m.init_state(), x)
    return y, jnp.concatenate([y1, y2]), y_step, s2, s_full, s_step


@eqx.filter_jit
def perturbed_and_shifted(m, x, t0, shift):
    y_pert = m(x.at[t0].add(1.0))
    x_shift = jnp.concatenate([jnp.zeros((shift, x.shape[1]), x.dtype), x[:-shift]])
    return y_pert, m(x_shift)


@pytest.mark.parametrize("case", CASES)
def test_recurrent_forms_causality_shift(case, getkey):
    """`m(x) == prefill (split in two) == step by step`; causal; shift-equivariant."""
    m = make(case)
    x = normal(getkey(), (T, D_MODEL), f32)
    y, y_split, y_step, s2, s_full, s_step = recurrent_forms(m, x, 13)
    assert y.dtype == f32 and y.shape == (T, D_MODEL)
    assert_close(y_split, y, 1e-5, "prefill split in two")
    assert_close(y_step, y, 1e-5, "step by step")
    assert_close(s2, s_full, 1e-5, "state after split prefill")
    assert_close(s_step, s_full, 1e-5, "state after steps")
    for leaf in jax.tree.leaves(s_full):
        assert leaf.dtype in (jnp.float32, jnp.complex64)
    t0, k = 20, 5
    y_pert, y_shift = perturbed_and_shifted(m, x, t0, k)
    np.testing.assert_allclose(y_pert[:t0], y[:t0], rtol=0, atol=1e-6)
    assert rel_err(y_pert[t0:], y[t0:]) > 1e-3
    if case in TIME_INVARIANT:
        assert_close(y_shift[k:], y[:-k], 1e-5, "shift equivariance")


@pytest.mark.parametrize("case", CASES)
def test_vmap_over_a_batch(case, getkey):
    m = make(case)
    xs = normal(getkey(), (3, 11, D_MODEL), f32)
    ys, ys_loop = eqx.filter_jit(lambda m, xs: (jax.vmap(m)(xs), [m(x) for x in xs]))(m, xs)
    assert ys.shape == xs.shape
    assert_close(ys, jnp.stack(ys_loop), 1e-5, "vmap")
    with raises_as_user(ValueError, match="vmap"):
        m(xs)


@pytest.mark.parametrize("case", CASES)
def test_bfloat16_close_to_float32(case, getkey):
    m = make(case)
    x = normal(getkey(), (T, D_MODEL), f32)
    y = recurrent_forms(m, x, 13)[0]
    y16 = eqx.filter_jit(lambda m, x: cast(m, jnp.bfloat16)(x.astype(jnp.bfloat16)))(m, x)
    assert y16.dtype == jnp.bfloat16
    assert rel_err(y16.astype(f32), y) < 5e-2


# ----------------------------------------------------------------------- init properties


def test_s4d_init(getkey):
    lin = build(
        layers.S4D, 4, state_size=16, init="lin", dt_min=0.01, dt_max=0.05, key=getkey()
    )
    inv = build(layers.S4D, 4, state_size=16, init="inv", key=getkey())
    n = np.arange(8)
    A = np.asarray(lin.eigenvalues())
    np.testing.assert_allclose(A.real, -0.5, rtol=1e-6)
    np.testing.assert_allclose(A.imag, np.broadcast_to(np.pi * n, (4, 8)), rtol=1e-6)
    np.testing.assert_allclose(
        np.asarray(inv.eigenvalues()).imag[0],
        16 / np.pi * (16 / (2 * n + 1) - 1),
        rtol=1e-5,
    )
    dt = np.exp(np.asarray(lin.log_dt))
    assert np.all((dt >= 0.01 * 0.999) & (dt <= 0.05 * 1.001))
    dA = np.asarray(lin.discretise()[0])
    assert np.all(np.abs(dA) < 1)


def test_s5_init(getkey):
    m = build(layers.S5, 4, state_size=16, blocks=2, key=getkey())
    lam = np.asarray(m.eigenvalues())
    assert lam.shape == (8,)
    np.testing.assert_allclose(lam.real, -0.5, atol=1e-5)  # HiPPO-N: real part -1/2
    # each block's modes are one of each conjugate pair of a HiPPO-N block of size 8
    from layers._init import hippo_legs, hippo_normal

    full, V = hippo_normal(8)
    np.testing.assert_allclose(
        np.sort(np.abs(lam.imag[:4])), np.sort(np.abs(full.imag[:4])), rtol=1e-5
    )
    P = np.sqrt(np.arange(8) + 0.5)
    np.testing.assert_allclose(
        V @ np.diag(full) @ V.conj().T, hippo_legs(8) + np.outer(P, P), atol=1e-9
    )
    assert np.all(np.abs(np.asarray(m.discretise()[0])) < 1)
    b = build(layers.S5, 4, state_size=16, discretisation="bilinear", key=getkey())
    assert np.all(np.abs(np.asarray(b.discretise()[0])) < 1)


def test_lru_init(getkey):
    m = build(
        layers.LRU,
        4,
        state_size=256,
        r_min=0.4,
        r_max=0.8,
        max_phase=np.pi / 4,
        key=getkey(),
    )
    lam = np.asarray(m.eigenvalues())
    r = np.abs(lam)
    assert np.all((r >= 0.4 - 1e-6) & (r <= 0.8 + 1e-6))
    assert r.min() < 0.5 and r.max() > 0.7  # fills the ring
    assert np.all((np.angle(lam) >= 0) & (np.angle(lam) <= np.pi / 4 + 1e-6))
    np.testing.assert_allclose(
        np.exp(np.asarray(m.gamma_log)), np.sqrt(1 - r**2), rtol=1e-4
    )


def test_mamba_init(getkey):
    m = build(layers.Mamba, 16, d_state=8, dt_min=0.002, dt_max=0.05, key=getkey())
    dt = np.asarray(jax.nn.softplus(m.dt_bias))
    assert np.all((dt >= 0.002 * 0.999) & (dt <= 0.05 * 1.001))
    np.testing.assert_allclose(
        np.asarray(-jnp.exp(m.A_log))[0], -np.arange(1, 9), rtol=1e-6
    )
    assert m.d_inner == 32 and m.dt_rank == 1
    np.testing.assert_array_equal(np.asarray(m.D), 1.0)


def test_rglru_init(getkey):
    m = build(layers.RGLRU, 16, key=getkey())
    assert m.d_rnn == 22  # ceil(4 * 16 / 3)
    a_c = np.exp(m.c * np.asarray(m.log_a()))
    assert np.all((a_c >= 0.9 - 1e-5) & (a_c <= 0.999 + 1e-5))


def test_mamba_memory_is_chunk_bounded(getkey):
    """Forward+backward temp memory grows with T far slower than the state history.

    The history `T x d_inner x d_state` would add `d_inner * d_state * 4` bytes per
    step; the chunked layer adds only its per-step activations (which do not scale
    with `d_inner * d_state`) and one boundary state per chunk.
    """
    m = build(layers.Mamba, 16, d_state=64, chunk_size=32, key=getkey())
    params, static = eqx.partition(m, eqx.is_array)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(eqx.combine(p, static)(x) ** 2)))

    def temp_bytes(T_long):
        x = jax.ShapeDtypeStruct((T_long, 16), f32)
        return f.lower(params, x).compile().memory_analysis().temp_size_in_bytes

    state_bytes = m.d_inner * m.d_state * 4
    t1, t2 = temp_bytes(1024), temp_bytes(2048)
    assert t1 < 1024 * state_bytes, (t1, 1024 * state_bytes)
    assert (t2 - t1) / 1024 < state_bytes / 2, ((t2 - t1) / 1024, state_bytes)


# ------------------------------------------------------------ Block and SequenceModel


@pytest.mark.parametrize("mixer", ["s5", "mamba"])
def test_sequence_model_recurrent_forms(mixer, getkey):
    kwargs = {"s5": dict(state_size=8, blocks=2), "mamba": dict(d_state=4, chunk_size=8)}
    model = build(
        layers.SequenceModel,
        mixer,
        16,
        2,
        11,
        vocab_size=11,
        mixer_kwargs=kwargs[mixer],
        key=getkey(),
    )
    tokens = jr.randint(getkey(), (T,), 0, 11)
    y, y_split, y_step, s2, s_full, s_step = recurrent_forms(model, tokens, 13)
    assert y.shape == (T, 11)
    assert_close(y_split, y, 1e-5, "prefill split")
    assert_close(y_step, y, 1e-5, "steps")
    assert_close(s_step, s_full, 1e-5, "state")


def test_sequence_model_pooling_remat_dropout(getkey):
    options = ({}, dict(pooling="last"), dict(pooling="mean"), dict(remat=True))
    options += (dict(dropout=0.5),)
    kw = dict(d_input=3, mixer_kwargs=dict(state_size=8))
    models = eqx.filter_jit(  # one compiled call builds all five, with the same weights
        lambda key: tuple(
            layers.SequenceModel("lru", 8, 1, 5, **o, **kw, key=key) for o in options
        )
    )(getkey())
    x = normal(getkey(), (T, 3), f32)

    @eqx.filter_jit
    def run(models, x, k1, k2):
        plain, last, mean, remat, drop = models
        grad = eqx.filter_grad(lambda m: jnp.sum(m(x) ** 2))
        return (
            (plain(x), last(x), mean(x)),
            (grad(plain), grad(remat)),
            (drop(x, key=k1), drop(x, key=k2), eqx.nn.inference_mode(drop)(x)),
        )

    (y, y_last, y_mean), (g, g_remat), (d1, d2, d_inf) = run(models, x, getkey(), getkey())
    plain = models[0]
    assert y.shape == (T, 5) and y_last.shape == y_mean.shape == (5,)
    assert_close(y_last, y[-1], 1e-6, "last pooling")
    assert_close(g_remat, g, 1e-5, "remat gradients")
    assert rel_err(d1, d2) > 1e-3
    assert_close(d_inf, y, 1e-6, "inference mode")
    with raises_as_user(ValueError, match="vmap"):
        plain(jnp.stack([x, x]))


def test_block_options(getkey):
    x = normal(getkey(), (T, D_MODEL), f32)
    block = build(
        layers.Block, D_MODEL, "mamba", dict(d_state=4), mlp_ratio=0, key=getkey()
    )
    assert block.mlp is None
    y, y_mixer = eqx.filter_jit(
        lambda b, x: (b(x), x + b.mixer(layers._block.rms_norm(b.norm1, x)))
    )(block, x)
    assert_close(y, y_mixer, 1e-6)
    with pytest.raises(ValueError, match="unknown mixer"):
        build(layers.Block, D_MODEL, "nope", key=getkey())


def test_ssm_param_labels(getkey):
    model = build(
        layers.SequenceModel,
        "mamba",
        8,
        2,
        4,
        d_input=3,
        mixer_kwargs=dict(d_state=4),
        key=getkey(),
    )
    labels = layers.ssm_param_labels(eqx.filter(model, eqx.is_array))
    mixer_labels = labels.blocks[1].mixer
    assert mixer_labels.A_log == mixer_labels.D == mixer_labels.dt_bias == "ssm"
    assert mixer_labels.in_proj.weight == "other"
    assert labels.head.weight == labels.blocks[0].norm1.weight == "other"
    mask = layers.ssm_param_mask(model)
    n_ssm = sum(jax.tree.leaves(mask))
    assert n_ssm == 2 * 3
    for case in CASES:
        m = make(case)
        labels = layers.ssm_param_labels(m)
        for field in type(m).ssm_params:
            assert getattr(labels, field) == "ssm", (name, field)
    assert set(layers.MIXERS) >= {"s4d", "s5", "lru", "mamba", "rglru"}
