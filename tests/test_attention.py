"""Softmax attention (`layers.Attention`, `layers.LocalAttention`) and hybrid stacks.

Each case is compared in values and gradients with a float64 reference written below
from the equations (`softmax(q kᵀ/√d + mask) v`, the rotary embedding applied as
explicit 2x2 rotations, documents and windows as an explicit mask); then every case
goes through the mixer contract in one compiled program (`__call__ == prefill ==
step by step == prefill a prefix then step`, the packing property for values and
gradients, causality, bfloat16). The local case's window (5) is far shorter than the
sequence (37), so its ring buffer wraps. Hybrid `SequenceModel`s and configs with a
list of mixers are tested at the end, down to a tiny training run, its resume,
fine-tuning from it and generation.
"""

from __future__ import annotations

import copy
import functools
import json
import zlib

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import yaml

import layers
from layers._attention import _band_pays as _band_attention_pays

from .helpers import (
    assert_close,
    numpy_rules,
    raises_as_user,
    rel_err,
    value_and_grads,
    with_random_parameters,
)

D_MODEL, T, SPLIT = 8, 37, 13  # odd lengths and an odd boundary
f32, f64 = jnp.float32, jnp.float64

CASES = {  # registry name and options; between them, every option
    "global": ("attention", dict(num_heads=2, rope_base=None, max_len=40)),  # MHA, NoPE
    "gqa": (
        "attention",
        dict(
            num_heads=4,
            num_kv_heads=2,
            head_dim=4,
            qk_norm=True,
            rope_base=500.0,
            max_len=40,
        ),
    ),  # fmt: skip
    # multi-query, sliding window (its ring buffer wraps), rotary positions
    "local-mqa": ("local_attention", dict(num_heads=2, num_kv_heads=1, window=5)),
}
# Three documents, boundaries at odd positions (the local window is shorter than each).
RESETS = np.zeros(T, bool)
RESETS[[SPLIT, 29]] = True


def cast(tree, dtype):
    return jax.tree.map(lambda v: v.astype(dtype) if eqx.is_inexact_array(v) else v, tree)


@functools.cache
def make(case, dtype=f32):
    """The layer of a case (random parameters, see `with_random_parameters`)."""
    name, kwargs = CASES[case]
    build = functools.partial(layers.MIXERS[name], D_MODEL, **kwargs, key=jr.key(0))
    return with_random_parameters(build, zlib.crc32(case.encode()), dtype)


def draw(case, shape, salt=""):
    rng = np.random.default_rng(zlib.crc32((case + salt).encode()))
    return rng.standard_normal(shape)


# ------------------------------------------------------------------ reference (float64)


