"""``ssm.scan`` against ``lax.scan``; DEER against the sequential loop; GRU and LSTM."""

import functools

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax import lax

import ssm
from layers._gru import GRU
from layers._lstm import LSTM

from .helpers import assert_close, normal, raises_as_user

F64 = jnp.float64
N, D = 3, 2


# ---------------------------------------------------------------------------
# ssm.scan: every reverse mode gives lax.scan's values and gradients.


def make_cell(params, diagonal):
    """A nonlinear step over a pytree carry (state, int counter) and pytree inputs."""
    W, U, a = params

    def cell(carry, x):
        h, i = carry
        drive = jnp.zeros((N,), F64) if x is None else U @ x["u"] * x["s"]
        pre = a * h if diagonal else W @ h
        h = jnp.tanh(pre + drive + 0.1)
        y = {"sq": h * h, "i": i}
        return (h, i + 1), y

    return cell


# mode: (checkpoints, backward, jacobian)
MODES = {
    "all": ("all", "sequential", "dense"),
    "budget1": (1, "sequential", "dense"),
    "budget3": (3, "sequential", "dense"),
    "budget64": (64, "sequential", "dense"),
    "auto": ("auto", "sequential", "dense"),
    "parallel": ("all", "parallel", "dense"),
    "parallel_diag": ("all", "parallel", "diagonal"),
}
# (T, reverse, with xs): every mode meets reverse, xs=None and an odd length.
CASES = {
    "A": (7, True, True),
    "B": (12, False, False),
    "C": (1, False, True),
    "D": (23, True, True),
}
PAIRS = [(m, c) for m in MODES for c in "AB"] + [
    ("budget3", "C"),
    ("auto", "C"),
    ("parallel", "C"),
    ("budget3", "D"),
    ("auto", "D"),
    ("parallel_diag", "D"),
]


def scan_inputs(case, diagonal):
    T, reverse, with_xs = CASES[case]
    keys = jax.random.split(jax.random.key(len(case) * 7 + ord(case[0])), 6)
    params = (normal(keys[0], (N, N)) * 0.6, normal(keys[1], (N, D)), normal(keys[2], (N,)))
    h0 = normal(keys[3], (N,))
    xs = None
    if with_xs:
        xs = {"u": normal(keys[4], (T, D)), "s": 1.0 + 0.1 * normal(keys[5], (T,))}
    return params, h0, xs


def scan_value_and_grad(scan_fn, case, diagonal):
    T, reverse, with_xs = CASES[case]

    def loss(params, h0, xs):
        cell = make_cell(params, diagonal)
        out = scan_fn(
            cell, (h0, jnp.int32(0)), xs, length=None if with_xs else T, reverse=reverse
        )
        (h, i), ys = out
        w = jnp.cos(jnp.arange(T, dtype=F64))[:, None]
        counts = ys["i"].astype(F64)[:, None]
        return jnp.sum(jnp.sin(h)) + jnp.sum(w * ys["sq"] * (1 + 0.01 * counts)), out

    fn = jax.jit(jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True))
    return fn(*scan_inputs(case, diagonal))


@functools.cache
def reference(case, diagonal):
    return scan_value_and_grad(lax.scan, case, diagonal)


@pytest.mark.parametrize("mode,case", PAIRS)
def test_scan_matches_lax_scan(mode, case):
    checkpoints, backward, jacobian = MODES[mode]
    diagonal = jacobian == "diagonal"
    ours = functools.partial(
        ssm.scan, checkpoints=checkpoints, backward=backward, jacobian=jacobian
    )
    (val, out), grad = scan_value_and_grad(ours, case, diagonal)
    (ref_val, ref_out), ref_grad = reference(case, diagonal)
    assert_close(val, ref_val, 1e-12, "value")
    assert_close(grad, ref_grad, 1e-10, "gradient")
    assert jax.tree.structure(out) == jax.tree.structure(ref_out)
    for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref_out), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("checkpoints", [2, "auto"])
def test_scan_vmap_of_grad(getkey, checkpoints):
    """Batched gradients: the schedule is data-independent, so vmap keeps it."""
    T, B = 9, 3
    W = normal(getkey(), (N, N)) * 0.6
    xs = normal(getkey(), (B, T, N))

    def loss(W, xs, scan_fn):
        h, ys = scan_fn(lambda h, x: (jnp.tanh(W @ h + x),) * 2, jnp.zeros((N,), F64), xs)
        return jnp.sum(ys**2) + jnp.sum(h)

    ours = functools.partial(ssm.scan, checkpoints=checkpoints)
    g = jax.jit(jax.vmap(jax.grad(loss, argnums=(0, 1)), (None, 0, None)), static_argnums=2)
    assert_close(g(W, xs, ours), g(W, xs, lax.scan), 1e-10)


