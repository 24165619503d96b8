"""Memory and time of ``ssm.scan``'s reverse modes, and DEER against sequential evaluation.

Prints markdown tables. For each reverse mode: the compiled gradient program's temp
memory (``memory_analysis().temp_size_in_bytes``) and the median wall time of at least
five calls after a warm-up, against ``lax.scan`` and ``equinox.internal.scan``.

    python scripts/bench_nonlinear.py [--length 16384] [--hidden 32] [--repeats 5]
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox.internal as eqxi
import jax
import jax.numpy as jnp
import jax.random as jr
from jax import lax

import ssm


def gru_cell(params, h, x):
    """A GRU step (Cho et al. 2014): the benchmark's nonlinear recurrence."""
    Wx, Wh, b = params
    gx = Wx @ x + b
    gh = Wh @ h
    N = h.shape[0]
    r = jax.nn.sigmoid(gx[:N] + gh[:N])
    z = jax.nn.sigmoid(gx[N : 2 * N] + gh[N : 2 * N])
    n = jnp.tanh(gx[2 * N :] + r * gh[2 * N :])
    return (1 - z) * n + z * h


def make_problem(T, N, D, key):
    k1, k2, k3, k4 = jr.split(key, 4)
    params = (
        jr.normal(k1, (3 * N, D)) / jnp.sqrt(D),
        jr.normal(k2, (3 * N, N)) / jnp.sqrt(N),
        jnp.zeros((3 * N,)),
    )
    xs = jr.normal(k3, (T, D))
    h0 = jr.normal(k4, (N,)) * 0.1
    return params, h0, xs


def scan_loss(scan_fn):
    def loss(params, h0, xs):
        def step(h, x):
            h = gru_cell(params, h, x)
            return h, jnp.sum(h * h)

        h, ys = scan_fn(step, h0, xs)
        return jnp.sum(ys) + jnp.sum(h)

    return jax.jit(jax.grad(loss, argnums=(0, 1, 2)))


def measure(fn, args, repeats):
    compiled = fn.lower(*args).compile()
    mem = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(*args))
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(*args))
        times.append(time.perf_counter() - t0)
    return mem, statistics.median(times)


def bench_scan(T, N, D, repeats, budgets):
    args = make_problem(T, N, D, jr.key(0))
    cases = [("lax.scan", lambda f, h, x: lax.scan(f, h, x))]
    cases.append(('ssm.scan checkpoints="all"', lambda f, h, x: ssm.scan(f, h, x)))
    cases.append(
        (
            'ssm.scan checkpoints="auto"',
            lambda f, h, x: ssm.scan(f, h, x, checkpoints="auto"),
        )
    )
    for c in budgets:
        cases.append(
            (
                f"ssm.scan checkpoints={c}",
                lambda f, h, x, c=c: ssm.scan(f, h, x, checkpoints=c),
            )
        )
    cases.append(
        (
            'ssm.scan backward="parallel"',
            lambda f, h, x: ssm.scan(f, h, x, backward="parallel"),
        )
    )
    for c in budgets:
        cases.append(
            (
                f"equinox.internal.scan checkpoints={c}",
                lambda f, h, x, c=c: eqxi.scan(f, h, x, kind="checkpointed", checkpoints=c),
            )
        )
    cases.append(
        (
            "equinox.internal.scan checkpoints=None (sqrt T)",
            lambda f, h, x: eqxi.scan(f, h, x, kind="checkpointed"),
        )
    )
    rows = []
    base_mem = base_time = None
    for name, scan_fn in cases:
        mem, t = measure(scan_loss(scan_fn), args, repeats)
        if base_mem is None:
            base_mem, base_time = mem, t
        rows.append((name, mem, mem / base_mem, t, t / base_time))
    print(
        f"\n### `ssm.scan` gradient, GRU cell, T={T}, N={N}, D={D}, "
        f"{jax.devices()[0].platform}\n"
    )
    print("| scan | temp memory (MiB) | vs lax.scan | time (ms) | vs lax.scan |")
    print("|---|---:|---:|---:|---:|")
    for name, mem, rm, t, rt in rows:
        print(f"| {name} | {mem / 2**20:.2f} | {rm:.3f} | {t * 1e3:.1f} | {rt:.2f} |")


def bench_deer(T, N, D, repeats):
    params, h0, xs = make_problem(T, N, D, jr.key(1))

    def f(h, x):
        return gru_cell(params, h, x)

    seq = jax.jit(lambda h0, xs: lax.scan(lambda h, x: (f(h, x),) * 2, h0, xs)[1])
    ref = seq(h0, xs)
    rows = [("sequential lax.scan", *measure(seq, (h0, xs), repeats), "-", 0.0)]
    for jac in ("dense", "diagonal"):
        fn = jax.jit(
            lambda h0, xs, jac=jac: ssm.parallel_scan_nonlinear(f, h0, xs, jacobian=jac)
        )
        hs, k = fn(h0, xs)
        err = float(jnp.max(jnp.abs(hs - ref)))
        rows.append(
            (f"parallel_scan_nonlinear {jac}", *measure(fn, (h0, xs), repeats), int(k), err)
        )
    print(f"\n### DEER vs sequential evaluation (forward), GRU cell, T={T}, N={N}, D={D}\n")
    print("| method | temp memory (MiB) | time (ms) | iterations | max abs error |")
    print("|---|---:|---:|---:|---:|")
    for name, mem, t, k, err in rows:
        print(f"| {name} | {mem / 2**20:.2f} | {t * 1e3:.1f} | {k} | {err:.1e} |")


def main():
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--length", type=int, default=16384)
    parser.add_argument("--hidden", type=int, default=32)
    parser.add_argument("--inputs", type=int, default=8)
    parser.add_argument("--repeats", type=int, default=5)
    parser.add_argument("--budgets", type=int, nargs="*", default=[16, 182])
    parser.add_argument("--deer-length", type=int, default=4096)
    parser.add_argument("--deer-hidden", type=int, default=8)
    args = parser.parse_args()
    bench_scan(args.length, args.hidden, args.inputs, args.repeats, args.budgets)
    bench_deer(args.deer_length, args.deer_hidden, args.inputs, args.repeats)


if __name__ == "__main__":
    main()
