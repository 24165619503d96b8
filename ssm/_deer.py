"""``parallel_scan_nonlinear``: nonlinear recurrences solved by Newton iterations of
parallel linear scans (DEER, quasi-DEER), with implicit gradients.

Lim, Zhu, Selfridge & Kasim (2024), "Parallelizing non-linear sequential models over
the sequence length" (DEER); Gonzalez, Warrington, Smith & Linderman (2024), "Towards
scalable and stable parallelization of nonlinear RNNs" (quasi-DEER).
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jaxtyping import Array, Inexact, Int

from ._autodiff import _inexact, fast_vjp
from ._scan import linear_scan, matrix_scan


def _diag_jacobian(fn, h, x):
    """The exact diagonal of ``d fn(h, x) / d h`` (N jvps, O(N) memory)."""
    n = h.shape[0]

    def body(i, d):
        e = jnp.zeros_like(h).at[i].set(1)
        return d.at[i].set(jax.jvp(lambda v: fn(v, x), (h,), (e,))[1][i])

    return lax.fori_loop(0, n, body, jnp.zeros_like(h))


def _linearise(fn, hprev, xs, jacobian):
    """``f(hprev[t], x[t])`` and its Jacobian (dense) or Jacobian diagonal."""
    fs = jax.vmap(fn)(hprev, xs)
    if jacobian == "dense":
        J = jax.vmap(jax.jacfwd(fn))(hprev, xs)
    else:
        J = jax.vmap(functools.partial(_diag_jacobian, fn))(hprev, xs)
    return fs, J


def _shift(h0, hs):
    return jnp.concatenate([h0[None], hs[:-1]])


def _newton(fn, h0, xs, guess, iterations, tol, jacobian):
    def cond(state):
        k, _, err = state
        return (k < iterations) & (err > tol)

    def body(state):
        k, hs, _ = state
        hprev = _shift(h0, hs)
        fs, J = _linearise(fn, hprev, xs, jacobian)
        if jacobian == "dense":
            b = fs - jnp.einsum("tij,tj->ti", J, hprev)
            new = matrix_scan(J, b, h0)
        else:
            new = linear_scan(J, fs - J * hprev, h0)
        new = new.astype(hs.dtype)
        err = jnp.max(jnp.abs(new - hs))
        # A non-finite iterate (Newton diverging) stops the loop where it is.
        new = jnp.where(jnp.isfinite(err), new, hs)
        err = jnp.where(jnp.isfinite(err), err, jnp.zeros_like(err))
        return k + 1, new, err

    inf = jnp.array(jnp.inf, jnp.finfo(h0.dtype).dtype)
    k, hs, _ = lax.while_loop(cond, body, (jnp.int32(0), guess, inf))
    return hs, k


def _call(fn, consts, h, x):
    return fn(h, x, *consts)


def _deer_rules(fn, iterations, tol, jacobian):
    """Newton iterations forwards, implicit adjoints backwards, the sequential loop
    (`lax.scan`) for forward mode and second order."""

    def fwd(consts, h0, xs):
        f = functools.partial(_call, fn, consts)
        guess = jnp.broadcast_to(h0, (jax.tree.leaves(xs)[0].shape[0],) + h0.shape)
        hs, k = _newton(f, h0, xs, guess, iterations, tol, jacobian)
        return (hs, k), hs

    def reference(consts, h0, xs):
        f = functools.partial(_call, fn, consts)
        hs = lax.scan(lambda h, x: (f(h, x),) * 2, h0, xs)[1]
        return hs, jnp.int32(0)

    def bwd(args, hs, cts, want):
        (consts, h0, xs), (ct_hs, _) = args, cts
        if ct_hs is None:
            ct_hs = jnp.zeros_like(hs)
        return _implicit_bwd(fn, iterations, tol, jacobian, consts, h0, xs, hs, ct_hs, want)

    return fwd, bwd, reference


def _implicit_bwd(fn, iterations, tol, jacobian, consts, h0, xs, hs, ct_hs, want):
    ct_hs = ct_hs.astype(hs.dtype)
    f = functools.partial(_call, fn, consts)
    hprev = _shift(h0, hs)
    # lam[t] = dL/dh[t] solves lam[t] = ct[t] + J[t+1]^T lam[t+1]: a reverse linear
    # recurrence in the Jacobians at the converged states.
    if jacobian == "dense":
        J = jax.vmap(jax.jacfwd(f))(hprev, xs)
        A = jnp.concatenate([jnp.swapaxes(J[1:], 1, 2), jnp.zeros_like(J[:1])])
        lam = matrix_scan(A, ct_hs, reverse=True).astype(hs.dtype)
    else:
        lam = _adjoint_quasi(f, hprev, xs, ct_hs, iterations, tol)
    mask = jax.tree.map(lambda a, w: bool(w) and _inexact(a), (consts, hs[0], xs), want)

    def vjp_step(h, x, lam_t):
        diff, static = eqx.partition((consts, h, x), mask)

        def g(d):
            c, hh, xx = eqx.combine(d, static)
            return fn(hh, xx, *c)

        return jax.vjp(g, diff)[1](lam_t)[0]

    d_consts, d_hprev, d_xs = jax.vmap(vjp_step)(hprev, xs, lam)
    d_consts = jax.tree.map(lambda d: jnp.sum(d, axis=0), d_consts)
    return d_consts, None if d_hprev is None else d_hprev[0], d_xs


def _adjoint_quasi(f, hprev, xs, ct, iterations, tol):
    """The adjoint recurrence solved like quasi-DEER: exact after at most T sweeps."""
    D = jax.vmap(functools.partial(_diag_jacobian, f))(hprev, xs)
    D_next = jnp.concatenate([D[1:], jnp.zeros_like(D[:1])])

    def jt_vec(lam):
        # (J[t+1]^T lam[t+1]) for every t, zero at the end.
        nxt = jnp.concatenate([lam[1:], jnp.zeros_like(lam[:1])])
        hp = jnp.concatenate([hprev[1:], hprev[-1:]])
        xn = jax.tree.map(lambda x: jnp.concatenate([x[1:], x[-1:]]), xs)
        out = jax.vmap(lambda h, x, v: jax.vjp(lambda u: f(u, x), h)[1](v)[0])(hp, xn, nxt)
        return out, nxt

    def cond(state):
        k, _, err = state
        return (k < iterations) & (err > tol)

    def body(state):
        k, lam, _ = state
        jt, nxt = jt_vec(lam)
        new = linear_scan(D_next, ct + jt - D_next * nxt, reverse=True).astype(lam.dtype)
        return k + 1, new, jnp.max(jnp.abs(new - lam))

    inf = jnp.array(jnp.inf, jnp.finfo(ct.dtype).dtype)
    _, lam, _ = lax.while_loop(cond, body, (jnp.int32(0), ct, inf))
    return lam


def parallel_scan_nonlinear(
    f: Callable[[Array, Any], Array],
    h0: Inexact[Array, "N"],
    xs: Any,
    *,
    iterations: int | None = None,
    tol: float | None = None,
    jacobian: str = "dense",
) -> tuple[Inexact[Array, "T N"], Int[Array, ""]]:
    """All states of ``h[t] = f(h[t-1], x[t])`` by Newton iterations of parallel scans.

    Each iteration linearises `f` around the current guess of every state and solves
    the linear recurrence `h[t] = J[t] h[t-1] + (f(g[t-1], x[t]) - J[t] g[t-1])` with
    `ssm.matrix_scan` (DEER, Lim et al. 2024) or, with `jacobian="diagonal"`, keeps only
    the diagonal of `J[t]` and uses `ssm.linear_scan` (quasi-DEER, Gonzalez et al.
    2024): O(N) memory per step instead of O(N^2), more iterations. Either way the
    first `k` states are exact after `k` iterations, so `T` iterations always reach
    the sequential result; smooth, contractive recurrences need far fewer.

    **Arguments:**

    - `f`: the step `f(h, x) -> h`, with `h` of shape `(N,)`. May close over arrays
      (parameters); they get gradients.
    - `h0`: the state before the first step, shape `(N,)`.
    - `xs`: a pytree of arrays with a leading time axis `T`.
    - `iterations`: the most Newton iterations (default `T`).
    - `tol`: stop once no state moves by more than `tol` in an iteration (default
      `1e-5` for float32, `1e-10` for float64).
    - `jacobian`: `"dense"` (DEER) or `"diagonal"` (quasi-DEER).

    **Returns:**

    `(hs, iterations_used)`: the states `(T, N)` and the number of iterations run.

    Gradients are implicit: they differentiate the fixed point `h[t] = f(h[t-1], x[t])`
    rather than the iterations, solving the adjoint recurrence
    `lam[t] = dL/dh[t] + J[t+1]^T lam[t+1]` at the converged states (with
    `ssm.matrix_scan` for dense Jacobians; by the same diagonal quasi-Newton sweeps
    for `"diagonal"`). They are exact when the forward iteration converged. Forward
    mode (`jax.jvp`, `jax.jacfwd`) and second-order derivatives are those of the
    sequential recurrence, taken through a `lax.scan` form of it.

    ```python
    hs, n_iter = ssm.parallel_scan_nonlinear(lambda h, x: jnp.tanh(W @ h + x), h0, xs)
    ```
    """
    if jacobian not in ("dense", "diagonal"):
        raise ValueError(f'`jacobian` must be "dense" or "diagonal", got {jacobian!r}.')
    if not hasattr(h0, "ndim") or h0.ndim != 1:
        raise ValueError(f"`h0` must be an array of shape (N,), got {np.shape(h0)}.")
    if not jnp.issubdtype(h0.dtype, jnp.floating):
        raise TypeError(f"`h0` must be a real floating array, got {h0.dtype}.")
    leaves = jax.tree.leaves(xs)
    if not leaves:
        raise ValueError("`xs` must hold at least one array with a leading time axis.")
    T = int(np.shape(leaves[0])[0])
    if any(np.ndim(x) == 0 or np.shape(x)[0] != T for x in leaves):
        raise ValueError("Every leaf of `xs` needs the same leading time axis.")
    if iterations is None:
        iterations = T
    if tol is None:
        tol = 1e-5 if jnp.finfo(h0.dtype).bits <= 32 else 1e-10
    out_shape = jax.eval_shape(f, h0, jax.tree.map(lambda x: x[0], xs))
    if out_shape.shape != h0.shape or out_shape.dtype != h0.dtype:
        raise ValueError(
            f"`f(h, x)` must return the state's shape and dtype {h0.shape} {h0.dtype}, "
            f"got {out_shape.shape} {out_shape.dtype}."
        )
    converted, consts = jax.closure_convert(f, h0, jax.tree.map(lambda x: x[0], xs))
    fwd, bwd, reference = _deer_rules(converted, int(iterations), float(tol), jacobian)
    return fast_vjp(fwd, bwd, reference)(tuple(consts), h0, xs)
