"""Tests for `train.data`: generators, splits, batch order and config validation."""

import dataclasses
import pathlib
import random

import numpy as np
import pytest

from train import data
from train.data import (
    TASKS,
    BytesLMConfig,
    CopyingConfig,
    InductionHeadsConfig,
    LMConfig,
    MNIST1DConfig,
    MQARConfig,
    SelectiveCopyingConfig,
    SplitSizes,
    build_task,
    eval_batches,
    train_batch,
    train_indices,
)

REPO = pathlib.Path(__file__).resolve().parent.parent

SYNTHETIC = [
    CopyingConfig(vocab_size=10, num_tokens=9, lag=13, num_train=300, num_val=200),
    SelectiveCopyingConfig(vocab_size=9, num_tokens=6, context_len=29, num_train=300),
    SelectiveCopyingConfig(vocab_size=16, num_tokens=16, context_len=20, num_train=300),
    MQARConfig(vocab_size=64, seq_len=61, num_kv_pairs=7, num_train=300, num_val=200),
    MQARConfig(vocab_size=20, seq_len=40, num_kv_pairs=9, num_train=300, num_val=200),
    InductionHeadsConfig(vocab_size=11, seq_len=37, num_train=300, num_val=200),
]


def _ids(configs):
    return [f"{c.name}-{i}" for i, c in enumerate(configs)]


def assert_batches_equal(a, b):
    assert a.keys() == b.keys()
    for k in a:
        assert a[k].dtype == b[k].dtype, k
        np.testing.assert_array_equal(a[k], b[k], err_msg=k)


# ------------------------------------------------------------------------ configs


def test_registry_names_and_help():
    assert set(TASKS) == {
        "mnist1d",
        "copying",
        "selective_copying",
        "mqar",
        "induction_heads",
        "parity",
        "modular_addition",
        "lm",
        "lm_bytes",
    }
    for name, cls in TASKS.items():
        config = cls()
        assert config.name == name
        hash(config)  # frozen and hashable: the caches key on it
        for field in dataclasses.fields(cls):
            assert field.metadata.get("help"), f"{name}.{field.name} has no help"
        with pytest.raises(dataclasses.FrozenInstanceError):
            config.name = "x"


@pytest.mark.parametrize(
    "cls, kwargs, key",
    [
        (MNIST1DConfig, dict(num_val=5000), "num_val"),
        (MNIST1DConfig, dict(num_val=0), "num_val"),
        (MNIST1DConfig, dict(num_test=1005), "num_test"),
        (MNIST1DConfig, dict(seed=-1), "seed"),
        (MNIST1DConfig, dict(train_shift=40), "train_shift"),
        (MNIST1DConfig, dict(train_noise=-0.5), "train_noise"),
        (MNIST1DConfig, dict(num_train="4000"), "num_train"),
        (MNIST1DConfig, dict(name="copying"), "name"),
        (CopyingConfig, dict(vocab_size=2), "vocab_size"),
        (CopyingConfig, dict(num_tokens=0), "num_tokens"),
        (CopyingConfig, dict(lag=-1), "lag"),
        (CopyingConfig, dict(num_train=0), "num_train"),
        (CopyingConfig, dict(num_val=1.5), "num_val"),
        (SelectiveCopyingConfig, dict(num_tokens=16, context_len=15), "context_len"),
        (MQARConfig, dict(seq_len=63, num_kv_pairs=16), "seq_len"),
        (MQARConfig, dict(vocab_size=32, num_kv_pairs=16), "vocab_size"),
        (MQARConfig, dict(power_a=0.0), "power_a"),
        (InductionHeadsConfig, dict(seq_len=2), "seq_len"),
        (InductionHeadsConfig, dict(seed=True), "seed"),
        (BytesLMConfig, dict(paths=()), "paths"),
        (BytesLMConfig, dict(paths=[1, 2]), "paths"),
        (BytesLMConfig, dict(val_fraction=1.0), "val_fraction"),
        (BytesLMConfig, dict(seq_len=0), "seq_len"),
        (BytesLMConfig, dict(train_stride=-1), "train_stride"),
        (LMConfig, dict(vocab_size=256), "vocab_size"),
        (LMConfig, dict(documents="pages"), "documents"),
        (LMConfig, dict(tokenizer=""), "tokenizer"),
        (LMConfig, dict(exclude=[3]), "exclude"),
        (LMConfig, dict(shard_tokens=0), "shard_tokens"),
    ],
)
def test_bad_config_names_key(cls, kwargs, key):
    with pytest.raises(ValueError, match=f"^{key}: "):
        cls(**kwargs)


