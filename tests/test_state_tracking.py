"""The state-tracking tasks (`parity`, `modular_addition`): labels against an
independent numpy computation, determinism in (seed, step), splits, config errors."""

import numpy as np
import pytest

import train
from train.config import ConfigError
from train.data import (
    TASKS,
    ModularAdditionConfig,
    ParityConfig,
    build_task,
    eval_batches,
    train_batch,
)

PAD_CONFIGS = [
    ParityConfig(min_len=3, max_len=17, num_train=300, num_val=50, num_test=50),
    ParityConfig(min_len=1, max_len=1, supervision="running", num_train=20),
    ModularAdditionConfig(modulus=5, min_len=2, max_len=23, num_train=300),
    ModularAdditionConfig(
        modulus=7, min_len=5, max_len=11, supervision="running", eval_lengths=[13, 29]
    ),
]


def _ids(configs):
    return [f"{c.name}-{c.modulus}-{c.supervision}-{c.max_len}" for c in configs]


def reference(inputs: np.ndarray, modulus: int) -> tuple[np.ndarray, np.ndarray]:
    """Per row: the sequence's length (tokens before the first pad token `modulus`) and
    the prefix sums mod m, by a Python loop over each sequence."""
    lengths, sums = [], np.zeros(inputs.shape, np.int64)
    for r, row in enumerate(inputs.tolist()):
        n = row.index(modulus) if modulus in row else len(row)
        assert all(x == modulus for x in row[n:]), "padding only at the end"
        total = 0
        for t, x in enumerate(row[:n]):
            assert 0 <= x < modulus
            total = (total + x) % modulus
            sums[r, t] = total
        lengths.append(n)
    return np.asarray(lengths), sums


@pytest.mark.parametrize("config", PAD_CONFIGS, ids=_ids(PAD_CONFIGS))
@pytest.mark.parametrize("split", ["train", "val", "test"])
def test_labels_are_sums_mod_m(config, split):
    task = build_task(config)
    assert task.vocab_size == config.modulus + 1 and task.n_outputs == config.modulus
    assert task.seq_len == config.max_len and task.kind == "sequence"
    n = min(task.size(split), 200)
    batch = task.examples(split, np.arange(n))
    lengths, sums = reference(batch["inputs"], config.modulus)
    assert lengths.min() >= config.min_len and lengths.max() <= config.max_len
    t = np.arange(config.max_len)[None, :]
    if config.supervision == "final":
        want_mask = t == lengths[:, None] - 1
        # the one label per sequence is the parity / sum of the whole sequence
        rows = np.arange(n)
        finals = batch["targets"][rows, lengths - 1]
        expected = [
            sum(row[:k]) % config.modulus
            for row, k in zip(batch["inputs"].tolist(), lengths, strict=True)
        ]
        np.testing.assert_array_equal(finals, expected)
    else:
        want_mask = t < lengths[:, None]
    np.testing.assert_array_equal(batch["mask"], want_mask.astype(np.float32))
    m = batch["mask"] > 0
    np.testing.assert_array_equal(batch["targets"][m], sums[m])


def test_parity_labels_are_parities():
    task = build_task(ParityConfig(min_len=40, max_len=40, supervision="running"))
    batch = task.examples("train", np.arange(64))
    bits = batch["inputs"]
    assert set(np.unique(bits)) <= {0, 1}
    np.testing.assert_array_equal(batch["targets"], np.cumsum(bits, axis=1) & 1)
    # about half of the parities are odd (not a constant label)
    assert 0.3 < batch["targets"][:, -1].mean() < 0.7


def test_lengths_cover_the_range_uniformly():
    config = ParityConfig(min_len=3, max_len=8, num_train=6000)
    batch = build_task(config).examples("train", np.arange(6000))
    lengths = (batch["inputs"] != 2).sum(axis=1)
    counts = np.bincount(lengths, minlength=9)[3:9]
    assert counts.min() > 800 and counts.max() < 1200, counts


