"""`train.hf`: Hugging Face checkpoints in and out, against the reference's logits.

The fixtures under `tests/fixtures/hf/` are tiny random `transformers` models with the
reference's float64 logits on fixed odd-length token sequences
(`scripts/make_hf_fixtures.py`). Nothing here needs torch, except the live test at
the end, which is skipped without `torch` and `transformers`.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
from safetensors.numpy import load_file, save_file

import layers
from train.hf import MODEL_TYPES, HFError, load_hf, save_hf
from train.hf._tree import arrays_of

from .helpers import rel_err

FIXTURES = Path(__file__).parent / "fixtures" / "hf"
NAMES = [
    "mamba_tied",
    "mamba_untied",
    "falcon_mamba",
    "mamba2_groups",
    "mamba2_tied",
    "xlstm_single",
    "xlstm_fused",
    "recurrent_gemma",
    "recurrent_gemma_untied",
]
# the model types whose blocks have an MLP
WITH_MLP = ("xlstm", "recurrent_gemma")
TOL = 1e-4  # float32 against the reference's float64 logits
SPLIT = 9  # prefill this many tokens, then step the rest


def reference(name):
    data = np.load(FIXTURES / name / "logits.npz")
    return jnp.asarray(data["tokens"], jnp.int32), data["logits"]


@eqx.filter_jit
def parallel(model, tokens):
    return jax.vmap(model)(tokens)


@eqx.filter_jit
def parallel_and_generated(model, tokens):
    """Per-step logits of the parallel form (a batch), and of `prefill` on the first
    `SPLIT` tokens of the first sequence followed by `step` on the rest."""
    par = jax.vmap(model)(tokens)
    seq = tokens[0]
    head, state = model.prefill(seq[:SPLIT], model.init_state())

    def one(state, token):
        y, state = model.step(token, state)
        return state, y

    _, tail = jax.lax.scan(one, state, seq[SPLIT:])
    return par, jnp.concatenate([head, tail])


@pytest.mark.parametrize("name", NAMES)
def test_logits_match_reference(name):
    # chunk 4: the odd lengths (23, 9) end inside a chunk, and prefill starts at one
    model, info = load_hf(FIXTURES / name, chunk_size=4)
    assert (
        info["model_type"]
        == json.loads((FIXTURES / name / "config.json").read_text())["model_type"]
    )
    # tied: the flag, and no lm_head stored (transformers' xLSTM ignores the flag)
    stored = load_file(FIXTURES / name / "model.safetensors")
    tied = info["config"]["tie_word_embeddings"] and "lm_head.weight" not in stored
    assert (model.head is None) == tied
    assert all(
        (b.mlp is None) == (info["model_type"] not in WITH_MLP) for b in model.blocks
    )
    tokens, ref = reference(name)
    par, gen = parallel_and_generated(model, tokens)
    assert par.dtype == jnp.float32
    assert rel_err(par, ref) <= TOL, rel_err(par, ref)
    assert rel_err(gen, ref[0]) <= TOL, rel_err(gen, ref[0])


@pytest.mark.parametrize(
    "name, option",
    [
        ("mamba_untied", "layer_norm_epsilon"),
        ("falcon_mamba", "mixer_rms_eps"),
        ("mamba2_tied", "layer_norm_epsilon"),
        ("xlstm_fused", "norm_eps"),
        ("recurrent_gemma_untied", "rms_norm_eps"),
        ("recurrent_gemma", "attention_window_size"),
    ],
)
def test_tolerance_sees_an_option(name, option, tmp_path):
    """The comparison is sharp enough to see an option: these fixtures' norms have
    eps 1e-3, and reading it as 1e-5 moves the logits past the tolerance (and a
    window of 5 read as 6)."""
    d = _copy(tmp_path, name)
    _edit_config(d, **{option: 6 if option == "attention_window_size" else 1e-5})
    model, _ = load_hf(d)
    tokens, ref = reference(name)
    assert rel_err(parallel(model, tokens), ref) > 3 * TOL


@pytest.mark.parametrize("name", NAMES)
def test_save_load_round_trip_exact(name, tmp_path):
    model, _ = load_hf(FIXTURES / name)
    out = save_hf(model, tmp_path / "out")
    again, info = load_hf(out)
    assert_same_model(model, again)
    # the written tensors are the original ones (plus zero conv biases where the
    # original had none: the saved config then says use_conv_bias: true)
    original = load_file(FIXTURES / name / "model.safetensors")
    written = load_file(out / "model.safetensors")
    if name == "xlstm_fused":
        return  # written unfused (weight_mode: single): the model equality is the check
    for k, v in original.items():
        np.testing.assert_array_equal(written[k], v, err_msg=k)
    for k in set(written) - set(original):
        assert k.endswith("conv1d.bias") and not np.any(written[k]), k
    assert info["config"]["tie_word_embeddings"] == (model.head is None)


def test_sharded_and_half_precision(tmp_path):
    """A sharded checkpoint (index + two files) and bfloat16/float16 tensors load to
    the same model as widening the values to float32 would."""
    src = FIXTURES / "mamba2_groups"
    tensors = load_file(src / "model.safetensors")
    names = sorted(tensors)
    shards = {"model-00001-of-00002.safetensors": names[::2]}
    shards["model-00002-of-00002.safetensors"] = names[1::2]
    d = tmp_path / "sharded"
    d.mkdir()
    shutil.copy(src / "config.json", d)
    weight_map = {}
    for file, keys in shards.items():
        half = {}
        for k in keys:
            v = tensors[k]
            if "in_proj" in k:  # bfloat16: the top 16 bits of the float32 pattern
                half[k] = v
            else:
                half[k] = v.astype(np.float16)
            weight_map[k] = file
        _save_with_bf16(half, d / file, bf16={k for k in keys if "in_proj" in k})
    (d / "model.safetensors.index.json").write_text(json.dumps({"weight_map": weight_map}))
    model, _ = load_hf(d)
    again, _ = load_hf(save_hf(model, d))  # saving over it replaces index and shards
    assert sorted(p.name for p in d.iterdir()) == ["config.json", "model.safetensors"]
    assert_same_model(model, again)
    base, _ = load_hf(src)
    flat = dict(jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array)))
    flat_base = dict(jax.tree_util.tree_leaves_with_path(eqx.filter(base, eqx.is_array)))
    for path, v in flat.items():
        name = jax.tree_util.keystr(path)
        b = np.asarray(flat_base[path])
        if "in_proj" in name:
            bits = (b.view(np.uint32) >> 16 << 16).view(np.float32)
            np.testing.assert_array_equal(np.asarray(v), bits, err_msg=name)
        else:
            np.testing.assert_array_equal(
                np.asarray(v), b.astype(np.float16).astype(np.float32), err_msg=name
            )


def _save_with_bf16(tensors, file, bf16):
    """safetensors' numpy API has no bfloat16: write the float32 values truncated to
    bfloat16 by hand, in the format's layout (a JSON header, then raw bytes)."""
    header, blobs, offset = {}, [], 0
    for k, v in tensors.items():
        if k in bf16:
            raw = (np.asarray(v, np.float32).view(np.uint32) >> 16).astype("<u2").tobytes()
            dtype = "BF16"
        else:
            raw = np.ascontiguousarray(v).tobytes()
            dtype = {np.float16: "F16", np.float32: "F32"}[v.dtype.type]
        header[k] = {
            "dtype": dtype,
            "shape": list(v.shape),
            "data_offsets": [offset, offset + len(raw)],
        }
        blobs.append(raw)
        offset += len(raw)
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    file.write_bytes(len(text).to_bytes(8, "little") + text + b"".join(blobs))


