"""The delta-rule mixers (DeltaNet, Gated DeltaNet): the contract of every mixer.

Each layer's parallel (chunked) form is compared with a float64 reference written
below from its paper's equations (the recurrence as a loop over full-matrix
transitions, on the layer's own parameters), in values and gradients; then the
recurrent trio, causality, shift equivariance, vmap and bfloat16 are checked, and the
training memory is measured against the `T × state` history.
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

from .helpers import assert_close, normal, rel_err

D_MODEL, T = 8, 37  # odd length, not a multiple of the chunk sizes below
f32, f64 = jnp.float32, jnp.float64

CASES = {  # between them, every option: the output gate, β in (0, 2), the decay
    "deltanet": ("deltanet", dict(num_heads=2, allow_neg_eigval=True, chunk_size=8)),
    "gated_deltanet": ("gated_deltanet", dict(num_heads=2, head_dim=3, chunk_size=16)),
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
    name, kwargs = CASES[case]
    build = eqx.filter_jit(lambda key: layers.MIXERS[name](D_MODEL, **kwargs, key=key))
    return build(jr.key(zlib.crc32(case.encode())))


# ---------------------------------------------------------------- reference (float64)


def _conv(w, x):
    """Causal depthwise convolution without bias, zero history."""
    K, n = w.shape[0], x.shape[0]
    xp = jnp.concatenate([jnp.zeros((K - 1, x.shape[1]), x.dtype), x])
    return sum(w[k] * xp[k : k + n] for k in range(K))


def reference(m, u):
    """The layer as its paper writes it, one step at a time."""
    H, dk, dv = m.num_heads, m.head_dim, m.head_dim_v
    qkv = jax.nn.silu(_conv(m.conv_weight, u @ m.qkv_proj.weight.T))
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

    o = jax.lax.scan(step, jnp.zeros((H, dk, dv)), (q, k, v, beta, alpha))[1]
    o = o / jnp.sqrt(jnp.mean(o**2, -1, keepdims=True) + 1e-5) * m.norm_weight
    if m.g_proj is not None:
        o = o * jax.nn.silu(u @ m.g_proj.weight.T).reshape(o.shape)
    return o.reshape(o.shape[0], -1) @ m.o_proj.weight.T


def value_and_grads(fn):
    @eqx.filter_jit
    def run(m, x, w):
        def loss(mx):
            return jnp.sum(fn(*mx) * w)

        return fn(m, x), eqx.filter_grad(loss)((m, x))

    return run


def numpy_rules(fn):
    """The reference is written as the equations read, with NumPy's promotion rules."""

    def wrapped(*args):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(*args)

    return wrapped


run_layer = value_and_grads(lambda m, x: m(x))
run_reference = value_and_grads(numpy_rules(reference))


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_matches_float64_reference(case, getkey):
    """Values and gradients (to every parameter and the input) at an odd length."""
    m = make(case, f64)
    x = normal(getkey(), (T, D_MODEL))
    w = normal(getkey(), (T, D_MODEL))
    y, g = run_layer(m, x, w)
    y_ref, g_ref = run_reference(m, x, w)
    assert y.dtype == f64
    assert_close(y, y_ref, 1e-10, "values")
    assert_close(g, g_ref, 1e-9, "gradients")
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(g[0], eqx.is_array))
    assert len(leaves) == len(jax.tree.leaves(eqx.filter(m, eqx.is_array)))
    for path, leaf in leaves:
        name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), name
        assert np.max(np.abs(leaf)) > 0, f"no gradient reaches {name}"


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
def test_recurrent_forms_causality_shift_vmap_bf16(case, getkey):
    """`m(x) == prefill (split in two) == step by step` (outputs and states); causal;
    shift-equivariant (zero inputs leave the state at zero: no conv bias, `k = 0`);
    `vmap` over a batch; bfloat16 parameters and inputs close to float32."""
    m = make(case)
    x = normal(getkey(), (T, D_MODEL), f32)
    t0, k = 20, 5
    r = contract_forms(m, x, 13, t0, k)
    y = r["y"]
    assert y.dtype == f32 and y.shape == (T, D_MODEL)
    assert_close(r["y_call"], y, 1e-5, "__call__ (vmapped) against prefill")
    assert_close(r["y_split"], y, 1e-5, "prefill split in two")
    assert_close(r["y_step"], y, 1e-5, "step by step")
    assert_close(r["s2"], r["s_full"], 1e-5, "state after split prefill")
    assert_close(r["s_step"], r["s_full"], 1e-5, "state after steps")
    for leaf in jax.tree.leaves(r["s_full"]):
        assert leaf.dtype == f32
    np.testing.assert_allclose(r["y_pert"][:t0], y[:t0], rtol=0, atol=1e-6)
    assert rel_err(r["y_pert"][t0:], y[t0:]) > 1e-3
    assert_close(r["y_shift"][k:], y[:-k], 1e-5, "shift equivariance")
    assert r["y16"].dtype == jnp.bfloat16
    assert rel_err(r["y16"].astype(f32), y) < 5e-2
    with pytest.raises(ValueError, match="vmap"):
        m(jnp.stack([x, x]))
    with pytest.raises(ValueError, match="vmap"):
        m.step(x[:2], m.init_state())


@pytest.mark.parametrize("name", CASES)
def test_memory_is_not_the_state_history(name):
    """Forward+backward (to every parameter) at T = 4096 holds far less than the
    `T × H × d_k × d_v` state history (the rest is `O(T · channels)` activations)."""
    T_long, d = 4096, 16
    m = layers.MIXERS[name](d, num_heads=2, head_dim=128, expand_v=1, key=jr.key(0))
    params, static = eqx.partition(m, eqx.is_array)

    def loss(p, x):
        return jnp.sum(eqx.combine(p, static)(x) ** 2)

    x = jax.ShapeDtypeStruct((T_long, d), f32)
    temp = jax.jit(jax.grad(loss)).lower(params, x).compile().memory_analysis()
    history = T_long * m.num_heads * m.head_dim * m.head_dim_v * 4
    assert temp.temp_size_in_bytes < history / 3, (temp.temp_size_in_bytes, history)


def test_sizes_init_and_labels(getkey):
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
        layers.DeltaNet(10, num_heads=4, key=getkey())
