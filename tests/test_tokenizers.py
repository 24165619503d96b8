"""Tokenizers of the LM task: bytes and byte-level BPE round trips, deterministic BPE
training, bytes per token, and tokenizer files that are missing or not tokenizers."""

import json

import numpy as np
import pytest

from train import data
from train.data import BytesTokenizer, DataError, load_tokenizer_file, train_bpe

TEXTS = [
    "def add(a, b):\n    return a + b\n\n",
    "The quick brown fox jumps over the lazy dog. " * 5,
    "héllo → 世界, ünïcödé and emoji 🙂\n" * 3,
    "class Stack:\n    def push(self, item):\n        self.items.append(item)\n" * 4,
]
UNSEEN = "Ωmega ≠ omega; tabs\tand\r\nnewlines, <|endoftext|> as text, 🙂🙃 and ASCII ~!@#"


@pytest.fixture(scope="module")
def bpe():
    return train_bpe(TEXTS * 3, vocab_size=320)


@pytest.mark.parametrize("eod", [False, True])
def test_bytes_round_trip(eod):
    tok = BytesTokenizer(eod=eod)
    assert tok.vocab_size == (257 if eod else 256)
    assert tok.eod_id == (256 if eod else None)
    ids = tok.encode(UNSEEN)
    assert ids.dtype == np.int32 and len(ids) == len(UNSEEN.encode("utf-8"))
    assert tok.decode(ids) == UNSEEN
    assert tok.token_bytes[ids].sum() == len(UNSEEN.encode("utf-8"))
    if eod:
        joined = np.concatenate([tok.encode("ab"), [256], tok.encode("c")])
        assert tok.decode(joined) == "ab<|endoftext|>c"
        assert tok.token_bytes[256] == 0
    with pytest.raises(ValueError, match="must lie in"):
        tok.decode([tok.vocab_size])


def test_bpe_round_trip_and_bytes_per_token(bpe):
    assert bpe.vocab_size == len(bpe.token_bytes) and 256 < bpe.vocab_size <= 320
    assert bpe.eod_id == 0
    for text in TEXTS + [UNSEEN, ""]:
        ids = bpe.encode(text)
        assert ids.dtype == np.int32
        assert bpe.decode(ids) == text
        # every token stands for a whole number of bytes, and they add up to the text
        assert bpe.token_bytes[ids].sum() == len(text.encode("utf-8"))
    # The literal text of the end-of-document token is text, not the token.
    assert bpe.eod_id not in bpe.encode(UNSEEN).tolist()
    assert bpe.token_bytes[bpe.eod_id] == 0
    # Merges were learnt: the training text is shorter in BPE tokens than in bytes.
    assert len(bpe.encode(TEXTS[3])) < len(TEXTS[3].encode()) / 2
    batch = bpe.encode_batch(TEXTS)
    for text, ids in zip(TEXTS, batch, strict=True):
        np.testing.assert_array_equal(ids, bpe.encode(text))


def test_bpe_training_is_deterministic(bpe, tmp_path):
    again = train_bpe(TEXTS * 3, vocab_size=320)
    assert again.to_json() == bpe.to_json() and again.fingerprint == bpe.fingerprint
    other = train_bpe(TEXTS[::-1] * 3, vocab_size=300)
    assert other.fingerprint != bpe.fingerprint
    path = tmp_path / "tokenizer.json"
    path.write_text(bpe.to_json())
    loaded = load_tokenizer_file(path)
    assert loaded.fingerprint == bpe.fingerprint
    np.testing.assert_array_equal(loaded.token_bytes, bpe.token_bytes)
    np.testing.assert_array_equal(loaded.encode(UNSEEN), bpe.encode(UNSEEN))


def test_tokenizer_file_errors_name_key_and_file(tmp_path, bpe):
    missing = tmp_path / "nope.json"
    with pytest.raises(DataError, match=f"^task.tokenizer: .*{missing}.*does not exist"):
        load_tokenizer_file(missing)
    for name, text in [
        ("garbage.json", "not json at all {"),
        ("other.json", json.dumps({"model": {"type": "nothing"}})),
    ]:
        path = tmp_path / name
        path.write_text(text)
        with pytest.raises(DataError, match=f"^task.tokenizer: .*{name}.*not a tokenizer"):
            load_tokenizer_file(path)


def test_file_tokenizer_without_eod_is_refused_for_documents(tmp_path, monkeypatch):
    from tokenizers import Tokenizer, models, pre_tokenizers

    words = {w: i for i, w in enumerate(["[UNK]", "hello", "world"])}
    tok = Tokenizer(models.WordLevel(words, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.Whitespace()
    path = tmp_path / "words.json"
    tok.save(str(path))
    (tmp_path / "c.txt").write_text("hello world " * 50)
    monkeypatch.chdir(tmp_path)
    config = dict(paths=["c.txt"], tokenizer=str(path), seq_len=8, cache_dir="cache")
    with pytest.raises(DataError, match="^task.tokenizer: .*words.json.*end-of-document"):
        data.build_task(data.LMConfig(**config))
    task = data.build_task(data.LMConfig(**config, documents="none"))
    assert task.vocab_size == 3 and task.eod_id is None
    assert task.tokens("train")[:4].tolist() == [1, 2, 1, 2]
    assert task.decode(task.encode("hello world")) == "hello world"
