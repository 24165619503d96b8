"""Compiled generation (`train.generate`, `ssm-generate`).

Greedy decoding from the prefill and the compiled step loop equals the argmax of the
parallel form's logits on the generated sequence (recurrent, global attention whose
KV cache generation sizes itself, and a hybrid whose local-attention ring buffer
wraps); sampling inside the loop equals drawing from the parallel form's logits with
the same keys; the sampling rules against NumPy references; the CLI on a tiny run.
"""

from __future__ import annotations

import logging

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest

import layers
from train import cli
from train.generate import (
    check_sampling,
    filter_logits,
    generate,
    sample_logits,
    temperature_logits,
    timed_generate,
    top_k_logits,
    top_p_logits,
    with_cache_length,
)

from .helpers import with_random_parameters

VOCAB, PROMPT, NEW = 13, 5, 9  # odd lengths; the window below is shorter than both
f64 = jnp.float64

MODELS = {
    "recurrent": ("lru", 1, {}),
    "attention": ("attention", 1, {"num_heads": 2}),  # no max_len
    "hybrid": (
        ["rglru", "local_attention"],
        2,
        {
            "rglru": {"d_rnn": 8, "num_heads": 2},
            "local_attention": {"window": 3, "num_heads": 2},
        },
    ),
}


def make(name: str, seed: int = 0):
    mixer, n_layers, kwargs = MODELS[name]
    return with_random_parameters(
        lambda: layers.SequenceModel(
            mixer, 8, n_layers, VOCAB, vocab_size=VOCAB, mixer_kwargs=kwargs, key=jr.key(0)
        ),
        seed,
        f64,
    )


# The parallel form, compiled once per model structure.
parallel = eqx.filter_jit(lambda model, tokens: model(tokens))


def prompt_of(seed: int):
    return np.random.default_rng(seed).integers(0, VOCAB, PROMPT).astype(np.int32)


def reference_tokens(model, prompt, n, draw):
    """Each new token drawn from the parallel form's logits at its position, `draw(i,
    logits)`; the sequence is a fixed-length buffer, so causal outputs one compile."""
    P = len(prompt)
    buffer = np.concatenate([prompt, np.zeros(n, np.int32)])
    for i in range(n):
        logits = parallel(model, jnp.asarray(buffer))[P - 1 + i]
        buffer[P + i] = int(draw(i, logits))
    return buffer[P:]


@pytest.mark.parametrize("name", list(MODELS))
def test_greedy_equals_argmax_of_parallel_form(name):
    model = make(name, 1)
    prompt = prompt_of(2)
    tokens = np.asarray(generate(model, prompt, NEW, temperature=0.0, key=jr.key(0)))
    assert tokens.shape == (NEW,) and tokens.dtype == np.int32
    # The parallel form on prompt + generation: each new token is the argmax of the
    # logits at the position before it.
    logits = parallel(model, jnp.asarray(np.concatenate([prompt, tokens])))
    expected = np.asarray(jnp.argmax(logits[PROMPT - 1 : PROMPT - 1 + NEW], axis=-1))
    np.testing.assert_array_equal(tokens, expected)
    if name == "attention":  # the model alone has no KV cache size: generation sized it
        with pytest.raises(ValueError, match="max_len"):
            model.init_state()


def test_sampling_inside_the_loop_matches_the_parallel_form(caplog):
    """Temperature, top-k and top-p inside the compiled loop: the same tokens as
    drawing from the parallel form's logits with `fold_in(key, i)`; the same key gives
    the same tokens, another key others."""
    model = make("hybrid", 3)
    prompt, key = prompt_of(4), jr.key(7)
    opts = dict(temperature=1.7, top_k=6, top_p=0.8)
    tokens = np.asarray(generate(model, prompt, NEW, **opts, key=key))
    one = jax.jit(lambda i, lg: sample_logits(jr.fold_in(key, i), lg, **opts))
    ref = reference_tokens(model, prompt, NEW, one)
    np.testing.assert_array_equal(tokens, ref)
    again = np.asarray(generate(model, prompt, NEW, **opts, key=key))
    np.testing.assert_array_equal(again, tokens)
    other = np.asarray(generate(model, prompt, NEW, **opts, key=jr.key(8)))
    assert not np.array_equal(other, tokens)
    # Another temperature or k reuses the compiled programs (they are traced).
    assert compiled_programs(caplog, lambda: jnp.cos(jnp.zeros((3, 1, 7), f64)))  # seen
    again = compiled_programs(
        caplog,
        lambda: generate(model, prompt, NEW, temperature=0.5, top_k=3, top_p=0.6, key=key),
    )
    assert again == [], again


