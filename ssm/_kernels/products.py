"""The chunked operators' kernels (``matmul.cc``): batched small matrix products
(`matmul`), the delta rule's chain of chunks (`chain`) and the per-key gated linear
attention's within-chunk tree (`per_key_tree`). Each wrapper emits the kernel, under
``jax.lax.platform_dependent``, only where `ssm._kernels.build.available`; otherwise
the same computation in XLA ops.
"""

from __future__ import annotations

import functools

import jax
import jax.numpy as jnp
import numpy as np

from .build import available, cpus

# Products of fewer multiply-adds than this in all run on one thread (handing work to
# another costs more than it saves; measured on the chunked operators).
MATMUL_THREADS_MACS = 1 << 16


def _one_float_dtype(*arrays) -> bool:
    """Whether the arrays share one dtype the kernels compute in: float32 or float64."""
    dtypes = {np.dtype(x.dtype) for x in arrays}
    return len(dtypes) == 1 and dtypes.pop() in (np.dtype(np.float32), np.dtype(np.float64))


def _xla_matmul(a, b, ta, tb, precision):
    """``op(a) @ op(b)`` by ``jnp.matmul``: the path off the kernel."""
    a, b = (jnp.swapaxes(x, -1, -2) if t else x for x, t in ((a, ta), (b, tb)))
    return jnp.matmul(a, b, precision=precision)


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, precision=None):
    """``op(a) @ op(b)`` over the leading (batch) axes, ``op`` a transpose of the last
    two axes where asked.

    On the CPU backend with the kernel available, for float32 or float64 operands of
    one dtype, the compiled kernel does it (in full precision, threaded over the
    batch); otherwise, and when lowered for other platforms, ``jnp.matmul`` with
    ``precision``. Reverse-mode differentiable (its derivative is made of the same
    products); not forward-mode where the kernel is used."""
    if not _one_float_dtype(a, b) or a.ndim < 2 or b.ndim < 2 or not available():
        return _xla_matmul(a, b, transpose_a, transpose_b, precision)
    batch = tuple(jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    a = jnp.broadcast_to(a, batch + a.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    return _matmul(a, b, bool(transpose_a), bool(transpose_b), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(a, b, ta, tb, precision):
    M, N = (a.shape[-1] if ta else a.shape[-2]), (b.shape[-2] if tb else b.shape[-1])
    K = a.shape[-2] if ta else a.shape[-1]
    count = int(np.prod(a.shape[:-2], dtype=np.int64))
    threads = 1 if count * M * K * N < MATMUL_THREADS_MACS else cpus()

    def kernel(a, b):
        call = jax.ffi.ffi_call(
            "ssm_matmul",
            jax.ShapeDtypeStruct(a.shape[:-2] + (M, N), a.dtype),
            vmap_method="broadcast_all",
        )
        return call(a, b, transpose_a=ta, transpose_b=tb, threads=np.int64(threads))

    xla = functools.partial(_xla_matmul, ta=ta, tb=tb, precision=precision)
    return jax.lax.platform_dependent(a, b, cpu=kernel, default=xla)


def _matmul_fwd(a, b, ta, tb, precision):
    return _matmul(a, b, ta, tb, precision), (a, b)


def _matmul_bwd(ta, tb, precision, res, dc):
    a, b = res
    # c = op(a) op(b): d op(a) = dc op(b)^T, d op(b) = op(a)^T dc (transposed back
    # where the operand is stored transposed).
    mm = functools.partial(matmul, precision=precision)
    if ta:
        da = mm(b, dc, transpose_a=tb, transpose_b=True)
    else:
        da = mm(dc, b, transpose_b=not tb)
    if tb:
        db = mm(dc, a, transpose_a=True, transpose_b=ta)
    else:
        db = mm(a, dc, transpose_a=not ta)
    return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _xla_chain(y0, a, b, gamma, s0, c, a_offset, b_offset, negate_a, negate_b, reverse):
    """`chain` by a loop of ``jnp.matmul`` (unrolled: ``n`` is a group's few chunks)."""
    dk, dv = s0.shape[-2:]
    y0, a = y0[..., :dv], a[..., a_offset : a_offset + dk]
    b = b[..., b_offset : b_offset + dk]
    states, ys, s = [None] * y0.shape[-4], [None] * y0.shape[-4], s0
    for i in reversed(range(len(ys))) if reverse else range(len(ys)):
        states[i] = s
        ay = jnp.matmul(a[..., i, :, :, :], s)
        ys[i] = y0[..., i, :, :, :] + (-ay if negate_a else ay)
        by = jnp.matmul(jnp.swapaxes(b[..., i, :, :, :], -1, -2), ys[i])
        s = gamma[..., i, :, None, None] * s + (-by if negate_b else by)
        if c is not None:
            s = s + c[..., i, :, :, :]
    return jnp.stack(states, -4), jnp.stack(ys, -4), s


def chain(
    y0,
    a,
    b,
    gamma,
    s0,
    c=None,
    *,
    a_offset=0,
    b_offset=0,
    negate_a=False,
    negate_b=False,
    reverse=False,
):
    """The sequential part of the delta rule's chunked form (`_delta.py`): for each
    head, over the links ``i`` of a chain in order (or reversed), from ``s = s0``,

        states[i] = s
        y[i] = y0[i] ± a[i] @ s
        s = gamma[i] s ± b[i]ᵀ @ y[i]  (+ c[i])

    Shapes, with any leading batch ``L...``: ``s0 (L..., H, dk, dv)``; ``y0 (L..., n,
    H, C, ≥ dv)``, of which the first ``dv`` columns are read; ``a``, ``b (L..., n, H,
    C, ≥ offset + dk)``, of which ``dk`` columns from ``a_offset`` (``b_offset``) are
    read (slices of a wider array, without a copy); ``gamma (L..., n, H)``; ``c``
    like the states or ``None``. Returns ``(states, y, s)``, ``states (L..., n, H, dk,
    dv)``, ``y (L..., n, H, C, dv)``. Not differentiable (the delta rule's derivative
    is written by hand).

    On the CPU backend with the kernel available, for float32 or float64, one call of
    the compiled kernel runs every chain (threaded over heads and batch); otherwise,
    and when lowered for other platforms, a loop of ``jnp.matmul``.
    """
    args = (y0, a, b, gamma, s0, c)
    static = (a_offset, b_offset, negate_a, negate_b, reverse)
    if not _one_float_dtype(*(x for x in args if x is not None)) or not available():
        return _xla_chain(*args, *static)
    dk, dv = s0.shape[-2:]
    n, H, C = y0.shape[-4:-1]
    lead = s0.shape[:-3]
    dtype = s0.dtype
    count = int(np.prod(lead, dtype=np.int64)) * H
    threads = 1 if count * n * C * dk * dv * 2 < MATMUL_THREADS_MACS else cpus()

    def kernel(y0, a, b, gamma, s0, c):
        call = jax.ffi.ffi_call(
            "ssm_delta_chain",
            (
                jax.ShapeDtypeStruct(lead + (n, H, dk, dv), dtype),
                jax.ShapeDtypeStruct(lead + (n, H, C, dv), dtype),
                jax.ShapeDtypeStruct(s0.shape, dtype),
            ),
            vmap_method="broadcast_all",
        )
        has_c = c is not None
        return call(
            y0,
            a,
            b,
            gamma,
            c if has_c else jnp.zeros((1,), dtype),
            s0,
            a_offset=np.int64(a_offset),
            b_offset=np.int64(b_offset),
            negate_a=bool(negate_a),
            negate_b=bool(negate_b),
            reverse=bool(reverse),
            has_c=has_c,
            threads=np.int64(threads),
        )

    def xla(*args):
        return _xla_chain(*args, *static)

    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def per_key_tree(q, k, v, b, do=None, *, xla):
    """The within-chunk outputs of gated linear attention with a decay per key
    (``_gla._intra_per_key``: the binary tree over a chunk), or with ``do`` their
    derivative ``(dq, dk, dv, db)``; ``q, k, b (..., C, d_k)``, ``v, do (..., C, d_v)``.

    On the CPU backend with the kernel available, for float32 or float64 and ``C`` a
    power of two, one call of the compiled kernel (chunks shared across threads, the
    exponentials vectorised); otherwise, and when lowered for other platforms,
    ``xla(q, k, v, b[, do])``, the same tree in XLA ops. Not differentiable (the
    operator's derivative is written by hand)."""
    args = (q, k, v, b) if do is None else (q, k, v, b, do)
    C, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    power_of_two = C >= 1 and C & (C - 1) == 0
    same_rows = len({x.shape[:-1] for x in args}) == 1
    if not (_one_float_dtype(*args) and power_of_two and same_rows and available()):
        return xla(*args)
    count = int(np.prod(q.shape[:-2], dtype=np.int64))
    threads = 1 if count * C * C * (dk + dv) < MATMUL_THREADS_MACS else cpus()
    out = (v,) if do is None else (q, k, v, b)
    out = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in out)

    def kernel(*args):
        call = jax.ffi.ffi_call("ssm_gla_tree", out, vmap_method="broadcast_all")
        result = call(*args, threads=np.int64(threads))
        return result[0] if do is None else tuple(result)

    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
