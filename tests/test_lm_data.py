"""The LM task's data: shards, packed documents, bits per byte, data errors.

Corpora are tiny synthetic files in `tmp_path` (one test reads a slice of the standard
library); every test has its own cache directory.
"""

import json
import math
import os
import re
import shutil
import sysconfig
from pathlib import Path

import numpy as np
import pytest

from train import data
from train.data import LMConfig, build_task, train_batch

TEXTS = {
    "docs/a.txt": "alpha beta gamma.\nsecond line of a\n\nA new paragraph.\n" * 6,
    "docs/b.txt": "héllo → 世界, ünïcödé 🙂\n\n\n  indented paragraph\n" * 5,
    "docs/sub/c.txt": "def f(x):\n    return x + 1\n\n\ndef g():\n    pass\n" * 7,
    "docs/empty.txt": "",
}


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    for name, text in TEXTS.items():
        (tmp_path / name).parent.mkdir(parents=True, exist_ok=True)
        (tmp_path / name).write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def config(**kwargs) -> LMConfig:
    base = dict(paths=("docs/**/*.txt",), seq_len=16, val_fraction=0.2, cache_dir="cache")
    return LMConfig(**{**base, **kwargs})


# ------------------------------------------------------- an independent reference


def reference_documents(files, val_fraction, mode):
    """(text, ends) per document per split, written from the task's definition."""
    raws = [Path(f).read_bytes() for f in files]
    total = sum(len(r) for r in raws)
    cut = total - int(total * val_fraction)
    pieces = {"train": [], "val": []}
    start = 0
    for raw in raws:
        end = start + len(raw)
        if end <= cut:
            pieces["train"].append((raw, True))
        elif start >= cut:
            pieces["val"].append((raw, True))
        else:
            c = cut - start
            while c < len(raw) and raw[c] & 0xC0 == 0x80:  # not inside a character
                c += 1
            pieces["train"].append((raw[:c], False))
            pieces["val"].append((raw[c:], True))
        start = end
    docs = {}
    for split, parts in pieces.items():
        docs[split] = []
        for raw, ends in parts:
            text = raw.decode("utf-8")
            if not text:
                continue
            if mode == "paragraphs":
                paragraphs = re.split(r"\n(?:[ \t\r\f\v]*\n)+", text)
                kept = [i for i, p in enumerate(paragraphs) if p.strip()]
                for i in kept:
                    still_open = not ends and i == len(paragraphs) - 1
                    docs[split].append((paragraphs[i], not still_open))
            else:
                docs[split].append((text, ends and mode == "files"))
    return docs


def reference_tokens(tokenizer, docs, eod):
    out = []
    for text, ends in docs:
        out.extend(tokenizer.encode(text).tolist())
        if ends:
            out.append(eod)
    return np.asarray(out, np.int32)


def reference_windows(stream, starts, seq_len, eod):
    """inputs, targets, mask, resets of windows of an in-memory stream."""
    inputs = np.stack([stream[s : s + seq_len] for s in starts])
    targets = np.stack([stream[s + 1 : s + seq_len + 1] for s in starts])
    resets = np.zeros(inputs.shape, bool)
    for row, s in enumerate(starts):
        for t in range(seq_len):
            p = s + t
            resets[row, t] = p == 0 or (eod is not None and stream[p - 1] == eod)
    mask = (inputs != eod) if eod is not None else np.ones(inputs.shape, bool)
    mask = mask.astype(np.float32)
    return inputs, targets, mask, resets


# ---------------------------------------------------------------------- the tests


@pytest.mark.parametrize(
    "tokenizer, mode, shard_tokens",
    [("bytes", "files", 7), ("bytes", "none", 1 << 24), ("bpe", "paragraphs", 13)],
)
def test_shard_windows_equal_in_memory_windows(corpus, tokenizer, mode, shard_tokens):
    task = build_task(
        config(
            tokenizer=tokenizer, documents=mode, shard_tokens=shard_tokens, vocab_size=300
        )
    )
    assert task.files == ("docs/a.txt", "docs/b.txt", "docs/empty.txt", "docs/sub/c.txt")
    eod = None if mode == "none" else task.tokenizer.eod_id
    assert task.eod_id == eod
    docs = reference_documents(task.files, 0.2, mode)
    index = json.loads((task.cache_path / "index.json").read_text())
    for split in ("train", "val"):
        stream = reference_tokens(task.tokenizer, docs[split], eod)
        np.testing.assert_array_equal(task.tokens(split), stream)
        # the shards: all full but the last, of the index's dtype
        entry = index["splits"][split]
        assert entry["tokens"] == len(stream)
        lengths = [len(np.load(task.cache_path / n)) for n in entry["shards"]]
        assert lengths[:-1] == [shard_tokens] * (len(lengths) - 1)
        assert sum(lengths) == len(stream)
        assert np.load(task.cache_path / entry["shards"][0]).dtype == np.uint16
        n = task.size(split)
        stride = task._stride[split]
        assert (n - 1) * stride + 17 <= len(stream) < n * stride + 17
        idx = np.arange(n)[::-1]  # any order
        batch = task.examples(split, idx)
        want = reference_windows(stream, idx * stride, 16, eod)
        for key, value in zip(("inputs", "targets", "mask", "resets"), want, strict=True):
            assert batch[key].dtype == value.dtype, key
            np.testing.assert_array_equal(batch[key], value, err_msg=key)
        np.testing.assert_array_equal(
            batch["bytes"], task.tokenizer.token_bytes[want[1]].astype(np.float32)
        )
    if tokenizer == "bpe":
        assert task.vocab_size == task.tokenizer.vocab_size <= 300
        assert len(task.tokens("train")) < 0.6 * sum(
            len(t.encode()) for t, _ in docs["train"]
        )


