"""`task.eval_lengths`: evaluation splits at other lengths (`val_len{L}`,
`test_len{L}`), their generation, validation, and their place in a run's summary,
metrics and plot."""

from __future__ import annotations

import dataclasses
import json

import jax
import numpy as np
import pytest

import train
from train.config import ConfigError
from train.data import (
    CopyingConfig,
    InductionHeadsConfig,
    MQARConfig,
    SelectiveCopyingConfig,
    at_length,
    build_task,
    length_split,
)
from train.data._synthetic import length_seed

LENGTH_CONFIGS = [
    (CopyingConfig(num_tokens=3, lag=5, num_train=50, eval_lengths=[9, 20]), "lag"),
    (
        SelectiveCopyingConfig(
            vocab_size=8, num_tokens=4, context_len=12, num_train=50, eval_lengths=[30]
        ),
        "context_len",
    ),
    (
        MQARConfig(
            vocab_size=64, seq_len=32, num_kv_pairs=4, num_train=50, eval_lengths=[64, 16]
        ),
        "seq_len",
    ),
    (InductionHeadsConfig(seq_len=16, num_train=50, eval_lengths=[33, 64]), "seq_len"),
]


@pytest.mark.parametrize("config, key", LENGTH_CONFIGS, ids=lambda c: getattr(c, "name", c))
def test_length_splits_are_the_task_at_that_length(config, key):
    task = build_task(config)
    for length in config.eval_lengths:
        assert f"val_len{length}" in task.splits and f"test_len{length}" in task.splits
        copy = at_length(config, length)
        assert getattr(copy, key) == length and copy.eval_lengths == ()
        assert copy.seed == length_seed(config.seed, length) != config.seed
        direct = build_task(copy)
        for split in ("val", "test"):
            name = f"{split}_len{length}"
            assert task.size(name) == config.split_size(split)
            assert task.split_seq_len(name) == direct.seq_len
            idx = np.arange(min(7, task.size(name)))
            got, want = task.examples(name, idx), direct.examples(split, idx)
            for k in want:
                np.testing.assert_array_equal(got[k], want[k])
            assert got["inputs"].shape == (len(idx), direct.seq_len)
    # the splits at the training length are as before
    plain = build_task(dataclasses.replace(config, eval_lengths=()))
    assert plain.splits == ("train", "val", "test")
    np.testing.assert_array_equal(
        task.examples("val", np.arange(5))["inputs"],
        plain.examples("val", np.arange(5))["inputs"],
    )


def test_length_data_differ_from_training_data_at_the_same_length():
    config = InductionHeadsConfig(seq_len=32, num_train=200, eval_lengths=[32])
    task = build_task(config)
    train_rows = task.examples("train", np.arange(200))["inputs"]
    for split in ("val_len32", "test_len32"):
        rows = task.examples(split, np.arange(200))["inputs"]
        assert not {tuple(r) for r in rows.tolist()} & {
            tuple(r) for r in train_rows.tolist()
        }


def test_length_seed_is_deterministic_and_distinct():
    seeds = {length_seed(s, n) for s in range(4) for n in (16, 32, 64, 128)}
    assert len(seeds) == 16 and all(0 <= s < 2**63 for s in seeds)
    assert length_seed(3, 64) == length_seed(3, 64)


def test_length_split_names():
    assert length_split("val_len512") == ("val", 512)
    assert length_split("test_len7") == ("test", 7)
    assert length_split("test") is None and length_split("train_len4") is None


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "induction_heads", "eval_lengths": [64, -1]}, "must be positive"),
        ({"name": "induction_heads", "eval_lengths": [64, True]}, "expected int"),
        ({"name": "induction_heads", "eval_lengths": [2]}, "not a valid length"),
        ({"name": "mqar", "seq_len": 64, "num_kv_pairs": 8, "eval_lengths": [31]}, "31"),
        ({"name": "selective_copying", "eval_lengths": [8]}, "context_len: must be >="),
        ({"name": "mnist1d", "eval_lengths": [80]}, "unknown key task.eval_lengths"),
        ({"name": "lm_bytes", "eval_lengths": [80]}, "unknown key task.eval_lengths"),
    ],
)
def test_bad_eval_lengths_name_the_key(task, message):
    with pytest.raises(ConfigError, match="task.eval_lengths") as info:
        train.config.parse({"task": task})
    assert message in str(info.value)