def assert_same_model(a, b):
    """Same structure, static fields and dtypes, and bitwise-equal arrays."""
    la, ta = jax.tree_util.tree_flatten(a)
    lb, tb = jax.tree_util.tree_flatten(b)
    assert ta == tb
    for x, y in zip(la, lb, strict=True):
        if eqx.is_array(x):
            assert x.dtype == y.dtype
            np.testing.assert_array_equal(np.asarray(x), np.asarray(y))
        else:
            assert x == y


# ------------------------------------------------------------------------ bad input


def _copy(tmp_path, name="mamba_tied"):
    d = tmp_path / name
    shutil.copytree(FIXTURES / name, d)
    return d


def _edit_config(d, **changes):
    config = json.loads((d / "config.json").read_text())
    config.update(changes)
    (d / "config.json").write_text(json.dumps(config))


def _edit_tensors(d, fn):
    tensors = load_file(d / "model.safetensors")
    save_file(fn(tensors), d / "model.safetensors", metadata={"format": "pt"})


def test_missing_config(tmp_path):
    d = _copy(tmp_path)
    (d / "config.json").unlink()
    with pytest.raises(HFError, match="no config.json"):
        load_hf(d)
    with pytest.raises(HFError, match="not a directory"):
        load_hf(tmp_path / "nowhere")


