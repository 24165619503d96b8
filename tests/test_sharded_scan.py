"""Time-sharded scans (sequence parallelism) against the unsharded scans.

conftest.py sets up 4 fake CPU devices; meshes of 4 and 2 of them split the time
axis. Values and VJPs (float64/complex128) must equal the unsharded scan's, and the
compiled programs may only move per-shard summaries between devices.
"""

import functools
import re

import jax
import jax.numpy as jnp
import numpy as np
import pytest
from jax.sharding import AxisType, NamedSharding, PartitionSpec as P

import ssm

from .helpers import assert_close

F64, C128 = jnp.float64, jnp.complex128
TOL = 1e-11


# Inputs from NumPy (no per-shape compilations of JAX's random functions).


@pytest.fixture
def rng(request):
    return np.random.default_rng(sum(map(ord, request.node.name)))


def normal(rng, shape, dtype=F64, scale=1.0):
    x = scale * rng.standard_normal(shape)
    if dtype == C128:
        x = (x + 1j * rng.standard_normal(shape)) * np.sqrt(0.5)
    return jnp.asarray(x, dtype)


def decay(rng, shape, dtype=F64):
    """Moduli in [0.3, 0.99], random phases (complex) or signs (real)."""
    mod = rng.uniform(0.3, 0.99, shape)
    if dtype == C128:
        return jnp.asarray(mod * np.exp(1j * rng.uniform(-np.pi, np.pi, shape)), dtype)
    return jnp.asarray(mod * np.where(rng.random(shape) < 0.2, -1.0, 1.0), dtype)


def _mesh(n, names=("seq",), shape=None, axis_type=AxisType.Explicit):
    shape = shape or (n,)
    return jax.make_mesh(
        shape, names, axis_types=(axis_type,) * len(names), devices=jax.devices()[:n]
    )


def _a_shape(kind, T, S):
    return {
        "full": (T,) + S,
        "step": (T,) + (1,) * len(S),  # one decay per step, broadcast over S
        "key": (T, S[0]) + (1,) * (len(S) - 1),
        "inv": S,  # time-invariant, no time axis
    }[kind]


