"""Benchmark whole training steps of every registered mixer against the usual JAX ports.

One training step is the forward pass, the backward pass and an `optax.adamw` update of
a 2-block `layers.SequenceModel` (token inputs, a small vocabulary, loss the mean
cross-entropy of next-token prediction over every position, a batch through
`jax.vmap`), jitted with the parameters and optimiser state donated, as a training
loop runs it. Each mixer in `layers.MIXERS` is timed at

- `task`: d_model 64, T = 72 and T = 256, batch 32 (the synthetic tasks' size);
- `lm`: d_model 256, T = 1024, batch 8 (a small language model);

and, for the mixers that have a common port, against the same model with the
mixer's recurrence written "the usual way in JAX", from the same parameters:

- `mamba`: the whole `(T, d_inner, d_state)` tensors `exp(Δ A)` and `Δ x B`
  discretised at once, `lax.associative_scan` (as the popular ports do);
- `s5`, `lru`: `lax.associative_scan` over the diagonal recurrence, as in the
  papers' JAX code;
- `gla`, `deltanet`, `gated_deltanet`: `lax.scan` over the per-step matrix-state
  recurrence;
- `attention`, `local_attention`: plain `jnp` causal softmax attention (einsum
  `q kᵀ`, mask, softmax, einsum) with the same projections and rotary embedding
  (our layer: its own einsum form and the band on CPU, `jax.nn.dot_product_attention`
  elsewhere);
- `s4d`: the FFT-kernel S4D of the paper's code (the kernel `2 Re(C B̄ Ā^k)` by a
  Vandermonde product over all `T` at once, then an FFT convolution).

Everything else (embedding, norms, MLPs, projections, convolutions, head, optimiser)
is the same code. Before timing, each port's loss and gradients are checked against
our model's on a short batch. Figures: tokens per second (batch · T / median step
time over `--runs` interleaved rounds; each round times every contender of a mixer
once, after two untimed rounds) and the compiled step's temp memory
(`memory_analysis().temp_size_in_bytes`).

    python scripts/bench_train.py                          # every mixer, task and lm
    python scripts/bench_train.py --sizes task --mixers mamba,s5 --runs 5
    python scripts/bench_train.py --quick                  # tiny sizes, a smoke test
    python scripts/bench_train.py --json results.json      # also write the records
    python scripts/bench_train.py --system-malloc          # the allocator left alone
    python scripts/bench_train.py --floor --sizes lm       # also the no-mixer floor

`--floor` also times the same model with every mixer replaced by the identity (the
embedding, norms, MLPs, head and optimiser only). No mixer can make a step faster
than that, so `port / floor` (the port's step time over the floor's) bounds the
ratio `ours / port` any implementation of the mixer could reach in this model.

By default the allocator is configured as `ssm-train` configures it (glibc keeps
freed memory, `train/allocator.py`); `--system-malloc` leaves it alone
(`scripts/_allocator.py`), and the header says which.
"""

from __future__ import annotations

import sys

if __name__ == "__main__":  # before JAX allocates; importing this module changes nothing
    import _allocator  # this script's folder is on sys.path

    _allocator.retain_freed_memory()

import argparse  # noqa: E402
import datetime  # noqa: E402
import json  # noqa: E402
import math  # noqa: E402
import os  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
import traceback  # noqa: E402
from collections.abc import Callable  # noqa: E402

import equinox as eqx  # noqa: E402
import jax  # noqa: E402
import jax.numpy as jnp  # noqa: E402
import jax.random as jr  # noqa: E402
import optax  # noqa: E402
from jax import lax  # noqa: E402

import layers  # noqa: E402
from layers._attention import document_starts  # noqa: E402
from layers._heads import merge_heads  # noqa: E402
from layers._init import as_complex  # noqa: E402
from layers._mixer import complex_dtype, linear, real_dtype  # noqa: E402

# --------------------------------------------------------------------------- ports


def _assoc_linear(a, b):
    """`h[t] = a[t] h[t-1] + b[t]` from zero by `lax.associative_scan` (over axis 0)."""

    def combine(left, right):
        a1, b1 = left
        a2, b2 = right
        return a1 * a2, a2 * b1 + b2

    return lax.associative_scan(combine, (a, b))[1]


