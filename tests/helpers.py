"""Comparison helpers and float64 references shared by the tests."""

import contextlib
import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import jaxtyping
import numpy as np
import pytest

import ssm


def rel_err(x, y) -> float:
    """``||x - y|| / ||y||`` over a whole pytree (0 when both are zero)."""
    xs, ys = jax.tree.leaves(x), jax.tree.leaves(y)
    assert len(xs) == len(ys), (len(xs), len(ys))
    num = sum(
        float(
            np.sum(np.abs(np.asarray(a, np.complex128) - np.asarray(b, np.complex128)) ** 2)
        )
        for a, b in zip(xs, ys, strict=True)
    )
    den = sum(float(np.sum(np.abs(np.asarray(b, np.complex128)) ** 2)) for b in ys)
    return float(np.sqrt(num / den)) if den > 0 else float(np.sqrt(num))


def assert_close(x, y, tol: float, what: str = "") -> None:
    for a, b in zip(jax.tree.leaves(x), jax.tree.leaves(y), strict=True):
        assert jnp.shape(a) == jnp.shape(b), (what, jnp.shape(a), jnp.shape(b))
    err = rel_err(x, y)
    assert err <= tol, f"{what}: relative error {err:.3e} > {tol:.1e}"


@contextlib.contextmanager
def raises_as_user(exception, *, match):
    """`pytest.raises(exception, match=match)` with jaxtyping's run-time checks off
    inside the block: the error a user's process sees.

    The suite runs `ssm` and `layers` under jaxtyping's import hook
    (`--jaxtyping-packages` in pyproject.toml), which checks every annotated call. A
    user's process has no hook, so what stops a batched input, a bad `resets` or an
    unknown option there is the layer's own `ValueError` (the `jax.vmap` hint, the
    accepted choices), which the hook would pre-empt with its `TypeCheckError`. The
    tests of those messages run here, as the user would meet them; everything else
    keeps the checks. `jaxtyping.config.update("jaxtyping_disable", True)` takes
    effect at call time: each checked function reads it on every call (jaxtyping
    0.3's `jaxtyped` wrapper), so already-decorated functions skip their checks.
    """
    before = jaxtyping.config.jaxtyping_disable
    jaxtyping.config.update("jaxtyping_disable", True)
    try:
        with pytest.raises(exception, match=match) as info:
            yield info
    finally:
        jaxtyping.config.update("jaxtyping_disable", before)


def normal(key, shape, dtype=jnp.float64):
    """Standard normal samples, complex when ``dtype`` is complex."""
    if jnp.issubdtype(dtype, jnp.complexfloating):
        k1, k2 = jax.random.split(key)
        real = jnp.finfo(dtype).dtype
        scale = np.sqrt(0.5).astype(real)
        return jax.lax.complex(
            jax.random.normal(k1, shape, real) * scale,
            jax.random.normal(k2, shape, real) * scale,
        ).astype(dtype)
    return jax.random.normal(key, shape, dtype)


def decay(key, shape, dtype=jnp.float64, low=0.3, high=0.99):
    """Random decays with modulus in [low, high] (and a random phase if complex)."""
    k1, k2 = jax.random.split(key)
    real = jnp.finfo(dtype).dtype
    mod = jax.random.uniform(k1, shape, real, low, high)
    if jnp.issubdtype(dtype, jnp.complexfloating):
        phase = jax.random.uniform(k2, shape, real, -np.pi, np.pi)
        return jax.lax.complex(mod * jnp.cos(phase), mod * jnp.sin(phase)).astype(dtype)
    sign = jnp.where(jax.random.bernoulli(k2, 0.2, shape), -1.0, 1.0).astype(real)
    return mod * sign


def value_and_grads(fn):
    """``fn(m, x)`` jitted once: its outputs and the gradients, to ``(m, x)``, of a
    random projection ``sum(fn(m, x) * w)`` of them."""

    @eqx.filter_jit
    def run(m, x, w):
        def loss(mx):
            y = fn(*mx)
            return jnp.sum(y * w), y

        g, y = eqx.filter_grad(loss, has_aux=True)((m, x))
        return y, g

    return run


def numpy_rules(fn):
    """References are written as the equations read, with NumPy's broadcasting."""

    @functools.wraps(fn)
    def wrapped(*args, **kwargs):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(*args, **kwargs)

    return wrapped