def test_scan_memory_is_bounded():
    """Measured, not asserted: the compiled gradient's temp memory shrinks."""
    T, H = 2048, 32
    W = jnp.eye(H, dtype=jnp.float32) * 0.5
    xs = jnp.ones((T, 1), jnp.float32)

    def temp_bytes(**kw):
        def loss(W, xs):
            def cell(h, x):
                h = jnp.tanh(W @ jnp.tanh(W @ h) + x)
                return h, jnp.sum(h)

            return jnp.sum(ssm.scan(cell, jnp.zeros((H,), jnp.float32), xs, **kw)[1])

        compiled = jax.jit(jax.grad(loss)).lower(W, xs).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    full = temp_bytes()
    assert temp_bytes(checkpoints="auto") < full / 10
    assert temp_bytes(checkpoints=8) < full / 10


def test_scan_errors():
    f = lambda c, x: (c, x)
    xs = jnp.zeros((4, 2))
    with pytest.raises(ValueError, match="checkpoints"):
        ssm.scan(f, 0.0, xs, checkpoints="some")
    with pytest.raises(ValueError, match="at least 1"):
        ssm.scan(f, 0.0, xs, checkpoints=0)
    with pytest.raises(TypeError, match="checkpoints"):
        ssm.scan(f, 0.0, xs, checkpoints=2.5)
    with pytest.raises(ValueError, match="parallel"):
        ssm.scan(f, 0.0, xs, checkpoints=3, backward="parallel")
    with pytest.raises(ValueError, match="disagree"):
        ssm.scan(f, 0.0, xs, length=5, checkpoints=2)
    with pytest.raises(ValueError, match="length"):
        ssm.scan(f, 0.0, None, checkpoints=2)


# ---------------------------------------------------------------------------
# DEER / quasi-DEER: convergence to the sequential loop, implicit gradients.


def deer_cell(params):
    W, U, b = params

    def f(h, x):
        return jnp.tanh(W @ h + U @ x["u"] + b) * x["g"]

    return f


def sequential(f, h0, xs):
    return lax.scan(lambda h, x: (f(h, x),) * 2, h0, xs)[1]


@pytest.mark.parametrize("jacobian", ["dense", "diagonal"])
def test_deer_converges_with_implicit_gradients(getkey, jacobian):
    T, M = 37, 4
    params = (
        normal(getkey(), (M, M)) * 0.4,
        normal(getkey(), (M, D)),
        normal(getkey(), (M,)),
    )
    h0 = normal(getkey(), (M,))
    xs = {"u": normal(getkey(), (T, D)), "g": 1 + 0.1 * normal(getkey(), (T, 1))}
    w = normal(getkey(), (T, M))

    def deer(f, h0, xs):
        return ssm.parallel_scan_nonlinear(f, h0, xs, jacobian=jacobian)

    def seq(f, h0, xs):
        return sequential(f, h0, xs), jnp.int32(0)

    @functools.partial(jax.jit, static_argnums=3)
    def value_and_grad(params, h0, xs, solver):
        def loss(params, h0, xs):
            hs, iters = solver(deer_cell(params), h0, xs)
            return jnp.sum(w * jnp.sin(hs)), (hs, iters)

        return jax.value_and_grad(loss, argnums=(0, 1, 2), has_aux=True)(params, h0, xs)

    (_, (hs, iters)), grads = value_and_grad(params, h0, xs, deer)
    (_, (ref, _)), ref_grads = value_and_grad(params, h0, xs, seq)
    assert_close(hs, ref, 1e-9, "states")
    # Newton (dense Jacobian) converges well before the T-iteration guarantee; quasi-DEER
    # (diagonal Jacobian) may need all T on some draws (seen in CI), never more.
    assert 1 <= int(iters) < T if jacobian == "dense" else 1 <= int(iters) <= T
    assert_close(grads, ref_grads, 1e-9, "gradients")


@pytest.mark.parametrize("jacobian", ["dense", "diagonal"])
def test_deer_forward_mode_and_second_order(jacobian):
    """DEER's derivatives beyond the implicit VJP: forward mode, a Hessian and
    reverse over reverse, also for a Python float closed over by the step."""
    T = 9
    xs = jnp.linspace(0.1, 1.0, T, dtype=F64)[:, None] * jnp.ones((1, 2), F64)
    h0 = jnp.asarray([0.3, -0.1], F64)

    def loss(solver, c):
        hs = solver(lambda h, x: jnp.tanh(h * c + x), h0, xs)
        return jnp.sum(hs**2)

    def deer(f, h0, xs):
        return ssm.parallel_scan_nonlinear(f, h0, xs, jacobian=jacobian)[0]

    @functools.partial(jax.jit, static_argnums=0)
    def derivatives(solver, c):
        f = functools.partial(loss, solver)
        return jax.grad(f)(c), jax.jacfwd(f)(c), jax.hessian(f)(c), jax.grad(jax.grad(f))(c)

    ours, ref = derivatives(deer, 0.7), derivatives(sequential, 0.7)
    for name, a, b in zip(
        ("grad", "jacfwd", "hessian", "grad of grad"), ours, ref, strict=True
    ):
        assert_close(a, b, 1e-9, name)
    # Outside jit, the closed-over value a Python float.
    assert_close(jax.grad(functools.partial(loss, deer))(0.7), ref[0], 1e-9, "eager grad")


