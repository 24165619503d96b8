"""The compiled CPU kernel of ``ssm.linear_scan`` (``ssm/_kernels/scan.cc``).

``method="sequential"`` (and ``"auto"`` on CPU) runs the diagonal scan as an XLA FFI
call when the kernel covers the case; these tests check that it is really used, that
it agrees with a float64 loop reference in values, VJPs and JVPs (forwards, reverse,
``h0``, lengths 1 to 301, real, complex and bfloat16 inputs, decays full, time-
invariant, shared over a state axis or one per step, resets, column counts that
are not multiples of its blocks, one thread and several, stores through the cache and
non-temporal ones), and that
without it (no compiler, a failed build, ``SSM_CPU_KERNEL=0``) the scan falls back
to XLA's loops with a warning and the same numbers.
"""

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm
from ssm import _kernels

from .helpers import assert_close, decay, normal
from .test_scan import ref_linear_scan

F32, F64, BF16 = jnp.float32, jnp.float64, jnp.bfloat16

pytestmark = pytest.mark.skipif(
    _kernels.build._compiler() is None, reason="no C++ compiler to build the kernel"
)


def lowered_text(f, *args):
    return jax.jit(f).lower(*args).as_text()


def uses_kernel(f, *args):
    return "@ssm_linear_scan(" in lowered_text(f, *args)


def check_kernel(f, ref, primals, tangents, ct, wide, tol, vjp_tol):
    """`f` runs on the kernel and agrees with `ref`, run on `wide` copies of the inputs,
    in values, in the VJP of `ct` and in the JVP along `tangents`."""
    assert uses_kernel(f, *primals)
    widened = tuple(x.astype(wide) for x in primals)
    h, vjp = jax.vjp(jax.jit(f), *primals)
    h_ref, vjp_ref = jax.vjp(ref, *widened)
    _, jvp = jax.jit(lambda *p: jax.jvp(f, p, tangents))(*primals)
    _, jvp_ref = jax.jvp(ref, widened, tuple(x.astype(wide) for x in tangents))
    assert_close(h, h_ref, tol, "values")
    assert_close(vjp(ct), vjp_ref(ct.astype(wide)), vjp_tol, "vjp")
    assert_close(jvp, jvp_ref, tol, "jvp")
    return h


@pytest.fixture(params=["cached-stores", "nontemporal-threads"])
def mode(request, monkeypatch):
    """The kernel's two store paths and its thread split, chosen at trace time."""
    if request.param == "nontemporal-threads":
        monkeypatch.setattr(_kernels.linear_scan, "NONTEMPORAL_BYTES", 0)
        monkeypatch.setattr(_kernels.linear_scan, "THREADS_ELEMENTS", 0)
    return request.param


# (T, state shape, shape of `a` after T, dtype, reverse): column counts 5, 210, 130,
# 134, 64 against blocks of 64 (float32) and 32 (float64) columns; 64 float32 columns
# make aligned rows, the others not. `a` full, time-invariant (leading 1), shared over
# a leading state axis, or one decay per step; real and complex.
C64, C128 = jnp.complex64, jnp.complex128
CASES = [
    (1, (5,), "full", F64, False),
    (2, (3, 70), "full", F32, True),
    (17, (130,), "full", F64, False),
    (301, (2, 67), "full", F32, True),
    (300, (64,), "full", F32, False),
    (257, (2, 64), "full", F64, True),
    (33, (3, 64), "invariant", F32, False),
    (40, (2, 5, 64), "shared", F64, True),
    (29, (4, 3), "per-step", F32, False),
    (37, (3, 70), "full", C64, True),
    (45, (2, 33), "invariant", C128, False),
    (50, (3, 32), "shared", C64, False),
    (301, (2, 67), "full", BF16, True),
    (64, (2, 64), "invariant", BF16, False),
]


def a_shape(kind, T, S):
    return {
        "full": (T,) + S,
        "invariant": (1,) + S,
        "shared": (1,) + (1,) * (len(S) - 1) + S[-1:],
        "per-step": (T,) + (1,) * len(S),
    }[kind]


@pytest.mark.parametrize("case", CASES, ids=lambda c: f"T{c[0]}-{c[1]}-{c[2]}-{c[4]}")
def test_kernel_matches_float64_reference(getkey, mode, case):
    T, S, kind, dtype, reverse = case
    wide = C128 if jnp.issubdtype(dtype, jnp.complexfloating) else F64
    state = F32 if dtype == BF16 else dtype  # bfloat16 inputs, float32 state
    a = decay(getkey(), a_shape(kind, T, S), wide).astype(dtype)
    b, h0 = normal(getkey(), (T,) + S, wide).astype(dtype), normal(getkey(), S, wide)
    h0 = h0.astype(state)
    ta, tb = (normal(getkey(), x.shape, wide).astype(dtype) for x in (a, b))
    ct, th0 = (normal(getkey(), x.shape, wide).astype(state) for x in (b, h0))

    def f(a, b, h0):
        return ssm.linear_scan(a, b, h0, reverse=reverse, method="sequential")

    def ref(a, b, h0):
        return ref_linear_scan(a, b, h0, reverse=reverse)

    # bfloat16 inputs accumulate in float32; their cotangents come back in bfloat16
    # (8 bits of mantissa)
    tol = {F32: 1e-5, C64: 1e-5, BF16: 1e-5}.get(dtype, 1e-12)
    vjp_tol = 1e-2 if dtype == BF16 else tol
    h = check_kernel(f, ref, (a, b, h0), (ta, tb, th0), ct, wide, tol, vjp_tol)
    assert h.dtype == state


