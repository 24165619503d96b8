"""Benchmark the layers and the chunked operators: forward+backward time and compiled
temp memory.

Each layer (`--mixers`, names in `layers.MIXERS`; the diagonal SSMs s4d, s5, lru,
mamba, rglru by default) is timed on a batch of
sequences through `jax.vmap`, loss `sum(y**2)`, gradient to every parameter, against a
naive reference of the same layer: its own `step` in a `lax.scan` over time,
differentiated by JAX's autodiff (which stores every per-step carry and residual).

    python scripts/bench_layers.py            # T in {1024, 4096}, d_model 128, batch 8
    python scripts/bench_layers.py --quick    # small sizes, a smoke test
    python scripts/bench_layers.py --mixers deltanet,gated_deltanet   # + memory table
    python scripts/bench_layers.py --mixers linear_attention,retnet,gla,mlstm,mamba2
    python scripts/bench_layers.py --operators   # chunked operators vs recurrence
    python scripts/bench_layers.py --operators gla-scalar,deltanet-c32   # some of them

`--operators` times the chunked operators of `ssm` (the registry `OPERATORS`:
`gated_linear_attention` with scalar and per-key decays, `mlstm`, and `delta_rule`
with and without a gate at chunk sizes 64 and 32) against their naive recurrence, on
bare inputs, in interleaved rounds (every case in turn, called twice and the second call
timed; two untimed rounds first; median over the timed rounds).

Prints markdown tables: time (median of `--runs` runs after a warm-up) and temp
memory (`compile().memory_analysis().temp_size_in_bytes`), and the Mamba memory
check against `T x d_inner x d_state` state bytes.

Like `bench_scan.py`, the script configures the allocator as `ssm-train` does (glibc
keeps freed memory, see `scripts/_allocator.py`); `--system-malloc` leaves it as it
is, where every temp buffer above 32 MiB is page-faulted in on each call.
"""

from __future__ import annotations

import argparse
import functools
import os
import statistics
import time

import _allocator  # this script's folder is on sys.path

_allocator.retain_freed_memory()

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402

import layers  # noqa: E402
import ssm  # noqa: E402


def naive(mixer):
    """The same layer as a `lax.scan` of its `step` over time (autodiff backward)."""

    def apply(x):
        def body(state, x_t):
            y_t, state = mixer.step(x_t, state)
            return state, y_t

        return jax.lax.scan(body, mixer.init_state(), x)[1]

    return apply


def fwd_bwd(mixer, use_naive):
    params, static = eqx.partition(mixer, eqx.is_array)

    def loss(p, x):
        m = eqx.combine(p, static)
        f = naive(m) if use_naive else m
        return jnp.sum(jax.vmap(f)(x) ** 2)

    return jax.jit(jax.value_and_grad(loss)), params


def measure(fn, params, x, runs):
    compiled = fn.lower(params, x).compile()
    temp = compiled.memory_analysis().temp_size_in_bytes
    jax.block_until_ready(compiled(params, x))  # warm-up
    times = []
    for _ in range(runs):
        t0 = time.perf_counter()
        jax.block_until_ready(compiled(params, x))
        times.append(time.perf_counter() - t0)
    return statistics.median(times), temp


def mib(n):
    return f"{n / 2**20:.1f}"


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="small sizes")
    parser.add_argument("--runs", type=int, default=None)
    parser.add_argument("--mixers", default="s4d,s5,lru,mamba,rglru")
    parser.add_argument(
        "--memory-only", action="store_true", help="only the Mamba memory tables"
    )
    parser.add_argument(
        "--operators",
        default=None,
        nargs="?",
        const=",".join(OPERATORS),
        help="only the chunked operators in OPERATORS (comma-separated names; all if "
        "none given) against their recurrence",
    )
    parser.add_argument(
        "--system-malloc",
        action="store_true",
        help="keep the system allocator (see scripts/_allocator.py)",
    )
    args = parser.parse_args()
    if args.operators:
        quick = ((128, 256), args.runs or 3)
        sizes = quick if args.quick else ((1024, 4096, 8192), args.runs or 5)
        operators(args.operators.split(","), *sizes)
        return
    if args.quick:
        lengths, d_model, batch, runs = (128, 256), 32, 2, args.runs or 3
    else:
        lengths, d_model, batch, runs = (1024, 4096), 128, 8, args.runs or 5
    mixers = args.mixers.split(",")
    if args.memory_only:
        mamba_memory(lengths[-1], d_model)
        return
    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), "
        f"d_model={d_model}, batch={batch}, median of {runs} runs, float32\n"
    )
    print(
        "| layer | T | layer fwd+bwd (ms) | naive scan fwd+bwd (ms) | speed-up "
        "| layer temp (MiB) | naive temp (MiB) |"
    )
    print("|---|---|---|---|---|---|---|")
    for name in mixers:
        mixer = layers.MIXERS[name](d_model, key=jr.key(0))
        for T in lengths:
            x = jr.normal(jr.key(1), (batch, T, d_model), jnp.float32)
            t_fast, m_fast = measure(*fwd_bwd(mixer, False), x, runs)
            t_naive, m_naive = measure(*fwd_bwd(mixer, True), x, runs)
            print(
                f"| {name} | {T} | {1e3 * t_fast:.1f} | {1e3 * t_naive:.1f} | "
                f"{t_naive / t_fast:.1f}x | {mib(m_fast)} | {mib(m_naive)} |",
                flush=True,
            )
    if "mamba" in mixers:
        mamba_memory(lengths[-1], d_model)
    delta = [name for name in mixers if name in ("deltanet", "gated_deltanet")]
    if delta:
        delta_layer_memory(delta, lengths[-1], d_model)
    matrix = [name for name in mixers if name in MATRIX_LAYERS]
    if matrix:
        matrix_layer_memory(matrix, lengths[-1], d_model)


