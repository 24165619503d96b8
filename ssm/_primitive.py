"""The ``linear_recurrence`` primitive and its derivative, transpose and batching rules.

One primitive serves the diagonal and the matrix recurrence and every method. It
is linear in ``(b, h0)`` for fixed ``(a, resets)``, which is all reverse mode needs:

* JVP: ``dh = scan(a, da · h_prev + db, dh0)``, the same primitive on tangents.
* Transpose (w.r.t. ``b`` and ``h0``): the adjoint recurrence
  ``g[t] = ct[t] + M(a[t+1])^T g[t+1]``, i.e. the same primitive run in the other
  direction with the multiplier shifted by one step (and transposed for
  matrices). Its residuals are ``a`` and the states ``h``; nothing of size
  ``T log T`` or ``T^2`` exists anywhere.

Because the JVP and the transpose are expressed through the primitive itself,
forward mode, reverse mode, ``vmap`` and any order of derivative compose.
"""

from __future__ import annotations

import functools

import jax
import jax.extend as jex
import jax.numpy as jnp
from jax.core import ShapedArray
from jax.interpreters import ad, batching, mlir

from . import _kernels, _loops

linear_recurrence_p = jex.core.Primitive("ssm_linear_recurrence")


def _varying_axes(x):
    """The manual mesh axes (inside ``shard_map``) along which ``x`` varies."""
    aval = jax.typeof(x)
    vma = getattr(aval, "vma", None)
    if vma is None:
        mat = getattr(aval, "mat", None)
        vma = getattr(mat, "varying", frozenset())
    return frozenset(vma)


def _match_varying(*args):
    """Cast all operands to vary along the union of their manual axes, as JAX's own
    n-ary primitives do under ``shard_map(..., check_vma=True)``: the primitive's
    output then varies along them too, and the transpose of the cast (a ``psum``)
    gives replicated operands (such as ``h0``) replicated cotangents."""
    vmas = [_varying_axes(x) for x in args]
    union = frozenset().union(*vmas)
    if not union:
        return args
    order = tuple(sorted(union, key=str))
    return tuple(
        x
        if v == union
        else jax.lax.pcast(x, tuple(n for n in order if n not in v), to="varying")
        for x, v in zip(args, vmas, strict=True)
    )


def linear_recurrence(
    a,
    b,
    h0,
    r,
    *,
    matrix,
    trans,
    reverse,
    shift,
    has_resets,
    method,
    chunk_size,
    kernel=None,
):
    a, b, h0, r = _match_varying(a, b, h0, r)
    if kernel is None:
        # Decided once, where the scan is first bound; the derivative rules pass it on.
        # (`available` is False off the CPU backend.)
        kernel = method == "sequential" and _kernels.available()
    return linear_recurrence_p.bind(
        a,
        b,
        h0,
        r,
        matrix=matrix,
        trans=trans,
        reverse=reverse,
        shift=shift,
        has_resets=has_resets,
        method=method,
        chunk_size=chunk_size,
        kernel=kernel,
    )


def _impl(a, b, h0, r, **params):
    return _loops.evaluate(a, b, h0, r, **params)


def _abstract_eval(a, b, h0, r, **params):
    del a, r, params
    # Like an elementwise op on `b`: same shape, its sharding and manual axes.
    return b.update(shape=(b.shape[0],) + h0.shape, dtype=h0.dtype, weak_type=False)


linear_recurrence_p.def_impl(
    functools.partial(
        jax.jit,
        static_argnames=(
            "matrix",
            "trans",
            "reverse",
            "shift",
            "has_resets",
            "method",
            "chunk_size",
            "kernel",
        ),
    )(_impl)
)
linear_recurrence_p.def_abstract_eval(_abstract_eval)
_lower_impl = mlir.lower_fun(_impl, multiple_results=False)


def _lowering(ctx, *args, **params):
    # Inside `shard_map` the operands' types carry the manual axes they vary along;
    # the kernels are per-device code whose loop carries start invariant, so they
    # are traced with those axes dropped (the lowered code is the same).
    avals = [
        ShapedArray(v.shape, v.dtype, v.weak_type, sharding=v.sharding)
        for v in ctx.avals_in
    ]
    if tuple(ctx.module_context.platforms) != ("cpu",):
        params = dict(params, kernel=False)  # the kernel is a CPU custom call
    return _lower_impl(ctx.replace(avals_in=avals), *args, **params)


mlir.register_lowering(linear_recurrence_p, _lowering)


# ---------------------------------------------------------------------------
# Helpers shared by the rules.


def _time_shift(x, reverse, fill):
    """``y[p] = x[p-1]`` in processing order, ``y[0] = fill``."""
    fill = jnp.broadcast_to(fill, (1,) + x.shape[1:]).astype(x.dtype)
    if reverse:
        return jnp.concatenate([x[1:], fill])
    return jnp.concatenate([fill, x[:-1]])


def _multiplier(a, r, dtype, *, matrix, trans, has_resets):
    return _loops._Ops(matrix=matrix, trans=trans).mult(a, r, dtype, has_resets)


