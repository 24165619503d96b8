"""`init_from: hf:PATH` of a RecurrentGemma checkpoint (a hybrid stack with options
the model section cannot name: embedding scale, Gemma norms, MLP biases): the trainer
builds the checkpoint's architecture from its `config.json`, starts from its exact
function, and exports a directory `load_hf` reads back (training and exporting
through the CLI are tested with other model types in `test_hf.py`)."""

from __future__ import annotations

import shutil
from pathlib import Path

import equinox as eqx
import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import yaml

from train.hf import load_hf, save_hf

from .helpers import rel_err

FIXTURES = Path(__file__).parent / "fixtures" / "hf"


def test_init_from_recurrent_gemma(tmp_path):
    from train import config as config_lib, data
    from train.finetune import load_matching
    from train.trainer import build_model

    src = tmp_path / "recurrent_gemma"
    shutil.copytree(FIXTURES / "recurrent_gemma", src)
    shutil.copyfile(FIXTURES / "mamba_tied" / "tokenizer.json", src / "tokenizer.json")
    (tmp_path / "corpus.txt").write_text(
        "the quick brown fox jumps over the lazy dog.\n" * 9
    )
    raw = {
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
    cfg = tmp_path / "ft.yaml"
    cfg.write_text(yaml.safe_dump(raw))
    config = config_lib.load(cfg, [])
    assert config.model.mixer == ["rglru", "rglru", "local_attention"]
    assert config.model.mixer_kwargs["rglru"]["reset_rule"] == "recurrent_gemma"
    assert config.model.mixer_kwargs["local_attention"]["window"] == 5

    # the trainer's model starts as the checkpoint's function on the tokenizer's tokens
    task = data.build_task(config.task)
    V = task.vocab_size
    params, static = eqx.partition(build_model(config, task, jr.key(0)), eqx.is_array)
    params, report = load_matching(params, f"hf:{src}", report=lambda m: None)
    assert not report["skipped"]
    assert static.embed_scale == 4.90625 and static.norm_offset == 1.0
    tokens = jnp.asarray(np.random.default_rng(0).integers(0, V, (2, 11)), jnp.int32)
    logits = eqx.filter_jit(lambda m, t: jax.vmap(m)(t))
    start = logits(eqx.combine(params, static), tokens)
    assert rel_err(start, logits(load_hf(src)[0], tokens)[..., :V]) <= 1e-6

    # the trainer's untied head (bias frozen at zero) exports as an lm_head
    model = eqx.combine(params, static)
    exported, info = load_hf(save_hf(model, tmp_path / "out"))
    assert info["model_type"] == "recurrent_gemma" and exported.head is not None
    assert rel_err(logits(exported, tokens), start) <= 1e-6