def reference(m, x, resets):
    """`softmax(q kᵀ / √d + mask) v` per head, from the equations."""
    n, N, K, d = x.shape[0], m.num_heads, m.num_kv_heads, m.head_dim
    t = np.arange(n)
    doc = np.cumsum(resets)
    start = np.array([np.flatnonzero(doc == doc[i])[0] for i in range(n)])
    position = t - start  # restarts at each document
    q = (x @ m.q_proj.weight.T).reshape(n, N, d)
    k = (x @ m.k_proj.weight.T).reshape(n, K, d)
    v = (x @ m.v_proj.weight.T).reshape(n, K, d)
    if m.q_norm is not None:
        q = q / jnp.sqrt(jnp.mean(q**2, -1, keepdims=True) + 1e-6) * m.q_norm
        k = k / jnp.sqrt(jnp.mean(k**2, -1, keepdims=True) + 1e-6) * m.k_norm
    if m.rope_base is not None:  # channels i and i + d/2 turn by position * base^(-2i/d)
        R = np.zeros((n, d, d))
        for i in range(d // 2):
            angle = position * m.rope_base ** (-2 * i / d)
            j = i + d // 2
            R[:, i, i], R[:, i, j] = np.cos(angle), -np.sin(angle)
            R[:, j, i], R[:, j, j] = np.sin(angle), np.cos(angle)
        q = jnp.einsum("tij,tnj->tni", R, q)
        k = jnp.einsum("tij,tnj->tni", R, k)
    group = np.arange(N) // (N // K)  # query head -> its key/value head
    k, v = k[:, group], v[:, group]
    allowed = (t[None, :] <= t[:, None]) & (doc[None, :] == doc[:, None])
    if m.window is not None:
        allowed &= t[:, None] - t[None, :] < m.window
    logits = jnp.einsum("tnd,snd->nts", q, k) / np.sqrt(d)
    logits = jnp.where(allowed[None], logits, -jnp.inf)
    p = jnp.exp(logits - logits.max(-1, keepdims=True))
    p = p / p.sum(-1, keepdims=True)
    o = jnp.einsum("nts,snd->tnd", p, v)
    return o.reshape(n, N * d) @ m.o_proj.weight.T


BOUNDS = np.flatnonzero(RESETS)


def separate(m, x):
    """The documents of `RESETS` through the layer one at a time."""
    return jnp.concatenate([m(piece) for piece in jnp.split(x, BOUNDS)])


run_packed = value_and_grads(lambda m, x: m(x, resets=jnp.asarray(RESETS)))
run_separate = value_and_grads(separate)
run_reference = value_and_grads(numpy_rules(lambda m, x: reference(m, x, RESETS)))


# ---------------------------------------------------------------------------- tests


@pytest.mark.parametrize("case", CASES)
def test_packed_documents_match_reference_and_separate_runs(case):
    """`m(concat(x1, x2, x3), resets)` equals the float64 reference and
    `concat(m(x1), m(x2), m(x3))`, in values and gradients (to every parameter and
    the input), with boundaries at odd positions. `jax.nn.dot_product_attention` takes
    its softmax in float32 whatever the input dtype, which sets the tolerance."""
    m = make(case, f64)
    x = jnp.asarray(draw(case, (T, D_MODEL)), f64)
    w = jnp.asarray(draw(case, (T, D_MODEL), "w"), f64)
    y, g = run_packed(m, x, w)
    y_ref, g_ref = run_reference(m, x, w)
    y_sep, g_sep = run_separate(m, x, w)
    assert y.dtype == f64
    assert_close(y, y_ref, 1e-6, "values against the reference")
    assert_close(g, g_ref, 1e-6, "gradients against the reference")
    assert_close(y, y_sep, 1e-6, "values against separate documents")
    assert_close(g, g_sep, 1e-6, "gradients against separate documents")
    for path, leaf in jax.tree_util.tree_leaves_with_path(eqx.filter(g[0], eqx.is_array)):
        assert np.all(np.isfinite(leaf)) and np.max(np.abs(leaf)) > 0, path


def _with_jax_attention(m):
    """`m` computing its parallel form with `jax.nn.dot_product_attention`'s XLA path
    (`implementation="xla"`), parameters shared."""
    new = copy.copy(m)
    object.__setattr__(new, "implementation", "xla")
    return new


@pytest.mark.parametrize("packed", [False, True], ids=["one-document", "packed"])
@pytest.mark.parametrize("case", CASES)
def test_cpu_einsum_and_band_match_dot_product_attention(case, packed):
    """On CPU `__call__` runs its own einsum-softmax (and, for local attention over a
    sequence much longer than the window, only the band: window 5 at T = 37, and the
    masked full product at T = 9). Both equal the float64 reference and
    `jax.nn.dot_product_attention`, in values and gradients, with and without resets,
    at odd lengths."""
    if jax.default_backend() != "cpu":
        pytest.skip("the einsum and band paths are taken on the CPU backend")
    m = make(case, f64)
    if m.window is not None:
        assert _band_attention_pays(T, m.window) and not _band_attention_pays(9, m.window)
    for n in (T, 9):
        resets = RESETS[:n] if packed else np.zeros(n, bool)
        x = jnp.asarray(draw(case, (n, D_MODEL)), f64)
        w = jnp.asarray(draw(case, (n, D_MODEL), "w"), f64)
        r = jnp.asarray(resets)
        y, g = value_and_grads(lambda m, x, r=r: m(x, resets=r))(m, x, w)
        y_ref, g_ref = value_and_grads(
            numpy_rules(lambda m, x, resets=resets: reference(m, x, resets))
        )(m, x, w)
        jax_path = value_and_grads(lambda m, x, r=r: _with_jax_attention(m)(x, resets=r))
        y_jax, g_jax = jax_path(m, x, w)
        assert_close(y, y_ref, 1e-9, f"T={n}: values against the reference")
        assert_close(g, g_ref, 1e-9, f"T={n}: gradients against the reference")
        assert_close(y, y_jax, 1e-6, f"T={n}: values against dot_product_attention")
        assert_close(g, g_jax, 1e-6, f"T={n}: gradients against dot_product_attention")


def _steps(m, state, xs):
    state, ys = jax.lax.scan(lambda s, xt: m.step(xt, s)[::-1], state, xs)
    return ys, state


def _lanes(fn, *args):
    """`fn` on two inputs at once (one compiled copy instead of two); each argument is
    a pair, and so is the result."""
    out = jax.vmap(fn)(*(jax.tree.map(lambda *v: jnp.stack(v), *a) for a in args))
    return tuple(jax.tree.map(lambda v, i=i: v[i], out) for i in range(2))


@eqx.filter_jit
def contract_forms(m, x, t0):
    """Everything the mixer contract promises, in one compiled program (forms of equal
    shapes share a compiled copy through `_lanes`). `r` packs two documents, `x[:SPLIT]`
    and `x[SPLIT:]`; `zeros` are resets that never fire."""
    x1, x2 = x[:SPLIT], x[SPLIT:]
    cut = SPLIT + 4  # a prefix that ends inside the second document
    r = jnp.zeros(T, bool).at[SPLIT].set(True)
    zeros = jnp.zeros(T, bool)
    s0 = m.init_state()

    def prefill(x, s, resets):
        return m.prefill(x, s, resets=resets)

    # The whole sequence, as one row and as two packed documents.
    (y, s_full), (y_pf_packed, _) = _lanes(prefill, (x, x), (s0, s0), (zeros, r))
    y_step, s_step = _steps(m, s0, x)
    # Two prefills, and a reset at the second one's first token, which hides the cache.
    y1, s1 = m.prefill(x1, s0)
    (y2, s2), (y_pf_hidden, _) = _lanes(
        prefill, (x2, x2), (s1, s1), (zeros[SPLIT:], r[SPLIT:])
    )
    # Prefill a prefix, step the rest; with the packed prefix, the steps must carry on
    # inside the second document (its start and positions are in the state).
    (_, s_cut), (_, s_cut_packed) = _lanes(
        prefill, (x[:cut], x[:cut]), (s0, s0), (zeros[:cut], r[:cut])
    )
    (y_rest, s_rest), (y_after, _) = _lanes(
        lambda s, xs: _steps(m, s, xs), (s_cut, s_cut_packed), (x[cut:], x[cut:])
    )
    y_call, y_pert = jax.vmap(m)(jnp.stack([x, x.at[t0].add(1.0)]))
    y16 = cast(m, jnp.bfloat16)(x.astype(jnp.bfloat16))
    return dict(
        y=y,
        y_call=y_call,
        y_step=y_step,
        y_prefills=jnp.concatenate([y1, y2]),
        y_prefix_steps=jnp.concatenate([y[:cut], y_rest]),
        s_full=s_full,
        s_step=s_step,
        s2=s2,
        s_rest=s_rest,
        y_pert=y_pert,
        y_packed=m(x, resets=r),
        y_pf_packed=y_pf_packed,
        y_pf_hidden=y_pf_hidden,
        y_after=y_after,
        doc_start_packed=s_cut_packed.doc_start,
        y16=y16,
    )


@pytest.mark.parametrize("case", CASES)
def test_recurrent_forms_causality_bf16(case):
    """`m(x) == prefill == step by step == prefill then step == two prefills`
    (outputs and caches); packed documents through `prefill` and the steps after it;
    causal; bfloat16 close to float32."""
    m = make(case)
    x = jnp.asarray(draw(case, (T, D_MODEL)), f32)
    t0 = 20
    r = contract_forms(m, x, t0)
    y = r["y"]
    assert y.dtype == f32 and y.shape == (T, D_MODEL)
    assert_close(r["y_call"], y, 1e-5, "__call__ (vmapped) against prefill")
    assert_close(r["y_step"], y, 1e-5, "step by step")
    assert_close(r["y_prefills"], y, 1e-5, "two prefills")
    assert_close(r["y_prefix_steps"], y, 1e-5, "prefill a prefix, step the rest")
    for name in ("s_step", "s2", "s_rest"):
        assert_close(r[name], r["s_full"], 1e-5, f"cache ({name})")
        np.testing.assert_array_equal(r[name].pos, r["s_full"].pos)
    assert int(r["s_full"].index) == T and int(r["s_full"].doc_start) == 0
    np.testing.assert_allclose(r["y_pert"][:t0], y[:t0], rtol=0, atol=1e-6)
    assert rel_err(r["y_pert"][t0:], y[t0:]) > 1e-3
    packed = r["y_packed"]
    assert rel_err(packed, y) > 1e-2  # the boundary matters
    assert_close(r["y_pf_packed"], packed, 1e-5, "packed prefill")
    assert_close(r["y_pf_hidden"], packed[SPLIT:], 1e-5, "a reset hides the cache")
    assert_close(r["y_after"], packed[SPLIT + 4 :], 1e-5, "steps after a reset")
    # RoPE scores depend on position differences only, so restarting positions at a
    # document is invisible in the outputs (attention is masked to the document); the
    # cache records where the document began.
    assert int(r["doc_start_packed"]) == SPLIT
    assert r["y16"].dtype == jnp.bfloat16
    assert rel_err(r["y16"].astype(f32), y) < 5e-2
    # The cache holds `window` (local) or `max_len` (global) entries at any length.
    C = m.window if m.window is not None else m.max_len
    assert r["s_full"].k.shape == (C, m.num_kv_heads, m.head_dim)
    if m.window is not None:  # the ring buffer holds the last `window` tokens
        assert sorted(np.asarray(r["s_full"].pos)) == list(range(T - C, T))
    else:
        np.testing.assert_array_equal(r["s_full"].pos[:T], np.arange(T))
        assert np.all(np.asarray(r["s_full"].pos[T:]) == -1)
    with raises_as_user(ValueError, match="vmap"):
        m(jnp.stack([x, x]))
    with raises_as_user(ValueError, match="vmap"):
        m.step(x[:2], m.init_state())
    with raises_as_user(ValueError, match="resets"):
        m(x, resets=jnp.zeros(T - 1, bool))


def test_global_cache_limit_and_options():
    """Global attention's cache: `max_len` is needed and never silently exceeded; the
    registry, the local default window and the constructor's checks (traced with
    `eqx.filter_eval_shape`: nothing to compile)."""
    m = make("global")  # max_len 40
    x = jnp.asarray(draw("limit", (m.max_len + 1, D_MODEL)), f32)
    with pytest.raises(Exception, match="max_len"):
        jax.block_until_ready(eqx.filter_jit(m.prefill)(x, m.init_state()))

    def build(cls=layers.Attention, **kwargs):
        return eqx.filter_eval_shape(lambda: cls(D_MODEL, **kwargs, key=jr.key(0)))

    with pytest.raises(ValueError, match="max_len"):
        build(num_heads=2).init_state()
    assert layers.MIXERS["attention"] is layers.Attention
    assert layers.MIXERS["local_attention"] is layers.LocalAttention
    local = build(layers.LocalAttention, num_heads=2)
    assert local.window == 128 and local.cache_size == 128
    assert eqx.filter_eval_shape(local.init_state).k.shape == (128, 2, 4)
    assert isinstance(local, layers.AbstractAttention)
    assert build(num_heads=2, window=3).cache_size == 3
    gqa = build(num_heads=4, num_kv_heads=2, qk_norm=True)
    assert gqa.k_proj.weight.shape == (4, D_MODEL) and gqa.q_norm.shape == (2,)
    for kwargs, match in [
        (dict(num_heads=4, num_kv_heads=3), "num_kv_heads"),
        (dict(num_heads=3), "d_model"),
        (dict(num_heads=2, head_dim=3), "even"),
        (dict(num_heads=2, window=0), "window"),
        (dict(num_heads=2, implementation="flash"), "implementation"),
    ]:
        with raises_as_user(ValueError, match=match):
            build(**kwargs)
    with raises_as_user(ValueError, match="integer"):
        build(layers.LocalAttention, window=None)
    assert set(jax.tree.leaves(layers.ssm_param_labels(m))) == {"other"}


# ------------------------------------------------------------------------ hybrid stacks


@eqx.filter_jit
def model_forms(model, packed, tokens):
    """A hybrid model's parallel form, prefill then steps; a packed row through a model
    of attention blocks, in parallel and through prefill, and its documents apart."""
    y = model(tokens)
    y1, s1 = model.prefill(tokens[:SPLIT], model.init_state())
    y_rest, _ = _steps(model, s1, tokens[SPLIT:])
    r = jnp.zeros(T, bool).at[SPLIT].set(True)
    return dict(
        y=y,
        y_prefill_steps=jnp.concatenate([y1, y_rest]),
        y_packed=packed(tokens, resets=r),
        y_pf_packed=packed.prefill(tokens, packed.init_state(), resets=r)[0],
        y_separate=jnp.concatenate([packed(tokens[:SPLIT]), packed(tokens[SPLIT:])]),
    )


def test_hybrid_sequence_model():
    """A list of mixers is repeated (and cut) to `n_layers`, with options keyed by
    mixer; prefill then step equals the parallel form; `resets` reach the mixers
    through `Block` and `SequenceModel`."""
    model = with_random_parameters(
        lambda: layers.SequenceModel(
            ["rglru", "local_attention"],
            8,
            3,
            11,
            vocab_size=11,
            mixer_kwargs={"local_attention": {"window": 4, "num_heads": 2}},
            key=jr.key(0),
        ),
        1,
        f32,
    )
    kinds = [type(b.mixer) for b in model.blocks]
    assert kinds == [layers.RGLRU, layers.LocalAttention, layers.RGLRU]
    assert model.blocks[1].mixer.window == 4
    packed = with_random_parameters(
        lambda: layers.SequenceModel(
            ["attention", "local_attention"],
            8,
            2,
            11,
            vocab_size=11,
            mixer_kwargs={"attention": {"max_len": T}, "local_attention": {"window": 6}},
            key=jr.key(0),
        ),
        2,
        f32,
    )
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, 11, T), jnp.int32)
    r = model_forms(model, packed, tokens)
    assert r["y"].shape == (T, 11)
    assert_close(r["y_prefill_steps"], r["y"], 1e-5, "prefill a prompt, then steps")
    assert_close(r["y_packed"], r["y_separate"], 1e-5, "packed documents")
    assert_close(r["y_pf_packed"], r["y_separate"], 1e-5, "packed documents, prefill")
    with pytest.raises(ValueError, match=r"mixer\[1\]"):
        layers.SequenceModel(["rglru", "nope"], 8, 2, 11, vocab_size=11, key=jr.key(0))
    with pytest.raises(ValueError, match="mixer_kwargs.window"):
        layers.SequenceModel(
            ["rglru"], 8, 2, 11, vocab_size=11, mixer_kwargs={"window": 3}, key=jr.key(0)
        )


