"""ssm.selective_scan against a float64 loop written from the Mamba paper's equations.

Values and gradients to every argument (x, dt, A, B, C, D, z, h0) with and without
resets, grouped B/C, lengths that are not a multiple of the chunk, bfloat16 inputs,
forward mode and a Hessian-vector product, vmap, the cotangents asked for, argument
errors, and the compiled gradient's temp memory against one state history. On CPU
`method="auto"` runs the compiled kernel (tests/test_selective_kernel.py has its own
tests); the values-and-gradients cases run with `method="xla"` too, the path other
platforms take.
"""

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import ssm

from .helpers import assert_close

f32, f64, bf16 = jnp.float32, jnp.float64, jnp.bfloat16
ARGS = ("x", "dt", "A", "B", "C", "D", "z", "h0")


def reference(**args):
    with jax.numpy_rank_promotion("allow"), jax.numpy_dtype_promotion("standard"):
        return _reference(**args)


def _reference(x, dt, A, B, C, D=None, z=None, h0=None, resets=None):
    """Gu and Dao (2023), eq. 2 with Mamba's discretisation, one step at a time:
    h[t] = exp(dt[t] A) h[t-1] + dt[t] x[t] B[t],  y[t] = h[t] C[t] + D x[t],
    out = y silu(z); a reset at t restarts the state (h[t] = dt[t] x[t] B[t])."""
    T, d_inner = x.shape
    N = A.shape[1]
    if B.ndim == 2:
        B, C = B[:, None], C[:, None]
    P = d_inner // B.shape[1]
    group = np.arange(d_inner) // P  # the group of each channel
    h = jnp.zeros((d_inner, N), f64) if h0 is None else h0
    restart = jnp.zeros((T,), bool) if resets is None else resets

    def step(h, t):
        decay = jnp.where(restart[t], 0.0, jnp.exp(dt[t][:, None] * A))
        h = decay * h + (dt[t] * x[t])[:, None] * B[t, group]
        y = jnp.sum(h * C[t, group], axis=1)
        return h, (y if D is None else y + D * x[t])

    h, y = jax.lax.scan(step, h, jnp.arange(T))
    return (y if z is None else y * jax.nn.silu(z)), h


def make_inputs(key, T, d_inner, N, groups=None, dtype=f64, extras=True):
    ks = jr.split(key, 8)
    bc = (T, N) if groups is None else (T, groups, N)
    args = dict(
        x=jr.normal(ks[0], (T, d_inner), dtype),
        dt=jax.nn.softplus(jr.normal(ks[1], (T, d_inner), dtype) - 1.0),
        A=-jnp.exp(0.5 * jr.normal(ks[2], (d_inner, N), dtype)),
        B=jr.normal(ks[3], bc, dtype),
        C=jr.normal(ks[4], bc, dtype),
    )
    if extras:
        args.update(
            D=jr.normal(ks[5], (d_inner,), dtype),
            z=jr.normal(ks[6], (T, d_inner), dtype),
            h0=jr.normal(ks[7], (d_inner, N), dtype),
        )
    return args


def loss_fn(fn, w, w_h):
    """A random projection of the outputs and of the final state."""

    def loss(args):
        out, h = fn(args)
        return jnp.sum(out.astype(w.dtype) * w) + jnp.sum(h.astype(w_h.dtype) * w_h)

    return loss


def op(resets=None, chunk_size=None, method="auto"):
    def fn(args):
        return ssm.selective_scan(
            **args, resets=resets, return_state=True, chunk_size=chunk_size, method=method
        )

    return fn


def ref(resets=None):
    return lambda args: reference(**args, resets=resets)


def random_weights(key, args):
    k1, k2 = jr.split(key)
    T, d_inner = args["x"].shape
    N = args["A"].shape[1]
    return jr.normal(k1, (T, d_inner), f64), jr.normal(k2, (d_inner, N), f64)


def value_and_grad(fn, w, w_h, args):
    return jax.jit(jax.value_and_grad(loss_fn(fn, w, w_h)))(args)


RESETS = (3, 9, 10, 21, 35)  # odd positions, chunk starts (chunk 5) and insides