def test_unknown_model_type(tmp_path):
    d = _copy(tmp_path)
    _edit_config(d, model_type="llama")
    with pytest.raises(HFError, match="model_type 'llama' is not supported; supported: "):
        load_hf(d)
    config = json.loads((d / "config.json").read_text())
    del config["model_type"]
    (d / "config.json").write_text(json.dumps(config))
    with pytest.raises(HFError, match="'model_type' is missing"):
        load_hf(d)
    assert set(MODEL_TYPES) >= {"mamba", "mamba2"}


def test_missing_tensor(tmp_path):
    d = _copy(tmp_path)
    _edit_tensors(d, lambda t: {k: v for k, v in t.items() if "layers.1.mixer.D" not in k})
    with pytest.raises(HFError, match=r"'backbone.layers.1.mixer.D' is missing.*\(32,\)"):
        load_hf(d)


def test_misshaped_tensor(tmp_path):
    d = _copy(tmp_path, "mamba2_groups")
    key = "backbone.layers.0.mixer.conv1d.weight"
    _edit_tensors(d, lambda t: {**t, key: t[key][:, :, :3]})
    with pytest.raises(
        HFError, match=rf"'{key}' has shape \(56, 1, 3\), expected \(56, 1, 4\)"
    ):
        load_hf(d)


def test_unused_tensor(tmp_path):
    d = _copy(tmp_path)
    _edit_tensors(
        d, lambda t: {**t, "backbone.layers.0.mlp.weight": np.ones((2, 2), np.float32)}
    )
    with pytest.raises(HFError, match="mlp.weight'.* not used"):
        load_hf(d)


def test_unsupported_dtype(tmp_path):
    d = _copy(tmp_path)
    key = "backbone.norm_f.weight"
    _edit_tensors(d, lambda t: {**t, key: t[key].astype(np.int8)})
    with pytest.raises(HFError, match=f"'{key}' has dtype I8, which float32"):
        load_hf(d)


def test_no_weights_and_bad_index(tmp_path):
    d = _copy(tmp_path)
    (d / "model.safetensors").rename(d / "pytorch_model.bin")
    with pytest.raises(HFError, match=r"no model.safetensors.*only safetensors"):
        load_hf(d)
    (d / "model.safetensors.index.json").write_text(
        json.dumps({"weight_map": {"a": "model-00001-of-00002.safetensors"}})
    )
    with pytest.raises(HFError, match="names shard"):
        load_hf(d)


@pytest.mark.parametrize(
    "name, field, value, message",
    [
        ("mamba_tied", "use_bias", True, "'use_bias' = True is not supported"),
        ("mamba_tied", "hidden_act", "gelu", "'hidden_act' = 'gelu' is not supported"),
        ("mamba_tied", "intermediate_size", 40, "not a multiple of hidden_size"),
        ("mamba_tied", "state_size", "5", "'state_size' must be int"),
        ("mamba2_groups", "time_step_limit", [0.0, 0.5], "'time_step_limit'"),
        ("mamba2_groups", "n_groups", 3, "n_groups 3 does not divide num_heads 4"),
        ("mamba2_groups", "head_dim", 4, "num_heads \\* head_dim = 16 differs"),
        ("xlstm_single", "use_bias", True, "'use_bias' = True is not supported"),
        ("xlstm_single", "weight_mode", "mixed", "'weight_mode' = 'mixed' is not"),
        ("xlstm_single", "num_heads", 3, "is not a multiple of num_heads 3"),
        ("recurrent_gemma", "block_types", ["recurrent", "mlp"], "'block_types' = "),
        ("recurrent_gemma", "hidden_activation", "gelu", "'hidden_activation' = 'gelu'"),
        ("recurrent_gemma", "num_key_value_heads", 2, "2 does not divide num_attenti"),
        ("recurrent_gemma", "lru_width", 25, "lru_width 25 is not a multiple of num_"),
        ("recurrent_gemma", "head_dim", 6, "'head_dim' = 6 differs from hidden_size"),
        ("recurrent_gemma", "rope_parameters", {"rope_type": "linear"}, "'linear' is"),
        (
            "recurrent_gemma_untied",
            "rope_parameters",
            {"partial_rotary_factor": 0.1},
            "rotates 0 channels",
        ),
    ],
)
def test_unsupported_options(tmp_path, name, field, value, message):
    d = _copy(tmp_path, name)
    _edit_config(d, **{field: value})
    with pytest.raises(HFError, match=message):
        load_hf(d)


