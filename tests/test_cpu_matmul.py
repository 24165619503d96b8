"""The compiled CPU kernels of ``ssm/_kernels/matmul.cc``: batched small matrix products
and the delta rule's chain of chunks.

The chunked operators (``ssm.gated_linear_attention``, ``ssm.mlstm``,
``ssm.delta_rule``) take their products through ``ssm._kernels.matmul``, which
runs them as an XLA FFI call on the CPU backend. These tests check it against
float64 NumPy products (every transpose, float32 and float64, shapes off its
register tiles and vector widths, row blocks, batches that broadcast, a zero-length
contraction, one thread and several), its derivative, ``vmap``, that it is really
used (and not when lowered for a GPU), and that the operators agree with and
without it. The chain (``ssm._kernels.chain``) is checked against a float64 loop of
its recurrence, in both directions, under ``vmap``, and through the delta rule.
"""

import functools

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm
from ssm import _kernels

from .helpers import assert_close

F32, F64 = jnp.float32, jnp.float64

pytestmark = pytest.mark.skipif(
    _kernels.build._compiler() is None, reason="no C++ compiler to build the kernel"
)


def uses_kernel(f, *args):
    return "@ssm_matmul(" in jax.jit(f).lower(*args).as_text()


def op(x, transpose):
    return np.swapaxes(x, -1, -2) if transpose else x


def operands(rng, batch_a, batch_b, M, K, N, ta, tb, dtype):
    a = rng.standard_normal(batch_a + ((K, M) if ta else (M, K))).astype(dtype)
    b = rng.standard_normal(batch_b + ((N, K) if tb else (K, N))).astype(dtype)
    return a, b


# (batch of a, batch of b, M, K, N): tiles of 6 rows and panels of whole vectors with
# tails; few columns (the dot-product path when b is transposed, with and without a
# contraction tail); more rows than a work unit (96); a contraction shorter than a
# vector; batches that broadcast.
SHAPES = [
    ((3,), (3,), 37, 29, 70),
    ((2, 2), (2, 2), 64, 64, 64),
    ((1,), (1,), 6, 130, 17),
    ((5,), (5,), 70, 3, 200),
    ((), (), 197, 64, 65),
    ((7,), (7,), 1, 5, 1),
    ((40,), (40,), 2, 64, 3),
    ((6,), (6,), 4, 37, 5),
    ((4, 3), (3,), 12, 16, 9),
    ((1, 5), (2, 1), 8, 33, 40),
]