def compiled_programs(caplog, fn) -> list[str]:
    """What JAX compiles while `fn()` runs: the "Compiling ..." lines that
    `jax.log_compiles` writes, one per program compiled (none for a cache hit)."""
    caplog.clear()
    with jax.log_compiles(), caplog.at_level(logging.WARNING, logger="jax"):
        jax.block_until_ready(fn())
    lines = [r.getMessage() for r in caplog.records]
    return [line for line in lines if line.startswith("Compiling")]


def logits_with_ties(seed, V=37):
    x = np.random.default_rng(seed).normal(size=V) * 2
    x = np.round(x, 1)  # ties occur
    x[3] = x[10] = x[20] = np.max(x)  # a three-way tie at the top
    return x


def ranked(x):
    """Indices from the largest to the smallest value, ties to the lower index."""
    return np.lexsort((np.arange(len(x)), -x))


# k and p traced: one compiled program each for every case below.
top_k_jit, top_p_jit = jax.jit(top_k_logits), jax.jit(top_p_logits)


@pytest.mark.parametrize("k", [1, 2, 5, 36, 37, 0, 50])
def test_top_k_keeps_exactly_the_k_largest(k):
    x = logits_with_ties(k)
    out = np.asarray(top_k_jit(jnp.asarray(x), k))
    n = len(x) if k <= 0 or k >= len(x) else k
    kept = np.flatnonzero(np.isfinite(out))
    np.testing.assert_array_equal(np.sort(kept), np.sort(ranked(x)[:n]))
    np.testing.assert_array_equal(out[kept], x[kept])
    assert np.all(out[~np.isfinite(out)] == -np.inf)


@pytest.mark.parametrize("p", [0.01, 0.3, 0.5, 0.77, 0.95, 0.999, 1.0])
def test_top_p_keeps_the_smallest_set_with_mass_p(p):
    x = logits_with_ties(int(p * 100) + 1)
    out = np.asarray(top_p_jit(jnp.asarray(x), p))
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = ranked(x)
    mass = np.cumsum(probs[order])
    n = min(int(np.searchsorted(mass, p)) + 1, len(x))  # the smallest n: mass >= p
    kept = np.flatnonzero(np.isfinite(out))
    np.testing.assert_array_equal(np.sort(kept), np.sort(order[:n]))
    np.testing.assert_array_equal(out[kept], x[kept])
    assert probs[kept].sum() >= p - 1e-12  # enough mass ...
    assert n == 1 or probs[order[: n - 1]].sum() < p  # ... and no smaller set has it


def reference_filter(x, temperature, k, p):
    """NumPy, from the definitions: `x / temperature`, then the `k` largest (ties to
    the lower id), then the smallest most-likely set of mass `>= p`; -inf elsewhere."""
    x = np.asarray(x, np.float64) / temperature
    keep = np.zeros(len(x), bool)
    keep[ranked(x)[: k if 0 < k < len(x) else len(x)]] = True
    x = np.where(keep, x, -np.inf)
    probs = np.exp(x - x.max())
    probs /= probs.sum()
    order = ranked(x)
    n = min(int(np.searchsorted(np.cumsum(probs[order]), p)) + 1, len(x))
    keep = np.zeros(len(x), bool)
    keep[order[:n]] = True
    return np.where(keep, x, -np.inf)