def random_model(*args, **kwargs):
    """A `SequenceModel` with random values, built without running its initialiser
    eagerly (op by op that costs many small compilations)."""
    skeleton = eqx.filter_eval_shape(
        lambda: layers.SequenceModel(*args, **kwargs, key=jr.key(0))
    )
    rng = np.random.default_rng(0)
    return jax.tree.map(
        lambda s: (
            jnp.asarray(rng.normal(size=s.shape), s.dtype)
            if isinstance(s, jax.ShapeDtypeStruct)
            else s
        ),
        skeleton,
    )


def test_save_refuses_what_hf_cannot_hold(tmp_path):
    kw = dict(vocab_size=11)
    with pytest.raises(ValueError, match="no MLP"):
        save_hf(random_model("mamba", 8, 1, 11, **kw), tmp_path / "a")
    with pytest.raises(ValueError, match="one mixer of"):
        save_hf(random_model("gla", 8, 1, 11, mlp_ratio=0, **kw), tmp_path / "b")
    with pytest.raises(ValueError, match="one mixer of"):
        save_hf(random_model(["mamba", "mamba2"], 8, 2, 11, mlp_ratio=0, **kw), tmp_path)
    with pytest.raises(ValueError, match="pooling"):
        save_hf(
            random_model("mamba", 8, 1, 11, mlp_ratio=0, pooling="mean", **kw), tmp_path
        )
    model = random_model("mamba", 8, 1, 11, mlp_ratio=0, **kw)
    with pytest.raises(ValueError, match="non-zero bias"):
        save_hf(model, tmp_path / "c")
    # a zero bias is no bias (the trainer's models have one)
    model = eqx.tree_at(lambda m: m.head.bias, model, jnp.zeros(11, jnp.float32))
    again, _ = load_hf(save_hf(model, tmp_path / "d"))
    assert again.head.bias is None
    np.testing.assert_array_equal(again.head.weight, model.head.weight)


# ------------------------------------------------------------------------ live


def test_live_against_transformers(tmp_path):
    """Fresh random models built by `transformers`, compared live; and our saved
    model loaded back by `transformers` gives our logits."""
    torch = pytest.importorskip("torch")
    pytest.importorskip("transformers")
    import importlib.util

    spec = importlib.util.spec_from_file_location(
        "make_hf_fixtures", Path(__file__).parents[1] / "scripts" / "make_hf_fixtures.py"
    )
    fixtures = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(fixtures)
    import transformers

    tokens = np.random.default_rng(7).integers(0, fixtures.VOCAB, size=(1, 17))
    names = ["mamba_untied", "mamba2_groups", "xlstm_single", "recurrent_gemma"]
    for i, name in enumerate(names):
        model_type, options = fixtures.FIXTURES[name]
        if model_type not in fixtures.CLASSES:  # an older transformers
            continue
        ref_model = fixtures.build(model_type, options, seed=1000 + i)
        ref_model.save_pretrained(tmp_path / name)
        ref = fixtures.reference_logits(ref_model, tokens)
        ours, _ = load_hf(tmp_path / name)
        out = parallel(ours, jnp.asarray(tokens, jnp.int32))
        assert rel_err(out, ref) <= TOL
        # ours -> transformers: perturb so the weights are not the ones it made
        ours = jax.tree.map(lambda a: a * 1.01 if eqx.is_array(a) else a, ours)
        save_hf(ours, tmp_path / f"{name}_ours")
        back = transformers.AutoModelForCausalLM.from_pretrained(tmp_path / f"{name}_ours")
        with torch.no_grad():
            theirs = back.eval()(torch.as_tensor(tokens), use_cache=False).logits.numpy()
        out = parallel(ours, jnp.asarray(tokens, jnp.int32))
        assert rel_err(out, theirs) <= TOL