CASES = {  # name: (T, d_inner, N, groups, chunk_size, extras, resets)
    "plain-chunk8": (37, 6, 4, None, 8, False, False),
    "all-args-chunk8": (37, 6, 4, None, 8, True, False),
    "resets-chunk8": (37, 6, 4, None, 8, True, RESETS),
    "reset-first-step": (37, 6, 4, None, 8, True, (0,) + RESETS),
    "grouped-chunk5": (37, 6, 3, 3, 5, True, RESETS),
    "auto-chunk": (37, 4, 4, None, None, True, RESETS),
    "chunk1": (13, 4, 2, None, 1, True, RESETS),
    "one-step": (1, 4, 2, 2, None, True, False),
}


@pytest.mark.parametrize("method", ["auto", "xla"])
@pytest.mark.parametrize("case", CASES)
def test_values_and_gradients(case, method, getkey):
    T, d_inner, N, groups, chunk, extras, with_resets = CASES[case]
    args = make_inputs(getkey(), T, d_inner, N, groups, extras=extras)
    resets = None
    if with_resets:
        at = np.array([r for r in with_resets if r < T])
        resets = jnp.zeros((T,), bool).at[at].set(True)
    w, w_h = random_weights(getkey(), args)
    (val, grads) = value_and_grad(op(resets, chunk, method), w, w_h, args)
    (val_ref, grads_ref) = value_and_grad(ref(resets), w, w_h, args)
    out, h = op(resets, chunk, method)(args)
    out_ref, h_ref = ref(resets)(args)
    assert out.dtype == f64 and h.shape == (d_inner, N)
    assert_close(out, out_ref, 1e-12, "outputs")
    assert_close(h, h_ref, 1e-12, "final state")
    assert set(grads) == set(args)
    for name in args:
        assert_close(grads[name], grads_ref[name], 1e-10, f"d{name}")
        reset_first = with_resets and 0 in with_resets
        if name == "h0" and reset_first:  # the state restarts before it is used
            np.testing.assert_array_equal(np.asarray(grads[name]), 0.0)
        else:
            assert np.max(np.abs(np.asarray(grads[name]))) > 0, f"d{name} is zero"


def test_packed_documents_equal_separate_runs(getkey):
    """A reset at a document start is the same as running the documents apart (the
    second from a zero state), values and gradients."""
    args = make_inputs(getkey(), 30, 4, 3)
    cut = 13
    resets = jnp.zeros((30,), bool).at[cut].set(True)

    def packed(args):
        return ssm.selective_scan(**args, resets=resets, chunk_size=8)

    def separate(args):
        a1 = {k: (v[:cut] if v.shape[0] == 30 else v) for k, v in args.items()}
        a2 = {k: (v[cut:] if v.shape[0] == 30 else v) for k, v in args.items()}
        a2.pop("h0")
        return jnp.concatenate(
            [ssm.selective_scan(**a1, chunk_size=8), ssm.selective_scan(**a2)]
        )

    assert_close(packed(args), separate(args), 1e-12, "packed outputs")
    w = jr.normal(getkey(), (30, 4), f64)
    g = jax.grad(lambda a: jnp.sum(packed(a) * w))(args)
    g_sep = jax.grad(lambda a: jnp.sum(separate(a) * w))(args)
    for name in args:
        assert_close(g[name], g_sep[name], 1e-12, f"d{name}")
    assert np.max(np.abs(np.asarray(g["h0"]))) > 0


def test_float32_default(getkey):
    args64 = make_inputs(getkey(), 37, 6, 4)
    args = {k: v.astype(f32) for k, v in args64.items()}
    out, h = ssm.selective_scan(**args, return_state=True, chunk_size=8)
    assert out.dtype == f32 and h.dtype == f32
    out_ref, h_ref = reference(**{k: v.astype(f64) for k, v in args.items()})
    assert_close(out, out_ref, 1e-5, "float32 outputs")
    assert_close(h, h_ref, 1e-5, "float32 state")


def test_bfloat16_inputs(getkey):
    """bf16 in, bf16 out, float32 state and accumulation: close to the float64
    reference on the same (rounded) inputs, gradients in bf16."""
    args = {k: v.astype(bf16) for k, v in make_inputs(getkey(), 37, 6, 4).items()}
    resets = jnp.zeros((37,), bool).at[np.array(RESETS)].set(True)
    out, h = ssm.selective_scan(**args, resets=resets, return_state=True, chunk_size=8)
    assert out.dtype == bf16 and h.dtype == f32
    wide = {k: v.astype(f64) for k, v in args.items()}
    out_ref, h_ref = reference(**wide, resets=resets)
    assert_close(out, out_ref, 1e-2, "bf16 outputs")
    assert_close(h, h_ref, 1e-5, "bf16 final state (float32)")
    w, w_h = random_weights(getkey(), args)
    _, grads = value_and_grad(op(resets, 8), w, w_h, args)
    _, grads_ref = value_and_grad(ref(resets), w, w_h, wide)
    for name in args:
        assert grads[name].dtype == bf16, name
        assert_close(grads[name], grads_ref[name], 2e-2, f"bf16 d{name}")