@jax.jit
def draw(keys, x, temperature, top_k, top_p):
    """Samples and the filtered logits, with traced settings (one compiled program)."""
    samples = jax.vmap(lambda k: sample_logits(k, x, temperature, top_k, top_p))(keys)
    return samples, filter_logits(x, temperature, top_k, top_p)


def test_samples_follow_the_filtered_distribution():
    """Draws never leave the top-k / top-p set, and their frequencies are those of the
    renormalised `softmax(logits / temperature)` on it; k=0 and p=1 switch a filter
    off; temperature 0 is the argmax whatever the key."""
    x = jnp.asarray(logits_with_ties(5, V=23))
    keys = jr.split(jr.key(0), 8_000)
    for temperature, top_k, top_p in [(0.5, 0, 1.0), (2.0, 7, 1.0), (1.3, 9, 0.7)]:
        args = jnp.asarray(temperature, f64), jnp.asarray(top_k), jnp.asarray(top_p, f64)
        samples, filtered = map(np.asarray, draw(keys, x, *args))
        ref = reference_filter(x, temperature, top_k, top_p)
        np.testing.assert_allclose(filtered, ref, rtol=1e-12)
        assert np.all(np.isfinite(ref[samples])), (temperature, top_k, top_p)
        expected = np.exp(ref - ref.max())
        expected /= expected.sum()
        freq = np.bincount(samples, minlength=len(x)) / len(samples)
        np.testing.assert_allclose(freq, expected, atol=0.02)
    args = jnp.asarray(0.0, f64), jnp.asarray(3), jnp.asarray(0.5, f64)
    greedy, _ = draw(keys[:50], x, *args)
    assert np.all(np.asarray(greedy) == int(np.argmax(np.asarray(x))))
    # One sort for both filters: the same as one filter after the other.
    np.testing.assert_array_equal(
        filter_logits(x, 1.3, 9, 0.7), top_p_jit(top_k_jit(x / 1.3, 9), 0.7)
    )
    np.testing.assert_array_equal(temperature_logits(x, 0.0), x)


def test_cache_length_and_errors():
    model = make("hybrid", 0)
    attn = with_random_parameters(
        lambda: layers.SequenceModel(
            ["attention", "local_attention"],
            8,
            2,
            VOCAB,
            vocab_size=VOCAB,
            mixer_kwargs={"local_attention": {"window": 4}},
            key=jr.key(1),
        ),
        0,
        f64,
    )
    sized = with_cache_length(attn, 17)
    assert sized.blocks[0].mixer.max_len == 17 and attn.blocks[0].mixer.max_len is None
    assert sized.blocks[1].mixer.window == 4 and sized.blocks[1].mixer.max_len is None
    for new, old in zip(jax.tree.leaves(sized), jax.tree.leaves(attn), strict=True):
        assert new is old  # the parameters are shared
    assert sized.init_state()[0].k.shape[0] == 17
    with pytest.raises(ValueError, match="KV cache length"):
        with_cache_length(attn, 0)
    glob, local = attn.blocks[0].mixer, attn.blocks[1].mixer
    assert glob.with_cache_length(5).max_len == 5 and glob.max_len is None
    with pytest.raises(ValueError, match="KV cache length"):
        glob.with_cache_length(0)
    with pytest.raises(ValueError, match="window"):
        local.with_cache_length(8)

    prompt, key = prompt_of(0), jr.key(0)
    assert generate(model, prompt, 0, key=key).shape == (0,)
    bad = [
        (dict(max_new_tokens=-1), "max_new_tokens"),
        (dict(temperature=-0.5), "temperature"),
        (dict(temperature=float("nan")), "temperature"),
        (dict(top_k=-2), "top_k"),
        (dict(top_p=0.0), "top_p"),
        (dict(top_p=1.5), "top_p"),
        (dict(prompt=np.zeros(0, np.int32)), "empty"),
        (dict(prompt=np.array([1, VOCAB])), "vocabulary"),
        (dict(prompt=np.ones((2, 3), np.int32)), "vmap"),
        (dict(prompt=np.ones(3, np.float32)), "integer"),
    ]
    for change, message in bad:
        args = dict(prompt=prompt, max_new_tokens=4) | change
        with pytest.raises(ValueError, match=message):
            generate(model, args.pop("prompt"), args.pop("max_new_tokens"), **args, key=key)
    real = eqx.filter_eval_shape(
        lambda: layers.SequenceModel("lru", 8, 1, VOCAB, d_input=3, key=jr.key(0))
    )
    with pytest.raises(ValueError, match="token model"):
        generate(real, prompt, 3, key=key)
    with pytest.raises(ValueError, match="max_new_tokens"):
        check_sampling(2.5, 1.0, None, None)
    with pytest.raises(ValueError, match="key"):
        generate(model, prompt, 3, key=None)
    legacy = generate(model, prompt, 0, key=jr.PRNGKey(0))  # raw uint32 keys work too
    assert legacy.shape == (0,)


