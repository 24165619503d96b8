"""A fast, memory-bounded backward pass that still composes with every JAX transform.

``jax.custom_vjp`` gives an operator a hand-written backward pass, but then the
operator has no forward mode (``jax.jvp``, ``jax.jacfwd``, Hessians by
forward-over-reverse), and second-order reverse mode has to differentiate the
hand-written backward pass itself (which fails when that pass is a ``while_loop``
with a data-dependent trip count, as in checkpointing, or a compiled kernel).

``fast_vjp(fwd, bwd, reference)`` builds a function with the same derivatives but
through forward mode, in the manner of ``equinox.internal``'s loops and JAX's own
``linear_call``:

- The function is a ``jax.custom_jvp``. Its JVP rule evaluates ``fwd`` (the fast
  forward pass, which also returns residuals) and emits the output tangent as one
  ``ssm_tangent`` primitive: linear in the input tangents, with the primal inputs
  and the residuals as constants.
- ``ssm_tangent``'s *transpose* is ``bwd``, the fast backward pass. So
  ``jax.grad`` = linearise + transpose keeps only the inputs and the residuals,
  and runs ``bwd``: memory is exactly what ``bwd`` needs.
- ``ssm_tangent``'s *evaluation* (forward mode) is ``jax.jvp`` of ``reference``,
  a plain-JAX form of the same function (a ``lax.scan`` loop): forward mode stores
  nothing anyway.
- Everything of second order (the derivative of ``bwd`` with respect to the
  primals, the derivative of a tangent with respect to the primals) is taken
  through ``reference`` by JAX's own autodiff. Those paths keep what ``reference``
  keeps (for a scan: every step's residuals), which is the price of a Hessian.

``vmap`` works on all of it (the primitive has a batching rule that vmaps the
three functions). Only inexact leaves get tangents; integer leaves pass through.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any

import jax
import jax.extend as jex
import jax.numpy as jnp
import numpy as np
from jax.core import ShapedArray
from jax.custom_derivatives import SymbolicZero
from jax.interpreters import ad, batching, mlir

__all__ = ["fast_vjp"]


def _inexact(x) -> bool:
    return jnp.issubdtype(jnp.result_type(x), jnp.inexact)


def _zero_tangent(x):
    """A zero tangent for ``x``: zeros of its dtype, or float0 for non-inexact dtypes."""
    if _inexact(x):
        return jnp.zeros(jnp.shape(x), jnp.result_type(x))
    return np.zeros(np.shape(x), jax.dtypes.float0)


class _Rules:
    """The flat functions behind one ``ssm_tangent`` equation (hashed by identity).

    ``p``: every primal input leaf; ``res``: residual leaves; ``t``: tangents of the
    inputs ``p[i] for i in t_idx``; outputs: tangents of the inexact outputs.

    - ``ref_jvp(p, t) -> list``: the output tangents, from the reference.
    - ``bwd(p, res, cts, want) -> list``: cotangents of ``t[j] for j in want`` from
      the output cotangents ``cts`` (``None`` where symbolically zero), fast.
    - ``ref_vjp(p, cts, want) -> list``: the same from the reference's autodiff.
    """

    def __init__(self, ref_jvp, bwd, ref_vjp, out_avals, n_p, n_res, n_t):
        self.ref_jvp = ref_jvp
        self.bwd = bwd
        self.ref_vjp = ref_vjp
        self.out_avals = tuple(out_avals)
        self.n_p, self.n_res, self.n_t = n_p, n_res, n_t

    def split(self, args):
        n_p, n_res = self.n_p, self.n_res
        return list(args[:n_p]), list(args[n_p : n_p + n_res]), list(args[n_p + n_res :])

    def batched(self, axes, size):
        """The same functions for inputs batched along ``axes`` (0 or None)."""
        p_ax, res_ax, t_ax = self.split(axes)

        def unbatch(grads, want):
            # A tangent input without a batch axis gets the batch's summed cotangent.
            return [
                g if t_ax[j] is not None else g.sum(0)
                for g, j in zip(grads, want, strict=True)
            ]

        def ref_jvp(p, t):
            return jax.vmap(self.ref_jvp, in_axes=(p_ax, t_ax), axis_size=size)(p, t)

        def bwd(p, res, cts, want):
            fn = lambda p, r, c: self.bwd(p, r, c, want)
            return unbatch(
                jax.vmap(fn, in_axes=(p_ax, res_ax, 0), axis_size=size)(p, res, cts), want
            )

        def ref_vjp(p, cts, want):
            fn = lambda p, c: self.ref_vjp(p, c, want)
            return unbatch(jax.vmap(fn, in_axes=(p_ax, 0), axis_size=size)(p, cts), want)

        avals = [ShapedArray((size,) + a.shape, a.dtype) for a in self.out_avals]
        return _Rules(ref_jvp, bwd, ref_vjp, avals, self.n_p, self.n_res, self.n_t)


tangent_p = jex.core.Primitive("ssm_tangent")
tangent_p.multiple_results = True


def _impl(*args, rules):
    p, _, t = rules.split(args)
    return rules.ref_jvp(p, t)


def _abstract_eval(*args, rules):
    del args
    return list(rules.out_avals)


tangent_p.def_impl(_impl)
tangent_p.def_abstract_eval(_abstract_eval)
mlir.register_lowering(tangent_p, mlir.lower_fun(_impl, multiple_results=True))


def _jvp(primals, tangents, *, rules):
    """Linear in ``t``; its derivative in ``p`` is second order, from the reference."""
    p, res, t = rules.split(primals)
    dp, _, dt = rules.split(tangents)  # residual tangents: res is a function of p
    out = tangent_p.bind(*primals, rules=rules)
    terms = []
    if any(type(d) is not ad.Zero for d in dt):
        dt = [ad.instantiate_zeros(d) for d in dt]
        terms.append(tangent_p.bind(*p, *res, *dt, rules=rules))
    if any(type(d) is not ad.Zero and _inexact(x) for d, x in zip(dp, p, strict=True)):
        dp = [
            _zero_tangent(x) if type(d) is ad.Zero or not _inexact(x) else d
            for d, x in zip(dp, p, strict=True)
        ]
        terms.append(jax.jvp(lambda p_: rules.ref_jvp(p_, t), (p,), (dp,))[1])
    if not terms:
        return out, [ad.Zero(a.to_tangent_aval()) for a in rules.out_avals]
    return out, [functools.reduce(jnp.add, ts) for ts in zip(*terms, strict=True)]


def _bwd_call(rules, want, p, res, cts):
    """``rules.bwd``, made differentiable (to any order) through the reference."""
    present = tuple(c is not None for c in cts)

    def fill(c):
        it = iter(c)
        return [next(it) if here else None for here in present]

    @jax.custom_jvp
    def run(p, res, c):
        return rules.bwd(p, res, fill(c), want)

    @run.defjvp
    def run_jvp(primals, tangents):
        p, res, c = primals
        dp, _, dc = tangents
        out = run(p, res, c)
        fn = lambda p_, c_: rules.ref_vjp(p_, fill(c_), want)
        return out, jax.jvp(fn, (p, c), (dp, dc))[1]

    return run(p, res, [c for c in cts if c is not None])


def _transpose(cts, *args, rules):
    p, res, t = rules.split(args)
    if any(ad.is_undefined_primal(x) for x in p + res):
        raise NotImplementedError("ssm_tangent is linear in its tangent operands only.")
    want = tuple(j for j, x in enumerate(t) if ad.is_undefined_primal(x))
    cts = [None if type(c) is ad.Zero else c for c in cts]
    out = [None] * len(args)
    if not want or all(c is None for c in cts):
        return out
    grads = _bwd_call(rules, want, p, res, cts)
    for j, g in zip(want, grads, strict=True):
        aval = t[j].aval
        out[rules.n_p + rules.n_res + j] = g.astype(aval.dtype).reshape(aval.shape)
    return out


def _batch(args, dims, *, rules):
    size = next(x.shape[d] for x, d in zip(args, dims, strict=True) if d is not None)
    args = [
        x if d is None else jnp.moveaxis(x, d, 0) for x, d in zip(args, dims, strict=True)
    ]
    axes = [None if d is None else 0 for d in dims]
    out = tangent_p.bind(*args, rules=rules.batched(axes, size))
    return out, [0] * len(out)


ad.primitive_jvps[tangent_p] = _jvp
ad.primitive_transposes[tangent_p] = _transpose
batching.primitive_batchers[tangent_p] = _batch


# ---------------------------------------------------------------------------
# The public combinator.


def fast_vjp(
    fwd: Callable[..., tuple[Any, Any]],
    bwd: Callable[[Any, Any, Any, Any], Any],
    reference: Callable[..., Any],
) -> Callable[..., Any]:
    """A function with a hand-written backward pass and every other derivative too.

    **Arguments:**

    - `fwd`: `fwd(*args) -> (out, res)`, the fast forward pass and what the backward
      pass needs besides `args` (pytrees of arrays).
    - `bwd`: `bwd(args, res, cts, want) -> grads`. `cts` has the structure of `out`
      with `None` at leaves whose cotangent is zero (integer leaves and unused
      outputs; do not build zeros for them). `want` has the structure of `args`
      with a bool per leaf: the cotangents to compute. `grads` has the structure of
      `args`; leaves that are not wanted may be `None`.
    - `reference`: `reference(*args) -> out`, the same function in plain JAX, used
      for forward mode and for every second-order derivative.

    **Returns:**

    `f(*args) -> out`, equal to `fwd(*args)[0]`.
    """

    def call(*args):
        leaves, in_tree = jax.tree.flatten(args)
        leaves = [jnp.asarray(x) for x in leaves]
        out_shape, res_shape = jax.eval_shape(lambda *a: fwd(*a), *args)
        out_tree = jax.tree.structure(out_shape)
        res_tree = jax.tree.structure(res_shape)
        out_leaves_shape = jax.tree.leaves(out_shape)
        out_diff = [_inexact(o) for o in out_leaves_shape]
        n_out = len(out_leaves_shape)

        def flat_fwd(*p):
            out, res = fwd(*in_tree.unflatten(p))
            return [*jax.tree.leaves(out), *jax.tree.leaves(res)]

        def flat_ref(p):
            return jax.tree.leaves(reference(*in_tree.unflatten(p)))

        g = jax.custom_jvp(flat_fwd)

        def g_jvp(primals, tangents):
            outs = g(*primals)
            out_l, res_l = outs[:n_out], outs[n_out:]
            t_idx = tuple(
                i
                for i, (x, d) in enumerate(zip(primals, tangents, strict=True))
                if _inexact(x) and not isinstance(d, SymbolicZero)
            )
            t_res = [_zero_tangent(r) for r in res_l]
            if not t_idx:
                return outs, [_zero_tangent(o) for o in out_l] + t_res
            rules = _make_rules(
                primals,
                t_idx,
                out_l,
                out_diff,
                res_l,
                flat_ref,
                bwd,
                in_tree,
                out_tree,
                res_tree,
            )
            t_out = iter(
                tangent_p.bind(*primals, *res_l, *[tangents[i] for i in t_idx], rules=rules)
            )
            t_outs = [
                next(t_out) if d else _zero_tangent(o)
                for o, d in zip(out_l, out_diff, strict=True)
            ]
            return outs, t_outs + t_res

        g.defjvp(g_jvp, symbolic_zeros=True)

        outs = g(*leaves)
        return out_tree.unflatten(outs[:n_out])

    return call


def _make_rules(
    primals, t_idx, out_l, out_diff, res_l, flat_ref, bwd, in_tree, out_tree, res_tree
):
    n_p = len(primals)
    diff_out_idx = [i for i, d in enumerate(out_diff) if d]

    def with_t(p, sub, idx):
        p = list(p)
        for i, v in zip(idx, sub, strict=True):
            p[i] = v
        return p

    def ref_diff(p, idx):
        def fn(sub):
            out = flat_ref(with_t(p, sub, idx))  # one trace of the reference
            return [out[i] for i in diff_out_idx]

        return fn

    def ref_jvp(p, t):
        sub = [p[i] for i in t_idx]
        return jax.jvp(ref_diff(p, t_idx), (sub,), (list(t),))[1]

    def ref_vjp(p, cts, want):
        idx = [t_idx[j] for j in want]
        sub = [p[i] for i in idx]
        outs, vjp = jax.vjp(ref_diff(p, idx), sub)
        cts = [
            jnp.zeros_like(o) if c is None else c for o, c in zip(outs, cts, strict=True)
        ]
        return vjp(cts)[0]

    def flat_bwd(p, res, cts, want):
        idx = {t_idx[j] for j in want}
        it = iter(cts)
        cts_full = [next(it) if d else None for d in out_diff]
        wanted = in_tree.unflatten([i in idx for i in range(n_p)])
        grads = bwd(
            in_tree.unflatten(p),
            res_tree.unflatten(res),
            out_tree.unflatten(cts_full),
            wanted,
        )
        grads = in_tree.flatten_up_to(grads)
        return [grads[t_idx[j]] for j in want]

    avals = [
        ShapedArray(jnp.shape(o), jnp.result_type(o))
        for o, d in zip(out_l, out_diff, strict=True)
        if d
    ]
    return _Rules(ref_jvp, flat_bwd, ref_vjp, avals, n_p, len(res_l), len(t_idx))
