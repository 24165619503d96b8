"""S4D's two parallel forms: the convolution (Vandermonde kernel + FFT) against the
chunked recurrence, for one training step (forward + backward) over a batch.

Prints a markdown table: median time of interleaved runs and compiled temp memory
(``memory_analysis()``) per length, and the ratio recurrent / convolution. The
crossover it shows is ``layers.S4D.CONV_MIN_LENGTH``.

    python scripts/bench_s4d.py [--lengths 16 32 64 128 1024] [--batch 8] [--d-model 128]
"""

from __future__ import annotations

import argparse
import statistics
import time

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr

import layers


def step_fn(model):
    """A jitted gradient of a batch loss in the layer's array leaves."""
    params, static = eqx.partition(model, eqx.is_array)

    @jax.jit
    def step(params, x):
        def loss(p):
            return jnp.mean(jax.vmap(eqx.combine(p, static))(x) ** 2)

        return jax.grad(loss)(params)

    return step, params


def measure(lengths, batch, d_model, state_size, rounds):
    key = jr.key(0)
    rows = []
    for T in lengths:
        x = jr.normal(jr.fold_in(key, T), (batch, T, d_model), jnp.float32)
        runs = {}
        for mode in ("recurrent", "convolution"):
            step, params = step_fn(
                layers.S4D(d_model, state_size=state_size, mode=mode, key=key)
            )
            compiled = step.lower(params, x).compile()
            temp = compiled.memory_analysis().temp_size_in_bytes
            jax.block_until_ready(compiled(params, x))  # warm-up
            runs[mode] = (compiled, params, [], temp)
        for _ in range(rounds):  # interleaved, so load changes hit both alike
            for compiled, params, times, _ in runs.values():
                t0 = time.perf_counter()
                jax.block_until_ready(compiled(params, x))
                times.append(time.perf_counter() - t0)
        med = {k: statistics.median(v[2]) * 1e3 for k, v in runs.items()}
        mem = {k: v[3] / 2**20 for k, v in runs.items()}
        rows.append((T, med, mem))
    return rows


def main():
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--lengths", type=int, nargs="+", default=[16, 32, 64, 128, 256, 1024])
    p.add_argument("--batch", type=int, default=8)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--state-size", type=int, default=64)
    p.add_argument("--rounds", type=int, default=7)
    a = p.parse_args()
    rows = measure(a.lengths, a.batch, a.d_model, a.state_size, a.rounds)
    print(
        f"\n### S4D training step, batch {a.batch}, d_model {a.d_model}, "
        f"state {a.state_size}, {jax.default_backend()}\n"
    )
    print(
        "| T | recurrent (ms) | convolution (ms) | recurrent / convolution "
        "| temp MiB recurrent | temp MiB convolution |"
    )
    print("|---:|---:|---:|---:|---:|---:|")
    for T, med, mem in rows:
        r, c = med["recurrent"], med["convolution"]
        print(
            f"| {T} | {r:.1f} | {c:.1f} | {r / c:.2f} "
            f"| {mem['recurrent']:.1f} | {mem['convolution']:.1f} |"
        )


if __name__ == "__main__":
    main()