def temp_of(mixer, shape):
    fn, params = fwd_bwd(mixer, False)
    x = jax.ShapeDtypeStruct(shape, jnp.float32)
    return fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes


def mamba_memory(T, d_model):
    """Mamba's fwd+bwd temp memory against the T x d_inner x d_state state history."""
    mixer = layers.Mamba(d_model, key=jr.key(0))
    state = T * mixer.d_inner * mixer.d_state * 4
    print(
        f"\nMamba, one sequence, T={T}, d_model={d_model} (d_inner={mixer.d_inner}, "
        f"d_state={mixer.d_state}): T x state = {mib(state)} MiB\n"
    )
    print("| chunk_size | fwd+bwd temp (MiB) | temp / (T x state bytes) |")
    print("|---|---|---|")
    for chunk in sorted({64, 256, T}):
        m = layers.Mamba(d_model, chunk_size=chunk, key=jr.key(0))
        temp = temp_of(m, (1, T, d_model))
        label = f"{chunk} (no chunking)" if chunk == T else str(chunk)
        print(f"| {label} | {mib(temp)} | {temp / state:.2f} |", flush=True)
    fn, params = fwd_bwd(mixer, True)
    x = jax.ShapeDtypeStruct((1, T, d_model), jnp.float32)
    temp = fn.lower(params, x).compile().memory_analysis().temp_size_in_bytes
    print(f"| naive lax.scan + autodiff | {mib(temp)} | {temp / state:.2f} |")
    print(
        "\nGrowth of temp memory per time step (from T/2 to T), chunk_size 64, "
        "against the bytes of one step's state:\n"
    )
    print("| d_state | temp growth per step (KiB) | state per step (KiB) | ratio |")
    print("|---|---|---|---|")
    for d_state in (16, 64):
        m = layers.Mamba(d_model, d_state=d_state, key=jr.key(0))
        slope = (temp_of(m, (1, T, d_model)) - temp_of(m, (1, T // 2, d_model))) / (T // 2)
        per_step = m.d_inner * d_state * 4
        print(
            f"| {d_state} | {slope / 1024:.1f} | {per_step / 1024:.1f} | "
            f"{slope / per_step:.2f} |",
            flush=True,
        )


# ------------------------------------------------ the delta-rule family (DeltaNet, GDN)


def _delta_inputs(T, H, d, gated):
    kq, kk, kv, kb, kg = jr.split(jr.key(2), 5)
    k = jr.normal(kk, (T, H, d), jnp.float32)
    log_decay = -jax.nn.softplus(jr.normal(kg, (T, H), jnp.float32) - 3) if gated else None
    return dict(
        q=jr.normal(kq, (T, H, d), jnp.float32),
        k=k / jnp.linalg.norm(k, axis=-1, keepdims=True),
        v=jr.normal(kv, (T, H, d), jnp.float32),
        beta=jax.nn.sigmoid(jr.normal(kb, (T, H), jnp.float32)),
        log_decay=log_decay,
        h0=jnp.zeros((H, d, d), jnp.float32),
    )


def delta_layer_memory(names, T, d_model):
    """Delta-rule layers: fwd+bwd temp memory against the `T × H × d_k × d_v` states.

    Growing the head size grows the activations linearly and the state quadratically:
    a layer that kept its state history would keep up with the last column."""
    print(f"\nOne sequence, T={T}, d_model={d_model}, 4 heads:\n")
    print("| layer | H × d_k × d_v | fwd+bwd temp (MiB) | T × state (MiB) | ratio |")
    print("|---|---|---|---|---|")
    for name in names:
        for head_dim in (None, 64, 128):
            m = layers.MIXERS[name](d_model, head_dim=head_dim, key=jr.key(0))
            temp = temp_of(m, (1, T, d_model))
            state = T * m.num_heads * m.head_dim * m.head_dim_v * 4
            sizes = f"{m.num_heads} × {m.head_dim} × {m.head_dim_v}"
            print(
                f"| {name} | {sizes} | {mib(temp)} | {mib(state)} | {temp / state:.2f} |",
                flush=True,
            )


# ------------------------------- chunked operators against their naive recurrence
#
# A registry: `OPERATORS[name](T, H, d) -> (inputs, loss)` with `loss(inputs, method)`
# a scalar whose gradient (to every input) is timed, for `method` "chunked" (the
# operator as layers use it) and "recurrent" (its `lax.scan` recurrence, autodiff).

OPERATORS = {}


def operator(name):
    def register(case):
        OPERATORS[name] = case
        return case

    return register


def _qkv(T, H, d, key=3):
    kq, kk, kv, kg, ki = jr.split(jr.key(key), 5)
    return dict(
        q=jr.normal(kq, (T, H, d), jnp.float32),
        k=jr.normal(kk, (T, H, d), jnp.float32) / d**0.5,
        v=jr.normal(kv, (T, H, d), jnp.float32),
    ), (kg, ki)


def _gla_case(per_key):
    def case(T, H, d):
        x, (kg, _) = _qkv(T, H, d)
        shape = (T, H, d) if per_key else (T, H)
        x["log_decay"] = jax.nn.log_sigmoid(jr.normal(kg, shape, jnp.float32) + 4)

        def loss(x, method):
            o, S = ssm.gated_linear_attention(**x, method=method)
            return jnp.sum(o**2) + jnp.sum(S**2)

        return x, loss

    return case


operator("gla-scalar")(_gla_case(per_key=False))  # RetNet, Mamba-2/SSD, linear attention
operator("gla-per-key")(_gla_case(per_key=True))  # GLA


@operator("mlstm")
def _mlstm_case(T, H, d):
    x, (kg, ki) = _qkv(T, H, d)
    x["log_forget"] = jax.nn.log_sigmoid(jr.normal(kg, (T, H), jnp.float32) + 4)
    x["log_input"] = jr.normal(ki, (T, H), jnp.float32)

    def loss(x, method):
        h, state = ssm.mlstm(**x, method=method)
        return jnp.sum(h**2) + jnp.sum(state.C**2)

    return x, loss


def _delta_case(gated, chunk_size):
    def case(T, H, d):
        def loss(x, method):
            o, S = ssm.delta_rule(**x, chunk_size=chunk_size, method=method)
            return jnp.sum(o**2) + jnp.sum(S**2)

        return _delta_inputs(T, H, d, gated), loss  # gradient to `h0` too

    return case


# DeltaNet and Gated DeltaNet at chunk sizes 64 and 32 (`delta_rule`'s default on CPU)
operator("deltanet-c64")(_delta_case(gated=False, chunk_size=64))
operator("deltanet-c32")(_delta_case(gated=False, chunk_size=32))
operator("gated-deltanet-c64")(_delta_case(gated=True, chunk_size=64))
operator("gated-deltanet-c32")(_delta_case(gated=True, chunk_size=32))


def _timed(compiled, inputs):
    t0 = time.perf_counter()
    jax.block_until_ready(compiled(inputs))
    return time.perf_counter() - t0


def operators(names, lengths, runs, H=4, d=64):
    """Each operator's chunked form against its recurrence in a `lax.scan` + autodiff.

    Every (operator, T, form) is compiled first; then rounds take each in turn (two
    untimed rounds, then `runs` timed ones) and the median over the timed rounds is
    reported, so that all cases see the same load on a shared machine. In a round a
    case is called twice and the second call timed: the steady state of a program
    called again and again (a training step), not a call that follows another
    program, which finds the caches filled by that program and its temp buffer
    possibly handed back to the OS (after a naive case, the chunked temp is
    page-faulted afresh). The untimed rounds let glibc's malloc settle: it serves a
    temp buffer of up to 32 MiB from its heap only once it has freed one about as
    large (its mmap threshold rises), while a larger one is mmapped and page-faulted
    on every call whatever the history. Growth when T doubles is the ratio of
    medians, with the spread of the per-round ratios.
    """
    print(
        f"backend: {jax.default_backend()} ({jax.devices()[0].device_kind}), {H} heads, "
        f"d_k = d_v = {d}, one sequence, the operators' default chunk (32 on CPU, 64 "
        f"elsewhere) unless the name says otherwise, "
        f"median of {runs} interleaved rounds, float32, {_allocator.describe()}; "
        f"load average {os.getloadavg()[0]:.2f} at the start\n"
    )
    cases = {}
    for name in names:
        for T in lengths:
            inputs, loss = OPERATORS[name](T, H, d)
            for method in ("chunked", "recurrent"):
                grad = jax.grad(functools.partial(loss, method=method))
                compiled = jax.jit(grad).lower(inputs).compile()
                temp = compiled.memory_analysis().temp_size_in_bytes
                cases[name, T, method] = (compiled, inputs, temp)
    times = {key: [] for key in cases}
    for timed in [False] * 2 + [True] * runs:
        for key, (compiled, inputs, _) in cases.items():
            _timed(compiled, inputs)
            t = _timed(compiled, inputs)
            if timed:
                times[key].append(t)
    median = {key: statistics.median(t) for key, t in times.items()}
    print(
        "| operator | T | chunked fwd+bwd (ms) | naive fwd+bwd (ms) | speed-up "
        "| chunked temp (MiB) | naive temp (MiB) | temp ratio |"
    )
    print("|---|---|---|---|---|---|---|---|")
    for name in names:
        for T in lengths:
            t, t_naive = median[name, T, "chunked"], median[name, T, "recurrent"]
            m, m_naive = cases[name, T, "chunked"][2], cases[name, T, "recurrent"][2]
            print(
                f"| {name} | {T} | {1e3 * t:.1f} | {1e3 * t_naive:.1f} | "
                f"{t_naive / t:.1f}x | {mib(m)} | {mib(m_naive)} | 1/{m_naive / m:.1f} |"
            )
    pairs = [(a, b) for a, b in zip(lengths, lengths[1:], strict=False) if b == 2 * a]
    if pairs:
        print("\nTime growth when T doubles (linear: 2.0x; quadratic: 4.0x):\n")
        print("| operator | T | chunked | chunked, per round | naive |")
        print("|---|---|---|---|---|")
        for name in names:
            for a, b in pairs:
                chunked = median[name, b, "chunked"] / median[name, a, "chunked"]
                naive = median[name, b, "recurrent"] / median[name, a, "recurrent"]
                rounds = [
                    t2 / t1
                    for t1, t2 in zip(
                        times[name, a, "chunked"], times[name, b, "chunked"], strict=True
                    )
                ]
                print(
                    f"| {name} | {a} → {b} | {chunked:.2f}x | "
                    f"{min(rounds):.2f}x–{max(rounds):.2f}x | {naive:.2f}x |"
                )
    print(f"\nload average {os.getloadavg()[0]:.2f} at the end")


MATRIX_LAYERS = {  # one head of large key/value size: the state dwarfs the activations
    "linear_attention": dict(num_heads=1),
    "retnet": dict(num_heads=1),
    "gla": dict(num_heads=1, expand_k=1.0),
    "mlstm": dict(num_heads=1),
    "mamba2": dict(num_heads=1, d_state=128),
}


def _state_bytes(mixer):
    state = mixer.init_state()
    leaves = [state] if isinstance(state, jax.Array) else jax.tree.leaves(state)
    return max(leaf.size for leaf in leaves) * 4


def matrix_layer_memory(names, T, d_model):
    """Gated-linear-attention layers: fwd+bwd temp memory against `T ×` the state, at
    their default sizes and with one large head."""
    print(f"\nOne sequence, T={T}, d_model={d_model}:\n")
    print(
        "| layer | heads | state per step (KiB) | fwd+bwd temp (MiB) | T × state (MiB) "
        "| ratio |"
    )
    print("|---|---|---|---|---|---|")
    for name in names:
        for kwargs in ({}, MATRIX_LAYERS[name]):
            m = layers.MIXERS[name](d_model, **kwargs, key=jr.key(0))
            temp = temp_of(m, (1, T, d_model))
            state = T * _state_bytes(m)
            print(
                f"| {name} | {m.num_heads} | {_state_bytes(m) / 1024:.0f} | {mib(temp)} "
                f"| {mib(state)} | {temp / state:.2f} |",
                flush=True,
            )


if __name__ == "__main__":
    main()
