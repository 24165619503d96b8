"""The compiled CPU kernel of ``ssm.selective_scan`` (``ssm/_kernels/selective.cc``).

``method="kernel"`` (and ``"auto"`` on CPU) runs Mamba's recurrence and its backward
pass as XLA FFI calls; these tests check that they are really in the program, that
they agree with a float64 loop written here from the paper's equations in values,
final state and VJPs to every argument (x, dt, A, B, C, D, z, h0), with resets, grouped
``B``/``C`` (groups aligned with the kernel's vector blocks and not), channel counts
that are not a multiple of a vector, lengths 1, 13 and 70, one thread and several;
float32 against that loop and against XLA's path; under ``jax.vmap``; the float32
exponential against ``exp``; forward mode (through the reference); and that with the
kernels off ``"auto"`` falls back to XLA's loops and ``"kernel"`` says why it cannot.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ssm
from ssm import _kernels

from .helpers import assert_close, raises_as_user

f32, f64 = jnp.float32, jnp.float64
ARGS = ("x", "dt", "A", "B", "C", "D", "z", "h0")

pytestmark = pytest.mark.skipif(
    _kernels.build._compiler() is None, reason="no C++ compiler to build the kernel"
)


def loop(x, dt, A, B, C, D, z, h0, resets):
    """Gu and Dao (2023), eq. 2 with Mamba's discretisation, per channel d:
    h[t] = exp(dt[t, d] A[d]) h[t-1] + dt[t, d] x[t, d] B[t, g(d)] (the decay 0 where
    resets[t]), y[t, d] = h[t] . C[t, g(d)] + D[d] x[t, d], out = y silu(z); a loop
    over time (`lax.scan`), one step as written."""
    d_inner = x.shape[1]
    Bg = B[:, None] if B.ndim == 2 else B
    Cg = C[:, None] if C.ndim == 2 else C
    group = np.arange(d_inner) // (d_inner // Bg.shape[1])

    def step(h, inputs):
        x_t, dt_t, B_t, C_t, r_t = inputs
        decay = jnp.where(r_t, 0.0, jnp.exp(dt_t[:, None] * A))
        h = decay * h + (dt_t * x_t)[:, None] * B_t[group]
        return h, jnp.sum(h * C_t[group], axis=1) + D * x_t

    h, y = jax.lax.scan(step, h0, (x, dt, Bg, Cg, resets))
    return y * jax.nn.silu(z), h


def make(key, T, d_inner, N, groups, dtype):
    ks = jr.split(key, 8)
    bc = (T, N) if groups is None else (T, groups, N)
    return dict(
        x=jr.normal(ks[0], (T, d_inner), dtype),
        dt=jax.nn.softplus(jr.normal(ks[1], (T, d_inner), dtype) - 1.0),
        A=-jnp.exp(0.5 * jr.normal(ks[2], (d_inner, N), dtype)),
        B=jr.normal(ks[3], bc, dtype),
        C=jr.normal(ks[4], bc, dtype),
        D=jr.normal(ks[5], (d_inner,), dtype),
        z=jr.normal(ks[6], (T, d_inner), dtype),
        h0=jr.normal(ks[7], (d_inner, N), dtype),
    )


def resets_at(T, where):
    r = np.zeros((T,), bool)
    r[[i for i in where if i < T]] = True
    return jnp.asarray(r)


def scan(method, resets, chunk_size=None):
    def fn(args):
        return ssm.selective_scan(
            **args, resets=resets, return_state=True, chunk_size=chunk_size, method=method
        )

    return fn


def value_and_vjp(fn, args, w, w_h):
    """The outputs and the VJP of the cotangents `(w, w_h)` to every argument."""
    out, vjp = jax.vjp(fn, args)
    cts = (w.astype(out[0].dtype), w_h.astype(out[1].dtype))
    return out, vjp(cts)[0]


def uses_kernel(fn, args):
    text = jax.jit(lambda a: jax.grad(lambda b: jnp.sum(fn(b)[0]))(a)).lower(args).as_text()
    return "@ssm_selective_fwd(" in text and "@ssm_selective_bwd(" in text


# name: (T, d_inner, N, groups, chunk_size, resets). float64 vectors hold 4 channels:
# d_inner = 6 leaves a partial block; groups of 2 or 10 channels put several groups
# in one block; 70 x 40 x 16 updates run on several threads, each summing dB and dC
# over its channels apart.
CASES = {
    "one-step": (1, 5, 3, None, None, ()),
    "partial-block-resets": (13, 6, 3, None, 5, (0, 3, 9)),
    "groups-in-blocks": (13, 6, 2, 3, 4, (4, 5)),
    "aligned-groups": (70, 16, 4, 2, None, (10, 35, 36)),
    "threads": (70, 40, 16, 4, 16, (16, 33)),
}


@pytest.mark.parametrize("case", CASES)
def test_float64_against_loop(case, getkey):
    T, d_inner, N, groups, chunk, where = CASES[case]
    args = make(getkey(), T, d_inner, N, groups, f64)
    resets = resets_at(T, where)
    w = jr.normal(getkey(), (T, d_inner), f64)
    w_h = jr.normal(getkey(), (d_inner, N), f64)
    fn = scan("kernel", resets, chunk)
    assert uses_kernel(fn, args)
    (out, h), grads = jax.jit(lambda a: value_and_vjp(fn, a, w, w_h))(args)
    (out_ref, h_ref), grads_ref = jax.jit(
        lambda a: value_and_vjp(lambda b: loop(**b, resets=resets), a, w, w_h)
    )(args)
    assert out.dtype == f64 and h.shape == (d_inner, N)
    assert_close(out, out_ref, 1e-12, "outputs")
    assert_close(h, h_ref, 1e-12, "final state")
    for name in ARGS:
        assert_close(grads[name], grads_ref[name], 1e-10, f"d{name}")
        if name == "h0" and 0 in where:  # the state restarts before h0 is used
            np.testing.assert_array_equal(np.asarray(grads[name]), 0.0)
        else:
            assert np.max(np.abs(np.asarray(grads[name]))) > 0, f"d{name} is zero"


def test_float32_against_loop_and_xla(getkey):
    """float32 (8 channels a vector, the polynomial exponential): close to the float64
    loop, and to XLA's path in float32; the state and gradients stay float32."""
    T, d_inner, N, groups = 70, 20, 5, None
    args = make(getkey(), T, d_inner, N, groups, f32)
    resets = resets_at(T, (7, 40))
    w = jr.normal(getkey(), (T, d_inner), f32)
    w_h = jr.normal(getkey(), (d_inner, N), f32)
    fn = scan("kernel", resets)
    assert uses_kernel(fn, args)
    (out, h), grads = jax.jit(lambda a: value_and_vjp(fn, a, w, w_h))(args)
    xla = scan("xla", resets)
    (out_x, h_x), grads_x = jax.jit(lambda a: value_and_vjp(xla, a, w, w_h))(args)
    wide = {k: v.astype(f64) for k, v in args.items()}
    (out_ref, h_ref), grads_ref = jax.jit(
        lambda a: value_and_vjp(lambda b: loop(**b, resets=resets), a, w, w_h)
    )(wide)
    assert out.dtype == f32 and h.dtype == f32
    assert_close(out, out_ref, 2e-6, "outputs")
    assert_close(h, h_ref, 2e-6, "final state")
    assert_close((out, h), (out_x, h_x), 2e-6, "outputs against XLA's path")
    for name in ARGS:
        assert grads[name].dtype == f32
        assert_close(grads[name], grads_ref[name], 1e-5, f"d{name}")
        assert_close(grads[name], grads_x[name], 1e-5, f"d{name} against XLA's path")