def test_jvp_and_hessian_vector_product(getkey):
    args = make_inputs(getkey(), 19, 4, 3)
    resets = jnp.zeros((19,), bool).at[np.array([4, 11])].set(True)
    tangents = {k: jr.normal(getkey(), v.shape, f64) for k, v in args.items()}
    out, t_out = jax.jvp(op(resets, 4), (args,), (tangents,))
    out_ref, t_ref = jax.jvp(ref(resets), (args,), (tangents,))
    assert_close(out, out_ref, 1e-12, "jvp primal")
    assert_close(t_out, t_ref, 1e-10, "jvp tangent")
    w, w_h = random_weights(getkey(), args)
    grad = jax.grad(loss_fn(op(resets, 4), w, w_h))
    grad_ref = jax.grad(loss_fn(ref(resets), w, w_h))
    hvp = jax.jit(lambda a, t: jax.jvp(grad, (a,), (t,))[1])(args, tangents)
    hvp_ref = jax.jit(lambda a, t: jax.jvp(grad_ref, (a,), (t,))[1])(args, tangents)
    for name in args:
        assert_close(hvp[name], hvp_ref[name], 1e-9, f"hvp d{name}")


def test_vmap(getkey):
    keys = jr.split(getkey(), 3)
    batch = jax.vmap(lambda k: make_inputs(k, 21, 4, 3, groups=1))(keys)
    resets = jr.bernoulli(getkey(), 0.2, (3, 21))
    w, w_h = jr.normal(getkey(), (3, 21, 4), f64), jr.normal(getkey(), (3, 4, 3), f64)

    def one(args, r, w, w_h):
        return jax.value_and_grad(loss_fn(op(r, 8), w, w_h))(args)

    vals, grads = jax.jit(jax.vmap(one))(batch, resets, w, w_h)
    for i in range(3):
        args_i = {k: v[i] for k, v in batch.items()}
        val_ref, g_ref = value_and_grad(ref(resets[i]), w[i], w_h[i], args_i)
        assert_close(vals[i], val_ref, 1e-12, f"value {i}")
        assert_close({k: v[i] for k, v in grads.items()}, g_ref, 1e-10, f"grads {i}")


def test_cotangents_asked_for_and_unused_outputs(getkey):
    """Gradients to a subset of arguments, and losses that use only the outputs or
    only the final state (the other's cotangent is symbolically zero)."""
    args = make_inputs(getkey(), 23, 4, 3)
    resets = jnp.zeros((23,), bool).at[7].set(True)
    w, w_h = random_weights(getkey(), args)
    for use_out, use_h in ((True, False), (False, True)):
        wo, wh = w * float(use_out), w_h * float(use_h)

        def only(fn, use_out=use_out):
            def loss(a):
                out, h = fn(a)
                return jnp.sum(out * w) if use_out else jnp.sum(h * w_h)

            return loss

        g = jax.grad(only(op(resets, 8)))(args)
        g_ref = jax.grad(loss_fn(ref(resets), wo, wh))(args)
        for name in args:
            assert_close(g[name], g_ref[name], 1e-10, f"d{name} ({use_out}, {use_h})")
    for names in (("x", "A", "h0"), ("dt", "B", "C", "D", "z")):
        fixed = {k: v for k, v in args.items() if k not in names}

        def partial(sub, fn, fixed=fixed):
            return loss_fn(fn, w, w_h)({**fixed, **sub})

        sub = {k: args[k] for k in names}
        g = jax.grad(partial)(sub, op(resets, 8))
        g_ref = jax.grad(partial)(sub, ref(resets))
        for name in names:
            assert_close(g[name], g_ref[name], 1e-10, f"only d{name}")