def test_num_val_message():
    with pytest.raises(ValueError) as info:
        MNIST1DConfig(num_val=5000)
    assert str(info.value) == "num_val: must be < num_train (4000), got 5000"


def test_synthetic_configs_share_split_sizes():
    import train

    for cls in (CopyingConfig, SelectiveCopyingConfig, MQARConfig, InductionHeadsConfig):
        assert issubclass(cls, SplitSizes)
    assert (MQARConfig().num_val, CopyingConfig().num_val) == (3000, 1000)
    # the YAML keys stay flat under task
    config = train.config.parse({"task": {"name": "copying", "num_val": 7}})
    assert build_task(config.task).size("val") == 7
    with pytest.raises(train.ConfigError, match="^task.num_test: must be >= 1, got 0"):
        train.config.parse({"task": {"name": "induction_heads", "num_test": 0}})


def test_build_task_rejects_other_objects():
    with pytest.raises(TypeError, match="build_task"):
        build_task({"name": "mqar"})


# ---------------------------------------------------------------- synthetic tasks


@pytest.mark.parametrize("config", SYNTHETIC, ids=_ids(SYNTHETIC))
def test_synthetic_shapes_and_determinism(config):
    task = build_task(config)
    assert task.kind == "sequence"
    assert task.vocab_size == task.n_outputs == config.vocab_size
    assert task.d_input is None
    assert task.splits == ("train", "val", "test")
    idx = np.array([0, 5, 299, 17])
    batch = task.examples("train", idx)
    t = task.seq_len
    assert batch["inputs"].shape == batch["targets"].shape == batch["mask"].shape == (4, t)
    assert batch["inputs"].dtype == batch["targets"].dtype == np.int32
    assert batch["mask"].dtype == np.float32
    assert batch["inputs"].min() >= 0 and batch["inputs"].max() < task.vocab_size
    assert batch["targets"].min() >= 0 and batch["targets"].max() < task.n_outputs
    # same seed: same arrays, from a fresh task too
    assert_batches_equal(batch, build_task(config).examples("train", idx))
    # an example does not depend on the batch it is generated in
    alone = task.examples("train", np.array([299]))
    assert_batches_equal(alone, {k: v[2:3] for k, v in batch.items()})
    # another seed: other examples
    other = build_task(dataclasses.replace(config, seed=config.seed + 1))
    assert not np.array_equal(other.examples("train", idx)["inputs"], batch["inputs"])


@pytest.mark.parametrize("config", SYNTHETIC, ids=_ids(SYNTHETIC))
def test_synthetic_splits_are_disjoint_streams(config):
    # independent streams: with a large space of examples no example is shared
    task = build_task(config)
    rows = {
        split: task.examples(split, np.arange(200))["inputs"]
        for split in ("train", "val", "test")
    }
    seen = {split: {r.tobytes() for r in x} for split, x in rows.items()}
    assert len(seen["train"]) > 190  # distinct examples within a split
    assert not seen["train"] & seen["val"]
    assert not seen["train"] & seen["test"]
    assert not seen["val"] & seen["test"]


def test_synthetic_does_not_touch_global_rng():
    np_state, py_state = np.random.get_state(), random.getstate()
    for config in SYNTHETIC:
        train_batch(build_task(config), seed=3, step=2, batch_size=16)
    assert random.getstate() == py_state
    after = np.random.get_state()
    assert after[0] == np_state[0] and np.array_equal(after[1], np_state[1])


def test_copying_reproduces_the_sequence():
    c = CopyingConfig(vocab_size=7, num_tokens=5, lag=13)
    task = build_task(c)
    assert task.seq_len == 2 * 5 + 13
    b = task.examples("val", np.arange(64))
    x, y, m = b["inputs"], b["targets"], b["mask"]
    data_tokens = x[:, :5]
    assert data_tokens.min() >= 1 and data_tokens.max() <= c.vocab_size - 2
    assert len(np.unique(data_tokens)) == c.vocab_size - 2  # every data token is used
    assert (x[:, 5:18] == 0).all()
    assert (x[:, 18:] == c.vocab_size - 1).all()
    np.testing.assert_array_equal(y[:, 18:], data_tokens)
    np.testing.assert_array_equal(m, np.broadcast_to(np.arange(23) >= 18, m.shape))