def test_float32_exponential(getkey):
    """With x = 0, one state, C = 1 and h0 = 1, y[0, d] = exp(dt[d] A[d]): the kernel's
    float32 exponential over [-87, 10], against float64 exp."""
    d = 4096
    dtA = np.linspace(-87.0, 10.0, d)
    args = dict(
        x=jnp.zeros((1, d), f32),
        dt=jnp.ones((1, d), f32),
        A=jnp.asarray(dtA, f32)[:, None],
        B=jnp.zeros((1, 1), f32),
        C=jnp.ones((1, 1), f32),
        h0=jnp.ones((d, 1), f32),
    )
    y = np.asarray(jax.jit(lambda a: ssm.selective_scan(**a, method="kernel"))(args))
    exact = np.exp(np.asarray(args["A"][:, 0], np.float64))
    assert np.max(np.abs(y[0] / exact - 1)) < 1e-6


def test_vmap(getkey):
    """A batch through `jax.vmap` (A shared, everything else per example): gradients
    equal the loop's, run example by example, on the kernel; jvp (through the
    operator's reference) too."""
    L, T, d_inner, N = 3, 13, 12, 4
    per = [make(getkey(), T, d_inner, N, None, f64) for _ in range(L)]
    batch = {k: jnp.stack([p[k] for p in per]) for k in ARGS if k != "A"}
    A = per[0]["A"]
    resets = jnp.stack([resets_at(T, (3,)), resets_at(T, ()), resets_at(T, (0, 7))])

    def run(a, b, r):
        return ssm.selective_scan(**b, A=a, resets=r, return_state=True, method="kernel")

    def loss(a, b):
        out, h = jax.vmap(run, in_axes=(None, 0, 0))(a, b, resets)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(h**2)

    grad = jax.jit(jax.grad(loss, argnums=(0, 1)))
    assert "@ssm_selective_bwd(" in grad.lower(A, batch).as_text()
    dA, db = grad(A, batch)

    def loss_ref(a, b):
        out, h = jax.vmap(lambda b, r: loop(**b, A=a, resets=r))(b, resets)
        return jnp.sum(out * jnp.cos(out)) + jnp.sum(h**2)

    dA_ref, db_ref = jax.jit(jax.grad(loss_ref, argnums=(0, 1)))(A, batch)
    assert_close(dA, dA_ref, 1e-10, "dA (summed over the batch)")
    for k in batch:
        assert_close(db[k], db_ref[k], 1e-10, f"d{k}")

    def batched(b):
        return jax.vmap(run, in_axes=(None, 0, 0))(A, b, resets)

    def batched_ref(b):
        return jax.vmap(lambda b, r: loop(**b, A=A, resets=r))(b, resets)

    tangent = jax.tree.map(jnp.ones_like, batch)
    _, jvp = jax.jit(lambda b, t: jax.jvp(batched, (b,), (t,)))(batch, tangent)
    _, jvp_ref = jax.jit(lambda b, t: jax.jvp(batched_ref, (b,), (t,)))(batch, tangent)
    assert_close(jvp, jvp_ref, 1e-10, "jvp")


def test_fallback(monkeypatch, getkey):
    """With the kernels off (`SSM_CPU_KERNEL=0`, `_kernels.disabled()`), `auto` runs
    XLA's loops with the same values and `kernel` refuses, naming the cause."""
    args = make(getkey(), 13, 6, 3, None, f64)
    auto = scan("auto", None)
    assert uses_kernel(auto, args)
    expected = jax.jit(auto)(args)
    with _kernels.disabled():
        assert not uses_kernel(auto, args)
        assert_close(jax.jit(auto)(args), expected, 1e-12, "XLA's path")
    monkeypatch.setenv("SSM_CPU_KERNEL", "0")
    assert not uses_kernel(auto, args)
    with raises_as_user(ValueError, match="kernel is unavailable"):
        scan("kernel", None)(args)
    with raises_as_user(ValueError, match="`method` must be"):
        ssm.selective_scan(**args, method="fast")
