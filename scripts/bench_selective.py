"""Benchmark the Mamba layer's training step: `ssm.selective_scan` against the old paths.

One training step of `layers.Mamba` (forward and backward, loss `sum(y**2)`, gradient
to every parameter, a batch through `jax.vmap`) with the recurrence computed five ways,
everything else (projections, convolution, gate) the same:

- `selective`: `ssm.selective_scan` (discretised on the fly, chunk-start states only),
  `method="auto"`: on CPU the compiled kernel (`ssm/_kernels/selective.cc`).
- `selective_xla`: the same with `method="xla"` (XLA's chunked loops).
- `chunked`: the layer before `selective_scan`: each chunk of 64 steps discretised to
  `(64, d_inner, d_state)` tensors, `ssm.linear_scan` over it, the chunk body
  rematerialised (`jax.checkpoint`), only chunk-boundary states kept.
- `full`: the whole `(T, d_inner, d_state)` tensors `exp(dt A)` and `dt x B`
  discretised at once and `ssm.linear_scan` over them.
- `port`: the textbook JAX port: the same whole tensors, `lax.associative_scan`.

Times are the median of `--runs` interleaved rounds (each round calls every contender
once, in turn, after two untimed rounds), so that a noisy shared machine charges them
alike. Temp memory is the compiled step's `memory_analysis().temp_size_in_bytes`.

    python scripts/bench_selective.py                  # T in {72, 1024}, batch 32
    python scripts/bench_selective.py --lengths 72 --runs 5
    python scripts/bench_selective.py --system-malloc  # the allocator left alone

By default the allocator is configured as `ssm-train` configures it (glibc keeps
freed memory, `train/allocator.py`); `--system-malloc` leaves it alone
(`scripts/_allocator.py`), and the header says which.
"""

from __future__ import annotations

import argparse
import statistics
import time

import _allocator  # this script's folder is on sys.path

_allocator.retain_freed_memory()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
from jax import lax  # noqa: E402

import layers  # noqa: E402
import ssm  # noqa: E402
from layers._mixer import chunked, linear  # noqa: E402


def _discretise(delta, A, B, x):
    dA = jnp.exp(delta[:, :, None] * A[None])
    dBx = (delta * x)[:, :, None] * B[:, None, :]
    return dA, dBx


def _assoc(a, b):
    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return lax.associative_scan(combine, (a, b))[1]


def recurrence(kind, chunk_size=64):
    """`(delta, A, B, C, x) -> h C` over the whole sequence, zero initial state."""

    def full(delta, A, B, C, x):
        h = ssm.linear_scan(*_discretise(delta, A, B, x))
        return jnp.einsum("tdn,tn->td", h, C)

    def port(delta, A, B, C, x):
        h = _assoc(*_discretise(delta, A, B, x))
        return jnp.einsum("tdn,tn->td", h, C)

    def chunk_body(A):
        def fn(h0, inputs):
            delta_c, B_c, C_c, x_c = inputs
            h = ssm.linear_scan(*_discretise(delta_c, A, B_c, x_c), h0)
            return jnp.einsum("tdn,tn->td", h, C_c), h

        return fn

    def chunk(delta, A, B, C, x):
        h0 = jnp.zeros(A.shape, A.dtype)
        return chunked(chunk_body(A), h0, (delta, B, C, x), chunk_size)[0]

    def selective(delta, A, B, C, x):
        return ssm.selective_scan(x, delta, A, B, C)

    def selective_xla(delta, A, B, C, x):
        return ssm.selective_scan(x, delta, A, B, C, method="xla")

    kinds = {"full": full, "port": port, "chunked": chunk, "selective": selective}
    return {**kinds, "selective_xla": selective_xla}[kind]


def mamba_apply(m, kind):
    """The layer's forward pass with the recurrence computed by `kind`."""
    scan = recurrence(kind, m.chunk_size)

    def apply(u):
        x, z, delta, B, C, _ = m._selective_inputs(u, m.init_state().conv)
        A = -jnp.exp(m.A_log)
        y = scan(delta, A, B, C, x) + m.D[None] * x
        return linear(m.out_proj, y * jax.nn.silu(z))

    return apply


def train_step(m, kind):
    params, static = eqx.partition(m, eqx.is_array)

    def loss(p, x):
        return jnp.sum(jax.vmap(mamba_apply(eqx.combine(p, static), kind))(x) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


KINDS = ("selective", "selective_xla", "chunked", "full", "port")


def bench(T, d_model, batch, runs, kinds):
    m = layers.Mamba(d_model, key=jr.key(0))
    x = jr.normal(jr.key(1), (batch, T, d_model), jnp.float32)
    compiled, temps = {}, {}
    for kind in kinds:
        fn, params = train_step(m, kind)
        c = fn.lower(params, x).compile()
        compiled[kind] = (c, params)
        temps[kind] = c.memory_analysis().temp_size_in_bytes
    ref = compiled[kinds[0]][0](compiled[kinds[0]][1], x)
    for kind in kinds[1:]:  # every contender computes the same step
        out = compiled[kind][0](compiled[kind][1], x)
        err = max(
            float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(b)) + 1e-30))
            for a, b in zip(jax.tree.leaves(out), jax.tree.leaves(ref), strict=True)
        )
        assert err < 1e-3, (kind, err)
    times = {k: [] for k in kinds}
    for r in range(runs + 2):
        for kind in kinds:
            c, params = compiled[kind]
            t0 = time.perf_counter()
            jax.block_until_ready(c(params, x))
            if r >= 2:
                times[kind].append(time.perf_counter() - t0)
    return {k: statistics.median(v) for k, v in times.items()}, temps, m


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--lengths", default="72,1024")
    parser.add_argument("--d-model", type=int, default=64)
    parser.add_argument("--batch", type=int, default=32)
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--kinds", default=",".join(KINDS))
    parser.add_argument(
        "--system-malloc", action="store_true", help="leave the allocator alone"
    )
    args = parser.parse_args()
    kinds = tuple(args.kinds.split(","))
    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"d_model={args.d_model}, batch={args.batch}, float32, median of {args.runs} "
        f"interleaved runs, {_allocator.describe()}\n"
    )
    print("| T | path | fwd+bwd (ms) | vs selective | temp (MiB) | temp / T x state |")
    print("|---|---|---|---|---|---|")
    for T in map(int, args.lengths.split(",")):
        times, temps, m = bench(T, args.d_model, args.batch, args.runs, kinds)
        history = args.batch * T * m.d_inner * m.d_state * 4
        for kind in kinds:
            ratio = times[kind] / times[kinds[0]]
            print(
                f"| {T} | {kind} | {1e3 * times[kind]:.1f} | {ratio:.2f}x | "
                f"{temps[kind] / 2**20:.1f} | {temps[kind] / history:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
