"""Matrix-state mixers: the gated-linear-attention family (linear attention, RetNet,
GLA, mLSTM, Mamba-2) and the delta-rule family (DeltaNet, Gated DeltaNet).

Each layer is compared with a float64 reference written below from its paper's
equations (a plain loop over time on the layer's own parameters), in values and
gradients; then every mixer in `CASES` goes through the contract of `AbstractMixer`
(`__call__ == prefill == prefill split in two == step by step`, outputs and states;
causality; `vmap`; bfloat16; shift equivariance for the mixers in `SHIFT`), and the
training memory is measured against the
`T x state` history. Other matrix-state mixers join the contract tests by adding a
line to `CASES` (and, for the memory test, to `BIG`).
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
    numpy_rules,
    raises_as_user,
    rel_err,
    value_and_grads,
)

D_MODEL, T = 8, 37  # an odd length, not a multiple of the chunk sizes below
f32, f64 = jnp.float32, jnp.float64

CASES = {  # registry name and options; every test runs on these
    "linear_attention": ("linear_attention", dict(num_heads=2, chunk_size=8)),
    "retnet": ("retnet", dict(num_heads=2, chunk_size=8)),
    "gla": ("gla", dict(num_heads=2, chunk_size=8)),
    "mlstm": ("mlstm", dict(num_heads=2, chunk_size=16)),
    "mamba2": ("mamba2", dict(d_state=4, num_heads=2, chunk_size=8)),
    # between them, every delta-rule option: the output gate, β in (0, 2), the decay
    "deltanet": ("deltanet", dict(num_heads=2, allow_neg_eigval=True, chunk_size=8)),
    "gated_deltanet": ("gated_deltanet", dict(num_heads=2, head_dim=3, chunk_size=16)),
}
# Zero inputs leave their state at zero (no convolution bias, `k = 0`), so a sequence
# delayed by zeros gives the delayed outputs.
SHIFT = ("deltanet", "gated_deltanet")
VARIANTS = {  # other options, checked against the reference only
    "linear_attention-relu-rms": (
        "linear_attention",
        dict(feature_map="relu", normalization="rms", chunk_size=16),
    ),
    "linear_attention-identity-none": (
        "linear_attention",
        dict(feature_map="identity", normalization="none", num_heads=1),
    ),
}
BIG = {  # d_model 128, one head: the state history dwarfs the activations
    "linear_attention": dict(num_heads=1),  # state 128 x 129 per step
    "retnet": dict(num_heads=1),  # 128 x 256
    "gla": dict(num_heads=1, expand_k=1.0),  # 128 x 128
    "mlstm": dict(num_heads=1),  # 256 x 256
    "mamba2": dict(d_state=128, num_heads=1),  # 128 x 256
    "deltanet": dict(num_heads=1, expand_v=1),  # 128 x 128
    "gated_deltanet": dict(num_heads=1, expand_v=1),  # 128 x 128
}


def cast(tree, dtype):
    def f(v):
        return v.astype(dtype) if eqx.is_inexact_array(v) else v

    return jax.tree.map(f, tree)


@functools.cache
def make(case, dtype=f32):
    """The layer of a case, built (and cast) in one compiled call."""
    if dtype != f32:
        return eqx.filter_jit(cast)(make(case), dtype)
    name, kwargs = {**CASES, **VARIANTS}[case]
    build = eqx.filter_jit(lambda key: layers.MIXERS[name](D_MODEL, **kwargs, key=key))
    return build(jr.key(zlib.crc32(case.encode())))


def draw(case, shape, salt=""):
    """Standard normal NumPy draws, seeded by the case (no compilation)."""
    rng = np.random.default_rng(zlib.crc32((case + salt).encode()))
    return rng.standard_normal(shape)


def loop(step, h0, xs):
    return jax.lax.scan(step, h0, xs)[1]


def heads(x, H):
    return x.reshape(x.shape[0], H, -1)


def _conv(w, b, x):
    """Causal depthwise convolution, zero history (`b = 0`: no bias)."""
    K, n = w.shape[0], x.shape[0]
    xp = jnp.concatenate([jnp.zeros((K - 1, x.shape[1]), x.dtype), x])
    return b + sum(w[k] * xp[k : k + n] for k in range(K))


def _matrix_loop(q, k, v, decay):
    """`S[t] = decay[t] * S[t-1] + k[t] v[t]^T` (decay `(H, 1)` or `(H, d_k)` per step),
    `o[t] = S[t]^T q[t]`, from zeros."""
    H, dk, dv = q.shape[1], q.shape[2], v.shape[2]

    def step(S, x):
        q_t, k_t, v_t, a_t = x
        S = a_t[:, :, None] * S + k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    return loop(step, jnp.zeros((H, dk, dv)), (q, k, v, decay))


def _group_norm(o, eps):
    o = o - o.mean(-1, keepdims=True)
    return o / jnp.sqrt((o**2).mean(-1, keepdims=True) + eps)


# ---------------------------------------------------------------- references (float64)


def ref_linear_attention(m, x):
    phi = {
        "elu": lambda y: jax.nn.elu(y) + 1,
        "relu": jax.nn.relu,
        "identity": lambda y: y,
    }[m.feature_map]
    H = m.num_heads
    q = heads(phi(x @ m.q_proj.weight.T), H)
    k = heads(phi(x @ m.k_proj.weight.T), H)
    v = heads(x @ m.v_proj.weight.T, H)
    o = _matrix_loop(q, k, v, jnp.ones(q.shape[:2] + (1,)))
    if m.normalization == "sum":
        z = jnp.cumsum(k, axis=0)  # the normaliser sum_s phi(k_s)
        o = o / (jnp.sum(z * q, -1, keepdims=True) + m.eps)
    elif m.normalization == "rms":
        o = o / jnp.sqrt((o**2).mean(-1, keepdims=True) + m.eps) * m.norm_weight
    return o.reshape(o.shape[0], -1) @ m.o_proj.weight.T


def ref_retnet(m, x):
    H, dk = m.num_heads, m.head_dim
    n = jnp.arange(x.shape[0])
    theta = 10000.0 ** -jnp.linspace(0, 1, dk // 2)

    def rotate(y):  # pairs as complex numbers times e^{i n theta}
        z = (y[..., 0::2] + 1j * y[..., 1::2]) * jnp.exp(1j * n[:, None, None] * theta)
        return jnp.stack([z.real, z.imag], -1).reshape(y.shape)

    q = rotate(heads(x @ m.q_proj.weight.T, H))
    k = rotate(heads(x @ m.k_proj.weight.T, H)) / np.sqrt(dk)
    v = heads(x @ m.v_proj.weight.T, H)
    gamma = 1 - 2.0 ** (-5.0 - jnp.arange(H))
    o = _matrix_loop(q, k, v, jnp.broadcast_to(gamma[:, None], q.shape[:2] + (1,)))
    y = _group_norm(o, 1e-6).reshape(o.shape[0], -1) * m.norm_weight + m.norm_bias
    return (jax.nn.silu(x @ m.g_proj.weight.T) * y) @ m.o_proj.weight.T


def ref_gla(m, x):
    H = m.num_heads
    q = heads(x @ m.q_proj.weight.T, H) / np.sqrt(m.head_dim)
    k = heads(x @ m.k_proj.weight.T, H)
    v = heads(x @ m.v_proj.weight.T, H)
    gate = x @ m.gk_proj1.weight.T @ m.gk_proj2.weight.T + m.gk_proj2.bias
    alpha = heads(jax.nn.sigmoid(gate) ** (1 / m.gate_normalizer), H)
    o = _matrix_loop(q, k, v, alpha)
    o = o / jnp.sqrt((o**2).mean(-1, keepdims=True) + 1e-5) * m.norm_weight
    r = jax.nn.silu(x @ m.g_proj.weight.T + m.g_proj.bias)
    return (o.reshape(o.shape[0], -1) * r) @ m.o_proj.weight.T


def ref_mlstm(m, x):
    H, d, dk = m.num_heads, m.d_inner, m.head_dim
    xz = x @ m.up_proj.weight.T
    x_m, z = xz[:, :d], xz[:, d:]
    c = jax.nn.silu(_conv(m.conv_weight, m.conv_bias, x_m))
    blocks = [jax.scipy.linalg.block_diag(*w) for w in (m.q_weight, m.k_weight, m.v_weight)]
    q, k, v = c @ blocks[0].T, c @ blocks[1].T, x_m @ blocks[2].T
    qkv = jnp.concatenate([q, k, v], -1)
    i_tilde = qkv @ m.igate.weight.T + m.igate.bias
    log_f = jax.nn.log_sigmoid(qkv @ m.fgate.weight.T + m.fgate.bias)
    q, k, v = heads(q, H), heads(k, H) / np.sqrt(dk), heads(v, H)

    def step(state, inp):  # Beck et al. (2024), equations (19)-(27)
        C, nrm, mx = state
        q_t, k_t, v_t, it, lf = inp
        m_new = jnp.maximum(lf + mx, it)
        i = jnp.exp(it - m_new)[:, None]
        f = jnp.exp(lf + mx - m_new)[:, None]
        C = f[:, :, None] * C + i[:, :, None] * k_t[:, :, None] * v_t[:, None, :]
        nrm = f * nrm + i * k_t
        den = jnp.maximum(jnp.abs(jnp.sum(nrm * q_t, -1)), jnp.exp(-m_new)) + 1e-6
        return (C, nrm, m_new), jnp.einsum("hkv,hk->hv", C, q_t) / den[:, None]

    state = (jnp.zeros((H, dk, dk)), jnp.zeros((H, dk)), jnp.zeros(H))
    h = loop(step, state, (q, k, v, i_tilde, log_f))
    y = _group_norm(h, 1e-5).reshape(h.shape[0], -1) * m.norm_weight + m.skip * c
    return (y * jax.nn.silu(z)) @ m.down_proj.weight.T


def ref_mamba2(m, u, *, transitions=False):
    """Mamba-2, `S[t] = a[t] S[t-1] + B[t] (Δ[t] x[t])ᵀ` per head with `a = exp(Δ A)`,
    or `2 exp(Δ A) - 1` with `allow_neg_eigval`; with `transitions` also returns `a`
    `(T, H)`."""
    d, N, H, P = m.d_inner, m.d_state, m.num_heads, m.head_dim
    zxbcdt = u @ m.in_proj.weight.T
    z, xbc, dt = zxbcdt[:, :d], zxbcdt[:, d : 2 * d + 2 * N], zxbcdt[:, 2 * d + 2 * N :]
    xbc = jax.nn.silu(_conv(m.conv_weight, m.conv_bias, xbc))
    x, B, C = heads(xbc[:, :d], H), xbc[:, d : d + N], xbc[:, d + N :]
    delta = jax.nn.softplus(dt + m.dt_bias)  # (T, H)
    a = jnp.exp(-delta * jnp.exp(m.A_log))
    if m.allow_neg_eigval:
        a = 2 * a - 1

    def step(S, inp):  # S: (H, N, P)
        a_t, x_t, B_t, C_t, d_t = inp
        S = a_t[:, None, None] * S + B_t[None, :, None] * (d_t[:, None] * x_t)[:, None, :]
        return S, jnp.einsum("hnp,n->hp", S, C_t) + m.D[:, None] * x_t

    y = loop(step, jnp.zeros((H, N, P)), (a, x, B, C, delta)).reshape(u.shape[0], d)
    y = y * jax.nn.silu(z)
    y = y / jnp.sqrt((y**2).mean(-1, keepdims=True) + 1e-5) * m.norm_weight
    out = y @ m.out_proj.weight.T
    return (out, a) if transitions else out


def ref_delta_rule(m, u, *, transitions=False):
    """DeltaNet (Yang et al. 2024) and Gated DeltaNet (Yang et al. 2025), one step at
    a time with the full transition `α (I - β k kᵀ)` (`β = 2σ(·)` with
    `allow_neg_eigval`); with `transitions` also returns the transitions' eigenvalues
    along `k`, `α (1 - β ‖k‖²)`."""
    H, dk, dv = m.num_heads, m.head_dim, m.head_dim_v
    qkv = jax.nn.silu(_conv(m.conv_weight, 0.0, u @ m.qkv_proj.weight.T))
    q = qkv[:, : H * dk].reshape(-1, H, dk)
    k = qkv[:, H * dk : 2 * H * dk].reshape(-1, H, dk)
    v = qkv[:, 2 * H * dk :].reshape(-1, H, dv)
    q = q / jnp.sqrt(jnp.sum(q**2, -1, keepdims=True) + 1e-6) / np.sqrt(dk)
    k = k / jnp.sqrt(jnp.sum(k**2, -1, keepdims=True) + 1e-6)
    beta = jax.nn.sigmoid(u @ m.b_proj.weight.T) * (2 if m.allow_neg_eigval else 1)
    if isinstance(m, layers.GatedDeltaNet):
        dt = jax.nn.softplus(u @ m.a_proj.weight.T + m.dt_bias)
        alpha = jnp.exp(-jnp.exp(m.A_log) * dt)
    else:
        alpha = jnp.ones(beta.shape)

    def step(S, x):
        q_t, k_t, v_t, b_t, a_t = x
        outer = k_t[:, :, None] * k_t[:, None, :]
        S = a_t[:, None, None] * (jnp.eye(dk) - b_t[:, None, None] * outer) @ S
        S = S + b_t[:, None, None] * k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    o = loop(step, jnp.zeros((H, dk, dv)), (q, k, v, beta, alpha))
    o = o / jnp.sqrt(jnp.mean(o**2, -1, keepdims=True) + 1e-5) * m.norm_weight
    if m.g_proj is not None:
        o = o * jax.nn.silu(u @ m.g_proj.weight.T).reshape(o.shape)
    out = o.reshape(o.shape[0], -1) @ m.o_proj.weight.T
    return (out, alpha * (1 - beta * jnp.sum(k**2, -1))) if transitions else out


REFERENCES = {
    "linear_attention": ref_linear_attention,
    "retnet": ref_retnet,
    "gla": ref_gla,
    "mlstm": ref_mlstm,
    "mamba2": ref_mamba2,
    "deltanet": ref_delta_rule,
    "gated_deltanet": ref_delta_rule,
}


run_layer = value_and_grads(lambda m, x: m(x))
run_reference = {k: value_and_grads(numpy_rules(f)) for k, f in REFERENCES.items()}


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", [*(c for c in CASES if c in REFERENCES), *VARIANTS])
def test_matches_float64_reference(case):
    """Values and gradients (to every parameter and the input) at an odd length."""
    m = make(case, f64)
    x = jnp.asarray(draw(case, (T, D_MODEL)), f64)
    w = jnp.asarray(draw(case, (T, D_MODEL), "w"), f64)
    y, g = run_layer(m, x, w)
    y_ref, g_ref = run_reference[{**CASES, **VARIANTS}[case][0]](m, x, w)
    assert y.dtype == f64
    assert_close(y, y_ref, 1e-10, "values")
    assert_close(g, g_ref, 1e-9, "gradients")
    assert_gradient_reaches_every_parameter(g[0], m)


@eqx.filter_jit
def contract_forms(m, x, split, t0, shift):
    """Everything the contract promises, in one compiled program."""
    x_pert = x.at[t0].add(1.0)
    x_shift = jnp.concatenate([jnp.zeros((shift, x.shape[1]), x.dtype), x[:-shift]])
    y_call, y_pert, y_shift = jax.vmap(m)(jnp.stack([x, x_pert, x_shift]))
    y, s_full = m.prefill(x, m.init_state())
    y1, s1 = m.prefill(x[:split], m.init_state())
    y2, s2 = m.prefill(x[split:], s1)
    s_step, y_step = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], m.init_state(), x)
    y16 = cast(m, jnp.bfloat16)(x.astype(jnp.bfloat16))
    return dict(
        y=y,
        y_call=y_call,
        y_split=jnp.concatenate([y1, y2]),
        y_step=y_step,
        s2=s2,
        s_full=s_full,
        s_step=s_step,
        y_pert=y_pert,
        y_shift=y_shift,
        y16=y16,
    )


@pytest.mark.parametrize("case", CASES)
def test_recurrent_forms_causality_vmap_bf16(case):
    """`m(x) == prefill (split in two) == step by step` (outputs and states); causal;
    `vmap` over a batch; bfloat16 parameters and inputs close to float32; for the
    mixers in `SHIFT`, a sequence delayed by zeros gives the delayed outputs."""
    m = make(case)
    x = jnp.asarray(draw(case, (T, D_MODEL)), f32)
    t0, shift = 20, 5
    r = contract_forms(m, x, 13, t0, shift)
    y = r["y"]
    assert y.dtype == f32 and y.shape == (T, D_MODEL)
    assert_close(r["y_call"], y, 1e-5, "__call__ (vmapped) against prefill")
    assert_close(r["y_split"], y, 1e-5, "prefill split in two")
    assert_close(r["y_step"], y, 1e-5, "step by step")
    assert_close(r["s2"], r["s_full"], 1e-5, "state after split prefill")
    assert_close(r["s_step"], r["s_full"], 1e-5, "state after steps")
    for leaf in jax.tree.leaves(r["s_full"]):
        assert leaf.dtype in (f32, jnp.int32)
    np.testing.assert_allclose(r["y_pert"][:t0], y[:t0], rtol=0, atol=1e-6)
    assert rel_err(r["y_pert"][t0:], y[t0:]) > 1e-3
    if case in SHIFT:
        assert_close(r["y_shift"][shift:], y[:-shift], 1e-5, "shift equivariance")
    assert r["y16"].dtype == jnp.bfloat16
    assert rel_err(r["y16"].astype(f32), y) < 5e-2
    with raises_as_user(ValueError, match="vmap"):
        m(jnp.stack([x, x]))
    with raises_as_user(ValueError, match="vmap"):
        m.step(x[:2], m.init_state())


def _state_bytes(m):
    """Bytes of the recurrent (matrix) state of one step."""
    state = m.init_state()
    leaves = [state] if isinstance(state, jax.Array) else jax.tree.leaves(state)
    return max(leaf.size for leaf in leaves) * 4


@pytest.mark.parametrize("name", BIG)
def test_memory_is_not_the_state_history(name):
    """Forward+backward (to every parameter) at T = 4096 holds far less than the
    `T x state` history (what remains is `O(T · channels)` activations)."""
    T_long, d = 4096, 128
    m = eqx.filter_eval_shape(lambda: layers.MIXERS[name](d, **BIG[name], key=jr.key(0)))
    m = jax.tree.map(lambda s: jnp.zeros(s.shape, s.dtype), m)
    params, static = eqx.partition(m, eqx.is_array)

    def loss(p, x):
        return jnp.sum(eqx.combine(p, static)(x) ** 2)

    x = jax.ShapeDtypeStruct((T_long, d), f32)
    temp = jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis()
    history = T_long * _state_bytes(m)
    assert temp.temp_size_in_bytes < history / 3, (temp.temp_size_in_bytes, history)


def test_sizes_init_and_options():
    names = ("linear_attention", "retnet", "gla", "mlstm", "mamba2")
    la, ret, gla, ml, m2 = (make(c) for c in names)
    assert (la.head_dim, la.init_state().shape) == (4, (2, 4, 5))  # + the normaliser
    assert (ret.head_dim, ret.head_dim_v) == (4, 8)  # expand_v = 2
    np.testing.assert_allclose(np.exp(ret.log_decays()), [1 - 2**-5, 1 - 2**-6], rtol=1e-6)
    assert (gla.head_dim, gla.head_dim_v) == (2, 4)  # expand_k = 0.5, expand_v = 1
    assert (ml.d_inner, ml.head_dim) == (16, 8)
    np.testing.assert_array_equal(np.asarray(ml.fgate.bias), [3.0, 6.0])
    assert not np.any(np.asarray(ml.igate.weight)) and not np.any(
        np.asarray(ml.fgate.weight)
    )
    A = np.exp(np.asarray(m2.A_log))
    assert np.all((A >= 1 - 1e-5) & (A <= 16 + 1e-4))
    dt = np.asarray(jax.nn.softplus(m2.dt_bias))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    labels = layers.ssm_param_labels(m2)
    assert labels.A_log == labels.D == labels.dt_bias == "ssm"
    assert labels.in_proj.weight == "other"
    for name, cls in [
        ("linear_attention", layers.LinearAttention),
        ("retnet", layers.RetNet),
        ("gla", layers.GLA),
        ("mlstm", layers.MLSTM),
        ("mamba2", layers.Mamba2),
    ]:
        assert layers.MIXERS[name] is cls
    key = jr.key(0)
    with pytest.raises(ValueError, match="positive feature map"):
        layers.LinearAttention(8, feature_map="identity", key=key)
    with raises_as_user(ValueError, match="normalization"):
        layers.LinearAttention(8, normalization="softmax", key=key)
    with pytest.raises(ValueError, match="even"):
        layers.RetNet(6, num_heads=2, key=key)
    with pytest.raises(ValueError, match="num_heads"):
        layers.GLA(8, num_heads=3, key=key)


def test_delta_rule_sizes_init_and_labels():
    d, m = make("deltanet"), make("gated_deltanet")
    assert (d.head_dim, d.head_dim_v, d.g_proj) == (4, 4, None)  # d_model / heads
    assert (m.head_dim, m.head_dim_v) == (3, 6)  # expand_v = 2
    assert m.g_proj is not None and m.qkv_proj.weight.shape == (2 * (3 + 3 + 6), D_MODEL)
    A = np.exp(np.asarray(m.A_log))
    assert np.all((A >= 1 - 1e-5) & (A <= 16 + 1e-4))
    dt = np.asarray(jax.nn.softplus(m.dt_bias))
    assert np.all((dt >= 1e-3 * 0.999) & (dt <= 0.1 * 1.001))
    labels = layers.ssm_param_labels(m)
    assert labels.A_log == labels.dt_bias == "ssm"
    assert labels.qkv_proj.weight == labels.a_proj.weight == "other"
    assert layers.MIXERS["deltanet"] is layers.DeltaNet
    assert layers.MIXERS["gated_deltanet"] is layers.GatedDeltaNet
    with pytest.raises(ValueError, match="head_dim"):
        layers.DeltaNet(10, num_heads=4, key=jr.key(0))


def test_sequence_model_generation_with_retnet():
    """A language model on RetNet (whose state carries the position) generates by
    `step` exactly what its parallel form computes."""
    model = eqx.filter_jit(
        lambda key: layers.SequenceModel(
            "retnet", 8, 2, 11, vocab_size=11, mixer_kwargs=dict(num_heads=2), key=key
        )
    )(jr.key(3))
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, T))

    @eqx.filter_jit
    def forms(model, tokens):
        y = model(tokens)
        s, y_step = jax.lax.scan(
            lambda s, t: model.step(t, s)[::-1], model.init_state(), tokens
        )
        return y, y_step

    y, y_step = forms(model, tokens)
    assert y.shape == (T, 11)
    assert_close(y_step, y, 1e-5, "generation by steps")