def _resets(rng, T, n):
    r = rng.random(T) < 0.04
    r[[0, T // n]] = True  # on the very first step and on a shard's first step
    return jnp.asarray(r)


def _value_and_vjp(fn, diff, ct):
    h, vjp = jax.vjp(fn, *diff)
    return h, vjp(ct)


def _collectives(compiled_text):
    """(op, number of elements) of every collective in a compiled HLO module."""
    out = []
    pat = re.compile(
        r"=\s*\(?((?:[a-z]+\d*\[[\d,]*\][^ ]*[, ]*)+)\)?\s*"
        r"(all-gather|all-reduce|reduce-scatter|collective-permute|all-to-all)"
        r"(?:-start)?\("
    )
    for m in pat.finditer(compiled_text):
        for dims in re.findall(r"\[([\d,]*)\]", m.group(1)):
            n = int(np.prod([int(d) for d in dims.split(",") if d])) if dims else 1
            out.append((m.group(2), n))
    return out


def _put(x, mesh, spec):
    return jax.device_put(x, NamedSharding(mesh, spec))


def _unsharded_and_sharded(scan, diff, sharded, r, ct, mesh):
    """`scan(None, *diff, r=r)` on one device and `scan("seq", *sharded, ...)` with
    the resets and cotangent sharded over `mesh`, each with its VJP of `ct`.

    **Returns:** `(h, vjp)` unsharded, `(h, vjp)` sharded, and the sharded program's
    compiled HLO text."""
    ref = jax.jit(lambda diff, ct: _value_and_vjp(lambda *d: scan(None, *d, r=r), diff, ct))
    f = jax.jit(
        lambda diff, r, ct: _value_and_vjp(lambda *d: scan("seq", *d, r=r), diff, ct)
    )
    seq = P("seq")
    with jax.set_mesh(mesh):
        r_s = None if r is None else _put(r, mesh, seq)
        compiled = f.lower(sharded, r_s, _put(ct, mesh, seq)).compile()
        out = compiled(sharded, r_s, _put(ct, mesh, seq))
    return ref(diff, ct), out, compiled.as_text()


# (devices, T, state shape, shape of a, dtype of a, dtype of b, reverse, h0, resets,
#  local method)
LINEAR_CASES = [
    (4, 4 * 37, (3,), "full", F64, F64, False, True, False, "auto"),
    (4, 4 * 37, (2, 3), "step", C128, C128, True, True, True, "sequential"),
    (2, 2 * 37, (3,), "inv", F64, F64, True, False, True, "associative"),
    (4, 4 * 16, (4, 2), "key", F64, C128, False, False, True, "chunked"),
]


@pytest.mark.parametrize("case", LINEAR_CASES, ids=str)
def test_linear_scan_mesh_axis(case, rng):
    n, T, S, a_kind, a_dtype, b_dtype, reverse, with_h0, with_resets, method = case
    mesh = _mesh(n)
    a = decay(rng, _a_shape(a_kind, T, S), a_dtype)
    b = normal(rng, (T,) + S, b_dtype)
    h0 = normal(rng, S, b_dtype) if with_h0 else None
    r = _resets(rng, T, n) if with_resets else None
    ct = normal(rng, (T,) + S, C128 if C128 in (a_dtype, b_dtype) else F64)

    diff = (a, b) + ((h0,) if with_h0 else ())

    def scan(mesh_axis, a, b, h0=None, *, r):
        return ssm.linear_scan(
            a,
            b,
            h0,
            reverse=reverse,
            resets=r,
            mesh_axis=mesh_axis,
            method=method,
            chunk_size=5 if method == "chunked" else None,
        )

    seq = P("seq")
    sharded = (a if a_kind == "inv" else _put(a, mesh, seq), _put(b, mesh, seq))
    sharded += diff[2:]  # h0: replicated
    (h_ref, g_ref), (h, g), hlo = _unsharded_and_sharded(scan, diff, sharded, r, ct, mesh)
    assert h.sharding.spec[0] == "seq"
    assert_close(h, h_ref, TOL, "states")
    for name, x, y in zip("a b h0".split(), g, g_ref, strict=False):
        assert x.dtype == y.dtype, name
        assert_close(x, y, TOL, f"d{name}")
    # Only summaries cross devices: nothing with more elements than n states.
    colls = _collectives(hlo)
    assert colls, "expected the summaries to be exchanged"
    assert all(k <= n * int(np.prod(S)) for _, k in colls), colls


# (devices, T, N, M or None, dtype, reverse, h0, resets, time-invariant A)
MATRIX_CASES = [
    (4, 4 * 37, 3, None, F64, False, True, True, False),
    (2, 2 * 21, 3, 2, C128, True, True, False, True),
]


@pytest.mark.parametrize("case", MATRIX_CASES, ids=str)
def test_matrix_scan_mesh_axis(case, rng):
    n, T, N, M, dtype, reverse, with_h0, with_resets, invariant = case
    mesh = _mesh(n)
    S = (N,) if M is None else (N, M)
    A = normal(rng, (1 if invariant else T, N, N), dtype, scale=0.9 / np.sqrt(N))
    b = normal(rng, (T,) + S, dtype)
    h0 = normal(rng, S, dtype) if with_h0 else None
    r = _resets(rng, T, n) if with_resets else None
    ct = normal(rng, (T,) + S, dtype)
    diff = (A, b) + ((h0,) if with_h0 else ())

    def scan(mesh_axis, A, b, h0=None, *, r):
        return ssm.matrix_scan(A, b, h0, reverse=reverse, resets=r, mesh_axis=mesh_axis)

    seq = P("seq")
    sharded = (A if invariant else _put(A, mesh, seq), _put(b, mesh, seq)) + diff[2:]
    (h_ref, g_ref), (h, g), hlo = _unsharded_and_sharded(scan, diff, sharded, r, ct, mesh)
    assert_close(h, h_ref, TOL, "states")
    for name, x, y in zip("A b h0".split(), g, g_ref, strict=False):
        assert_close(x, y, TOL, f"d{name}")
    colls = _collectives(hlo)
    assert colls and all(k <= n * N * max(N, M or 1) for _, k in colls), colls


def test_inside_shard_map_vmap_and_jvp(rng):
    """`sharded_linear_scan` in a user's own shard_map (vmapped over a batch), and
    `linear_scan(mesh_axis=...)` there taking its inputs as the shards; forward mode."""
    n, T, B, D = 4, 4 * 9, 2, 3
    mesh = _mesh(n)
    a = decay(rng, (B, T, D), F64)
    b = normal(rng, (B, T, D), F64)
    h0 = normal(rng, (B, D), F64)
    ta, tb = normal(rng, a.shape, F64), normal(rng, b.shape, F64)

    ref = jax.vmap(lambda a, b, h0: ssm.linear_scan(a, b, h0, reverse=True))

    @jax.shard_map(
        mesh=mesh, in_specs=(P(None, "seq"), P(None, "seq"), P()), out_specs=P(None, "seq")
    )
    def by_function(a, b, h0):
        f = functools.partial(ssm.sharded_linear_scan, axis_name="seq", reverse=True)
        return jax.vmap(f)(a, b, h0)

    @jax.shard_map(
        mesh=mesh, in_specs=(P(None, "seq"), P(None, "seq"), P()), out_specs=P(None, "seq")
    )
    def by_mesh_axis(a, b, h0):
        f = functools.partial(ssm.linear_scan, reverse=True, mesh_axis="seq")
        return jax.vmap(f)(a, b, h0)

    h_ref, t_ref = jax.jvp(ref, (a, b, h0), (ta, tb, jnp.zeros_like(h0)))
    s = NamedSharding(mesh, P(None, "seq"))
    args = (jax.device_put(a, s), jax.device_put(b, s), h0)
    tans = (jax.device_put(ta, s), jax.device_put(tb, s), jnp.zeros_like(h0))
    for f in (by_function, by_mesh_axis):
        h, t = jax.jit(lambda args, tans, f=f: jax.jvp(f, args, tans))(args, tans)
        assert_close(h, h_ref, TOL, "states")
        assert_close(t, t_ref, TOL, "tangents")


def test_data_and_seq_mesh(rng):
    """A 2 x 2 mesh (auto axes): batch over "data", time over "seq", with gradients."""
    mesh = _mesh(4, ("data", "seq"), (2, 2), AxisType.Auto)
    B, T, D = 2, 2 * 25, 3
    a = decay(rng, (B, T, 1), F64)
    b = normal(rng, (B, T, D), C128)

    def loss(mesh_axis, a, b):
        h = jax.vmap(lambda a, b: ssm.linear_scan(a, b, mesh_axis=mesh_axis))(a, b)
        return jnp.sum(jnp.abs(h) ** 2)

    ref = jax.jit(jax.value_and_grad(functools.partial(loss, None), argnums=(0, 1)))(a, b)
    s = NamedSharding(mesh, P("data", "seq"))
    with jax.set_mesh(mesh):
        f = jax.jit(jax.value_and_grad(functools.partial(loss, "seq"), argnums=(0, 1)))
        out = f(jax.device_put(a, s), jax.device_put(b, s))
    assert_close(out, ref, TOL, "loss and gradients")
    assert out[1][1].sharding.spec == P("data", "seq")


def test_errors(rng):
    b = normal(rng, (4 * 5 + 2, 3), F64)
    a = decay(rng, b.shape, F64)
    with pytest.raises(ValueError, match=r"\(22, 3\).*not a multiple of the 4 devices"):
        with jax.set_mesh(_mesh(4)):
            ssm.linear_scan(a, b, mesh_axis="seq")
    with pytest.raises(ValueError, match="names no axis of a mesh"):
        ssm.linear_scan(a, b, mesh_axis="seq")
    with pytest.raises(ValueError, match="does not broadcast"):
        with jax.set_mesh(_mesh(2)):
            ssm.linear_scan(a[:, :2], b, mesh_axis="seq")