# ------------------------------------------------------------------------ the CLI


def _lm_config(tmp_path, src):
    """A tiny language-modelling fine-tune of `src` on a short corpus (its tokenizer:
    the checkpoint's `tokenizer.json`), 2 steps, checkpointed at the end."""
    (tmp_path / "corpus.txt").write_text(
        "the quick brown fox jumps over the lazy dog.\n" * 9
    )
    return {
        "init_from": f"hf:{src}",
        "task": {
            "name": "lm",
            "paths": [str(tmp_path / "corpus.txt")],
            "documents": "none",
            "seq_len": 15,
            "cache_dir": str(tmp_path / "cache"),
        },
        "optim": {"lr": 1e-3, "warmup_steps": 0},
        "train": {
            "steps": 2,
            "batch_size": 4,
            "eval_every": 2,
            "eval_batch_size": 4,
            "checkpoint_every": 2,
            "progress": False,
        },
        "logging": {"plot": False},
    }


def test_init_from_hf_takes_the_model_and_the_tokenizer(tmp_path):
    """`init_from: hf:PATH` takes the model section and the tokenizer from the
    checkpoint and starts from its exact function (on the tokenizer's vocabulary, a
    prefix of the checkpoint's); the next test trains one through the CLI."""
    import yaml

    from train import config as config_lib, data
    from train.finetune import load_matching
    from train.trainer import build_model

    src = _copy(tmp_path, "mamba_tied")  # with a 33-token tokenizer.json
    raw = _lm_config(tmp_path, src)
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    config = config_lib.load(cfg, [])
    assert (config.model.mixer, config.model.d_model, config.model.n_layers) == (
        "mamba",
        16,
        2,
    )
    assert config.model.mlp_ratio == 0
    assert config.model.mixer_kwargs == {
        "d_state": 5,
        "d_conv": 4,
        "expand": 2,
        "dt_rank": 3,
    }
    assert config.task.tokenizer == str(src / "tokenizer.json")
    assert config.train.freeze == ["head.bias"]
    with pytest.raises(config_lib.ConfigError, match="model.d_model: 32 differs"):
        config_lib.load(cfg, ["model.d_model=32"])
    with pytest.raises(config_lib.ConfigError, match="model.hf_config: needs init_from"):
        config_lib.parse({"model": {"hf_config": config.model.hf_config}})

    # the trainer's model starts as the checkpoint's function on the tokenizer's 33
    # tokens: its parameters are the checkpoint's (the tied head is the embedding, the
    # bias zero); the two models' functions are compared in test_logits_match_reference
    task = data.build_task(config.task)
    model = eqx.filter_eval_shape(build_model, config, task, jr.key(0))
    params, static = eqx.partition(model, lambda x: isinstance(x, jax.ShapeDtypeStruct))
    params, report = load_matching(params, f"hf:{src}", report=lambda m: None)
    assert sorted(report["reshaped"])[0].startswith("embedding.weight (61 rows")
    hf = load_hf(src)[0]
    V = task.vocab_size
    np.testing.assert_array_equal(params.embedding.weight, hf.embedding.weight[:V])
    np.testing.assert_array_equal(params.head.weight, hf.embedding.weight[:V])
    np.testing.assert_array_equal(params.head.bias, np.zeros(V, np.float32))
    ours, theirs = arrays_of(eqx.combine(params, static)), arrays_of(hf)
    body = sorted(k for k in theirs if not k.startswith(("embedding.", "head.")))
    assert body == sorted(k for k in ours if not k.startswith(("embedding.", "head.")))
    for k in body:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert static.blocks[0].norm1.eps == hf.blocks[0].norm1.eps == static.norm.eps

    assert len(report["loaded"]) == 21
    # the trainer's untied head (its bias frozen at zero) exports as an lm_head
    exported, _ = load_hf(save_hf(eqx.combine(params, static), tmp_path / "out"))
    assert exported.head is not None and exported.head.weight.shape == (33, 16)
    np.testing.assert_array_equal(exported.head.weight, params.head.weight)


