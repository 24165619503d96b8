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

Each of these is a hand-written backward pass; ``ssm._autodiff.fast_vjp`` turns it
into the transpose of a linear tangent map, so forward mode, ``vmap`` and every order
of derivative work in every mode, as they do for ``lax.scan``.
"""

from __future__ import annotations

import math
from collections.abc import Callable
from typing import Any

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np
from jax import lax

from ._autodiff import _inexact, fast_vjp
from ._scan import linear_scan, matrix_scan

# ---------------------------------------------------------------------------
# Pytree helpers. Cotangents are None where a leaf is not inexact, not wanted, or
# (for cotangents coming in) symbolically zero.


def _index(tree, i):
    return jax.tree.map(lambda x: lax.dynamic_index_in_dim(x, i, keepdims=False), tree)


def _set(tree, i, value):
    return jax.tree.map(
        lambda x, v: lax.dynamic_update_index_in_dim(x, v, i, 0), tree, value
    )


def _add(a, b):
    return jax.tree.map(jnp.add, a, b)


def _zeros_where(tree, want):
    """Zeros at the wanted inexact leaves of ``tree``, None elsewhere."""
    return jax.tree.map(
        lambda x, w: jnp.zeros_like(x) if w and _inexact(x) else None, tree, want
    )


def _cotangent(primal, ct):
    """A cotangent for every leaf of ``primal``: ``ct`` (None means zero), float0 for
    non-inexact leaves, as ``jax.vjp`` wants them."""
    leaves, treedef = jax.tree.flatten(primal)
    cts = treedef.flatten_up_to(ct) if ct is not None else [None] * len(leaves)
    out = []
    for p, c in zip(leaves, cts, strict=True):
        if not _inexact(p):
            out.append(np.zeros(np.shape(p), jax.dtypes.float0))
        elif c is None:
            out.append(jnp.zeros(np.shape(p), jnp.result_type(p)))
        else:
            out.append(jnp.asarray(c).astype(jnp.result_type(p)))
    return treedef.unflatten(out)


def _step_vjp(step, consts, carry, x, ct_carry, ct_y, want_consts, want_x):
    """Cotangents ``(consts, carry, x)`` of one step, None at leaves that are not
    inexact or not wanted (the carry's are always wanted: they chain the steps)."""
    args = (consts, carry, x)
    want = (want_consts, jax.tree.map(lambda _: True, carry), want_x)
    mask = jax.tree.map(lambda a, w: bool(w) and _inexact(a), args, want)
    diff, static = eqx.partition(args, mask)
    out, vjp = jax.vjp(lambda d: step(*eqx.combine(d, static)), diff)
    return vjp((_cotangent(out[0], ct_carry), _cotangent(out[1], ct_y)))[0]


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


def _reverse_sweep(
    step, budget, consts, init, xs, ct_carry, ct_ys, length, want_consts, want_x
):
    """Backward pass holding at most ``budget`` carries (the initial one included).

    Returns the cotangents ``(consts, init, xs)``, None where not wanted."""
    tab = jnp.asarray(_binomial_table(budget, length))
    stack = jax.tree.map(
        lambda c: jnp.zeros((budget,) + c.shape, c.dtype).at[0].set(c), init
    )
    where = jnp.zeros((budget,), jnp.int32)
    d_consts = _zeros_where(consts, want_consts)
    d_xs = _zeros_where(xs, want_x)
    lam = _cotangent_or_none(init, ct_carry)

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
            return _step_vjp(
                step, consts, carry, x_t, lam, _index(ct_ys, t), want_consts, want_x
            )

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


def _cotangent_or_none(primal, ct):
    """``ct`` with zeros for missing inexact leaves and None at the others."""
    leaves, treedef = jax.tree.flatten(primal)
    cts = treedef.flatten_up_to(ct) if ct is not None else [None] * len(leaves)
    return treedef.unflatten(
        [
            (jnp.zeros_like(p) if c is None else c.astype(p.dtype)) if _inexact(p) else None
            for p, c in zip(leaves, cts, strict=True)
        ]
    )


def _time_slice(tree, start, stop):
    return jax.tree.map(lambda x: x[start:stop], tree)


def _budget_bwd(step, budget, length):
    """Binomial checkpointing with at most ``budget`` stored carries."""

    def bwd(args, res, cts, want):
        (consts, init, xs), (ct_carry, ct_ys) = args, cts
        return _reverse_sweep(
            step,
            min(budget, length),
            consts,
            init,
            xs,
            ct_carry,
            ct_ys,
            length,
            want[0],
            want[2],
        )

    return bwd


def _auto_chunk(length: int) -> int:
    return max(1, math.isqrt(max(length - 1, 0)) + 1)


def _auto_bwd(step, unroll, length):
    """``"auto"``: a carry at every chunk boundary, one chunk's residuals at a time.

    The first ``T mod K`` steps form a head that is reversed last, in one piece."""
    K = _auto_chunk(length)
    n = length // K
    rem = length - n * K

    def scan_step(consts, c, xk):
        return lax.scan(lambda c, x: step(consts, c, x), c, xk, unroll=unroll)

    def bwd(args, res, cts, want):
        (consts, init, xs), (ct_carry, ct_ys) = args, cts
        want_consts, _, want_x = want
        chunks = lambda t: jax.tree.map(lambda x: x[rem:].reshape((n, K) + x.shape[1:]), t)
        carry = scan_step(consts, init, _time_slice(xs, 0, rem))[0] if rem else init
        d_consts, lam, d_body = _reverse_sweep(
            scan_step,
            n,
            consts,
            carry,
            chunks(xs),
            ct_carry,
            chunks(ct_ys),
            n,
            want_consts,
            want_x,
        )
        d_body = jax.tree.map(lambda d: d.reshape((n * K,) + d.shape[2:]), d_body)
        if not rem:
            return d_consts, lam, d_body
        g_consts, d_init, d_head = _step_vjp(
            scan_step,
            consts,
            init,
            _time_slice(xs, 0, rem),
            lam,
            _time_slice(ct_ys, 0, rem),
            want_consts,
            want_x,
        )
        d_xs = jax.tree.map(lambda a, b: jnp.concatenate([a, b]), d_head, d_body)
        return _add(d_consts, g_consts), d_init, d_xs

    return bwd


# ---------------------------------------------------------------------------
# BPPSA: the adjoint recurrence as a parallel linear scan.


def _ravel(tree):
    """``tree``'s leaves as one vector in their widest dtype, and the inverse map (which
    casts each leaf back), so carries that mix float32 and float64 leaves work."""
    leaves, treedef = jax.tree.flatten(tree)
    if not leaves:
        return jnp.zeros((0,), jnp.float32), lambda v: treedef.unflatten([])
    dtype = np.result_type(*[x.dtype for x in leaves])  # numpy rules: widest float
    shapes = [x.shape for x in leaves]
    sizes = [math.prod(s) for s in shapes]
    vec = jnp.concatenate([jnp.ravel(x).astype(dtype) for x in leaves])

    def unravel(v):
        parts = jnp.split(v, np.cumsum(sizes)[:-1])
        return treedef.unflatten(
            [
                p.reshape(s).astype(x.dtype)
                for p, s, x in zip(parts, shapes, leaves, strict=True)
            ]
        )

    return vec, unravel


def _carry_jacobians(step, consts, c_prev, xs, jacobian):
    """Per-step Jacobians of the inexact carry, ``(T, N, N)`` or diagonals ``(T, N)``."""

    def flat_step(c, x):
        diff, static = eqx.partition(c, _inexact)
        vec, unravel = _ravel(diff)

        def g(v):
            c2 = step(consts, eqx.combine(unravel(v), static), x)[0]
            return _ravel(eqx.filter(c2, _inexact))[0]

        if jacobian == "dense":
            return jax.jacfwd(g)(vec)
        return jax.jvp(g, (vec,), (jnp.ones_like(vec),))[1]

    try:
        return jax.vmap(flat_step)(c_prev, xs)
    except TypeError as e:
        if "custom_vjp" not in str(e):
            raise
        raise TypeError(
            'ssm.scan(backward="parallel") builds the carry Jacobians by forward mode, '
            "and the step calls a jax.custom_vjp function, which has none. Use "
            'backward="sequential" (with any `checkpoints`), or give that function a '
            "forward-mode rule."
        ) from e


def _parallel_rules(step, jacobian, unroll):
    def fwd(consts, init, xs):
        def body(c, x):
            c2, y = step(consts, c, x)
            return c2, (y, c2)

        carry, (ys, carries) = lax.scan(body, init, xs, unroll=unroll)
        c_prev = jax.tree.map(
            lambda i, c: jnp.concatenate([i[None], c[:-1]]), init, carries
        )
        return (carry, ys), c_prev

    def bwd(args, c_prev, cts, want):
        (consts, init, xs), (ct_carry, ct_ys) = args, cts
        want_consts, _, want_x = want
        lam_end, unravel = _ravel(eqx.filter(_cotangent_or_none(init, ct_carry), _inexact))

        # v[t]: what y[t] sends back to the carry entering step t.
        def y_part(c, x, cty):
            g = _step_vjp(step, consts, c, x, None, cty, want_consts, want_x)[1]
            return _ravel(eqx.filter(g, _inexact))[0]

        v = jax.vmap(y_part)(c_prev, xs, ct_ys)
        J = _carry_jacobians(step, consts, c_prev, xs, jacobian)
        if jacobian == "dense":
            g = matrix_scan(jnp.swapaxes(J, 1, 2), v, lam_end, reverse=True)
        else:
            g = linear_scan(J, v, lam_end, reverse=True)
        # lam[t] = dL/d(carry after step t); then one batched vjp gives everything else.
        lam = jnp.concatenate([g[1:], lam_end[None]]).astype(lam_end.dtype)
        lam = jax.vmap(unravel)(lam)
        vjp = lambda c, x, lt, cty: _step_vjp(
            step, consts, c, x, lt, cty, want_consts, want_x
        )
        d_consts, d_carry, d_xs = jax.vmap(vjp)(c_prev, xs, lam, ct_ys)
        d_consts = jax.tree.map(lambda d: jnp.sum(d, axis=0), d_consts)
        return d_consts, _index(d_carry, 0), d_xs

    return fwd, bwd


# ---------------------------------------------------------------------------
# The public function.


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
      `checkpoints="all"`. The Jacobians come from forward mode, so the step must be
      forward-differentiable: a nested `ssm.scan` or chunked `ssm` operator is, a
      `jax.custom_vjp` function of your own is not (a clear error says so).
    - `jacobian`: for `backward="parallel"`: `"dense"` builds `(T, N, N)` Jacobians
      of the flattened carry (leaves of mixed float dtypes are flattened in the
      widest one); `"diagonal"` promises the carry Jacobian is diagonal (an
      elementwise recurrence), computes it with one `jvp` per step and uses
      `ssm.linear_scan`. A non-diagonal Jacobian gives wrong gradients there.

    **Returns:**

    `(carry, ys)`, as `lax.scan`.

    **Derivatives.** Every mode supports what `lax.scan` does: `jax.grad`/`jax.vjp`,
    `jax.jvp`/`jax.jacfwd`, `jax.vmap`, `jax.jit`, `jax.checkpoint`, and any order
    (Hessians, grad of grad). The memory-bounded modes are a `jax.custom_jvp` whose
    tangent map transposes to their own backward pass (`ssm._autodiff.fast_vjp`), so
    first-order reverse mode has the memory described above, forward mode stores
    nothing, and second-order derivatives through the backward pass are taken on the
    plain `lax.scan` (with its memory). Outputs `ys` that the loss does not use get
    no cotangent buffer. Closed-over values (arrays, Python floats, weak-typed
    scalars) get their gradients.

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

    def reference(consts, init, xs):
        return lax.scan(lambda c, x: step(consts, c, x), init, xs, unroll=unroll)

    def plain(consts, init, xs):
        return reference(consts, init, xs), ()

    if backward == "parallel":
        fwd, bwd = _parallel_rules(step, jacobian, unroll)
    elif checkpoints == "auto":
        fwd, bwd = plain, _auto_bwd(step, unroll, T)
    else:
        fwd, bwd = plain, _budget_bwd(step, int(checkpoints), T)
    carry, ys = fast_vjp(fwd, bwd, reference)(consts, init, xs)
    if reverse:
        ys = jax.tree.map(lambda y: jnp.flip(y, 0), ys)
    return carry, ys