def test_return_state_false_and_no_extras(getkey):
    args = make_inputs(getkey(), 11, 4, 2, extras=False)
    out = ssm.selective_scan(**args, chunk_size=4)
    assert out.shape == (11, 4)
    assert_close(out, reference(**args)[0], 1e-12, "outputs")


def test_memory_is_chunk_bounded():
    """The compiled gradient's temp memory is far below one (T, d_inner, d_state)
    float32 buffer, while the plain scan's autodiff (the reference) stores more
    than one, so the measurement can tell them apart."""
    T, d_inner, N = 2048, 32, 16
    S = jax.ShapeDtypeStruct
    shapes = dict(
        x=S((T, d_inner), f32),
        dt=S((T, d_inner), f32),
        A=S((d_inner, N), f32),
        B=S((T, N), f32),
        C=S((T, N), f32),
        D=S((d_inner,), f32),
        z=S((T, d_inner), f32),
        h0=S((d_inner, N), f32),
    )
    history = T * d_inner * N * 4

    def temp(fn):
        def loss(args):
            out, h = fn(args)
            return jnp.sum(out**2) + jnp.sum(h**2)

        compiled = jax.jit(jax.grad(loss)).lower(shapes).compile()
        return compiled.memory_analysis().temp_size_in_bytes

    def naive(a):  # the recurrence as a lax.scan, differentiated by JAX
        def step(h, inputs):
            x_t, dt_t, B_t, C_t, z_t = inputs
            h = jnp.exp(dt_t[:, None] * a["A"]) * h + (dt_t * x_t)[:, None] * B_t[None]
            y = (jnp.sum(h * C_t[None], axis=1) + a["D"] * x_t) * jax.nn.silu(z_t)
            return h, y

        inputs = (a["x"], a["dt"], a["B"], a["C"], a["z"])
        h, out = jax.lax.scan(step, a["h0"], inputs)
        return out, h

    fast = temp(lambda a: ssm.selective_scan(**a, return_state=True))
    naive = temp(naive)
    assert naive > history, (naive, history)
    assert fast < history / 3, (fast, history)


BAD = {
    "batched x": (dict(x=(2, 5, 4)), ValueError, "jax.vmap"),
    "dt shape": (dict(dt=(5, 3)), ValueError, "`dt` must have shape"),
    "A shape": (dict(A=(3, 2)), ValueError, "`A` must have shape"),
    "B shape": (dict(B=(5, 3)), ValueError, "`B` must have shape"),
    "C unlike B": (dict(C=(5, 1, 2)), ValueError, "`C` must have the shape of `B`"),
    "groups divide": (dict(B=(5, 3, 2), C=(5, 3, 2)), ValueError, "divisible"),
    "D shape": (dict(D=(3,)), ValueError, "`D` must have shape"),
    "z shape": (dict(z=(4, 4)), ValueError, "`z` must have shape"),
    "h0 shape": (dict(h0=(2, 4)), ValueError, "`h0` must have shape"),
    "int x": (dict(x="int"), TypeError, "floating"),
    "complex A": (dict(A="complex"), TypeError, "real floating"),
    "resets dtype": (dict(resets="float"), TypeError, "boolean"),
    "resets shape": (dict(resets=(4,)), ValueError, "`resets` must have shape"),
    "chunk": (dict(chunk_size=0), ValueError, "chunk_size"),
    "empty": (dict(x=(0, 4), dt=(0, 4), B=(0, 2), C=(0, 2)), ValueError, "at least one"),
}


@pytest.mark.parametrize("case", BAD)
def test_argument_errors(case):
    shapes = dict(x=(5, 4), dt=(5, 4), A=(4, 2), B=(5, 2), C=(5, 2))
    kwargs = {}
    override, error, match = BAD[case]
    for k, v in override.items():
        if k == "chunk_size":
            kwargs[k] = v
        elif k == "resets":
            kwargs[k] = jnp.zeros(v, bool) if isinstance(v, tuple) else jnp.zeros((5,), f32)
        elif v == "int":
            shapes[k] = None
            kwargs[k] = jnp.zeros((5, 4), jnp.int32)
        elif v == "complex":
            shapes[k] = None
            kwargs[k] = jnp.zeros((4, 2), jnp.complex64)
        else:
            shapes[k] = v
    kwargs.update({k: jnp.ones(v, f32) for k, v in shapes.items() if v is not None})
    with pytest.raises(error, match=match):
        ssm.selective_scan(**kwargs)
