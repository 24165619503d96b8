"""`allow_neg_eigval` (Grazzi et al. 2025, "Unlocking state-tracking in linear RNNs
through negative eigenvalues"): transition eigenvalues in `(-1, 1)` instead of
`(0, 1)`.

For Mamba and Mamba-2 (`a = 2 exp(Δ A) - 1`, the input term unchanged) and DeltaNet
and Gated DeltaNet (`β = 2σ(·)`, so `α (I - β k kᵀ)` has the eigenvalue `α (1 - β)`
along `k`), in float64 at an odd length, each case in one compilation:

- the layer equals a plain loop over time written below from the equations, on the
  layer's own parameters, in values and in gradients to the input and every
  parameter;
- some transition eigenvalue of that loop is negative for the drawn parameters and
  input (so the comparison fails if the option did nothing);
- `__call__ == prefill == prefill in two calls == step by step`, outputs and states;
- packed documents (`resets`) equal the documents run separately, values and
  gradients.

With the option off the layers are unchanged; tests/test_layers_diagonal.py,
tests/test_layers_matrix.py and tests/test_packing.py cover that.
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
import train

from .helpers import assert_close, assert_gradient_reaches_every_parameter, numpy_rules

D_MODEL = 6
LENGTHS = (5, 1, 7)  # packed documents; boundaries inside the chunks of 4 steps
STARTS = np.cumsum((0,) + LENGTHS[:-1])
T = sum(LENGTHS)  # 13: odd, not a multiple of the chunk size
SPLIT = 6
f64 = jnp.float64

CASES = {  # large enough steps (`dt_min`, `dt_max`) that 2 exp(Δ A) - 1 goes negative
    "mamba": dict(d_state=4, chunk_size=4, dt_min=0.1, dt_max=0.9),
    "mamba2": dict(d_state=4, num_heads=2, chunk_size=4, dt_min=0.05, dt_max=0.5),
    "deltanet": dict(num_heads=2, chunk_size=4),
    "gated_deltanet": dict(num_heads=2, head_dim=3, chunk_size=4),
}


def _f64(tree):
    def cast(v):
        return v.astype(f64) if eqx.is_inexact_array(v) else v

    return jax.tree.map(cast, tree)


@functools.cache
def make(name):
    kwargs = dict(CASES[name], allow_neg_eigval=True)
    build = lambda key: _f64(layers.MIXERS[name](D_MODEL, **kwargs, key=key))
    return eqx.filter_jit(build)(jr.key(zlib.crc32(name.encode())))


def draw(name, shape, salt):
    rng = np.random.default_rng(zlib.crc32((name + salt).encode()))
    return jnp.asarray(rng.standard_normal(shape))


# ---------------------------------------------------------------- references (float64)


def _conv(w, b, x):
    """Causal depthwise convolution from zero history."""
    K, n = w.shape[0], x.shape[0]
    xp = jnp.concatenate([jnp.zeros((K - 1, x.shape[1])), x])
    return b + sum(w[k] * xp[k : k + n] for k in range(K))


def loop(step, h0, xs):
    return jax.lax.scan(step, h0, xs)[1]


def ref_mamba(m, u):
    """Mamba with `h[t] = (2 exp(Δ[t] A) - 1) ⊙ h[t-1] + (Δ[t] x[t]) B[t]ᵀ`; returns the
    outputs and the transitions `(T, d_inner, d_state)`."""
    xz = u @ m.in_proj.weight.T
    x, z = xz[:, : m.d_inner], xz[:, m.d_inner :]
    x = jax.nn.silu(_conv(m.conv_weight, m.conv_bias, x))
    dbc = x @ m.x_proj.weight.T
    r, n = m.dt_rank, m.d_state
    delta = jax.nn.softplus(dbc[:, :r] @ m.dt_proj.weight.T + m.dt_bias)
    Bs, Cs = dbc[:, r : r + n], dbc[:, r + n :]
    a = 2 * jnp.exp(delta[:, :, None] * -jnp.exp(m.A_log)) - 1

    def step(h, inp):
        a_t, d, b, c, xt = inp
        h = a_t * h + (d * xt)[:, None] * b[None, :]
        return h, h @ c + m.D * xt

    y = loop(step, jnp.zeros((m.d_inner, n)), (a, delta, Bs, Cs, x))
    return (y * jax.nn.silu(z)) @ m.out_proj.weight.T, a


def ref_mamba2(m, u):
    """Mamba-2 with `S[t] = (2 exp(Δ[t] A) - 1) S[t-1] + B[t] (Δ[t] x[t])ᵀ` per head."""
    d, N, H, P = m.d_inner, m.d_state, m.num_heads, m.head_dim
    zxbcdt = u @ m.in_proj.weight.T
    z, xbc, dt = zxbcdt[:, :d], zxbcdt[:, d : 2 * d + 2 * N], zxbcdt[:, 2 * d + 2 * N :]
    xbc = jax.nn.silu(_conv(m.conv_weight, m.conv_bias, xbc))
    x, B, C = xbc[:, :d].reshape(-1, H, P), xbc[:, d : d + N], xbc[:, d + N :]
    delta = jax.nn.softplus(dt + m.dt_bias)  # (T, H)
    a = 2 * jnp.exp(-delta * jnp.exp(m.A_log)) - 1

    def step(S, inp):  # S: (H, N, P)
        a_t, x_t, B_t, C_t, d_t = inp
        S = a_t[:, None, None] * S + B_t[None, :, None] * (d_t[:, None] * x_t)[:, None, :]
        return S, jnp.einsum("hnp,n->hp", S, C_t) + m.D[:, None] * x_t

    y = loop(step, jnp.zeros((H, N, P)), (a, x, B, C, delta)).reshape(-1, d)
    y = y * jax.nn.silu(z)
    y = y / jnp.sqrt((y**2).mean(-1, keepdims=True) + 1e-5) * m.norm_weight
    return y @ m.out_proj.weight.T, a


def ref_delta_rule(m, u):
    """(Gated) DeltaNet with `β = 2σ(W_β u)` and the full transition `α (I - β k kᵀ)`
    at every step; returns the outputs and the transitions' eigenvalues along `k`,
    `α (1 - β ‖k‖²)`."""
    H, dk, dv = m.num_heads, m.head_dim, m.head_dim_v
    qkv = jax.nn.silu(_conv(m.conv_weight, 0.0, u @ m.qkv_proj.weight.T))
    q = qkv[:, : H * dk].reshape(-1, H, dk)
    k = qkv[:, H * dk : 2 * H * dk].reshape(-1, H, dk)
    v = qkv[:, 2 * H * dk :].reshape(-1, H, dv)
    q = q / jnp.sqrt(jnp.sum(q**2, -1, keepdims=True) + 1e-6) / np.sqrt(dk)
    k = k / jnp.sqrt(jnp.sum(k**2, -1, keepdims=True) + 1e-6)
    beta = 2 * jax.nn.sigmoid(u @ m.b_proj.weight.T)
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
    eig = alpha * (1 - beta * jnp.sum(k**2, -1))
    return o.reshape(o.shape[0], -1) @ m.o_proj.weight.T, eig


REFERENCES = {
    "mamba": ref_mamba,
    "mamba2": ref_mamba2,
    "deltanet": ref_delta_rule,
    "gated_deltanet": ref_delta_rule,
}


# ---------------------------------------------------------------------------- tests


def _resets(first: bool):
    r = np.zeros(T, bool)
    r[STARTS] = True
    r[0] = first
    return jnp.asarray(r)


def _documents(x):
    """The documents of `x`, each zero-padded at its end to the longest (causal
    mixers give the same outputs on a document's own positions)."""
    L = max(LENGTHS)
    docs = [x[s : s + n] for s, n in zip(STARTS, LENGTHS, strict=True)]
    return jnp.stack([jnp.pad(d, ((0, L - d.shape[0]), (0, 0))) for d in docs])


def _undocument(y):
    return jnp.concatenate([y[i, :n] for i, n in enumerate(LENGTHS)])


@eqx.filter_jit
def _everything(m, x, w, reference):
    """All the comparisons of one case in one compiled program."""

    def grad(f):
        def loss(mx):
            y = f(*mx)
            return jnp.sum(y * w), y

        return eqx.filter_grad(loss, has_aux=True)((m, x))

    ref = numpy_rules(reference)
    out = dict(
        layer=grad(lambda m, x: m(x)),
        reference=grad(lambda m, x: ref(m, x)[0]),
        eig=ref(m, x)[1],
    )
    # the recurrent forms, in float64 states
    init = _f64(m.init_state())
    y, s = m.prefill(x, init)
    y1, s1 = m.prefill(x[:SPLIT], init)
    y2, s2 = m.prefill(x[SPLIT:], s1)
    s_step, y_step = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], init, x)
    out["forms"] = dict(
        y=y, y_split=jnp.concatenate([y1, y2]), y_step=y_step, s=s, s2=s2, s_step=s_step
    )
    # packed documents against separate ones
    resets = _resets(False)
    out["packed"] = grad(lambda m, x: m(x, resets=resets))
    out["separate"] = grad(lambda m, x: _undocument(jax.vmap(m)(_documents(x))))
    y_a, state = m.prefill(x[:SPLIT], init, resets=resets[:SPLIT])
    y_b, _ = m.prefill(x[SPLIT:], state, resets=resets[SPLIT:])
    out["packed_split"] = jnp.concatenate([y_a, y_b])
    out["dropped"] = m.prefill(x, state, resets=_resets(True))[0]  # `state` is not zero
    return out


