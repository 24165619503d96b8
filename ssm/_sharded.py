"""Time-sharded linear scans (sequence parallelism), and the public ``linear_scan`` and
``matrix_scan``: the single-device scans of ``_scan.py`` with ``mesh_axis`` added.

The time axis is split over the devices of one mesh axis, in order. The chunked
method's two-level idea is applied across devices:

1. every device runs the ordinary local scan on its shard from a zero state, and
   the cumulative multiplier of its shard, ``P[t] = a[t] ... a[first]`` (zero from
   a reset on), itself a local linear scan of ``a`` (``h = a * h + 0`` from ones);
2. the devices exchange only their summaries, the shard's total multiplier and its
   last local state (``D x`` state-sized numbers, one ``all_gather``), and each
   runs the same tiny scan over the ``D`` summaries to find its true carry-in;
3. each device corrects its local states, ``h[t] = h_local[t] + P[t] * carry_in``.

Everything is built from ``linear_scan``/``matrix_scan`` and JAX collectives, so
the derivatives come from the scan primitive's rules and the collectives'
transposes (the ``all_gather`` of the summaries becomes a ``psum_scatter`` of
their cotangents); nothing of the sequence's length crosses devices.

Compared with rerunning the local scan from the carry-in (the chunked method's
third pass), the correction costs one scan over the decays' shape (cheap when a
decay is shared by a state axis, as in ``(T, 1, 1)``) and one elementwise pass,
instead of a second scan over the state, forwards and backwards.
"""

from __future__ import annotations

import jax
import jax.numpy as jnp
from jax import lax
from jax.sharding import AxisType, PartitionSpec as P
from jaxtyping import Array, ArrayLike, Inexact, Shaped

from . import _scan
from ._checks import as_array, state_dtype
from ._primitive import _varying_axes


def _first(x, reverse):
    """The state processed last in a shard (index -1 forwards, 0 in reverse)."""
    return x[0] if reverse else x[-1]


def _carry_in(ends, h0, axis_name, reverse):
    """The state entering this device's shard, from the true shard-end states."""
    h0 = h0[None]
    ins = jnp.concatenate([ends[1:], h0]) if reverse else jnp.concatenate([h0, ends[:-1]])
    return lax.dynamic_index_in_dim(ins, lax.axis_index(axis_name), 0, keepdims=False)


def _vary(x, axis_name):
    """Mark an operand replicated over `axis_name` (a time-invariant decay, `h0`) as
    varying at the start, so that its cotangent is summed over the shard's steps
    before the one `psum` that the cast transposes to: that `psum` then moves the
    operand's own size, never the shard's length times it."""
    if x is None or not hasattr(x, "shape") or axis_name in _varying_axes(x):
        return x
    return lax.pcast(x, axis_name, to="varying")


def _local_h0(h0, shape, dtype):
    if h0 is None:
        return jnp.zeros(shape, dtype)
    h0 = as_array(h0)
    return jnp.broadcast_to(h0.astype(dtype), shape)


