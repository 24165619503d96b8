"""Benchmark of ``ssm.linear_scan`` / ``ssm.matrix_scan`` against JAX's own scans.

Prints markdown tables of forward and forward+backward time (median over interleaved
rounds after warm-up: every contender runs once per round, so load from other
processes hits all of them alike) and the compiled temp memory of forward+backward
(``memory_analysis()``) relative to the bytes of the inputs ``a`` and ``b``.

The loss is ``0.5 * sum(h ** 2)``; the gradient is taken w.r.t. ``a`` and ``b``.
The row "memory floor (no scan)" moves the bytes every scan must move, in elementwise
passes with no loop: the time this machine's memory bandwidth allows.

    python scripts/bench_scan.py            # T in {1024, 16384, 65536}, D = 256
    python scripts/bench_scan.py --quick    # small sizes, a smoke test

By default the allocator is configured as `ssm-train` configures it (glibc keeps
freed memory in the process, `train/allocator.py`): the environment the product's
entry points run in. Without it, every fresh 64 MiB buffer is returned to the kernel
after each call and page-faulted back in on the next (about 20 ms per buffer on our
2-core VM, for every contender alike). ``--system-malloc`` leaves the allocator alone
(what a library user gets without `train.configure_allocator()`); the header says
which.
"""

from __future__ import annotations

import argparse
import contextlib
import sys
import time

import _allocator  # this script's folder is on sys.path

_allocator.retain_freed_memory()

import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import numpy as np  # noqa: E402
from jax import lax  # noqa: E402

import ssm  # noqa: E402
from ssm import _kernels  # noqa: E402


def lax_scan_diag(a, b):
    def step(h, ab):
        h = ab[0] * h + ab[1]
        return h, h

    return lax.scan(step, jnp.zeros(b.shape[1:], b.dtype), (a, b))[1]


def lax_associative_diag(a, b):
    def combine(x, y):
        return y[0] * x[0], y[0] * x[1] + y[1]

    return lax.associative_scan(combine, (a, b))[1]


def lax_scan_matrix(A, b):
    def step(h, Ab):
        h = Ab[0] @ h + Ab[1]
        return h, h

    return lax.scan(step, jnp.zeros(b.shape[1:], b.dtype), (A, b))[1]


@jax.custom_vjp
def memory_floor(a, b):
    """Not a scan: elementwise passes that move the bytes any scan's forward and
    backward must move at least (forward reads ``a, b`` and writes ``h``; backward
    reads the cotangent, ``a`` and ``h`` and writes ``da, db``), with no loop. Its
    time is what this machine's memory bandwidth allows; no scan can beat it."""
    return a * b


def _memory_floor_fwd(a, b):
    h = a * b
    return h, (a, h)


def _memory_floor_bwd(res, ct):
    a, h = res
    g = ct * a
    return g * h, g


memory_floor.defvjp(_memory_floor_fwd, _memory_floor_bwd)


def _loss(f):
    return lambda a, b: 0.5 * jnp.sum(f(a, b) ** 2)


def measure(contenders: dict, args, rounds: int) -> dict:
    """Median forward and forward+backward time (s) and temp bytes per contender."""
    compiled = {}
    for name, f in contenders.items():
        # Compiled ahead of time; contenders marked `xla_loops` with ssm's compiled
        # CPU kernel turned off (what `method="sequential"` runs without it).
        off = getattr(f, "xla_loops", False)
        with _kernels.disabled() if off else contextlib.nullcontext():
            fwd = jax.jit(f).lower(*args).compile()
            bwd = jax.jit(jax.grad(_loss(f), argnums=(0, 1))).lower(*args).compile()
        mem = bwd.memory_analysis().temp_size_in_bytes
        mem_f = fwd.memory_analysis().temp_size_in_bytes
        jax.block_until_ready(fwd(*args))
        jax.block_until_ready(bwd(*args))
        compiled[name] = (fwd, bwd, mem_f, mem)
    times = {name: ([], []) for name in contenders}
    for _ in range(rounds):
        for name, (fwd, bwd, _, _) in compiled.items():
            for i, fn in enumerate((fwd, bwd)):
                t0 = time.perf_counter()
                jax.block_until_ready(fn(*args))
                times[name][i].append(time.perf_counter() - t0)
    return {
        name: (
            float(np.median(times[name][0])),
            float(np.median(times[name][1])),
            compiled[name][2],
            compiled[name][3],
        )
        for name in contenders
    }