@pytest.mark.parametrize("name", CASES)
def test_neg_eigval(name):
    m = make(name)
    assert m.allow_neg_eigval
    x = draw(name, (T, D_MODEL), "x")
    w = draw(name, (T, D_MODEL), "w")
    r = _everything(m, x, w, REFERENCES[name])

    # the layer is the equations: values, and gradients to the input and parameters
    (g, y), (g_ref, y_ref) = r["layer"], r["reference"]
    assert y.dtype == f64 and y.shape == (T, D_MODEL)
    assert_close(y, y_ref, 1e-10, f"{name} values")
    assert_close(g, g_ref, 1e-9, f"{name} gradients")
    assert_gradient_reaches_every_parameter(g[0], m)
    # ... and the option is in use: some eigenvalue is negative, none outside (-1, 1)
    eig = np.asarray(r["eig"])
    assert eig.min() < -0.1, eig.min()
    assert np.all(np.abs(eig) < 1)

    # __call__ == prefill == prefill in two calls == step by step
    f = r["forms"]
    assert_close(f["y"], y, 1e-12, f"{name}: prefill against __call__")
    assert_close(f["y_split"], y, 1e-12, f"{name}: prefill in two calls")
    assert_close(f["y_step"], y, 1e-12, f"{name}: step by step")
    assert_close(f["s2"], f["s"], 1e-12, f"{name}: state after two prefills")
    assert_close(f["s_step"], f["s"], 1e-12, f"{name}: state after the steps")

    # packed documents equal separate ones, values and gradients
    (g_p, y_p), (g_s, y_s) = r["packed"], r["separate"]
    assert_close(y_p, y_s, 1e-10, f"{name}: packed outputs")
    assert_close(g_p, g_s, 1e-9, f"{name}: packed gradients")
    assert_close(r["packed_split"], y_p, 1e-10, f"{name}: packed prefill in two calls")
    assert_close(r["dropped"], y_p, 1e-10, f"{name}: reset at token 0")
    assert float(jnp.max(jnp.abs(y - y_s))) > 1e-3  # without resets the documents mix