@pytest.mark.parametrize("config", PAD_CONFIGS[:3], ids=_ids(PAD_CONFIGS[:3]))
def test_deterministic_in_seed_and_step(config):
    a = train_batch(build_task(config), seed=3, step=5, batch_size=16)
    b = train_batch(build_task(config), seed=3, step=5, batch_size=16)
    for k in a:
        np.testing.assert_array_equal(a[k], b[k])
    c = train_batch(build_task(config), seed=3, step=6, batch_size=16)
    assert not np.array_equal(a["inputs"], c["inputs"])
    # the generator's seed changes the examples themselves
    import dataclasses

    other = build_task(dataclasses.replace(config, seed=1)).examples("train", np.arange(16))
    same = build_task(config).examples("train", np.arange(16))
    assert not np.array_equal(other["inputs"], same["inputs"])


def test_eval_length_splits_are_longer_and_new():
    config = ModularAdditionConfig(
        min_len=3, max_len=12, eval_lengths=[40, 64], num_train=500, num_val=30, num_test=40
    )
    task = build_task(config)
    assert task.splits == (
        "train",
        "val",
        "test",
        "val_len40",
        "test_len40",
        "val_len64",
        "test_len64",
    )
    assert task.size("val_len40") == 30 and task.size("test_len64") == 40
    for length in (40, 64):
        for split in ("val", "test"):
            name = f"{split}_len{length}"
            assert task.split_seq_len(name) == length
            batch = task.examples(name, np.arange(task.size(name)))
            lengths, sums = reference(batch["inputs"], config.modulus)
            assert (lengths == length).all()  # longer than every training sequence
            np.testing.assert_array_equal(batch["targets"][:, -1], sums[:, -1])
            np.testing.assert_array_equal(batch["mask"][:, -1], 1.0)
    val, test = (task.examples(f"{s}_len40", np.arange(30)) for s in ("val", "test"))
    rows = {tuple(r) for r in val["inputs"].tolist()}
    assert not rows & {tuple(r) for r in test["inputs"].tolist()}  # distinct streams
    # evaluation walks them like any split
    assert sum(b["weight"].sum() for b in eval_batches(task, "test_len64", 16)) == 40


def test_val_and_test_are_other_streams_than_train():
    config = ParityConfig(min_len=30, max_len=40, num_train=500, num_val=200, num_test=200)
    task = build_task(config)
    seen = {
        s: {tuple(r) for r in task.examples(s, np.arange(200))["inputs"].tolist()}
        for s in ("train", "val", "test")
    }
    # 2^30 or more sequences per length: any overlap would mean a shared stream
    assert not seen["train"] & seen["val"] and not seen["val"] & seen["test"]


def test_registered_and_parsed_from_yaml_keys():
    assert TASKS["parity"] is ParityConfig
    assert TASKS["modular_addition"] is ModularAdditionConfig
    config = train.config.parse(
        {"task": {"name": "modular_addition", "modulus": 3, "eval_lengths": [50, 100]}}
    )
    assert config.task.eval_lengths == (50, 100)
    hash(config.task)  # hashable: the caches key on task configs


@pytest.mark.parametrize(
    "task, message",
    [
        ({"name": "parity", "modulus": 3}, "task.modulus: must be 2 for parity"),
        ({"name": "modular_addition", "modulus": 1}, "task.modulus: must be >= 2"),
        ({"name": "parity", "min_len": 0}, "task.min_len: must be >= 1"),
        (
            {"name": "parity", "min_len": 9, "max_len": 4},
            "task.max_len: must be >= min_len",
        ),
        ({"name": "parity", "supervision": "all"}, "task.supervision: expected one of"),
        (
            {"name": "parity", "eval_lengths": [64, 0]},
            "task.eval_lengths: must be positive",
        ),
        ({"name": "parity", "eval_lengths": 64}, "task.eval_lengths: expected a list"),
        ({"name": "parity", "eval_lengths": [64, 64]}, "task.eval_lengths: has repeated"),
        ({"name": "parity", "num_val": 0}, "task.num_val: must be >= 1"),
    ],
)
def test_config_errors_name_the_key(task, message):
    with pytest.raises(ConfigError, match=message.replace("(", r"\(")):
        train.config.parse({"task": task})