def _apply(m, h, matrix):
    return _loops._Ops(matrix=matrix, trans=False).apply(m, h)


def _sum_to_shape(x, shape):
    """Sum the broadcast axes of ``x`` away so that it has ``shape``."""
    if x.shape == tuple(shape):
        return x
    lead = x.ndim - len(shape)
    axes = tuple(range(lead)) + tuple(
        lead + i for i, n in enumerate(shape) if n == 1 and x.shape[lead + i] != 1
    )
    return jnp.sum(x, axis=axes).reshape(shape)


def _cast_cotangent(ct, aval):
    """Cotangent of an input with ``aval``: real part for real inputs, its dtype."""
    if jnp.iscomplexobj(ct) and not jnp.issubdtype(aval.dtype, jnp.complexfloating):
        ct = jnp.real(ct)
    return _sum_to_shape(ct, aval.shape).astype(aval.dtype)


# ---------------------------------------------------------------------------
# JVP.


def _jvp(primals, tangents, **params):
    a, b, h0, r = primals
    da, db, dh0, _ = tangents
    h = linear_recurrence(a, b, h0, r, **params)
    if all(type(t) is ad.Zero for t in (da, db, dh0)):
        return h, ad.Zero.from_primal_value(h)

    dtype = h0.dtype
    reverse, shift, matrix = params["reverse"], params["shift"], params["matrix"]
    u = jnp.zeros(h.shape, dtype)
    if type(db) is not ad.Zero:
        u = u + db.astype(dtype)
    if type(da) is not ad.Zero:
        dm = _multiplier(
            da,
            r,
            dtype,
            matrix=matrix,
            trans=params["trans"],
            has_resets=params["has_resets"],
        )
        if shift:
            # step p uses a[p-1] on h[p-1]: the term da[p-1] h[p-1] enters at p.
            u = u + _time_shift(_apply(dm, h, matrix), reverse, 0)
        else:
            u = u + _apply(dm, _time_shift(h, reverse, h0), matrix)
    dh0 = jnp.zeros(h0.shape, dtype) if type(dh0) is ad.Zero else dh0
    dh = linear_recurrence(a, u, dh0, r, **params)
    return h, dh


ad.primitive_jvps[linear_recurrence_p] = _jvp


# ---------------------------------------------------------------------------
# Transpose with respect to (b, h0).


def _transpose(ct, a, b, h0, r, **params):
    if ad.is_undefined_primal(a) or ad.is_undefined_primal(r):
        raise ValueError(
            "linear_recurrence is linear only in (b, h0); cannot transpose in `a`."
        )
    b_aval = b.aval if ad.is_undefined_primal(b) else None
    h0_aval = h0.aval if ad.is_undefined_primal(h0) else None
    if type(ct) is ad.Zero:
        return (
            None,
            None if b_aval is None else ad.Zero(b_aval),
            None if h0_aval is None else ad.Zero(h0_aval),
            None,
        )
    dtype = ct.dtype
    state_shape = ct.shape[1:]
    zeros = jnp.zeros(state_shape, dtype)
    t_params = dict(params)
    t_params.update(reverse=not params["reverse"], shift=not params["shift"])
    if params["matrix"]:
        t_params["trans"] = not params["trans"]
    g = linear_recurrence(a, ct, zeros, r, **t_params)

    ct_b = None if b_aval is None else _cast_cotangent(g, b_aval)
    ct_h0 = None
    if h0_aval is not None:
        T = ct.shape[0]
        first = T - 1 if params["reverse"] else 0
        g_first = g[first]
        if params["shift"]:
            ct_h0 = g_first
        else:
            a_first = a[first if a.shape[0] != 1 else 0]
            r_first = r[first if r.shape[0] != 1 else 0]
            m = _multiplier(
                a_first,
                r_first,
                dtype,
                matrix=params["matrix"],
                trans=not params["trans"],
                has_resets=params["has_resets"],
            )
            ct_h0 = _apply(m, g_first, params["matrix"])
        ct_h0 = _cast_cotangent(jnp.broadcast_to(ct_h0, state_shape), h0_aval)
    return None, ct_b, ct_h0, None


ad.primitive_transposes[linear_recurrence_p] = _transpose


# ---------------------------------------------------------------------------
# Batching: the batch axis becomes a leading state axis (axis 1 of the time-major
# operands); the kernels broadcast over it.


def _batch(args, dims, **params):
    a, b, h0, r = args
    da, db, dh0, dr = dims
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)

    def time_major(x, d):
        if d is None:
            return jnp.expand_dims(x, 1)
        return jnp.moveaxis(x, d, 1)

    a = time_major(a, da)
    r = time_major(r, dr)
    if db is None:
        b = jnp.broadcast_to(b[:, None], (b.shape[0], size) + b.shape[1:])
    else:
        b = jnp.moveaxis(b, db, 1)
    if dh0 is None:
        h0 = jnp.broadcast_to(h0, (size,) + h0.shape)
    else:
        h0 = jnp.moveaxis(h0, dh0, 0)
    return linear_recurrence(a, b, h0, r, **params), 1


batching.primitive_batchers[linear_recurrence_p] = _batch