@pytest.mark.parametrize("threads", ["one-thread", "threads"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
@pytest.mark.parametrize("tb", [False, True], ids=["b", "bT"])
@pytest.mark.parametrize("ta", [False, True], ids=["a", "aT"])
def test_matches_float64_products(ta, tb, dtype, threads, monkeypatch):
    if threads == "threads":
        monkeypatch.setattr(_kernels.products, "MATMUL_THREADS_MACS", 0)
    else:
        monkeypatch.setattr(_kernels.products, "MATMUL_THREADS_MACS", 1 << 62)
    rng = np.random.default_rng([ta, tb, dtype == F64])
    tol = 1e-5 if dtype == F32 else 1e-13
    for batch_a, batch_b, M, K, N in SHAPES:
        a, b = operands(rng, batch_a, batch_b, M, K, N, ta, tb, dtype)
        f = functools.partial(_kernels.matmul, transpose_a=ta, transpose_b=tb)
        assert uses_kernel(f, a, b)
        c = jax.jit(f)(a, b)
        ref = op(a.astype(np.float64), ta) @ op(b.astype(np.float64), tb)
        assert c.dtype == dtype and c.shape == ref.shape
        assert_close(c, ref, tol, f"{batch_a} {batch_b} {(M, K, N)}")


def test_empty_contraction_and_outputs():
    f = jax.jit(_kernels.matmul)
    a, b = jnp.ones((2, 9, 0), F32), jnp.ones((2, 0, 20), F32)
    assert uses_kernel(_kernels.matmul, a, b)
    np.testing.assert_array_equal(f(a, b), np.zeros((2, 9, 20)))
    assert f(jnp.ones((0, 9, 4)), jnp.ones((0, 4, 20))).shape == (0, 9, 20)


@pytest.mark.parametrize(
    "ta, tb", [(False, False), (True, False), (False, True), (True, True)]
)
def test_gradient_and_vmap(ta, tb):
    """Reverse-mode derivatives (its own rule, made of the same products, to second
    order) and `vmap` agree with `jnp.matmul` in float64."""
    rng = np.random.default_rng([ta, tb])
    a, b = operands(rng, (3,), (3,), 11, 17, 23, ta, tb, np.float64)
    ct = rng.standard_normal((3, 11, 23))

    def ours(a, b):
        return jnp.sum(_kernels.matmul(a, b, transpose_a=ta, transpose_b=tb) * ct) ** 2

    def ref(a, b):
        return jnp.sum((op(a, ta) @ op(b, tb)) * ct) ** 2

    def second(f):  # reverse over reverse: the gradient of a function of the gradient
        return jax.grad(lambda a, b: jnp.sum(jnp.sin(jax.grad(f, (0, 1))(a, b)[0])), (0, 1))

    for d in (functools.partial(jax.grad, argnums=(0, 1)), second):
        assert_close(jax.jit(d(ours))(a, b), d(ref)(a, b), 1e-10, "derivatives")
    batched = jax.jit(
        jax.vmap(functools.partial(_kernels.matmul, transpose_a=ta, transpose_b=tb))
    )
    assert_close(batched(a, b), op(a, ta) @ op(b, tb), 1e-12, "vmap")


def test_dtypes_it_does_not_take_use_xla():
    """bfloat16 and integers go to `jnp.matmul`."""
    for a, b in [
        (jnp.ones((2, 8, 8), jnp.bfloat16), jnp.ones((2, 8, 8), jnp.bfloat16)),
        (jnp.ones((2, 8, 8), jnp.int32), jnp.ones((2, 8, 8), jnp.int32)),
    ]:
        assert not uses_kernel(_kernels.matmul, a, b)
        np.testing.assert_allclose(_kernels.matmul(a, b), np.full((2, 8, 8), 8.0))


def test_not_lowered_for_gpus():
    """Lowered for a GPU, the products are XLA dots (the kernel is a CPU call), with
    the precision asked for."""
    a, b = jnp.ones((3, 16, 8), F32), jnp.ones((3, 16, 32), F32)
    for precision in (None, jax.lax.Precision.HIGHEST):
        f = functools.partial(_kernels.matmul, transpose_a=True, precision=precision)
        text = jax.export.export(jax.jit(f), platforms=["cuda"])(a, b).mlir_module()
        assert "ssm_matmul" not in text and "dot_general" in text
        assert ("HIGHEST" in text) == (precision is not None)


def operator_cases(key):
    """Each chunked operator as `(fn, inputs)`, float64, in several chunks of 8."""
    k = jax.random.split(key, 6)
    T, H, dk, dv = 45, 2, 8, 6
    q, kk = (jax.random.normal(x, (T, H, dk), F64) for x in k[:2])
    v = jax.random.normal(k[2], (T, H, dv), F64)
    per_key = jax.nn.log_sigmoid(jax.random.normal(k[3], (T, H, dk), F64) + 2)
    scalar = jax.nn.log_sigmoid(jax.random.normal(k[4], (T, H), F64) + 2)
    beta = jax.nn.sigmoid(jax.random.normal(k[5], (T, H), F64))
    unit = kk / jnp.linalg.norm(kk, axis=-1, keepdims=True)
    gla = functools.partial(ssm.gated_linear_attention, chunk_size=8)
    return {
        "gla-per-key": (gla, (q, kk, v, per_key)),
        "gla-scalar": (gla, (q, kk, v, scalar)),
        "mlstm": (functools.partial(ssm.mlstm, chunk_size=8), (q, kk, v, scalar, scalar)),
        "gated-deltanet": (
            functools.partial(ssm.delta_rule, chunk_size=8),
            (q, unit, v, beta, scalar),
        ),
    }


def values_and_grads(fn, inputs):
    def loss(*inputs):
        return sum(jnp.sum(x**2) for x in jax.tree.leaves(fn(*inputs)))

    return jax.jit(fn)(*inputs), jax.jit(jax.grad(loss, range(len(inputs))))(*inputs)


def test_operators_agree_without_the_kernel(getkey):
    """The chunked operators take the kernel's products on CPU (forwards and in their
    derivative rules) and give the same values and gradients through `jnp.matmul`
    (their path on other platforms)."""
    cases = operator_cases(getkey())

    def kernel_in_gradient(fn, inputs):
        return uses_kernel(jax.grad(lambda *x: jnp.sum(fn(*x)[0])), *inputs)

    assert all(kernel_in_gradient(*case) for case in cases.values())
    fn, inputs = cases["gated-deltanet"]
    assert (
        "@ssm_delta_chain("
        in jax.jit(jax.grad(lambda *x: jnp.sum(fn(*x)[0]))).lower(*inputs).as_text()
    )
    with_kernel = {name: values_and_grads(*case) for name, case in cases.items()}
    with _kernels.disabled():
        assert not any(kernel_in_gradient(*case) for case in cases.values())
        without = {name: values_and_grads(*case) for name, case in cases.items()}
    for name in cases:
        assert_close(with_kernel[name], without[name], 1e-11, name)


# ------------------------------------------------------------------ delta chain


def chain_reference(y0, a, b, gamma, s0, c, a_off, b_off, negate_a, negate_b, reverse):
    """The chain written as a float64 loop over links, for one sequence per leading
    index: ``y[i] = y0[i] ± a[i] s``, ``s ← gamma[i] s ± b[i]ᵀ y[i] (+ c[i])``."""
    f = lambda x: None if x is None else np.asarray(x, np.float64)  # noqa: E731
    y0, a, b, gamma, s0, c = map(f, (y0, a, b, gamma, s0, c))
    dk, dv = s0.shape[-2:]
    n = y0.shape[-4]
    states = np.zeros(y0.shape[:-2] + (dk, dv))
    y = np.zeros(y0.shape[:-1] + (dv,))
    s = s0.copy()
    for i in reversed(range(n)) if reverse else range(n):
        states[..., i, :, :, :] = s
        ai = a[..., i, :, :, a_off : a_off + dk]
        bi = b[..., i, :, :, b_off : b_off + dk]
        y[..., i, :, :, :] = y0[..., i, :, :, :dv] + (-1 if negate_a else 1) * (ai @ s)
        bty = np.swapaxes(bi, -1, -2) @ y[..., i, :, :, :]
        s = gamma[..., i, :, None, None] * s + (-1 if negate_b else 1) * bty
        if c is not None:
            s = s + c[..., i, :, :, :]
    return states, y, s


# (lead, n, H, C, dk, dv): a delta-rule group, odd sizes off the vector widths, more
# columns than a panel (64 float32 or 32 float64 lanes with AVX-512), a single link
CHAINS = [
    ((), 8, 4, 32, 64, 64),
    ((2,), 5, 3, 7, 13, 29),
    ((), 3, 2, 33, 17, 130),
    ((2, 3), 2, 2, 8, 16, 5),
    ((), 1, 1, 1, 1, 1),
]


@pytest.mark.parametrize("threads", ["one-thread", "threads"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_chain_matches_float64_loop(dtype, threads, monkeypatch):
    monkeypatch.setattr(
        _kernels.products, "MATMUL_THREADS_MACS", 0 if threads == "threads" else 1 << 62
    )
    rng = np.random.default_rng([dtype == F64, threads == "threads"])
    tol = 1e-5 if dtype == F32 else 1e-12
    for case, (lead, n, H, C, dk, dv) in enumerate(CHAINS):
        a_off, b_off = case % 3, 2 * (case % 2)
        with_c, reverse, negate_a, negate_b = (
            case % 2 == 0,
            case % 2 == 1,
            case < 3,
            case > 1,
        )

        def normal(*shape, lead=lead):
            return rng.standard_normal(lead + shape).astype(dtype)

        args = (
            normal(n, H, C, dv + case),
            normal(n, H, C, a_off + dk + 1),
            normal(n, H, C, b_off + dk),
            rng.uniform(0.3, 1.0, lead + (n, H)).astype(dtype),
            normal(H, dk, dv),
            normal(n, H, dk, dv) if with_c else None,
        )
        kw = dict(a_offset=a_off, b_offset=b_off, negate_a=negate_a, negate_b=negate_b)
        f = jax.jit(lambda *x, kw=kw, r=reverse: _kernels.chain(*x, **kw, reverse=r))
        assert "@ssm_delta_chain(" in f.lower(*args).as_text()
        got = f(*args)
        want = chain_reference(*args, a_off, b_off, negate_a, negate_b, reverse)
        for x, ref, name in zip(got, want, ("states", "y", "last"), strict=True):
            assert x.dtype == dtype and x.shape == ref.shape, name
            assert_close(x, ref, tol, f"{name} of {(lead, n, H, C, dk, dv)}")


def test_chain_vmap_and_gpu_lowering():
    """Under `vmap` the chain takes the batch as leading sequences; lowered for a GPU it
    is a loop of XLA dots, as is the delta rule (no custom call in either)."""
    rng = np.random.default_rng(0)
    n, H, C, dk, dv = 3, 2, 5, 4, 6
    args = [rng.standard_normal((4, n, H, C, dv)), rng.standard_normal((4, n, H, C, dk))]
    args += [rng.standard_normal((4, n, H, C, dk)), rng.uniform(0.5, 1, (4, n, H))]
    args += [rng.standard_normal((4, H, dk, dv))]
    kw = dict(negate_a=True, reverse=True)
    batched = jax.jit(jax.vmap(lambda *x: _kernels.chain(*x, **kw)))(*args)
    want = chain_reference(*args, None, 0, 0, True, False, True)
    assert_close(batched, want, 1e-12, "vmap")
    x = [jnp.ones((9, 2, 4), F32)] * 3 + [
        jnp.full((9, 2), 0.5, F32),
        -jnp.ones((9, 2), F32),
    ]
    text = jax.export.export(
        jax.jit(lambda *x: ssm.delta_rule(*x, chunk_size=4)), platforms=["cuda"]
    )(*x).mlir_module()
    assert "ssm_delta_chain" not in text and "ssm_matmul" not in text


# ------------------------------------------------------------- per-key GLA tree


def dense_intra(q, k, v, b):
    """Within-chunk outputs of per-key gated linear attention as written, float64:
    `o[i] = Σ_{j ≤ i} (Σ_d q[i, d] k[j, d] exp(b[i, d] - b[j, d])) v[j]`."""
    C = q.shape[-2]
    causal = jnp.tril(jnp.ones((C, C), bool))[..., None]
    diff = b[..., :, None, :] - b[..., None, :, :]
    decay = jnp.exp(jnp.where(causal, diff, -jnp.inf))
    scores = jnp.sum(q[..., :, None, :] * k[..., None, :, :] * decay, axis=-1)
    return scores @ v


# (lead, C, d_k, d_v): a GLA group (chunks x heads), sizes off the vector widths, a
# value width over a panel, the smallest chunks
TREES = [
    ((2, 3), 32, 64, 64),
    ((5,), 16, 13, 29),
    ((2,), 2, 3, 70),
    ((3,), 1, 4, 4),
    ((2,), 64, 17, 5),
]


@pytest.mark.parametrize("threads", ["one-thread", "threads"])
@pytest.mark.parametrize("dtype", [F32, F64], ids=["f32", "f64"])
def test_per_key_tree_matches_dense_float64(dtype, threads, monkeypatch):
    """The kernel's outputs and derivative (to q, k, v and the cumulative log decays
    b) against the dense formula differentiated by JAX in float64; decays down to
    exp(-200) a step, so some weights underflow to zero."""
    from ssm import _gla_intra as _gla

    monkeypatch.setattr(
        _kernels.products, "MATMUL_THREADS_MACS", 0 if threads == "threads" else 1 << 62
    )
    rng = np.random.default_rng([dtype == F64, threads == "threads"])
    tol = 2e-4 if dtype == F32 else 1e-11
    for lead, C, dk, dv in TREES:
        log_decay = np.log(rng.uniform(0.05, 1.0, lead + (C, dk)))
        log_decay[..., 3::7, :] = -200.0
        x = [rng.standard_normal(lead + (C, d)) for d in (dk, dk, dv)]
        x += [np.cumsum(log_decay, axis=-2), rng.standard_normal(lead + (C, dv))]
        q, k, v, b, do = (jnp.asarray(y, dtype) for y in x)
        fwd = jax.jit(_gla._intra_per_key)
        assert "@ssm_gla_tree(" in fwd.lower(q, k, v, b).as_text()
        o = fwd(q, k, v, b)
        grads = jax.jit(_gla._intra_per_key_bwd)(q, k, v, b, do)
        x64 = [jnp.asarray(y, F64) for y in x]
        o_ref, vjp = jax.vjp(dense_intra, *x64[:4])
        what = f"{(lead, C, dk, dv)}"
        assert o.dtype == dtype and o.shape == o_ref.shape
        assert_close(o, o_ref, tol, f"outputs {what}")
        for g, g_ref, name in zip(grads, vjp(x64[4]), "qkvb", strict=True):
            assert g.dtype == dtype and g.shape == g_ref.shape
            assert_close(g, g_ref, tol, f"d{name} {what}")


def test_per_key_tree_dispatch():
    """Under `vmap` the kernel takes the batch as more chunks; chunks that are not a
    power of two, and any lowering for a GPU, use the tree in XLA ops."""
    from ssm import _gla_intra as _gla

    rng = np.random.default_rng(1)
    x = [rng.standard_normal((3, 2, 8, d)) for d in (5, 5, 6)]
    x.append(np.cumsum(-rng.uniform(0, 1, (3, 2, 8, 5)), axis=-2))
    batched = jax.jit(jax.vmap(_gla._intra_per_key))(*x)
    assert_close(batched, dense_intra(*map(jnp.asarray, x)), 1e-12, "vmap")
    odd = [jnp.asarray(y[..., :6, :]) for y in x]  # leaves of 3 steps, then one level
    assert "ssm_gla_tree" not in jax.jit(_gla._intra_per_key).lower(*odd).as_text()
    o_ref, vjp = jax.vjp(dense_intra, *odd)
    assert_close(_gla._intra_per_key(*odd), o_ref, 1e-12, "C=6")
    do = jnp.asarray(rng.standard_normal(o_ref.shape))
    assert_close(_gla._intra_per_key_bwd(*odd, do), vjp(do), 1e-12, "C=6 derivative")
    f32 = [jnp.asarray(y, F32) for y in x]
    text = jax.export.export(jax.jit(_gla._intra_per_key), platforms=["cuda"])(
        *f32
    ).mlir_module()
    assert "ssm_gla_tree" not in text