def test_deer_iteration_cap_and_exactness(getkey):
    """k iterations make the first k states exact; `iterations` caps the loop."""
    T, M = 10, 3
    W = normal(getkey(), (M, M)) * 2.0  # strongly nonlinear: slow convergence
    f = lambda h, x: jnp.tanh(W @ h + x)
    h0 = normal(getkey(), (M,))
    xs = normal(getkey(), (T, M))
    ref = sequential(f, h0, xs)
    hs, iters = ssm.parallel_scan_nonlinear(f, h0, xs, iterations=3, tol=0.0)
    assert int(iters) == 3
    assert_close(hs[:3], ref[:3], 1e-12)
    hs, iters = ssm.parallel_scan_nonlinear(f, h0, xs, tol=0.0)
    assert 3 < int(iters) <= T  # stops at T, or earlier once an iterate repeats exactly
    assert_close(hs, ref, 1e-12)


# ---------------------------------------------------------------------------
# GRU and LSTM: the mixer contract.

MIXERS = [GRU, LSTM]


def make_mixer(cls, key, **kw):
    return cls(5, 4, key=key, **kw)


@eqx.filter_jit
def mixer_outputs(mixer, x):
    """The parallel form, prefill, and split prefill followed by single steps."""
    y = mixer(x)
    y_pre, state = mixer.prefill(x, mixer.init_state())
    y1, s = mixer.prefill(x[:4], mixer.init_state())
    y2, s = mixer.prefill(x[4:8], s)
    ys = [y1, y2]
    for t in range(8, x.shape[0]):
        y_t, s = mixer.step(x[t], s)
        ys.append(y_t[None])
    return y, y_pre, state, jnp.concatenate(ys), s


@pytest.mark.parametrize("cls", MIXERS)
def test_mixer_prefill_step_equivalence(getkey, cls):
    mixer = make_mixer(cls, getkey())
    x = normal(getkey(), (11, 5))
    y, y_pre, state, y_steps, s = mixer_outputs(mixer, x)
    assert y.shape == x.shape and y.dtype == x.dtype
    assert_close(y_pre, y, 1e-12, "prefill")
    assert_close(y_steps, y, 1e-12, "split prefill + step")
    assert_close(s, state, 1e-12, "final state")


@eqx.filter_jit
def batched_outputs_and_grads(mixer, ckpt, x, x2):
    def loss(m, x):
        return jnp.sum(jnp.sin(jax.vmap(m)(x)))

    y, y2, y1 = jax.vmap(mixer)(x), jax.vmap(mixer)(x2), mixer(x[1])
    return y, y2, y1, eqx.filter_grad(loss)(mixer, x), eqx.filter_grad(loss)(ckpt, x)


@pytest.mark.parametrize("cls", MIXERS)
def test_mixer_causal_vmap_and_grads(getkey, cls):
    mixer = make_mixer(cls, getkey())
    # the same parameters with a checkpointed recurrence
    ckpt = make_mixer(cls, getkey(), checkpoints=3)
    ckpt = eqx.tree_at(lambda m: jax.tree.leaves(m), ckpt, jax.tree.leaves(mixer))
    x = normal(getkey(), (3, 9, 5))
    x2 = x.at[:, 6:].set(normal(getkey(), (3, 3, 5)))
    y, y2, y1, grads, ckpt_grads = batched_outputs_and_grads(mixer, ckpt, x, x2)
    assert_close(y[1], y1, 1e-12, "vmap")
    assert_close(y2[:, :6], y[:, :6], 1e-14, "causal")
    assert float(jnp.max(jnp.abs(y2[:, 6:] - y[:, 6:]))) > 1e-6
    for g in jax.tree.leaves(grads):
        assert bool(jnp.all(jnp.isfinite(g))) and float(jnp.max(jnp.abs(g))) > 0
    assert_close(ckpt_grads, grads, 1e-10, "checkpointed grads")


@pytest.mark.parametrize("cls", MIXERS)
def test_mixer_rejects_batches(getkey, cls):
    mixer = make_mixer(cls, getkey())
    with raises_as_user(ValueError, match="vmap"):
        mixer(jnp.zeros((2, 3, 5), F64))