@pytest.mark.parametrize("config", SYNTHETIC[1:3], ids=_ids(SYNTHETIC[1:3]))
def test_selective_copying_targets_are_marked_tokens_in_order(config):
    task = build_task(config)
    k, ctx_len = config.num_tokens, config.context_len
    b = task.examples("train", np.arange(128))
    x, y, m = b["inputs"], b["targets"], b["mask"]
    context = x[:, :ctx_len]
    is_data = context != 0
    np.testing.assert_array_equal(is_data.sum(1), k)
    assert context[is_data].max() <= config.vocab_size - 2
    np.testing.assert_array_equal(context[is_data].reshape(-1, k), y[:, ctx_len:])
    assert (x[:, ctx_len:] == config.vocab_size - 1).all()
    np.testing.assert_array_equal(m[:, :ctx_len], 0)
    np.testing.assert_array_equal(m[:, ctx_len:], 1)
    # positions really are random (unless every position holds data)
    if ctx_len > k:
        assert len({r.tobytes() for r in is_data}) > 100
        assert is_data.any(0).all()  # every context position gets used somewhere


@pytest.mark.parametrize("random_non_queries", [True, False])
@pytest.mark.parametrize("config", SYNTHETIC[3:5], ids=_ids(SYNTHETIC[3:5]))
def test_mqar_targets_are_bound_values(config, random_non_queries):
    config = dataclasses.replace(config, random_non_queries=random_non_queries)
    task = build_task(config)
    n, half = config.num_kv_pairs, config.vocab_size // 2
    b = task.examples("test", np.arange(100))
    for x, y, m in zip(b["inputs"], b["targets"], b["mask"], strict=True):
        keys, values = x[0 : 2 * n : 2], x[1 : 2 * n : 2]
        assert len(set(keys)) == n and len(set(values)) == n
        assert keys.min() >= 1 and keys.max() < half
        assert values.min() >= half and values.max() < config.vocab_size
        bound = dict(zip(keys.tolist(), values.tolist(), strict=True))
        (queries,) = np.nonzero(m)
        assert len(queries) == n
        assert (queries >= 2 * n).all() and ((queries - 2 * n) % 2 == 0).all()
        assert sorted(x[queries].tolist()) == sorted(keys.tolist())  # each key once
        assert [bound[k] for k in x[queries].tolist()] == y[queries].tolist()
        assert (y[m == 0] == 0).all()
        if not random_non_queries:
            rest = np.ones(len(x), bool)
            rest[: 2 * n] = False
            rest[queries] = False
            assert (x[rest] == 0).all()


