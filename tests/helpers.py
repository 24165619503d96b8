"""Comparison helpers shared by the tests."""

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np


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

    def wrapped(*args):
        with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
            return fn(*args)

    return wrapped


def assert_gradient_reaches_every_parameter(grads, model) -> None:
    """Every array of ``model`` has a finite gradient in ``grads`` that is not all zero."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(grads, eqx.is_array))
    assert len(leaves) == len(jax.tree.leaves(eqx.filter(model, eqx.is_array)))
    for path, leaf in leaves:
        name, leaf = jax.tree_util.keystr(path), np.asarray(leaf)
        assert np.all(np.isfinite(leaf)), name
        assert np.max(np.abs(leaf)) > 0, f"no gradient reaches {name}"