def mamba_port(m: layers.Mamba, u):
    """Mamba with the whole `(T, d_inner, d_state)` tensors and an associative scan."""
    x, z, delta, B, C, _ = m._selective_inputs(u, m.init_state().conv)
    rdt = delta.dtype
    A = -jnp.exp(m.A_log.astype(rdt))
    x, z = x.astype(rdt), z.astype(rdt)
    dA = jnp.exp(delta[:, :, None] * A[None])
    dBx = (delta * x)[:, :, None] * B[:, None, :]
    h = _assoc_linear(dA, dBx)
    y = jnp.einsum("tdn,tn->td", h, C) + m.D.astype(rdt)[None] * x
    return linear(m.out_proj, (y * jax.nn.silu(z)).astype(u.dtype))


def s5_port(m: layers.S5, u):
    """S5 as in its paper's code: `Λ̄` repeated over time, `B̄ u`, associative scan,
    `2 Re(C̃ h) + D u`."""
    if m.bidirectional:
        raise ValueError("s5_port: only the causal S5 has a port here.")
    rdt = real_dtype(u.dtype)
    dA, dB = m.discretise(rdt)
    Bu = u.astype(dB.dtype) @ dB.T
    h = _assoc_linear(jnp.broadcast_to(dA, Bu.shape), Bu)
    y = 2 * (h @ as_complex(m.C[0], dB.dtype).T).real
    return (y + m.D.astype(rdt)[None] * u.astype(rdt)).astype(u.dtype)


def lru_port(m: layers.LRU, u):
    """The LRU as in its paper's code: `λ` repeated over time, `γ B u`, associative
    scan, `Re(C h) + D u`."""
    rdt = real_dtype(u.dtype)
    lam, gB, C = m._params(rdt)
    Bu = u.astype(gB.dtype) @ gB.T
    h = _assoc_linear(jnp.broadcast_to(lam, Bu.shape), Bu)
    y = (h @ C.T).real + m.D.astype(rdt)[None] * u.astype(rdt)
    return y.astype(u.dtype)