def test_finetune_xlstm_resume_and_generate_through_the_cli(tmp_path, capsys):
    """A model the model section cannot express (xLSTM 7B: `MLSTMLarge`, a SwiGLU MLP,
    norm epsilon 1e-6, soft-capped logits) is built from the checkpoint's
    `config.json`, kept as `model.hf_config`: it starts as the checkpoint's function,
    fine-tunes, and resumes, generates and exports without the checkpoint's
    directory."""
    import yaml

    from train import cli, config as config_lib
    from train.hf.__main__ import main as hf_main

    src = _copy(tmp_path, "xlstm_single")
    shutil.copyfile(FIXTURES / "mamba_tied" / "tokenizer.json", src / "tokenizer.json")
    raw = _lm_config(tmp_path, src)
    raw["model"] = {"d_model": 16, "mixer_kwargs": {"chunk_size": 4}}  # equal; free
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    config = config_lib.load(cfg, [])
    assert config.model.hf_config["model_type"] == "xlstm"
    assert (config.model.mixer, config.model.n_layers) == ("MLSTMLarge", 2)
    assert config.model.mixer_kwargs["chunk_size"] == 4
    assert config.model.mixer_kwargs["num_heads"] == 2
    for key, value in (
        ("model.mixer", "mlstm"),
        ("model.mlp_ratio", "4"),
        ("model.mixer_kwargs.num_heads", "4"),
    ):
        with pytest.raises(config_lib.ConfigError, match=f"{key}: .* the checkpoint's"):
            config_lib.load(cfg, [f"{key}={value}"])

    V = 33  # the tokenizer's vocabulary
    start = load_hf(src)[0].head.weight[:V]

    run = tmp_path / "run"
    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict
        cli.train_main([str(cfg), "--run-dir", str(run)])
        shutil.rmtree(src)  # from here on, the run directory is all there is
        cli.train_main(["--resume", str(run), "train.steps=4"])
        cli.generate_main([str(run), "--prompt", "the ", "--max-new-tokens", "4"])
        hf_main(["export", str(run), str(tmp_path / "out"), "--checkpoint", "latest"])
    assert "\nthe " in capsys.readouterr().out
    _, _, trained, step = cli._load_run(run, "latest")
    assert step == 4
    exported, info = load_hf(tmp_path / "out")  # save_hf is exact (tested above)
    assert info["model_type"] == "xlstm" and info["tokenizer"] is not None
    ours, theirs = arrays_of(trained), arrays_of(exported)
    np.testing.assert_array_equal(ours.pop("head.bias"), np.zeros(V, np.float32))
    assert sorted(ours) == sorted(theirs)
    for k in ours:
        np.testing.assert_array_equal(ours[k], theirs[k], err_msg=k)
    assert not np.array_equal(ours["head.weight"], start)  # it trained


@pytest.mark.parametrize("name", ["xlstm_single", "recurrent_gemma"])
def test_init_from_hf_starts_as_the_checkpoint(name, tmp_path):
    """The trainer's model of `init_from: hf:PATH`, built from `model.hf_config`, with
    the checkpoint's parameters is the checkpoint's function on the tokenizer's
    vocabulary (its logits a prefix of the checkpoint's), also for the models the
    model section cannot express (xLSTM 7B; RecurrentGemma: a hybrid stack with
    Gemma's norms and embedding scale); the resolved config reads back the same."""
    from train import config as config_lib, data
    from train.finetune import load_matching
    from train.trainer import build_model

    src = _copy(tmp_path, name)
    shutil.copyfile(FIXTURES / "mamba_tied" / "tokenizer.json", src / "tokenizer.json")
    config = config_lib.parse(_lm_config(tmp_path, src))
    assert config_lib.parse(config_lib.to_dict(config)) == config
    task = data.build_task(config.task)
    V = task.vocab_size
    params, static = eqx.partition(build_model(config, task, jr.key(0)), eqx.is_array)
    params, report = load_matching(params, f"hf:{src}", report=lambda m: None)
    assert not report["skipped"] and len(report["reshaped"]) == 3
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 11)), jnp.int32)
    start = parallel(eqx.combine(params, static), tokens)
    assert rel_err(start, parallel(load_hf(src)[0], tokens)[..., :V]) <= 1e-6