RAW = {
    "model": {"mixer": "attention", "d_model": 8, "n_layers": 1, "mlp_ratio": 1},
    "task": {
        "name": "induction_heads",
        "vocab_size": 6,
        "seq_len": 12,
        "num_train": 64,
        "num_val": 8,
        "num_test": 8,
        "eval_lengths": [20, 40],
    },
    "optim": {"warmup_steps": 0},
    "train": {
        "steps": 2,
        "batch_size": 8,
        "eval_batch_size": 8,
        "eval_every": 0,
        "checkpoint_every": 0,
        "progress": False,
        "best_metric": "accuracy",
        "best_mode": "max",
    },
    "logging": {"plot": True},
}


@pytest.fixture(autouse=True, scope="module")
def standard_promotion():  # optax mixes Python floats and int32 counts
    with jax.numpy_dtype_promotion("standard"):
        yield


def test_run_reports_every_length(tmp_path):
    # attention's max_len (the KV cache of generation) below the longest eval length:
    # the parallel form that training and evaluation use takes any length
    raw = {**RAW, "model": {**RAW["model"], "mixer_kwargs": {"max_len": 16}}}
    summary = train.run(train.config.parse(raw), tmp_path / "run", say=lambda s: None)
    for split in ("val_len20", "test_len20", "val_len40", "test_len40"):
        assert set(summary[split]) == {"loss", "accuracy"}, split
        assert 0.0 <= summary[split]["accuracy"] <= 1.0
    on_disk = json.loads((tmp_path / "run" / "summary.json").read_text())
    assert on_disk["test_len40"] == summary["test_len40"]
    assert "val" in on_disk and "test" in on_disk  # best_metric stays on val
    records = [json.loads(x) for x in (tmp_path / "run" / "metrics.jsonl").open()]
    logged = {r["split"] for r in records if "len" in r["split"]}
    assert logged == {"val_len20", "test_len20", "val_len40", "test_len40"}
    assert (tmp_path / "run" / "curves.png").stat().st_size > 0


def test_plot_has_a_length_panel(tmp_path):
    from train.plot import _by_length, panel_names, plot_curves

    records = [
        {"step": 2, "split": "train", "loss": 1.0, "accuracy": 0.5},
        {"step": 2, "split": "val", "loss": 1.0, "accuracy": 0.5},
        {"step": 2, "split": "test_len64", "loss": 2.0, "accuracy": 0.3},
        {"step": 2, "split": "test_len16", "loss": 1.5, "accuracy": 0.4},
        {"step": 2, "split": "val_len16", "loss": 1.5, "accuracy": 0.45},
    ]
    assert panel_names(records) == ["loss", "accuracy"]  # not against step
    metric, curves = _by_length(records)
    assert metric == "accuracy"
    assert curves == {"test": ([16, 64], [0.4, 0.3]), "val": ([16], [0.45])}
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in records))
    plot_curves(path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_sequence_parallel_lengths_checked_before_compiling(tmp_path):
    if len(jax.devices()) < 2:
        pytest.skip("needs 2 devices")
    raw = {
        **RAW,
        "model": {"mixer": "lru", "d_model": 8, "n_layers": 1},
        "task": {**RAW["task"], "eval_lengths": [20, 41]},
        "distributed": {"seq": 2, "devices": 2},
        "train": {**RAW["train"], "batch_size": 2, "eval_batch_size": 2},
    }
    with pytest.raises(ConfigError, match="task.eval_lengths: split 'val_len41'"):
        train.Trainer(train.config.parse(raw), tmp_path / "run")