@pytest.mark.parametrize("name", CASES)
def test_neg_eigval_reaches_the_layer_from_a_config(name):
    """`model.mixer_kwargs: {allow_neg_eigval: true}` builds the model's mixers with it;
    the default is off."""

    def mixer(**options):
        config = train.config.parse(
            {
                "model": dict(mixer=name, d_model=8, n_layers=1, mixer_kwargs=options),
                "task": {"name": "parity"},
            }
        )
        task = train.build_task(config.task)
        model = eqx.filter_eval_shape(train.build_model, config, task, jr.key(0))
        return model.blocks[0].mixer

    assert mixer(allow_neg_eigval=True).allow_neg_eigval
    assert not mixer().allow_neg_eigval


def test_mamba_memory_is_not_the_state_history():
    """With the option on, Mamba scans through `ssm.linear_scan` one rematerialised
    chunk at a time: forward+backward at T = 4096 holds less than the `T x d_inner x
    d_state` state history (which a scan over the whole sequence stores, besides its
    transitions), one compilation. Mamba-2's path is the same `chunked` helper."""
    m = layers.Mamba(16, d_state=128, chunk_size=32, allow_neg_eigval=True, key=jr.key(0))
    params, static = eqx.partition(m, eqx.is_array)
    f = jax.jit(jax.grad(lambda p, x: jnp.sum(eqx.combine(p, static)(x) ** 2)))
    T_long = 4096
    x = jax.ShapeDtypeStruct((T_long, 16), jnp.float32)
    temp = f.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    history = T_long * m.d_inner * m.d_state * 4
    assert temp < history, (temp, history)  # measured: 0.43 of it