def test_mqar_query_order_random_and_gaps_power_law():
    c = MQARConfig(vocab_size=256, seq_len=512, num_kv_pairs=8, num_train=1000)
    b = build_task(c).examples("train", np.arange(500))
    n, space = 8, (512 - 16) // 2
    gaps, orders = [], set()
    for x, m in zip(b["inputs"], b["mask"], strict=True):
        (queries,) = np.nonzero(m)
        gaps.append((queries - 2 * n) // 2)
        keys = x[0 : 2 * n : 2].tolist()
        orders.add(tuple(keys.index(k) for k in x[queries].tolist()))
    assert len(orders) > 400  # queries come in random order, not in key order
    gaps = np.concatenate(gaps)
    assert gaps.max() < space
    # p(g) ~ (g + 1)^(a - 1) with a = 0.01 puts far more mass on small gaps than uniform
    assert np.median(gaps) < space / 8


@pytest.mark.parametrize("seq_len", [3, 37])
def test_induction_head_target_follows_trigger(seq_len):
    c = InductionHeadsConfig(vocab_size=11, seq_len=seq_len)
    b = build_task(c).examples("train", np.arange(200))
    trigger = c.vocab_size - 1
    for x, y, m in zip(b["inputs"], b["targets"], b["mask"], strict=True):
        (where,) = np.nonzero(x == trigger)
        assert len(where) == 2 and where[1] == seq_len - 1 and where[0] <= seq_len - 3
        assert y[-1] == x[where[0] + 1] != trigger
        np.testing.assert_array_equal(m, np.arange(seq_len) == seq_len - 1)
    if seq_len > 3:
        firsts = np.argmax(b["inputs"] == trigger, axis=1)
        assert len(np.unique(firsts)) > seq_len // 2


# ----------------------------------------------------------------------- batching


@pytest.mark.parametrize("n, batch_size", [(10, 3), (7, 7), (5, 12), (1, 4)])
def test_train_indices_cover_each_epoch_once(n, batch_size):
    steps = 4 * n  # covers at least 4 epochs
    stream = np.concatenate(
        [train_indices(n, seed=7, step=s, batch_size=batch_size) for s in range(steps)]
    )
    epochs = stream[: (len(stream) // n) * n].reshape(-1, n)
    for epoch in epochs:
        np.testing.assert_array_equal(np.sort(epoch), np.arange(n))
    if n > 3:
        assert len({e.tobytes() for e in epochs}) > 1  # each epoch its own permutation
        assert not np.array_equal(epochs[0], np.arange(n))
    # pure in (seed, step): recomputing any step gives the same indices
    data._batching._epoch_permutation.cache_clear()
    s = steps // 2
    np.testing.assert_array_equal(
        train_indices(n, 7, s, batch_size), stream[s * batch_size : (s + 1) * batch_size]
    )


def test_train_indices_seed_changes_order():
    a = train_indices(1000, seed=0, step=3, batch_size=32)
    b = train_indices(1000, seed=1, step=3, batch_size=32)
    assert not np.array_equal(a, b)


@pytest.mark.parametrize("config", SYNTHETIC[::2], ids=_ids(SYNTHETIC[::2]))
def test_train_batch_pure_in_seed_and_step(config):
    task = build_task(config)
    batch = train_batch(task, seed=5, step=11, batch_size=32)
    for _ in range(2):
        data._batching._epoch_permutation.cache_clear()
        train_batch(task, seed=5, step=3, batch_size=32)  # other calls in between
        assert_batches_equal(batch, train_batch(task, seed=5, step=11, batch_size=32))
    idx = train_indices(task.size("train"), 5, 11, 32)
    assert_batches_equal(batch, task.examples("train", idx))
    assert "weight" not in batch
    other = train_batch(task, seed=6, step=11, batch_size=32)
    assert not np.array_equal(other["inputs"], batch["inputs"])


@pytest.mark.parametrize("batch_size", [1, 7, 64, 500])
def test_eval_batches_cover_split_once_with_weights(batch_size):
    task = build_task(SYNTHETIC[0])
    n = task.size("val")
    batches = list(eval_batches(task, "val", batch_size))
    assert len(batches) == -(-n // batch_size)
    for b in batches:
        assert b["weight"].shape == (batch_size,) and b["weight"].dtype == np.float32
        assert b["inputs"].shape == (batch_size, task.seq_len)
    weight = np.concatenate([b["weight"] for b in batches])
    assert weight.sum() == n and (weight[:n] == 1).all() and (weight[n:] == 0).all()
    real = weight == 1
    everything = task.examples("val", np.arange(n))
    for key, value in everything.items():
        got = np.concatenate([b[key] for b in batches])[real]
        np.testing.assert_array_equal(got, value)


def test_eval_batches_max_examples_and_bad_split():
    task = build_task(SYNTHETIC[0])
    batches = list(eval_batches(task, "test", 8, max_examples=20))
    assert sum(b["weight"].sum() for b in batches) == 20 and len(batches) == 3
    with pytest.raises(KeyError, match="split"):
        task.examples("dev", np.arange(2))
    with pytest.raises(KeyError, match="split"):
        task.size("dev")
    with pytest.raises(ValueError, match="integer"):
        task.examples("val", np.array([0.0, 1.0]))
    with pytest.raises(IndexError):
        task.examples("val", np.array([task.size("val")]))


# ------------------------------------------------------------------------ MNIST-1D


def test_mnist1d_default_splits():
    np_state, py_state = np.random.get_state(), random.getstate()
    data._mnist1d._mnist1d_arrays.cache_clear()
    task = build_task(MNIST1DConfig())
    # make_dataset seeds the global generators; the state must come back untouched
    assert random.getstate() == py_state
    assert np.array_equal(np.random.get_state()[1], np_state[1])
    assert task.kind == "classification"
    assert (task.vocab_size, task.d_input, task.n_outputs) == (None, 1, 10)
    assert task.seq_len == 40
    assert task.splits == ("train", "val", "test")
    assert [task.size(s) for s in task.splits] == [3500, 500, 1000]
    b = task.examples("test", np.arange(1000))
    assert b["inputs"].shape == (1000, 40, 1) and b["inputs"].dtype == np.float32
    assert b["targets"].shape == (1000,) and b["targets"].dtype == np.int32
    assert set(np.unique(b["targets"])) == set(range(10))
    assert "mask" not in b
    # validation is carved from train: no row of val appears in train
    train = task.examples("train", np.arange(3500))["inputs"]
    val = task.examples("val", np.arange(500))["inputs"]
    assert not {r.tobytes() for r in train} & {r.tobytes() for r in val}
    # a second build is served from memory
    assert build_task(MNIST1DConfig(train_shift=2))._x is task._x


def test_mnist1d_matches_generator_and_is_deterministic():
    from mnist1d.data import get_dataset_args, make_dataset

    config = MNIST1DConfig(num_train=300, num_val=40, num_test=100, seed=3)
    task = build_task(config)
    args = get_dataset_args()
    args.num_samples, args.seed = 400, 3
    ref = make_dataset(args)
    parts = {s: task.examples(s, np.arange(task.size(s))) for s in task.splits}
    ref_x = np.concatenate([ref["x"], ref["x_test"]])  # the generator splits 0.8 / 0.2
    got_train = np.concatenate([parts["train"]["inputs"], parts["val"]["inputs"]])[..., 0]
    np.testing.assert_allclose(got_train, ref_x[:300], rtol=1e-6)
    np.testing.assert_allclose(parts["test"]["inputs"][..., 0], ref_x[300:], rtol=1e-6)
    np.testing.assert_array_equal(
        np.concatenate([parts[s]["targets"] for s in task.splits]),
        np.concatenate([ref["y"], ref["y_test"]]),
    )
    # regenerated from scratch: same arrays; another seed: other arrays
    data._mnist1d._mnist1d_arrays.cache_clear()
    again = build_task(config).examples("val", np.arange(40))
    np.testing.assert_array_equal(again["inputs"], parts["val"]["inputs"])
    other = build_task(dataclasses.replace(config, seed=4)).examples("val", np.arange(40))
    assert not np.array_equal(other["inputs"], again["inputs"])


def test_mnist1d_augmentation_only_on_training_batches():
    config = MNIST1DConfig(num_train=300, num_val=40, num_test=100, seed=3, train_shift=3)
    task = build_task(config)
    batch = train_batch(task, seed=1, step=4, batch_size=50)
    clean = task.examples("train", train_indices(task.size("train"), 1, 4, 50))
    np.testing.assert_array_equal(batch["targets"], clean["targets"])
    shifts = []
    for x, x0 in zip(batch["inputs"][..., 0], clean["inputs"][..., 0], strict=True):
        match = [s for s in range(-3, 4) if np.array_equal(np.roll(x0, s), x)]
        assert match
        shifts.append(match[0])
    assert len(set(shifts)) > 3
    assert_batches_equal(batch, train_batch(task, seed=1, step=4, batch_size=50))
    assert not np.array_equal(train_batch(task, 1, 5, 50)["inputs"], batch["inputs"])
    # evaluation sees the clean data
    first = next(eval_batches(task, "train", 50))
    clean_first = task.examples("train", np.arange(50))["inputs"]
    np.testing.assert_array_equal(first["inputs"], clean_first)

    noisy = build_task(dataclasses.replace(config, train_shift=0, train_noise=0.1))
    b = train_batch(noisy, seed=1, step=4, batch_size=50)
    assert b["inputs"].dtype == np.float32
    diff = b["inputs"] - clean["inputs"]
    assert 0.05 < diff.std() < 0.2
    assert_batches_equal(b, train_batch(noisy, seed=1, step=4, batch_size=50))


# ----------------------------------------------------------------------- bytes LM


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    texts = {
        "a.txt": "Hello, world. " * 20,
        "sub/b.txt": "héllo → 世界\n" * 30,
        "sub/deep/c.md": "not matched by *.txt\n",
        ".hidden/d.txt": "hidden directories are skipped\n",
    }
    for name, text in texts.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    monkeypatch.setenv("SSM_JAX_CACHE", str(tmp_path / "cache"))
    raw = (texts["a.txt"] + texts["sub/b.txt"]).encode("utf-8")
    return np.frombuffer(raw, np.uint8)


@pytest.mark.parametrize("train_stride", [0, 5])
def test_bytes_lm_windows(corpus, train_stride):
    config = BytesLMConfig(
        paths=["**/*.txt", "a.txt"],
        seq_len=16,
        val_fraction=0.25,
        train_stride=train_stride,
    )
    assert config.paths == ("**/*.txt", "a.txt")  # a YAML list becomes a tuple
    assert BytesLMConfig(paths="a.txt").paths == ("a.txt",)
    task = build_task(config)
    assert task.files == ("a.txt", "sub/b.txt")
    assert (task.kind, task.vocab_size, task.n_outputs) == ("lm", 256, 256)
    assert task.d_input is None
    assert task.splits == ("train", "val")
    n_val = int(len(corpus) * 0.25)
    parts = {"train": corpus[: len(corpus) - n_val], "val": corpus[len(corpus) - n_val :]}
    strides = {"train": train_stride or 16, "val": 16}
    for split, part in parts.items():
        n = task.size(split)
        assert (n - 1) * strides[split] + 17 <= len(part) < n * strides[split] + 17
        b = task.examples(split, np.arange(n))
        assert b["inputs"].dtype == b["targets"].dtype == np.int32
        np.testing.assert_array_equal(b["inputs"][:, 1:], b["targets"][:, :-1])
        np.testing.assert_array_equal(b["mask"], 1.0)
        for i in (0, n - 1):
            s = i * strides[split]
            np.testing.assert_array_equal(b["inputs"][i], part[s : s + 16])
            np.testing.assert_array_equal(b["targets"][i], part[s + 1 : s + 17])


def test_bytes_lm_encode_decode(corpus):
    task = build_task(BytesLMConfig(paths=("*.txt",), seq_len=8))
    text = "héllo → 世界, bytes\n"
    tokens = task.encode(text)
    assert tokens.dtype == np.int32 and len(tokens) == len(text.encode("utf-8"))
    assert task.decode(tokens) == text == data.decode(data.encode(text))
    assert task.decode(tokens[:2]) == "h\ufffd"  # a cut character is replaced
    assert data.decode(np.array([[72, 105]])) == "Hi"


def test_bytes_lm_errors_name_the_key(corpus):
    with pytest.raises(data.DataError, match="^task.paths: .*match no files"):
        build_task(BytesLMConfig(paths=("*.nothing",)))
    with pytest.raises(data.DataError, match="^task.paths: .*fewer than one window"):
        build_task(BytesLMConfig(paths=("sub/deep/*.md",), seq_len=16))
    with pytest.raises(data.DataError, match="^task.paths: the val split"):
        build_task(BytesLMConfig(paths=("*.txt",), seq_len=100, val_fraction=0.1))


def test_bytes_lm_default_config_in_repo(monkeypatch, tmp_path):
    monkeypatch.chdir(REPO)
    monkeypatch.setenv("SSM_JAX_CACHE", str(tmp_path))
    task = build_task(BytesLMConfig())
    assert "README.md" in task.files and "train/data/_lm.py" in task.files
    assert not any(f.startswith(".venv") for f in task.files)
    b = train_batch(task, seed=0, step=0, batch_size=4)
    assert b["inputs"].shape == (4, 256)


def test_mnist1d_scale_and_shear_and_process_rows():
    plain = data.build_task(data.MNIST1DConfig())
    config = data.MNIST1DConfig(train_scale=0.2, train_shear=0.5, train_noise=0.05)
    aug = data.build_task(config)
    full = data.train_batch(aug, 3, 7, 16)
    base = data.train_batch(plain, 3, 7, 16)["inputs"]
    np.testing.assert_array_equal(
        full["targets"], data.train_batch(plain, 3, 7, 16)["targets"]
    )
    # The difference is noise plus a per-example scale and linear ramp: fit them back.
    t = np.linspace(-0.5, 0.5, base.shape[1])
    for i in range(16):
        design = np.stack([base[i, :, 0], t], axis=1)
        (scale, ramp), *_ = np.linalg.lstsq(design, full["inputs"][i, :, 0], rcond=None)
        assert 0.8 - 0.05 <= scale <= 1.2 + 0.05 and abs(ramp) <= 0.5 + 0.1
    assert np.std(full["inputs"] - base) > 0.01
    # A process's rows equal the same rows of the whole batch (data parallelism).
    for rows in (slice(0, 4), slice(4, 12), slice(12, 16)):
        part = data.train_batch(aug, 3, 7, 16, rows=rows)
        for key in full:
            np.testing.assert_array_equal(part[key], full[key][rows])
    with pytest.raises(ValueError, match="train_shear"):
        data.MNIST1DConfig(train_shear=-1.0)