def test_packing_resets_mask_and_end_of_document(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "1.txt").write_text("ab")
    (tmp_path / "2.txt").write_text("cde")
    (tmp_path / "3.txt").write_text("p1\n\np2\n \n\n  p3\n" + "z" * 40)
    task = build_task(LMConfig(paths=["*.txt"], seq_len=6, val_fraction=0.2, cache_dir="c"))
    E = 256
    stream = task.tokens("train")
    head = [*b"ab", E, *b"cde", E, *b"p1\n\np2"]
    assert stream[: len(head)].tolist() == head
    assert (stream == E).sum() == 2  # the third file goes on into the validation split
    b = task.examples("train", np.array([0, 1]))
    np.testing.assert_array_equal(b["inputs"][0], [*b"ab", E, *b"cde"])
    np.testing.assert_array_equal(b["targets"][0], [*b"b", E, *b"cde", E])
    np.testing.assert_array_equal(b["resets"][0], [1, 0, 0, 1, 0, 0])
    np.testing.assert_array_equal(b["mask"][0], [1, 1, 0, 1, 1, 1])  # E -> "c": masked
    np.testing.assert_array_equal(b["bytes"][0], [1, 0, 1, 1, 1, 0])
    np.testing.assert_array_equal(b["inputs"][1], [E, *b"p1\n\np"])
    np.testing.assert_array_equal(b["resets"][1], [0, 1, 0, 0, 0, 0])
    np.testing.assert_array_equal(b["mask"][1], [0, 1, 1, 1, 1, 1])
    # paragraphs: blank lines (also whitespace-only ones) separate documents
    para = build_task(
        LMConfig(
            paths=["*.txt"], seq_len=6, val_fraction=0.2, cache_dir="c",
            documents="paragraphs",
        )
    )  # fmt: skip
    head = [*b"ab", E, *b"cde", E, *b"p1", E, *b"p2", E, *b"  p3\nzz"]
    assert para.tokens("train")[: len(head)].tolist() == head


def test_no_trained_prediction_crosses_a_document(corpus):
    task = build_task(config(tokenizer="bpe", documents="paragraphs", vocab_size=300))
    batch = train_batch(task, seed=3, step=2, batch_size=32)
    doc = np.cumsum(batch["resets"], axis=1)  # the document of each input position
    inputs, targets, mask = batch["inputs"], batch["targets"], batch["mask"]
    assert batch["resets"].any() and (mask == 0).any()
    eod = task.eod_id
    for row in range(len(inputs)):
        for t in range(task.seq_len - 1):
            # A trained prediction's target is the next input, in the same document.
            if mask[row, t]:
                assert doc[row, t] == doc[row, t + 1]
            else:
                assert inputs[row, t] == eod and batch["resets"][row, t + 1]
    # The end of a document is predicted (a target that is trained on, of 0 bytes).
    assert (targets[mask == 1] == eod).any()
    assert (batch["bytes"][targets == eod] == 0).all()


def test_shards_cached_by_files_and_tokenizer(corpus):
    cfg = config(tokenizer="bpe", vocab_size=300, documents="paragraphs")
    task = build_task(cfg)
    path = task.cache_path

    def contents(directory):
        return {p.name: p.read_bytes() for p in sorted(directory.iterdir())}

    before = contents(path)
    stamp = (path / "index.json").stat().st_mtime_ns
    assert build_task(cfg).cache_path == path  # reused, not rebuilt
    assert (path / "index.json").stat().st_mtime_ns == stamp
    tokenizers = corpus / "cache" / "tokenizers"
    trained = {p.name: p.read_bytes() for p in tokenizers.iterdir()}
    # Built again from nothing: the same key, the same bytes (BPE included).
    shutil.rmtree(corpus / "cache")
    again = build_task(cfg)
    assert again.cache_path == path and contents(path) == before
    assert {p.name: p.read_bytes() for p in tokenizers.iterdir()} == trained
    # Another tokenizer: another entry. A changed file: another entry, other tokens.
    assert build_task(config(documents="paragraphs")).cache_path != path
    os.utime("docs/a.txt", ns=(1, 1))  # same bytes, another mtime: rebuilt
    touched = build_task(cfg)
    assert touched.cache_path != path
    np.testing.assert_array_equal(touched.tokens("train"), task.tokens("train"))
    Path("docs/a.txt").write_text(TEXTS["docs/a.txt"] + "more text\n")
    changed = build_task(cfg)
    assert changed.cache_path not in (path, touched.cache_path)
    assert not np.array_equal(changed.tokens("val"), task.tokens("val"))
    # Nothing half-written is left: only complete entries, no temporary names.
    names = [p.name for p in (corpus / "cache" / "shards").iterdir()]
    assert len(names) == 4 and not any(n.startswith(".") for n in names)