def gla_port(m: layers.GLA, u):
    """GLA with `lax.scan` over `S[t] = diag(α[t]) S[t-1] + k[t] v[t]ᵀ`, `o = Sᵀ q`."""
    q, k, v, log_decay = m._features(u)
    rdt = real_dtype(u.dtype)

    def body(S, inputs):
        q_t, k_t, v_t, g_t = inputs  # (H, dk), (H, dk), (H, dv), (H, dk)
        S = jnp.exp(g_t)[..., None] * S + k_t[..., None] * v_t[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    S0 = jnp.zeros((m.num_heads, m.head_dim, m.head_dim_v), rdt)
    _, o = lax.scan(body, S0, (q.astype(rdt), k.astype(rdt), v.astype(rdt), log_decay))
    return m._readout(o.astype(u.dtype), u)


def delta_port(m, u):
    """(Gated) DeltaNet with `lax.scan` over the delta rule, per step:
    `S ← α S`, `S ← S + β k (v - Sᵀ k)ᵀ`, `o = Sᵀ q`."""
    q, k, v, beta, log_decay, _ = m._features(u, m.init_state().conv)
    rdt = real_dtype(u.dtype)
    T, H = q.shape[0], m.num_heads
    if log_decay is None:
        log_decay = jnp.zeros((T, H), rdt)

    def body(S, inputs):
        q_t, k_t, v_t, b_t, g_t = inputs  # (H, dk), (H, dk), (H, dv), (H,), (H,)
        S = jnp.exp(g_t)[:, None, None] * S
        v_new = b_t[:, None] * (v_t - jnp.einsum("hkv,hk->hv", S, k_t))
        S = S + k_t[..., None] * v_new[:, None, :]
        return S, jnp.einsum("hkv,hk->hv", S, q_t)

    S0 = jnp.zeros((H, m.head_dim, m.head_dim_v), rdt)
    xs = (q.astype(rdt), k.astype(rdt), v.astype(rdt), beta, log_decay)
    _, o = lax.scan(body, S0, xs)
    return m._readout(o.astype(u.dtype), u)


def attention_port(m: layers.AbstractAttention, u):
    """Causal softmax attention in plain `jnp`: `softmax(q kᵀ / √d + mask) v`, with
    the layer's projections, rotary embedding and (grouped) key/value heads."""
    T = u.shape[0]
    index = jnp.arange(T, dtype=jnp.int32)
    starts = document_starts(None, index, jnp.zeros((), jnp.int32))
    q, k, v = m._qkv(u, index - starts)
    group = m.num_heads // m.num_kv_heads
    k, v = jnp.repeat(k, group, axis=1), jnp.repeat(v, group, axis=1)
    scores = jnp.einsum("thd,shd->hts", q, k) / math.sqrt(m.head_dim)
    mask = index[None, :] <= index[:, None]
    if m.window is not None:
        mask = mask & (index[:, None] - index[None, :] < m.window)
    scores = jnp.where(mask[None], scores, jnp.finfo(scores.dtype).min)
    o = jnp.einsum("hts,shd->thd", jax.nn.softmax(scores, axis=-1), v)
    return linear(m.o_proj, merge_heads(o))


def s4d_port(m: layers.S4D, u):
    """S4D as its paper's code trains it: the kernel `K = 2 Re(C B̄ Ā^k)`, `k < T`, by a
    Vandermonde product over all `T` at once, an FFT convolution of length `2T`, `+ D u`.
    """
    rdt = real_dtype(u.dtype)
    cdt = complex_dtype(rdt)
    T = u.shape[0]
    A = lax.complex(-jnp.exp(m.log_A_real.astype(rdt)), m.A_imag.astype(rdt))
    dtA = jnp.exp(m.log_dt.astype(rdt))[:, None].astype(cdt) * A  # (H, N/2)
    CB = as_complex(m.C, cdt) * as_complex(m.B, cdt) * (jnp.exp(dtA) - 1) / A
    powers = jnp.exp(dtA[:, :, None] * jnp.arange(T, dtype=rdt).astype(cdt)[None, None])
    K = 2 * jnp.einsum("hn,hnl->hl", CB, powers).real
    x = u.astype(rdt).T  # (H, T)
    y = jnp.fft.irfft(jnp.fft.rfft(x, n=2 * T) * jnp.fft.rfft(K, n=2 * T), n=2 * T)
    y = y[:, :T] + m.D.astype(rdt)[:, None] * x  # (H, T)
    return y.T.astype(u.dtype)


PORTS: dict[str, Callable] = {
    "mamba": mamba_port,
    "s5": s5_port,
    "lru": lru_port,
    "gla": gla_port,
    "deltanet": delta_port,
    "gated_deltanet": delta_port,
    "attention": attention_port,
    "local_attention": attention_port,
    "s4d": s4d_port,
}
"""The common port of each mixer that has one: `port(mixer, x) -> y` for one sequence."""


class PortMixer(eqx.Module):
    """Our mixer's parameters, run through a port's forward pass instead of its own."""

    mixer: layers.AbstractMixer
    port: Callable = eqx.field(static=True)

    @property
    def d_model(self) -> int:
        return self.mixer.d_model

    def __call__(self, x, *, resets=None, key=None):
        if resets is not None:
            raise ValueError("PortMixer: the ports take no `resets`.")
        return self.port(self.mixer, x)


def no_mixer(m, x):
    """The floor: the mixer replaced by the identity (its parameters unused)."""
    del m
    return x


def port_model(model: layers.SequenceModel, port: Callable) -> layers.SequenceModel:
    """`model` with every block's mixer run through `port` (same parameters)."""
    for i in range(len(model.blocks)):
        model = eqx.tree_at(
            lambda m, i=i: m.blocks[i].mixer, model, PortMixer(model.blocks[i].mixer, port)
        )
    return model


# --------------------------------------------------------------------- the step

VOCAB = 16


def make_model(name: str, d_model: int, *, key) -> layers.SequenceModel:
    return layers.SequenceModel(
        name, d_model=d_model, n_layers=2, d_output=VOCAB, vocab_size=VOCAB, key=key
    )


def loss_fn(model, tokens):
    """Mean next-token cross-entropy over every position of every sequence."""
    logits = jax.vmap(model)(tokens[:, :-1])
    return jnp.mean(optax.softmax_cross_entropy_with_integer_labels(logits, tokens[:, 1:]))


def make_step(model, optimiser):
    """A jitted training step `(params, opt_state, tokens) -> (params, opt_state,
    loss)` with the state donated, and its initial `(params, opt_state)`."""
    params, static = eqx.partition(model, eqx.is_inexact_array)
    params = jax.tree.map(jnp.copy, params)  # donated: not shared with other contenders

    def step(params, opt_state, tokens):
        loss, grads = jax.value_and_grad(lambda p: loss_fn(eqx.combine(p, static), tokens))(
            params
        )
        updates, opt_state = optimiser.update(grads, opt_state, params)
        return optax.apply_updates(params, updates), opt_state, loss

    return jax.jit(step, donate_argnums=(0, 1)), params, optimiser.init(params)


def check_port(model, ported, length=45, batch=2, tol=1e-4):
    """The port's loss and gradients equal ours on a short batch (relative max error);
    returns the largest error."""
    tokens = jr.randint(jr.key(7), (batch, length + 1), 0, VOCAB)
    grad = eqx.filter_jit(eqx.filter_value_and_grad(loss_fn))
    ours, port = grad(model, tokens), grad(ported, tokens)
    leaves = zip(jax.tree.leaves(ours), jax.tree.leaves(port), strict=True)
    err = max(
        float(jnp.max(jnp.abs(a - b)) / (jnp.max(jnp.abs(a)) + 1e-30)) for a, b in leaves
    )
    if not err < tol:
        raise AssertionError(f"the port differs from our layer: relative error {err:.2e}")
    return err


SIZES = {
    "task72": (64, 72, 32),
    "task256": (64, 256, 32),
    "lm": (256, 1024, 8),
    "quick": (32, 40, 4),
}
GROUPS = {"task": ("task72", "task256")}


def bench_mixer(name, size, runs, warmup=2, floor=False):
    """Time ours (and the port, if any, and the no-mixer floor if `floor`) on one
    size; returns a record."""
    d_model, T, batch = SIZES[size]
    model = make_model(name, d_model, key=jr.key(0))
    contenders = {"ours": model}
    record = {"mixer": name, "size": size, "d_model": d_model, "T": T, "batch": batch}
    if name in PORTS:
        contenders["port"] = port_model(model, PORTS[name])
        window = getattr(model.blocks[0].mixer, "window", None)
        length = 45 if window is None else window + 19  # past the window
        record["port_error"] = check_port(model, contenders["port"], length)
    if floor:
        contenders["floor"] = port_model(model, no_mixer)
    tokens = jr.randint(jr.key(1), (batch, T + 1), 0, VOCAB)
    optimiser = optax.adamw(1e-3)
    state = {}
    for kind, m in contenders.items():
        step, params, opt_state = make_step(m, optimiser)
        compiled = step.lower(params, opt_state, tokens).compile()
        record[f"{kind}_temp_bytes"] = compiled.memory_analysis().temp_size_in_bytes
        state[kind] = [compiled, params, opt_state]
    times = {kind: [] for kind in contenders}
    for r in range(warmup + runs):
        for kind, s in state.items():
            t0 = time.perf_counter()
            s[1], s[2], loss = s[0](s[1], s[2], tokens)
            jax.block_until_ready(loss)
            if r >= warmup:
                times[kind].append(time.perf_counter() - t0)
    for kind, ts in times.items():
        record[f"{kind}_step_s"] = statistics.median(ts)
        record[f"{kind}_tokens_per_s"] = batch * T / statistics.median(ts)
    return record


def _mib(n):
    return f"{n / 2**20:.1f}"


def row(rec):
    d, T, B = rec["d_model"], rec["T"], rec["batch"]
    size = f"{rec['size']} (d={d}, T={T}, B={B})"
    if "error" in rec:
        return f"| {rec['mixer']} | {size} | failed: {rec['error']} | | | | |"
    ours = f"{rec['ours_tokens_per_s']:,.0f}"
    if "port_tokens_per_s" in rec:
        port = f"{rec['port_tokens_per_s']:,.0f}"
        ratio = f"{rec['ours_tokens_per_s'] / rec['port_tokens_per_s']:.2f}x"
        port_mem = _mib(rec["port_temp_bytes"])
    else:
        port = ratio = port_mem = "-"
    line = (
        f"| {rec['mixer']} | {size} | {ours} | {port} | {ratio} | "
        f"{_mib(rec['ours_temp_bytes'])} | {port_mem} |"
    )
    if "floor_tokens_per_s" in rec:
        floor = rec["floor_tokens_per_s"]
        bound = "-"
        if "port_step_s" in rec:
            bound = f"{rec['port_step_s'] / rec['floor_step_s']:.2f}x"
        line += f" {floor:,.0f} | {bound} |"
    return line


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--sizes", default="task,lm", help="task, lm, task72, task256")
    parser.add_argument("--mixers", default=",".join(layers.MIXERS))
    parser.add_argument("--runs", type=int, default=5)
    parser.add_argument("--quick", action="store_true", help="tiny sizes, 2 runs")
    parser.add_argument("--json", default=None, help="write the records to this file")
    parser.add_argument(
        "--system-malloc", action="store_true", help="leave the allocator alone"
    )
    parser.add_argument(
        "--floor",
        action="store_true",
        help="also time the model with the mixers replaced by the identity",
    )
    args = parser.parse_args(argv)
    mixers = [m for m in args.mixers.split(",") if m]
    unknown = [m for m in mixers if m not in layers.MIXERS]
    if unknown:
        parser.error(
            f"unknown mixers {unknown}; the registered ones are {list(layers.MIXERS)}"
        )
    if args.quick:
        sizes, runs, warmup = ["quick"], min(args.runs, 2), 1
    else:
        sizes, runs, warmup = [], args.runs, 2
        for s in args.sizes.split(","):
            if s not in SIZES and s not in GROUPS:
                parser.error(f"unknown size {s!r}; expected task, lm, task72 or task256")
            sizes.extend(GROUPS.get(s, (s,)))
    import _allocator  # this script's folder is on sys.path

    dev = jax.devices()[0]
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    print(
        f"{datetime.datetime.now(datetime.UTC):%Y-%m-%d %H:%M} UTC, backend: "
        f"{jax.default_backend()} ({dev.device_kind}), {os.cpu_count()} CPUs, load "
        f"average {load}, float32, 2 blocks, vocabulary {VOCAB}, AdamW, median of "
        f"{runs} interleaved runs after {warmup} warm-up rounds, "
        f"{_allocator.describe()}\n",
        flush=True,
    )
    header = (
        "| mixer | size | ours (tokens/s) | port (tokens/s) | ours / port | ours temp "
        "(MiB) | port temp (MiB) |"
    )
    rule = "|---|---|---|---|---|---|---|"
    if args.floor:
        header += " no mixer (tokens/s) | bound: port / no mixer |"
        rule += "---|---|"
    print(header)
    print(rule, flush=True)
    records = []
    for size in sizes:
        for name in mixers:
            try:
                rec = bench_mixer(name, size, runs, warmup, args.floor)
            except Exception as e:  # noqa: BLE001  # one mixer's failure is reported
                traceback.print_exc(file=sys.stderr)
                d, T, B = SIZES[size]
                rec = {
                    "mixer": name,
                    "size": size,
                    "d_model": d,
                    "T": T,
                    "batch": B,
                    "error": f"{type(e).__name__}: {str(e)[:80]}",
                }
            records.append(rec)
            print(row(rec), flush=True)
    if args.json:
        with open(args.json, "w") as f:
            json.dump({"load_average": os.getloadavg(), "records": records}, f, indent=1)


if __name__ == "__main__":
    main()