def table(title, results, in_bytes, baselines):
    print(f"\n### {title}\n")
    head = "| contender | fwd ms | fwd+bwd ms | temp (fwd+bwd) / input |"
    sep = "|---|---:|---:|---:|"
    for base in baselines:
        head += f" fwd vs {base} | fwd+bwd vs {base} |"
        sep += "---:|---:|"
    print(head)
    print(sep)
    for name, (tf, tb, _, mem) in results.items():
        row = f"| {name} | {tf * 1e3:.2f} | {tb * 1e3:.2f} | {mem / in_bytes:.2f}x |"
        for base in baselines:
            bf, bb, _, _ = results[base]
            # speed-up: > 1 means faster than the baseline
            row += f" {bf / tf:.2f}x | {bb / tb:.2f}x |"
        print(row)
    sys.stdout.flush()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--rounds", type=int, default=7, help="timed rounds (median)")
    parser.add_argument("--system-malloc", action="store_true")
    parser.add_argument("--lengths", type=int, nargs="*")
    args = parser.parse_args()

    D, N = (32, 8) if args.quick else (256, 16)
    lengths = args.lengths or ([257, 1024] if args.quick else [1024, 16384, 65536])
    backend = jax.default_backend()
    devices = jax.devices()
    print(
        f"backend={backend} device={devices[0].device_kind} jax={jax.__version__} "
        f"{_allocator.describe()}"
    )
    print("speed-ups are baseline time / contender time (> 1: faster than the baseline)")

    for T in lengths:
        k1, k2 = jax.random.split(jax.random.key(T))
        a = jax.random.uniform(k1, (T, D), jnp.float32, 0.5, 0.9999)
        b = jax.random.normal(k2, (T, D), jnp.float32)
        contenders = {
            "lax.scan": lax_scan_diag,
            "lax.associative_scan": lax_associative_diag,
        }
        contenders["memory floor (no scan)"] = memory_floor
        for method in ("sequential", "associative", "chunked", "auto"):
            contenders[f"linear_scan[{method}]"] = lambda a, b, m=method: ssm.linear_scan(
                a, b, method=m
            )
        if backend == "cpu":

            def xla_loop(a, b):
                return ssm.linear_scan(a, b, method="sequential")

            xla_loop.xla_loops = True
            contenders["linear_scan[sequential], XLA loop"] = xla_loop
        chosen = ssm._loops.auto_method(T, matrix=False)
        results = measure(contenders, (a, b), args.rounds)
        table(
            f"linear_scan, T={T}, D={D}, float32 (auto = {chosen})",
            results,
            a.nbytes + b.nbytes,
            ["lax.scan", "lax.associative_scan"],
        )

    for T in lengths:
        k1, k2 = jax.random.split(jax.random.key(T + 1))
        A = jax.random.normal(k1, (T, N, N), jnp.float32) / (1.5 * np.sqrt(N))
        x = jax.random.normal(k2, (T, N), jnp.float32)
        contenders = {"lax.scan": lax_scan_matrix}
        for method in ("sequential", "associative", "chunked", "auto"):
            contenders[f"matrix_scan[{method}]"] = lambda A, x, m=method: ssm.matrix_scan(
                A, x, method=m
            )
        chosen = ssm._loops.auto_method(T, matrix=True)
        results = measure(contenders, (A, x), args.rounds)
        table(
            f"matrix_scan, T={T}, N={N}, vector state, float32 (auto = {chosen})",
            results,
            A.nbytes + x.nbytes,
            ["lax.scan"],
        )


if __name__ == "__main__":
    main()