def sharded_linear_scan(
    a,
    b,
    h0=None,
    *,
    axis_name,
    reverse: bool = False,
    resets=None,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """`ssm.linear_scan` over a time axis split across the devices of `axis_name`.

    Call it inside a `jax.shard_map` body: `a` (when it has a time axis), `b` and
    `resets` are this device's shards of the time axis (device `i` of `axis_name`
    holding steps `i * T_local ... (i + 1) * T_local - 1`), `h0` is the global
    initial state (the same on every device). Returns this device's shard of the
    states of the unsharded scan. Only the shards' summaries (total decay and last
    state, `D x` state size) are exchanged, with one `all_gather`.

    The other arguments are as for `ssm.linear_scan`; `method` and `chunk_size`
    apply to the local scans.

    ```python
    @jax.shard_map(mesh=mesh, in_specs=(P("seq"), P("seq")), out_specs=P("seq"))
    def f(a, b):
        return ssm.sharded_linear_scan(a, b, axis_name="seq")
    ```
    """
    a = as_array(a)
    h0 = as_array(h0)
    a, h0 = _vary(a, axis_name), _vary(h0, axis_name)
    kw = dict(reverse=reverse, resets=resets, method=method, chunk_size=chunk_size)
    state_shape = tuple(b.shape[1:])
    dtype = state_dtype(a.dtype, b.dtype, *([] if h0 is None else [h0.dtype]))
    h_local = _scan.linear_scan(a, b, jnp.zeros(state_shape, dtype), **kw)
    a = jnp.reshape(a, (1,) * (b.ndim - a.ndim) + tuple(a.shape))
    a_shape = tuple(a.shape[1:])
    # Cumulative decay within the shard, in the decays' own shape.
    a_dtype = state_dtype(a.dtype)
    cum = _scan.linear_scan(
        a, jnp.zeros(b.shape[:1] + a_shape, a_dtype), jnp.ones(a_shape, a_dtype), **kw
    )
    decays = lax.all_gather(_first(cum, reverse), axis_name)
    lasts = lax.all_gather(_first(h_local, reverse), axis_name)
    h0 = _local_h0(h0, state_shape, dtype)
    ends = _scan.linear_scan(decays, lasts, h0, reverse=reverse, method="sequential")
    carry = _carry_in(ends, h0, axis_name, reverse)
    return h_local + cum.astype(dtype) * carry[None]


def sharded_matrix_scan(
    A,
    b,
    h0=None,
    *,
    axis_name,
    reverse: bool = False,
    resets=None,
    method: str = "auto",
    chunk_size: int | None = None,
):
    """`ssm.matrix_scan` over a time axis split across the devices of `axis_name`.

    As `sharded_linear_scan`: call it inside `jax.shard_map` with this device's
    shards of `A` (when it has a time axis), `b` and `resets`, and the global
    `h0`. The summaries exchanged are each shard's product of transitions
    (`N x N`) and last state.
    """
    A = as_array(A)
    h0 = as_array(h0)
    A, h0 = _vary(A, axis_name), _vary(h0, axis_name)
    kw = dict(reverse=reverse, resets=resets, method=method, chunk_size=chunk_size)
    dtype = state_dtype(A.dtype, b.dtype, *([] if h0 is None else [h0.dtype]))
    h_local = _scan.matrix_scan(A, b, jnp.zeros(b.shape[1:], dtype), **kw)
    N = b.shape[1]
    # Cumulative product of the transitions within the shard, (T_local, N, N).
    a_dtype = state_dtype(A.dtype)
    eye = jnp.eye(N, dtype=a_dtype)
    cum = _scan.matrix_scan(A, jnp.zeros(b.shape[:1] + (N, N), a_dtype), eye, **kw)
    prods = lax.all_gather(_first(cum, reverse), axis_name)
    lasts = lax.all_gather(_first(h_local, reverse), axis_name)
    h0 = _local_h0(h0, tuple(b.shape[1:]), dtype)
    ends = _scan.matrix_scan(prods, lasts, h0, reverse=reverse, method="sequential")
    carry = _carry_in(ends, h0, axis_name, reverse)
    spec = "tij,j->ti" if b.ndim == 2 else "tij,jm->tim"
    fix = jnp.einsum(spec, cum.astype(dtype), carry, precision=lax.Precision.HIGHEST)
    return h_local + fix


# ---------------------------------------------------------------------------
# `linear_scan(..., mesh_axis=...)`: the shard_map around it, from the mesh in
# context or in the inputs' types.


def _find_mesh(mesh_axis, arrays):
    mesh = jax.sharding.get_abstract_mesh()
    if not mesh.empty and mesh_axis in mesh.axis_names:
        return mesh
    for x in arrays:
        try:
            sharding = getattr(jax.typeof(x), "sharding", None)
        except TypeError:  # not an array; `linear_scan` says so below
            continue
        m = getattr(sharding, "mesh", None)
        if m is not None and not m.empty and mesh_axis in m.axis_names:
            return m
    for x in arrays:  # concrete arrays placed with a NamedSharding (outside jit)
        sharding = getattr(x, "sharding", None) if isinstance(x, jax.Array) else None
        if isinstance(sharding, jax.sharding.NamedSharding):
            if mesh_axis in sharding.mesh.axis_names:
                return sharding.mesh
    raise ValueError(
        f"`mesh_axis={mesh_axis!r}` names no axis of a mesh in context or in the "
        "inputs' shardings (current mesh axes: "
        f"{tuple(mesh.axis_names)}). Set one with `jax.set_mesh(mesh)` (e.g. "
        f"`jax.make_mesh((n,), ({mesh_axis!r},))`), or pass arrays sharded on it."
    )


def _axis_type(mesh, name):
    return dict(zip(mesh.axis_names, mesh.axis_types, strict=True))[name]


def _check_sharded(name, x, mesh_axis, mesh):
    """In explicit mode the time axis must already be sharded on `mesh_axis` (no
    hidden resharding); replicated is accepted (each device takes its slice)."""
    if _axis_type(mesh, mesh_axis) != AxisType.Explicit:
        return x
    spec = jax.typeof(x).sharding.spec
    first = spec[0] if len(spec) else None
    if first == mesh_axis or (isinstance(first, tuple) and first == (mesh_axis,)):
        return x
    used = {n for s in spec for n in (s if isinstance(s, tuple) else (s,)) if n}
    if first is None and mesh_axis not in used:
        return jax.sharding.reshard(x, P(mesh_axis, *spec[1:]))
    raise ValueError(
        f"`{name}` of type {jax.typeof(x).str_short()} must be sharded along its time "
        f"axis (axis 0) over mesh axis {mesh_axis!r} (and over no other axis there), "
        f"got spec {spec}; reshard it, e.g. "
        f"`jax.sharding.reshard({name}, P({mesh_axis!r}))`."
    )


def on_mesh(kind, a, b, h0, *, mesh_axis, reverse, resets, method, chunk_size):
    """`linear_scan` (kind "linear") or `matrix_scan` ("matrix") with the time
    axis split over the devices of mesh axis `mesh_axis`."""
    if not isinstance(mesh_axis, str):
        raise TypeError(f"`mesh_axis` must be a mesh axis name (str), got {mesh_axis!r}.")
    scan = _scan.linear_scan if kind == "linear" else _scan.matrix_scan
    local = sharded_linear_scan if kind == "linear" else sharded_matrix_scan
    kw = dict(reverse=reverse, method=method, chunk_size=chunk_size)
    a = as_array(a)
    arrays = [x for x in (a, b, h0, resets) if x is not None]
    mesh = _find_mesh(mesh_axis, arrays)
    if _axis_type(mesh, mesh_axis) == AxisType.Manual:
        # Already inside a shard_map over the axis: the inputs are the shards.
        return local(a, b, h0, axis_name=mesh_axis, resets=resets, **kw)
    # Check everything on the global shapes (errors then name them), unsharded.
    out = jax.eval_shape(
        lambda a, b, h0, r: scan(a, b, h0, resets=r, **kw), a, b, h0, resets
    )
    T = b.shape[0]
    D = mesh.shape[mesh_axis]
    if T % D:
        raise ValueError(
            f"time-sharded scan: `b` of shape {tuple(b.shape)} has T = {T} steps, not "
            f"a multiple of the {D} devices of mesh axis {mesh_axis!r}. Pad the time "
            f"axis to a multiple of {D} on the side processed last (the end, or the "
            "start when reverse=True) with a = 1, b = 0, and drop the padded states."
        )
    if kind == "matrix" and a.ndim == 2:
        a = a[None]
    if kind == "linear":
        a = jnp.reshape(a, (1,) * (b.ndim - a.ndim) + tuple(a.shape))
    a_timed = a.shape[0] == T and T != 1
    b = _check_sharded("b", b, mesh_axis, mesh)
    if a_timed:
        a = _check_sharded("a", a, mesh_axis, mesh)
    if resets is not None:
        resets = _check_sharded("resets", resets, mesh_axis, mesh)
    h0 = as_array(h0)
    seq, rep = P(mesh_axis), P()

    def body(a, b, h0, r):
        return local(a, b, h0, axis_name=mesh_axis, resets=r, **kw)

    f = jax.shard_map(
        body,
        mesh=mesh,
        in_specs=(
            seq if a_timed else rep,
            seq,
            None if h0 is None else rep,
            None if resets is None else seq,
        ),
        out_specs=seq,
        axis_names=frozenset({mesh_axis}),
    )
    h = f(a, b, h0, resets)
    assert h.shape == out.shape and h.dtype == out.dtype, (h, out)
    return h


# ---------------------------------------------------------------------------
# The public scans: those of `_scan.py` with `mesh_axis` added.


def _dispatch(kind, a, b, h0, mesh_axis, **kw):
    if mesh_axis is None:
        local = _scan.linear_scan if kind == "linear" else _scan.matrix_scan
        return local(a, b, h0, **kw)
    return on_mesh(kind, a, b, h0, mesh_axis=mesh_axis, **kw)


def linear_scan(
    a: Shaped[ArrayLike, "..."],
    b: Shaped[Array, "T *S"],
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    reverse: bool = False,
    resets: Shaped[ArrayLike, "..."] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    mesh_axis: str | None = None,
) -> Inexact[Array, "T *S"]:
    """Diagonal linear recurrence ``h[t] = a[t] * h[t-1] + b[t]``.

    **Arguments:**

    - `a`: the decays. Broadcasts against `b` by NumPy rules, so a scalar decay per
      step over a matrix state is `(T, 1, 1)`, a key-wise one `(T, N, 1)`, and a
      time-invariant one `(1, *S)` or `S` (never materialised over time).
    - `b`: the inputs, shape `(T, *S)`.
    - `h0`: the state before the first step, broadcastable to `S`; zeros if `None`.
    - `reverse`: run from the end, `h[t] = a[t] * h[t+1] + b[t]`.
    - `resets`: boolean `(T,)`; where true the state restarts before step `t`
      (`h[t] = b[t]`), for packed sequences.
    - `method`: `"sequential"`, `"associative"` (O(log T) depth), `"chunked"` or
      `"auto"` (chosen per backend and size, see the README's benchmark tables).
      All give the same values and share one derivative rule.
    - `chunk_size`: the chunk length of the chunked method (default about
      `sqrt(T)`, a divisor of `T` when one is near).
    - `mesh_axis`: the name of a mesh axis over which the time axis is split
      (sequence parallelism): each device scans its shard and the devices exchange
      only per-shard summaries (see `ssm.sharded_linear_scan`). The mesh comes from
      `jax.set_mesh` or the inputs' shardings; `T` must be a multiple of the axis
      size. Inside a `shard_map` over that axis the inputs are taken as the shards.

    **Returns:**

    The states `h`, shape `(T, *S)`, in float32/complex64 (float64/complex128 if
    any input is 64-bit): bfloat16 and float16 inputs accumulate in float32.

    The backward pass is the reverse linear scan of the adjoints,
    `g[t] = dL/dh[t] + a[t+1] g[t+1]`, `da[t] = g[t] h[t-1]`, `db[t] = g[t]`
    (JAX's transpose convention for complex numbers), run with the same method;
    it keeps only `a` and the states. `jit`, `vmap`, `grad`, `jvp` and
    higher-order derivatives all compose.

    ```python
    h = ssm.linear_scan(jnp.full((T, D), 0.9), x)        # leaky integrator
    h = ssm.linear_scan(decay[:, None, None], k[:, :, None] * v[:, None, :])
    ```
    """
    kw = dict(reverse=reverse, resets=resets, method=method, chunk_size=chunk_size)
    return _dispatch("linear", a, b, h0, mesh_axis, **kw)


def matrix_scan(
    A: Shaped[ArrayLike, "..."],
    b: Shaped[Array, "..."],
    h0: Shaped[ArrayLike, "..."] | None = None,
    *,
    reverse: bool = False,
    resets: Shaped[ArrayLike, "..."] | None = None,
    method: str = "auto",
    chunk_size: int | None = None,
    mesh_axis: str | None = None,
) -> Inexact[Array, "T N *M"]:
    """Matrix linear recurrence ``h[t] = A[t] @ h[t-1] + b[t]``.

    **Arguments:**

    - `A`: the transitions, shape `(T, N, N)` (or `(1, N, N)` / `(N, N)` for a
      time-invariant transition, never materialised over time).
    - `b`: the inputs, shape `(T, N)` (vector state) or `(T, N, M)` (matrix state).
    - `h0`: the state before the first step, shape `(N,)` or `(N, M)`; zeros if
      `None`.
    - `reverse`, `resets`, `method`, `chunk_size`, `mesh_axis`: as for `linear_scan`
      (time-sharded, the summaries exchanged are the shards' `N x N` products).

    **Returns:**

    The states, shape `(T, N)` or `(T, N, M)`, float32/complex64 or wider.

    The backward pass is the reverse scan `g[t] = dL/dh[t] + A[t+1]^T g[t+1]`,
    `dA[t] = g[t] h[t-1]^T`, `db[t] = g[t]`.
    """
    kw = dict(reverse=reverse, resets=resets, method=method, chunk_size=chunk_size)
    return _dispatch("matrix", A, b, h0, mesh_axis, **kw)
