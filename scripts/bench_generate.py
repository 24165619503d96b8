"""Benchmark generation: tokens/s and memory per generated token, by mixer and context.

For each mixer (`--mixers`, names in `layers.MIXERS`; every registered one by default)
and each context length (`--contexts`, 256, 4096 and 32768 by default), a
`layers.SequenceModel` of that mixer (`--d-model`, `--n-layers`, `--vocab`, its
default initialisation) prefills a random prompt of the context's length in chunks of
`--prefill-chunk` tokens (so global attention's prefill stays bounded in memory), then
generates `--new-tokens` tokens in the compiled loop of `train.generate` (one
`lax.scan` over `step`, sampling inside; temperature 1, no filters). Everything is
measured in one run:

- prefill tokens/s and decode tokens/s: the median of `--runs` timed calls of the
  compiled programs (compiled ahead of time, so compilation is not timed);
- state: the bytes of the recurrent state after the context (KV caches included),
  which a sequence holds while it generates and each new token reads;
- with `--python-loop`, the same generation with one dispatch per token from
  Python (a jitted `step` and a jitted draw), the loop the compiled one replaces;
- decode temp: the compiled decode loop's temporary memory
  (`compile().memory_analysis().temp_size_in_bytes`), per generated token it is this
  divided by `--new-tokens`.

Global attention's state and cost per token grow with the context; local attention's
ring buffer and the recurrent mixers' states do not.

    python scripts/bench_generate.py                       # the full table
    python scripts/bench_generate.py --quick               # small, a smoke test
    python scripts/bench_generate.py --mixers attention,mamba2 --contexts 256,4096

Prints a markdown table (and writes JSON rows with `--json PATH`). Like the other
benchmarks, it configures the allocator as `ssm-train` does (see
`scripts/_allocator.py`; `--system-malloc` leaves the system allocator as it is).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import statistics
import sys
import time

import _allocator  # this script's folder is on sys.path

_allocator.retain_freed_memory()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import numpy as np  # noqa: E402

import layers  # noqa: E402
from train import generate as gen  # noqa: E402

QUICK_MIXERS = "attention,local_attention,rglru,mamba2"


def build(mixer: str, args) -> layers.SequenceModel:
    """The model with its own initialisation, compiled (one program per mixer)."""
    return eqx.filter_jit(
        lambda key: layers.SequenceModel(
            mixer, args.d_model, args.n_layers, args.vocab, vocab_size=args.vocab, key=key
        )
    )(jr.key(0))


def median_time(fn, runs: int) -> float:
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(fn())
        times.append(time.perf_counter() - t0)
    return statistics.median(times)


def measure(model, context: int, args) -> dict:
    n = args.new_tokens
    model = gen.with_cache_length(model, context + n)
    rng = np.random.default_rng(context)
    prompt = jnp.asarray(rng.integers(0, args.vocab, context), jnp.int32)
    chunk = min(context, args.prefill_chunk)
    if context % chunk:
        raise SystemExit(f"--contexts: {context} is not a multiple of --prefill-chunk")
    chunks = list(prompt.reshape(context // chunk, chunk))
    state0 = model.init_state()
    prefill = gen._prefill_jit.lower(model, chunks[0], state0).compile()

    def run_prefill():
        state, logits = state0, None
        for c in chunks:
            logits, state = prefill(model, c, state)
        return logits, state

    logits, state = jax.block_until_ready(run_prefill())
    prefill_s = median_time(run_prefill, args.runs)

    sampling = (
        jnp.asarray(1.0, jnp.float32),
        jnp.asarray(0, jnp.int32),
        jnp.asarray(1.0, jnp.float32),
    )
    key = jr.key(1)
    decode = gen._decode_jit.lower(model, logits, state, key, *sampling, n).compile()
    temp = gen._temp_bytes(decode)

    def run_decode():
        return decode(model, logits, state, key, *sampling, n)

    jax.block_until_ready(run_decode())  # warm-up
    decode_s = median_time(run_decode, args.runs)
    extra = {}
    if args.python_loop:
        extra["python_loop_ms_per_token"] = (
            1e3 * python_loop_s(model, logits, state, key, sampling, n, args.runs) / n
        )
    return {
        "context": context,
        "new_tokens": n,
        "prefill_tokens_per_s": context / prefill_s,
        "decode_tokens_per_s": n / decode_s,
        "decode_ms_per_token": 1e3 * decode_s / n,
        "state_bytes": gen.cache_bytes(state),
        "decode_temp_bytes": temp,
        **extra,
    }


_step = eqx.filter_jit(lambda model, token, state: model.step(token, state))
_draw = jax.jit(gen.sample_logits)


def python_loop_s(model, logits, state, key, sampling, n: int, runs: int) -> float:
    """The median time of the same generation with one dispatch per token (a jitted
    `step` and a jitted draw called from Python, as `ssm-generate` did before)."""

    def run():
        last, s, out = logits, state, []
        for i in range(n):
            token = _draw(jr.fold_in(key, i), last, *sampling)
            out.append(token)
            last, s = _step(model, token, s)
        return out

    jax.block_until_ready(run())  # compile and warm up
    return median_time(run, runs)


def kib(b: int) -> str:
    return "n/a" if b < 0 else f"{b / 2**10:,.1f}"


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--mixers", default=",".join(layers.MIXERS), help="comma-separated")
    p.add_argument("--contexts", default="256,4096,32768", help="comma-separated")
    p.add_argument("--new-tokens", type=int, default=128)
    p.add_argument("--d-model", type=int, default=128)
    p.add_argument("--n-layers", type=int, default=4)
    p.add_argument("--vocab", type=int, default=4096)
    p.add_argument("--prefill-chunk", type=int, default=1024)
    p.add_argument("--runs", type=int, default=5, help="timed runs (median)")
    p.add_argument(
        "--quick",
        action="store_true",
        help=f"contexts 256,4096; mixers {QUICK_MIXERS}; d_model 64, 2 layers, "
        "vocab 256, 32 new tokens, 3 runs (flags given explicitly still apply)",
    )
    p.add_argument(
        "--python-loop",
        action="store_true",
        help="also time one dispatch per token from Python (the loop this replaces)",
    )
    p.add_argument("--json", help="also write the rows as JSON to this file")
    p.add_argument("--system-malloc", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.quick:
        given = {a.split("=")[0] for a in sys.argv[1:]}
        quick = {
            "--mixers": ("mixers", QUICK_MIXERS),
            "--contexts": ("contexts", "256,4096"),
            "--d-model": ("d_model", 64),
            "--n-layers": ("n_layers", 2),
            "--vocab": ("vocab", 256),
            "--new-tokens": ("new_tokens", 32),
            "--runs": ("runs", 3),
        }
        for flag, (name, value) in quick.items():
            if flag not in given:
                setattr(args, name, value)
    mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in layers.MIXERS]
    if unknown:
        p.error(f"--mixers: unknown {unknown}; registered: {sorted(layers.MIXERS)}")
    contexts = [int(c) for c in args.contexts.split(",") if c]

    device = jax.devices()[0]
    print(
        f"# generation: d_model {args.d_model}, {args.n_layers} layers, vocab "
        f"{args.vocab}, {args.new_tokens} new tokens, median of {args.runs} runs; "
        f"{device.platform} ({device.device_kind}), {os.cpu_count()} CPUs, "
        f"{platform.machine()}, jax {jax.__version__}; {_allocator.describe()}\n"
    )
    loop_col = " Python loop ms/token |" if args.python_loop else ""
    print(
        "| mixer | context | prefill tok/s | decode tok/s | ms/token | state KiB "
        "| decode temp KiB |" + loop_col
    )
    print("|---|---:|---:|---:|---:|---:|---:|" + ("---:|" if args.python_loop else ""))
    rows = []
    for mixer in mixers:
        model = build(mixer, args)
        for context in contexts:
            row = {"mixer": mixer, **measure(model, context, args)}
            rows.append(row)
            print(
                f"| {mixer} | {context} | {row['prefill_tokens_per_s']:,.0f} "
                f"| {row['decode_tokens_per_s']:,.0f} | {row['decode_ms_per_token']:.2f} "
                f"| {kib(row['state_bytes'])} | {kib(row['decode_temp_bytes'])} |"
                + (f" {row['python_loop_ms_per_token']:.2f} |" if args.python_loop else ""),
                flush=True,
            )
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"args": vars(args), "rows": rows}, f, indent=1)


if __name__ == "__main__":
    main()