def test_init_from_hf_for_a_new_head_and_a_larger_vocabulary():
    """A classification head keeps its fresh initialisation; a vocabulary larger than
    the checkpoint's keeps fresh rows after the checkpoint's; a model section that
    does not match is an error, not a partial model."""
    from train.config import ConfigError
    from train.finetune import load_matching

    src = FIXTURES / "mamba_untied"
    hf = load_hf(src)[0]
    kw = dict(mlp_ratio=0, mixer_kwargs={"d_state": 4, "d_conv": 3, "expand": 3})

    def params_of(d_output, vocab, **extra):
        model = random_model("mamba", 12, 2, d_output, vocab_size=vocab, **kw, **extra)
        return eqx.partition(model, eqx.is_array)[0]

    fresh = params_of(3, 61, pooling="mean")
    params, report = load_matching(fresh, f"hf:{src}", report=lambda m: None)
    assert set(report["skipped"]) == {"head.weight", "head.bias"}
    np.testing.assert_array_equal(params.head.weight, fresh.head.weight)
    np.testing.assert_array_equal(params.embedding.weight, hf.embedding.weight)

    fresh = params_of(70, 70)
    params, report = load_matching(fresh, f"hf:{src}", report=lambda m: None)
    assert len(report["reshaped"]) == 3 and not report["skipped"]
    np.testing.assert_array_equal(params.head.weight[:61], hf.head.weight)
    np.testing.assert_array_equal(params.head.weight[61:], fresh.head.weight[61:])
    np.testing.assert_array_equal(params.head.bias[:61], np.zeros(61, np.float32))

    kw["mixer_kwargs"] = {"d_state": 5, "d_conv": 3, "expand": 3}
    with pytest.raises(ConfigError, match=r"x_proj.weight of shape \(9, 36\) in the"):
        load_matching(params_of(61, 61), f"hf:{src}")


def test_mlstm_large_against_the_equations(getkey):
    """`MLSTMLarge` (the xLSTM 7B mixer) against a float64 loop over the reference's
    recurrent step (query scaled, not the key), with a packed-document reset at an odd
    position, chunk 4 (the reset inside a chunk), and prefill followed by step."""
    from layers._mlstm_large import MLSTMLarge

    d, H, T, cap, eps = 8, 2, 13, 3.0, 1e-3
    mixer = MLSTMLarge(
        d, num_heads=H, gate_soft_cap=cap, norm_eps=eps, chunk_size=4, key=getkey()
    )
    b_i, b_f = jr.normal(getkey(), (H,)), 2.0 + jr.normal(getkey(), (H,))
    mixer = eqx.tree_at(lambda m: (m.igate.bias, m.fgate.bias), mixer, (b_i, b_f))
    mixer = eqx.tree_at(lambda m: m.norm_weight, mixer, 1 + jr.normal(getkey(), (d,)))
    x = jr.normal(getkey(), (T, d), jnp.float64)
    W = {
        n: np.asarray(getattr(mixer, n).weight, np.float64)
        for n in ("q", "k", "v", "ogate", "igate", "fgate", "out_proj")
    }
    dk, dv = mixer.d_qk // H, mixer.d_v // H

    def reference(xs):
        C, n, m, out = np.zeros((H, dk, dv)), np.zeros((H, dk)), np.zeros(H), []
        for u in xs:
            q = (W["q"] @ u).reshape(H, dk) / np.sqrt(dk)
            k, v = (W["k"] @ u).reshape(H, dk), (W["v"] @ u).reshape(H, dv)
            i = cap * np.tanh((W["igate"] @ u + np.asarray(b_i)) / cap)
            f = cap * np.tanh((W["fgate"] @ u + np.asarray(b_f)) / cap)
            log_f = -np.logaddexp(0.0, -f)
            m_new = np.maximum(log_f + m, i)
            fa, ia = np.exp(log_f + m - m_new), np.exp(i - m_new)
            C = fa[:, None, None] * C + ia[:, None, None] * k[:, :, None] * v[:, None, :]
            n = fa[:, None] * n + ia[:, None] * k
            den = np.maximum(np.abs(np.einsum("hk,hk->h", q, n)), np.exp(-m_new)) + 1e-6
            h = np.einsum("hk,hkv->hv", q, C) / den[:, None]
            m = m_new
            hc = h - h.mean(-1, keepdims=True)
            hn = (hc / np.sqrt((hc**2).mean(-1, keepdims=True) + eps)).reshape(-1)
            hn = hn * np.asarray(mixer.norm_weight, np.float64)
            out.append(W["out_proj"] @ (hn / (1 + np.exp(-(W["ogate"] @ u)))))
        return np.stack(out)

    xs = np.asarray(x)
    resets = jnp.zeros(T, bool).at[7].set(True)
    expected = np.concatenate([reference(xs[:7]), reference(xs[7:])])

    @eqx.filter_jit
    def run(mixer, x):
        y, state = mixer.prefill(x[:5], mixer.init_state())
        ys = [y]
        for t in range(5, 7):
            y_t, state = mixer.step(x[t], state)
            ys.append(y_t[None])
        return mixer(x, resets=resets), jnp.concatenate(ys)

    parallel_y, generated = run(mixer, x)
    assert rel_err(parallel_y, expected) <= 1e-10
    assert rel_err(generated, expected[:7]) <= 1e-10


