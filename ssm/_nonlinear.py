"""``scan``: a ``lax.scan`` for nonlinear recurrences with memory-bounded reverse mode.

Three reverse-mode strategies share one forward result:

- ``checkpoints="all"``: plain ``lax.scan`` (every residual of every step is kept).
- an integer budget ``c``: binomial ("treeverse"/revolve) checkpointing. The forward
  pass keeps nothing; the backward pass holds at most ``c`` carries and recomputes
  the rest, placing each new checkpoint where Griewank's binomial schedule puts it.
- ``"auto"``: the same schedule over chunks of about ``sqrt(T)`` steps with one
  stored carry per chunk boundary, so memory grows like ``sqrt(T)`` and every step is
  recomputed once.

``backward="parallel"`` instead keeps every carry and solves the adjoint recurrence
``g[t] = J[t]^T g[t+1] + v[t]`` with ``matrix_scan`` (or ``linear_scan`` for diagonal
Jacobians), after Wang, Bai & Pekhimenko (2020), "BPPSA: Scaling Back-propagation by
Parallel Scan Algorithm".
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax
from jax.flatten_util import ravel_pytree

from ._scan import linear_scan, matrix_scan

# ---------------------------------------------------------------------------
# Pytree helpers: only inexact leaves are differentiated; the rest get float0.


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _only_diff(primal, other):
    """``other`` (same structure as ``primal``) with non-inexact leaves set to None."""
    leaves, treedef = jax.tree.flatten(primal)
    others = treedef.flatten_up_to(other)
    return treedef.unflatten(
        [o if _inexact(p) else None for p, o in zip(leaves, others, strict=True)]
    )


def _fill_float0(primal, grads):
    """Cotangents for ``primal`` from ``grads`` (None at non-inexact leaves)."""
    leaves, treedef = jax.tree.flatten(primal)
    gl = jax.tree.leaves(grads, is_leaf=lambda x: x is None)
    assert len(gl) == len(leaves)
    return treedef.unflatten(
        [
            np.zeros(np.shape(p), jax.dtypes.float0) if g is None else g
            for p, g in zip(leaves, gl, strict=True)
        ]
    )


def _index(tree, i):
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _set(tree, i, value):
    return jax.tree.map(
        lambda x, v: lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value
    )


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _step_vjp(step, consts, carry, x, ct_carry, ct_y):
    """Cotangents (consts, carry, x) of one step, None at non-inexact leaves."""
    args = (consts, carry, x)
    diff, static = eqx.partition(args, eqx.is_inexact_array)

    def fn(d):
        c2, y = step(*eqx.combine(d, static))
        return eqx.filter((c2, y), eqx.is_inexact_array)

    out, vjp = jax.vjp(fn, diff)
    ct = (_only_diff(out[0], ct_carry), _only_diff(out[1], ct_y))
    ct = jax.tree.map(lambda o, c: c.astype(o.dtype), out, ct)
    return vjp(ct)[0]


# ---------------------------------------------------------------------------
# Binomial checkpointing over "macro steps" (single steps, or chunks of steps).


def _binomial_table(budget: int, n: int) -> np.ndarray:
    """``tab[s, t] = min(C(s + t, s), n + 1)``: steps s snapshots, t sweeps reverse."""
    tmax = 1
    while math.comb(2 + tmax, 2) < n:
        tmax += 1
    tab = np.empty((budget + 1, tmax + 2), np.int32)
    for s in range(budget + 1):
        for t in range(tmax + 2):
            tab[s, t] = min(math.comb(s + t, s), n + 1)
    return tab


def _split(tab, snapshots, n):
    """Offset of the next checkpoint in a range of ``n`` steps (Griewank's revolve).

    With ``s`` snapshots (the one at the range start included) and ``t`` the fewest
    sweeps for which ``C(s + t, s) >= n``, the left part gets ``C(s + t - 1, s)``
    steps and the right part, reversed first with one snapshot fewer, the rest.
    """
    row = tab[snapshots]
    t = jnp.searchsorted(row, n, side="left")
    offset = row[jnp.maximum(t - 1, 0)]
    return jnp.clip(offset, 1, n - 1)


def _advance(step, consts, carry, xs, start, stop):
    def body(i, c):
        return step(consts, c, _index(xs, i))[0]

    return lax.fori_loop(start, stop, body, carry)


def _reverse_sweep(step, budget, consts, init, xs, ct_carry, ct_ys, length):
    """Backward pass holding at most ``budget`` carries (the initial one included)."""
    tab = jnp.asarray(_binomial_table(budget, length))
    stack = jax.tree.map(
        lambda c: jnp.zeros((budget,) + c.shape, c.dtype).at[0].set(c), init
    )
    where = jnp.zeros((budget,), jnp.int32)
    d_consts = jax.tree.map(jnp.zeros_like, eqx.filter(consts, eqx.is_inexact_array))
    d_xs = jax.tree.map(jnp.zeros_like, eqx.filter(xs, eqx.is_inexact_array))
    lam = _only_diff(init, ct_carry)

    def cond(state):
        return state[1] > 0

    def body(state):
        top, hi, stack, where, lam, d_consts, d_xs = state
        lo = where[top]
        n = hi - lo
        free = budget - 1 - top
        push = (n > 1) & (free > 0)
        target = jnp.where(push, lo + _split(tab, jnp.maximum(free, 1) + 1, n), hi - 1)
        carry = _advance(step, consts, _index(stack, top), xs, lo, target)
        t = hi - 1
        x_t = _index(xs, t)
        old_dx = _index(d_xs, t)

        # Only small values cross the cond: the big buffers are updated in place below.
        def do_step(_):
            return _step_vjp(step, consts, carry, x_t, lam, _index(ct_ys, t))

        def no_step(_):
            return jax.tree.map(jnp.zeros_like, d_consts), lam, old_dx

        g_consts, g_carry, g_x = lax.cond(push, no_step, do_step, None)
        slot = jnp.minimum(top + 1, budget - 1)
        keep = _index(stack, slot)
        stack = _set(
            stack, slot, jax.tree.map(lambda a, b: jnp.where(push, a, b), carry, keep)
        )
        where = where.at[slot].set(jnp.where(push, target, where[slot]))
        d_xs = _set(d_xs, t, g_x)
        new_top = jnp.where(push, top + 1, jnp.where(t == lo, jnp.maximum(top - 1, 0), top))
        new_hi = jnp.where(push, hi, t)
        return new_top, new_hi, stack, where, g_carry, _add(d_consts, g_consts), d_xs

    state = (jnp.int32(0), jnp.int32(length), stack, where, lam, d_consts, d_xs)
    _, _, _, _, lam, d_consts, d_xs = lax.while_loop(cond, body, state)
    return d_consts, lam, d_xs


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _checkpointed(step, budget, unroll, consts, init, xs):
    return lax.scan(lambda c, x: step(consts, c, x), init, xs, unroll=unroll)


def _checkpointed_fwd(step, budget, unroll, consts, init, xs):
    out = _checkpointed(step, budget, unroll, consts, init, xs)
    return out, (consts, init, xs)


def _checkpointed_bwd(step, budget, unroll, res, ct):
    consts, init, xs = res
    ct_carry, ct_ys = ct
    ys_shape = jax.eval_shape(lambda: _checkpointed(step, budget, unroll, consts, init, xs))
    ct_ys = _only_diff(ys_shape[1], ct_ys)
    length = jax.tree.leaves(xs)[0].shape[0]
    d_consts, d_init, d_xs = _reverse_sweep(
        step, min(budget, length), consts, init, xs, ct_carry, ct_ys, length
    )
    return (
        _fill_float0(consts, d_consts),
        _fill_float0(init, d_init),
        _fill_float0(xs, d_xs),
    )


_checkpointed.defvjp(_checkpointed_fwd, _checkpointed_bwd)


# ---------------------------------------------------------------------------
# BPPSA: the adjoint recurrence as a parallel linear scan.


def _carry_jacobians(step, consts, c_prev, xs, jacobian):
    """Per-step Jacobians of the inexact carry, ``(T, N, N)`` or diagonals ``(T, N)``."""

    def flat_step(c, x):
        diff, static = eqx.partition(c, eqx.is_inexact_array)
        vec, unravel = ravel_pytree(diff)

        def g(v):
            c2 = step(consts, eqx.combine(unravel(v), static), x)[0]
            return ravel_pytree(eqx.filter(c2, eqx.is_inexact_array))[0]

        if jacobian == "dense":
            return jax.jacfwd(g)(vec)
        return jax.jvp(g, (vec,), (jnp.ones_like(vec),))[1]

    return jax.vmap(flat_step)(c_prev, xs)


@functools.partial(jax.custom_vjp, nondiff_argnums=(0, 1, 2))
def _parallel_backward(step, jacobian, unroll, consts, init, xs):
    return lax.scan(lambda c, x: step(consts, c, x), init, xs, unroll=unroll)


def _parallel_fwd(step, jacobian, unroll, consts, init, xs):
    def body(c, x):
        c2, y = step(consts, c, x)
        return c2, (y, c2)

    carry, (ys, carries) = lax.scan(body, init, xs, unroll=unroll)
    c_prev = jax.tree.map(lambda i, c: jnp.concatenate([i[None], c[:-1]]), init, carries)
    return (carry, ys), (consts, c_prev, xs)


def _parallel_bwd(step, jacobian, unroll, res, ct):
    consts, c_prev, xs = res
    ct_carry, ct_ys = ct
    init = _index(c_prev, 0)
    out_shape = jax.eval_shape(lambda: step(consts, init, _index(xs, 0)))
    ct_carry = _only_diff(out_shape[0], ct_carry)
    ct_ys = _only_diff(out_shape[1], ct_ys)
    lam_end, unravel = ravel_pytree(ct_carry)
    zeros_carry = jax.tree.map(
        lambda c: jnp.zeros(c.shape[1:], c.dtype), eqx.filter(c_prev, eqx.is_inexact_array)
    )

    # v[t]: what y[t] sends back to the carry entering step t.
    def y_part(c, x, cty):
        return ravel_pytree(_step_vjp(step, consts, c, x, zeros_carry, cty)[1])[0]

    v = jax.vmap(y_part)(c_prev, xs, ct_ys)
    J = _carry_jacobians(step, consts, c_prev, xs, jacobian)
    if jacobian == "dense":
        g = matrix_scan(jnp.swapaxes(J, 1, 2), v, lam_end, reverse=True)
    else:
        g = linear_scan(J, v, lam_end, reverse=True)
    # lam[t] = dL/d(carry after step t); then one batched vjp gives everything else.
    lam = jnp.concatenate([g[1:], lam_end[None]]).astype(lam_end.dtype)
    lam = jax.vmap(unravel)(lam)
    grads = jax.vmap(functools.partial(_step_vjp, step), in_axes=(None, 0, 0, 0, 0))(
        consts, c_prev, xs, lam, ct_ys
    )
    d_consts = jax.tree.map(lambda d: jnp.sum(d, axis=0), grads[0])
    d_init = _index(grads[1], 0)
    return (
        _fill_float0(consts, d_consts),
        _fill_float0(init, d_init),
        _fill_float0(xs, grads[2]),
    )


_parallel_backward.defvjp(_parallel_fwd, _parallel_bwd)


# ---------------------------------------------------------------------------
# The public function.


def _auto_chunk(length: int) -> int:
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def _check_checkpoints(checkpoints):
    if isinstance(checkpoints, str):
        if checkpoints not in ("all", "auto"):
            raise ValueError(
                '`checkpoints` must be "all", "auto" or a positive int, '
                f"got {checkpoints!r}."
            )
        return
    if isinstance(checkpoints, bool) or not isinstance(checkpoints, (int, np.integer)):
        raise TypeError(
            f'`checkpoints` must be "all", "auto" or a positive int, got {checkpoints!r}.'
        )
    if checkpoints < 1:
        raise ValueError(f"`checkpoints` must be at least 1, got {checkpoints}.")


def scan(
    f: Callable[[Any, Any], tuple[Any, Any]],
    init: Any,
    xs: Any = None,
    length: int | None = None,
    *,
    reverse: bool = False,
    unroll: int | bool = 1,
    checkpoints: str | int = "all",
    backward: str = "sequential",
    jacobian: str = "dense",
) -> tuple[Any, Any]:
    """``jax.lax.scan`` for nonlinear recurrences, with memory-bounded reverse mode.

    Computes exactly what `jax.lax.scan(f, init, xs, length, reverse=reverse)` does;
    only what reverse-mode autodiff keeps differs.

    **Arguments:**

    - `f`: the step, `f(carry, x) -> (carry, y)`. May close over arrays (parameters);
      their gradients are returned as usual.
    - `init`: the initial carry, a pytree of arrays.
    - `xs`: a pytree of arrays with a leading time axis, or `None` (then `length` is
      required).
    - `length`: the number of steps; checked against `xs` when both are given.
    - `reverse`: run from the end, as in `lax.scan`.
    - `unroll`: passed to the forward `lax.scan` loops.
    - `checkpoints`: what the backward pass may store.
        - `"all"` (default): `lax.scan` itself, every residual of every step.
          Supports every JAX transformation, forward mode and higher order included.
        - an `int` `c`: binomial (treeverse/revolve, Griewank 1992; Griewank & Walther
          2000) checkpointing that never holds more than `c` carries. The forward
          pass stores nothing; the backward pass re-runs segments from the nearest
          checkpoint. With `c` snapshots and `r` recomputation sweeps it reverses
          `C(c + r, c)` steps, so `c ~ sqrt(2T)` costs about two extra forward passes
          and `c ~ log T` about `log T`.
        - `"auto"`: the same machinery over chunks of `ceil(sqrt(T))` steps, storing
          the carry at each chunk boundary and the residuals of one chunk at a time:
          memory grows like `sqrt(T)` and each step is recomputed once.
    - `backward`: `"sequential"` (default) or `"parallel"` (BPPSA, Wang et al. 2020):
      keep every carry, then solve the adjoint recurrence
      `g[t] = J[t]^T g[t+1] + v[t]` (`J[t]` the Jacobian of the new carry with
      respect to the old) with `ssm.matrix_scan`, in `O(log T)` depth. Needs
      `checkpoints="all"` and inexact carries of one dtype.
    - `jacobian`: for `backward="parallel"`: `"dense"` builds `(T, N, N)` Jacobians
      of the flattened carry; `"diagonal"` promises the carry Jacobian is diagonal
      (an elementwise recurrence), computes it with one `jvp` per step and uses
      `ssm.linear_scan`. A non-diagonal Jacobian gives wrong gradients there.

    **Returns:**

    `(carry, ys)`, as `lax.scan`.

    The checkpointed and parallel modes define a custom VJP: `jax.grad`, `jax.vjp`,
    `jax.jit` and `jax.vmap` compose with them, forward mode (`jax.jvp`) does not.

    ```python
    def cell(h, x):
        h = jnp.tanh(W @ h + U @ x)
        return h, h

    h_T, hs = ssm.scan(cell, h0, xs, checkpoints="auto")
    ```
    """
    _check_checkpoints(checkpoints)
    if backward not in ("sequential", "parallel"):
        raise ValueError(
            f'`backward` must be "sequential" or "parallel", got {backward!r}.'
        )
    if jacobian not in ("dense", "diagonal"):
        raise ValueError(f'`jacobian` must be "dense" or "diagonal", got {jacobian!r}.')
    if backward == "parallel" and checkpoints != "all":
        raise ValueError(
            '`backward="parallel"` keeps every carry; use it with `checkpoints="all"` '
            f"(got checkpoints={checkpoints!r})."
        )
    x_leaves = jax.tree.leaves(xs)
    lengths = {int(np.shape(x)[0]) for x in x_leaves if np.ndim(x) > 0}
    if any(np.ndim(x) == 0 for x in x_leaves):
        raise ValueError("Every leaf of `xs` needs a leading time axis; got a scalar.")
    if length is not None:
        lengths.add(int(length))
    if len(lengths) != 1:
        if not lengths:
            raise ValueError("`length` is required when `xs` is None or has no leaves.")
        raise ValueError(
            f"`xs` leaves and `length` disagree on the number of steps: {sorted(lengths)}."
        )
    (T,) = lengths

    if checkpoints == "all" and backward == "sequential":
        return lax.scan(f, init, xs, length=T, reverse=reverse, unroll=unroll)
    if T == 0:
        return lax.scan(f, init, xs, length=T, reverse=reverse, unroll=unroll)

    init = jax.tree.map(jnp.asarray, init)
    if xs is None:
        xs = jnp.zeros((T, 0), jnp.float32)  # an empty slice per step

        def f_x(c, x):
            return f(c, None)
    else:
        f_x = f
    if reverse:
        xs = jax.tree.map(lambda x: jnp.flip(x, 0), xs)
    x0 = _index(xs, 0)
    converted, consts = jax.closure_convert(f_x, init, x0)

    def step(consts, c, x):
        return converted(c, x, *consts)

    consts = tuple(consts)
    if backward == "parallel":
        carry, ys = _parallel_backward(step, jacobian, unroll, consts, init, xs)
    elif checkpoints == "auto":
        carry, ys = _chunked(step, unroll, consts, init, xs, T)
    else:
        carry, ys = _checkpointed(step, int(checkpoints), unroll, consts, init, xs)
    if reverse:
        ys = jax.tree.map(lambda y: jnp.flip(y, 0), ys)
    return carry, ys


def _chunked(step, unroll, consts, init, xs, T):
    """``"auto"``: checkpoint every chunk boundary, reverse one chunk at a time."""
    K = _auto_chunk(T)
    n = T // K
    rem = T - n * K
    head = jax.tree.map(lambda x: x[:rem], xs)
    body = jax.tree.map(lambda x: x[rem:].reshape((n, K) + x.shape[1:]), xs)

    def chunk_step(consts, c, xk):
        return lax.scan(lambda c, x: step(consts, c, x), c, xk, unroll=unroll)

    carry = init
    ys_head = None
    if rem:
        carry, ys_head = lax.scan(lambda c, x: step(consts, c, x), carry, head)
    carry, ys = _checkpointed(chunk_step, n, 1, consts, carry, body)
    ys = jax.tree.map(lambda y: y.reshape((n * K,) + y.shape[2:]), ys)
    if rem:
        ys = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), ys_head, ys)
    return carry, ys