class Letters:
    """A tokenizer on the model's 13 tokens: the letters a..m."""

    kind = "lm"

    @staticmethod
    def encode(text):
        return np.asarray([ord(c) - ord("a") for c in text], np.int32)

    @staticmethod
    def decode(tokens):
        return "".join(chr(ord("a") + int(t)) for t in np.asarray(tokens))


def test_cli(monkeypatch, capsys):
    """`ssm-generate`'s flags on a model without a KV cache size (global attention):
    greedy and sampled output equal to the Python API's, tokens/s on stderr, the same
    seed the same sample, bad flags exit 2 without a traceback. The run is stubbed
    (`_load_run`); tests/test_train.py runs `ssm-generate` on a trained run."""
    model = make("attention", 1)  # compiled programs shared with the tests above
    config = type("Config", (), {"task": type("T", (), {"name": "letters"})})()
    monkeypatch.setattr(
        cli, "_load_run", lambda run_dir, which: (config, Letters, model, 0)
    )
    prompt = "".join(Letters.decode(prompt_of(2)))

    cli.generate_main(["run", "--prompt", prompt, "--max-new-tokens", str(NEW),
                       "--temperature", "0"])  # fmt: skip
    out, err = capsys.readouterr()
    tokens = generate(model, Letters.encode(prompt), NEW, temperature=0.0, key=jr.key(0))
    assert out == prompt + Letters.decode(tokens) + "\n"
    assert "prefill: 5 tokens" in err and "decode: 9 tokens" in err and "tokens/s" in err

    sampled = []
    for _ in range(2):
        cli.generate_main(
            ["run", "--prompt", prompt, "--length", str(NEW), "--temperature", "1.2",
             "--top-k", "4", "--top-p", "0.9", "--seed", "3"]
        )  # fmt: skip
        sampled.append(capsys.readouterr().out)
    assert sampled[0] == sampled[1]  # the same seed, the same text
    tokens, stats = timed_generate(
        model, Letters.encode(prompt), NEW, temperature=1.2, top_k=4, top_p=0.9,
        key=jr.key(3)
    )  # fmt: skip
    assert sampled[0] == prompt + Letters.decode(tokens) + "\n"
    assert stats.new_tokens == NEW and stats.prompt_tokens == PROMPT
    cache = with_cache_length(model, PROMPT + NEW).init_state()
    assert stats.state_bytes == sum(leaf.nbytes for leaf in jax.tree.leaves(cache))

    for flags, message in [
        (["--top-p", "1.5"], "--top-p"),
        (["--top-k", "-1"], "--top-k"),
        (["--temperature", "-1"], "--temperature"),
        (["--max-new-tokens", "-3"], "--max-new-tokens"),
        (["--prompt", ""], "empty"),
        (["--prompt", "xyz"], "vocabulary"),
    ]:
        with pytest.raises(SystemExit) as exc:
            cli.generate_main(["run", "--prompt", "abc", *flags])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and message in err and "Traceback" not in err, err