def test_save_refuses_what_recurrent_gemma_cannot_hold(tmp_path):
    gemma = dict(
        vocab_size=11, mlp_hidden=6, mlp_bias=True, norm_offset=1.0,
        embed_scale=float(np.sqrt(8.0).astype(jnp.bfloat16)), logit_soft_cap=30.0,
        head_bias=False, tie_embeddings=True,
    )  # fmt: skip
    rg = {"rglru": {"d_rnn": 8, "num_heads": 2, "reset_rule": "recurrent_gemma"},
          "local_attention": {"num_heads": 2, "window": 3, "out_bias": True}}  # fmt: skip
    pattern = ["rglru", "local_attention"]
    model = random_model(pattern, 8, 2, 11, mixer_kwargs=rg, **gemma)
    again, info = load_hf(save_hf(model, tmp_path / "ok"))
    assert info["config"]["block_types"] == ["recurrent", "attention"]
    assert_same_model(model, again)
    paper = {**rg, "rglru": {"d_rnn": 8, "num_heads": 2}}
    with pytest.raises(ValueError, match="reset_rule='recurrent_gemma'"):
        save_hf(random_model(pattern, 8, 2, 11, mixer_kwargs=paper, **gemma), tmp_path)
    with pytest.raises(ValueError, match="norm_offset=1"):
        save_hf(random_model(pattern, 8, 2, 11, mixer_kwargs=rg,
                             **{**gemma, "norm_offset": 0.0}), tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="scales the embeddings by 2.828125"):
        save_hf(random_model(pattern, 8, 2, 11, mixer_kwargs=rg,
                             **{**gemma, "embed_scale": 8**0.5}), tmp_path)  # fmt: skip
    with pytest.raises(ValueError, match="one mixer of"):
        save_hf(random_model(["rglru", "mamba"], 8, 2, 11, **gemma), tmp_path)
    with pytest.raises(ValueError, match="norm_offset=0"):
        save_hf(random_model("mamba", 8, 1, 11, mlp_ratio=0, vocab_size=11,
                             norm_offset=1.0), tmp_path)  # fmt: skip


def test_recurrent_gemma_older_config_format(tmp_path):
    """A `config.json` written by `transformers` 4 (rope options at the top level,
    `embeddings_scale_by_sqrt_dim`, no `rope_parameters`) is the same model."""
    d = _copy(tmp_path, "recurrent_gemma_untied")
    config = json.loads((d / "config.json").read_text())
    rope = config.pop("rope_parameters")
    config.update(
        rope_theta=rope["rope_theta"],
        partial_rotary_factor=rope["partial_rotary_factor"],
        embeddings_scale_by_sqrt_dim=True,
    )
    (d / "config.json").write_text(json.dumps(config))
    model, _ = load_hf(d)
    assert_same_model(model, load_hf(FIXTURES / "recurrent_gemma_untied")[0])
    assert model.blocks[1].mixer.rotary_dim == 2 and model.blocks[1].mixer.rope_base == 100