def test_bpe_is_trained_on_the_training_split_only(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "a.txt").write_text("common words here and there\n" * 40)
    (tmp_path / "b.txt").write_text("zqxj" * 400)  # only in validation
    task = build_task(
        LMConfig(paths=["*.txt"], tokenizer="bpe", vocab_size=400, seq_len=8,
                 val_fraction=0.6, cache_dir="c")
    )  # fmt: skip
    vocab = json.loads(task.tokenizer.to_json())["model"]["vocab"]
    assert any("common" in v for v in vocab)
    assert not any("zq" in v or "qx" in v or "xj" in v for v in vocab)
    assert len(task.tokens("val")) >= 1600  # no merges for the held-out text


def test_bits_per_byte_of_a_uniform_model(corpus):
    """A model with zero logits predicts uniformly: every counted target costs
    ln(V) nats, so bits per byte is (counted targets) * log2(V) / (their bytes)."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import train
    from train.trainer import evaluate, make_eval_step

    cfg = train.config.parse(
        {
            "model": {"mixer": "lru", "d_model": 8, "n_layers": 1},
            "task": {
                "name": "lm", "paths": ["docs/**/*.txt"], "tokenizer": "bpe",
                "vocab_size": 300, "seq_len": 16, "cache_dir": "cache",
            },
        }
    )  # fmt: skip
    task = build_task(cfg.task)
    model = train.build_model(cfg, task, jr.key(0))
    model = eqx.tree_at(
        lambda m: (m.head.weight, m.head.bias),
        model,
        (jnp.zeros_like(model.head.weight), jnp.zeros_like(model.head.bias)),
    )
    params, static = eqx.partition(model, eqx.is_array)
    with jax_standard_promotion():
        values = evaluate(
            make_eval_step(cfg, static, task.kind),
            params,
            data.eval_batches(task, "val", 5),
            task.kind,
        )
    batch = task.examples("val", np.arange(task.size("val")))
    counted = batch["mask"].sum()
    text_bytes = (batch["bytes"] * batch["mask"]).sum()
    assert text_bytes > 1.2 * counted  # BPE tokens are often several bytes long
    V = task.vocab_size
    assert values["loss"] == pytest.approx(math.log(V), rel=1e-6)
    assert values["bits_per_byte"] == pytest.approx(
        counted * math.log2(V) / text_bytes, rel=1e-6
    )
    # by hand: 3 counted targets of 1, 4 and 2 bytes under a uniform 8-way model cost
    # 3 ln 8 nats for 7 bytes: 9/7 bits per byte.
    assert 3 * math.log(8) / 7 / math.log(2) == pytest.approx(9 / 7)


def jax_standard_promotion():
    import jax

    return jax.numpy_dtype_promotion("standard")


def test_stdlib_slice(tmp_path):
    """The default corpus: the interpreter's standard library, less test suites."""
    cfg = LMConfig()
    assert cfg.paths == ("stdlib:**/*.py",) and cfg.tokenizer == "bytes"
    corpus = data._corpus.find_corpus(cfg.paths, cfg.exclude)
    stdlib = sysconfig.get_paths()["stdlib"]
    rel = [os.path.relpath(f, stdlib) for f in corpus.files]
    assert "json/decoder.py" in rel and "os.py" in rel
    for excluded in ("test", "tests", "idle_test", "site-packages"):
        assert not any(excluded in r.split(os.sep)[:-1] for r in rel), excluded
    assert len(corpus.files) > 100 and corpus.total_bytes > 1_000_000
    task = build_task(
        LMConfig(
            paths=["stdlib:json/*.py"], tokenizer="bpe", vocab_size=512, seq_len=64,
            cache_dir=str(tmp_path),
        )
    )  # fmt: skip
    assert task.files == tuple(sorted(os.path.join(stdlib, "json", f) for f in os.listdir(
        os.path.join(stdlib, "json")) if f.endswith(".py")))  # fmt: skip
    text = Path(stdlib, "json", "decoder.py").read_text()
    assert task.decode(task.encode(text)) == text