def assert_gradient_reaches_every_parameter(grads, model) -> None:
    """Every array of ``model`` has a finite gradient in ``grads`` that is not all zero."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    assert len(leaves) == len(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    for path, leaf in leaves:
        name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), name
        assert np.max(np.abs(leaf)) > 0, f"no gradient reaches {name}"


# ------------------------------------------------- the chunked operators' references
# Step-by-step loops written from the papers' equations, in float64, with the
# operators' argument order; `resets[t]` (optional) restarts the state before step
# `t` from zeros, the initial state included.


def _restart(state, r):
    return jax.tree.map(lambda s: jnp.where(r, jnp.zeros_like(s), s), state)


def _no_resets(x):
    return jnp.zeros(x.shape[:1], bool)


@numpy_rules
def ref_gla(q, k, v, log_decay, h0, resets=None):
    """`S[t] = diag(exp(log_decay[t])) S[t-1] + k[t] v[t]ᵀ`, `o[t] = S[t]ᵀ q[t]` (a
    `(T, H)` log decay is one per head). **Returns:** `(o, S[T-1])`."""
    if log_decay.ndim == 2:
        log_decay = jnp.broadcast_to(log_decay[:, :, None], q.shape)
    resets = _no_resets(q) if resets is None else resets

    def step(S, x):
        q_t, k_t, v_t, g_t, r = x
        S = _restart(S, r)
        S = jnp.exp(g_t)[:, :, None] * S + k_t[:, :, None] * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    S, o = jax.lax.scan(step, h0, (q, k, v, log_decay, resets))
    return o, S


@numpy_rules
def ref_mlstm(q, k, v, log_forget, log_input, h0, resets=None, eps=1e-6):
    """The stabilised mLSTM of Beck et al. (2024), equations (19)-(27), from
    `h0 = (C, n, m)`. **Returns:** `(h, ssm.MLSTMState)`."""
    resets = _no_resets(q) if resets is None else resets

    def step(state, x):
        q_t, k_t, v_t, lf, li, r = x
        C, n, m = _restart(state, r)
        m_new = jnp.maximum(lf + m, li)
        f = jnp.exp(lf + m - m_new)[:, None]
        i = jnp.exp(li - m_new)[:, None]
        C = f[:, :, None] * C + i[:, :, None] * k_t[:, :, None] * v_t[:, None, :]
        n = f * n + i * k_t
        num = jnp.einsum("hkv,hk->hv", C, q_t)
        den = jnp.abs(jnp.sum(n * q_t, axis=-1))
        h = num / (jnp.maximum(den, jnp.exp(-m_new)) + eps)[:, None]
        return ssm.MLSTMState(C, n, m_new), h

    xs = (q, k, v, log_forget, log_input, resets)
    state, h = jax.lax.scan(step, ssm.MLSTMState(*h0), xs)
    return h, state


@numpy_rules
def ref_delta(q, k, v, beta, log_decay=None, h0=None, resets=None):
    """`S[t] = α[t] (I - β[t] k[t] k[t]ᵀ) S[t-1] + β[t] k[t] v[t]ᵀ`, `o[t] = S[t]ᵀ q[t]`
    with `α = exp(log_decay)` (1: DeltaNet) and `S[-1] = h0` (zeros when None).
    **Returns:** `(o, S[T-1])`."""
    if log_decay is None:
        log_decay = jnp.zeros(beta.shape, beta.dtype)
    if h0 is None:
        h0 = jnp.zeros(k.shape[1:] + v.shape[2:], v.dtype)
    resets = _no_resets(q) if resets is None else resets

    def step(S, x):
        q_t, k_t, v_t, b_t, g_t, r = x
        S = _restart(S, r)
        kS = jnp.einsum("hk,hkv->hv", k_t, S)
        write = (b_t[:, None] * k_t)[:, :, None]
        S = jnp.exp(g_t)[:, None, None] * (S - write * kS[:, None, :])
        S = S + write * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    S, o = jax.lax.scan(step, h0, (q, k, v, beta, log_decay, resets))
    return o, S


# ------------------------------------------------------------------- random modules


def with_random_parameters(build, seed: int, dtype):
    """The module `build()` makes, with every inexact array drawn afresh by NumPy in
    `dtype` (its complex counterpart for complex arrays): matrices `N(0, 1/fan_in)`,
    vectors (norm scales, biases, decays) `1 + N(0, 0.3²)`.

    The structure comes from `eqx.filter_eval_shape`, so nothing is compiled (jitted
    random initialisers cost seconds of compilation each on CPU); the contracts and
    references hold for any parameters, and random norm scales make using them matter.
    """
    rng = np.random.default_rng(seed)
    complex_dtype = np.promote_types(dtype, np.complex64)  # NumPy: no strict rules

    def fill(v):
        if not isinstance(v, jax.ShapeDtypeStruct) or not jnp.issubdtype(
            v.dtype, jnp.inexact
        ):
            return v
        if len(v.shape) >= 2:
            value = rng.standard_normal(v.shape) / np.sqrt(v.shape[-1])
        else:
            value = 1 + 0.3 * rng.standard_normal(v.shape)
        return jnp.asarray(value, complex_dtype if jnp.iscomplexobj(v) else dtype)

    shapes = eqx.filter_eval_shape(build)
    return jax.tree.map(fill, shapes, is_leaf=lambda v: isinstance(v, jax.ShapeDtypeStruct))