# ------------------------------------------------------------------- hybrid configs

HYBRID_RUN = {
    "model": {
        "mixer": ["rglru", "local_attention"],
        "d_model": 16,
        "n_layers": 2,
        "mixer_kwargs": {"local_attention": {"window": 8, "num_heads": 2}},
    },
    "task": {"name": "lm", "paths": ["docs/*.txt"], "seq_len": 24, "cache_dir": "cache"},
    "optim": {"warmup_steps": 1},
    "train": {
        "steps": 3,
        "batch_size": 4,
        "eval_every": 0,
        "eval_batch_size": 8,
        "progress": False,
    },
    "logging": {"plot": False},
}


def test_hybrid_config_errors_name_the_key(tmp_path, capsys):
    """A list of mixers in a config, and its mistakes: each names its key."""
    import train
    from train import cli

    config = train.config.parse(HYBRID_RUN)
    assert config.model.mixer == ["rglru", "local_attention"]
    assert config.model.kwargs_by_mixer()["local_attention"] == {
        "window": 8,
        "num_heads": 2,
    }
    again = train.config.parse(yaml.safe_load(yaml.safe_dump(train.config.to_dict(config))))
    assert again == config
    flat = train.config.parse(
        {"model": {"mixer": "attention", "mixer_kwargs": {"window": 4}}}
    )
    assert flat.model.kwargs_by_mixer() == {"attention": {"window": 4}}

    def model_error(model):
        return {"model": {**HYBRID_RUN["model"], **model}}

    cases = [
        (model_error({"mixer": ["rglru", "transformer"]}), "model.mixer[1]: unknown mixer"),
        (model_error({"mixer": []}), "model.mixer: an empty list"),
        (model_error({"mixer_kwargs": {"mamba": {}}}), "model.mixer_kwargs.mamba"),
        (model_error({"mixer_kwargs": {"window": 8}}), "model.mixer_kwargs.window"),
        (
            model_error({"mixer_kwargs": {"local_attention": {"windw": 8}}}),
            "model.mixer_kwargs.local_attention.windw: not an option",
        ),
        (
            model_error({"mixer_kwargs": {"local_attention": {"window": 0}}}),
            "model.mixer_kwargs.local_attention.window: must be an integer >= 1",
        ),
        (
            {"model": {"mixer": "rglru", "mixer_kwargs": {"windw": 8}}},
            "model.mixer_kwargs.windw",
        ),
    ]
    for raw, expected in cases:
        with pytest.raises(train.ConfigError) as exc:
            train.config.parse(raw)
        assert expected in str(exc.value), (expected, str(exc.value))
    # Knowable only with the task: a window longer than its sequences, also the default
    # one; through the CLI, exit 2 and nothing written.
    docs = tmp_path / "docs"
    docs.mkdir()
    (docs / "a.txt").write_text("some text for a corpus. " * 20)
    for window, expected in [(25, "(25)"), (None, "(128, its default)")]:
        raw = yaml.safe_load(yaml.safe_dump(HYBRID_RUN))
        raw["model"]["mixer_kwargs"] = (
            {} if window is None else {"local_attention": {"window": window}}
        )
        raw["task"].update(paths=[str(docs / "*.txt")], cache_dir=str(tmp_path / "cache"))
        path = tmp_path / "bad.yaml"
        path.write_text(yaml.safe_dump(raw))
        with pytest.raises(SystemExit) as exc:
            cli.train_main([str(path), "--run-dir", str(tmp_path / "never")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert "model.mixer_kwargs.local_attention.window" in err and expected in err, err
        assert "longer than the task's sequences (24)" in err and "Traceback" not in err
        assert not (tmp_path / "never").exists()


def test_hybrid_run_trains_restores_and_finetunes(tmp_path, monkeypatch):
    """A Griffin-style config (`[rglru, local_attention]`) through `ssm-train`;
    fine-tuning's `load_matching` into a model built from the config; the model
    rebuilt from the run's `config.yaml` with its checkpoint restored, as `--resume`,
    `ssm-eval` and `ssm-generate` do."""
    import train
    from train import cli
    from train.checkpoint import Checkpointer, flatten
    from train.finetune import load_matching

    docs = tmp_path / "docs"
    docs.mkdir()
    for i, text in enumerate(
        ["def add(a, b):\n    return a + b\n", "the quick brown fox\n"]
    ):
        (docs / f"{i}.txt").write_text(text * 12)
    monkeypatch.chdir(tmp_path)
    path = tmp_path / "hybrid.yaml"
    path.write_text(yaml.safe_dump(HYBRID_RUN))
    run_dir = tmp_path / "run"
    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict
        cli.train_main([str(path), "--run-dir", str(run_dir)])
        summary = json.loads((run_dir / "summary.json").read_text())
        assert summary["steps"] == 3 and np.isfinite(summary["val"]["loss"])
        saved = yaml.safe_load((run_dir / "config.yaml").read_text())
        assert saved["model"]["mixer"] == ["rglru", "local_attention"]
        # Fine-tuning builds the model from its own config and loads by parameter path.
        config = train.config.parse(HYBRID_RUN)
        task = train.build_task(config.task)
        model = train.build_model(config, task, jr.key(5))
        params = eqx.filter(model, eqx.is_array)
        loaded, report = load_matching(params, run_dir, report=lambda m: None)
        assert not report["skipped"] and "blocks.1.mixer.q_proj.weight" in report["loaded"]
        fresh = np.asarray(params.blocks[1].mixer.q_proj.weight)
        assert not np.array_equal(np.asarray(loaded.blocks[1].mixer.q_proj.weight), fresh)
        # What --resume, ssm-eval and ssm-generate do: rebuild the model from the run's
        # config.yaml and restore the checkpoint into it.
        _, _, restored, step = cli._load_run(run_dir, "latest")
        assert step == 3
        assert [type(b.mixer) for b in restored.blocks] == [
            layers.RGLRU,
            layers.LocalAttention,
        ]
        stored, _ = Checkpointer(run_dir / "checkpoints").read_raw(3)
        for name, value in flatten(eqx.filter(restored, eqx.is_array)).items():
            np.testing.assert_array_equal(np.asarray(value), stored["params." + name])