def test_kernel_agrees_with_xla_loops_and_under_vmap(getkey):
    """The same scan with the kernel turned off (XLA's loop) gives the same values and
    gradients; under `vmap` the kernel is used with `a` batched and with `a` shared
    across the batch (a decay broadcast over a leading state axis)."""
    a = decay(getkey(), (4, 45, 128)).astype(F32)
    b = normal(getkey(), (4, 45, 128)).astype(F32)

    def loss(a, b):
        return jnp.sum(ssm.linear_scan(a, b, method="sequential") ** 2)

    grad = jax.value_and_grad(loss, argnums=(0, 1))
    with _kernels.disabled():
        assert not uses_kernel(grad, a[0], b[0])
        want = jax.jit(grad)(a[0], b[0])
    assert uses_kernel(grad, a[0], b[0])
    assert_close(jax.jit(grad)(a[0], b[0]), want, 1e-6, "kernel against XLA")

    batched = jax.vmap(grad)
    shared = jax.vmap(grad, in_axes=(None, 0))
    assert uses_kernel(batched, a, b) and uses_kernel(shared, a[0], b)
    out_batched, out_shared = jax.jit(batched)(a, b), jax.jit(shared)(a[0], b)
    for i in range(4):
        row = jax.tree.map(lambda x: x[i], out_batched)  # noqa: B023
        assert_close(row, jax.jit(grad)(a[i], b[i]), 1e-6, "vmap, a batched")
        row = jax.tree.map(lambda x: x[i], out_shared)  # noqa: B023
        assert_close(row, jax.jit(grad)(a[0], b[i]), 1e-6, "vmap, a shared")


@pytest.mark.parametrize("reverse", [False, True])
def test_kernel_with_resets(getkey, mode, reverse):
    """Resets (one flag per step, including the first and the last) restart the state;
    values, VJPs and JVPs against the float64 loop."""
    T, S = 203, (2, 67)
    a, b = decay(getkey(), (T,) + S).astype(F32), normal(getkey(), (T,) + S).astype(F32)
    h0 = normal(getkey(), S).astype(F32)
    resets = jax.random.bernoulli(getkey(), 0.05, (T,)).at[0].set(True).at[-1].set(True)
    ct, ta, tb, th0 = (normal(getkey(), x.shape).astype(F32) for x in (b, a, b, h0))

    def f(a, b, h0):
        return ssm.linear_scan(a, b, h0, reverse=reverse, resets=resets)

    def ref(a, b, h0):
        return ref_linear_scan(a, b, h0, reverse=reverse, resets=resets)

    check_kernel(f, ref, (a, b, h0), (ta, tb, th0), ct, F64, 1e-5, 1e-5)


def test_cases_the_kernel_does_not_cover_use_xla():
    a, b = jnp.full((9, 6, 4), 0.5, F32), jnp.ones((9, 6, 4), F32)
    resets = jnp.zeros((2, 9), bool)  # resets that differ across a vmapped batch

    def batched_resets(a, b):
        return jax.vmap(lambda r: ssm.linear_scan(a, b, resets=r))(resets)

    assert not uses_kernel(batched_resets, a, b)
    shared = jnp.full((1, 1, 9), 0.5, F32)  # shared in less than a vector block
    assert not uses_kernel(lambda b: ssm.linear_scan(shared, b), jnp.ones((9, 6, 9), F32))
    assert not uses_kernel(lambda a, b: ssm.linear_scan(a[:, :, :1], b), a, b)
    assert not uses_kernel(lambda a, b: ssm.linear_scan(a, b, method="chunked"), a, b)
    c = b.astype(C64)  # a real decay on a complex state: mixed dtypes
    assert not uses_kernel(lambda a, c: ssm.linear_scan(a, c), a, c)
    assert not uses_kernel(lambda a, b: ssm.matrix_scan(a[:, :4], b[:, :4, 0]), a, b)
    assert uses_kernel(lambda a, b: ssm.linear_scan(a, b), a, b)  # auto, on CPU


def test_build_is_cached(tmp_path, monkeypatch):
    monkeypatch.setenv("SSM_KERNEL_CACHE", str(tmp_path))
    library = _kernels.build._build()
    assert library.parent == tmp_path and library.exists()
    stamp = library.stat().st_mtime_ns
    assert _kernels.build._build() == library and library.stat().st_mtime_ns == stamp
    assert [p.name for p in tmp_path.iterdir()] == [library.name]  # no leftovers


def test_fallback_without_the_kernel(getkey, monkeypatch):
    """A failed build warns once, naming the cause, and scans run on XLA's loops;
    `SSM_CPU_KERNEL=0` turns the kernel off."""
    a = decay(getkey(), (20, 3)).astype(F32)
    b = normal(getkey(), (20, 3)).astype(F32)
    want = ref_linear_scan(a.astype(F64), b.astype(F64), jnp.zeros(3, F64))

    def f(a, b):
        return ssm.linear_scan(a, b)

    def broken():
        raise RuntimeError("compiler exploded")

    monkeypatch.setitem(_kernels.build._state, "loaded", None)
    monkeypatch.setattr(_kernels.build, "_build", broken)
    with pytest.warns(RuntimeWarning, match="compiler exploded"):
        assert not _kernels.available()
    assert not _kernels.available()  # no second warning, no second try
    assert not uses_kernel(f, a, b)
    assert_close(jax.jit(f)(a, b), want, 1e-5)

    monkeypatch.setitem(_kernels.build._state, "loaded", True)
    assert _kernels.available()
    monkeypatch.setenv("SSM_CPU_KERNEL", "0")
    assert not _kernels.available() and not uses_kernel(f, a, b)
    np.testing.assert_allclose(jax.jit(f)(a, b), want, rtol=1e-5, atol=1e-6)
