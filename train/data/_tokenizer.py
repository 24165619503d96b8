"""Tokenizers of the LM task: UTF-8 bytes, or a Hugging Face `tokenizers` file.

A tokenizer maps text to int32 token ids and back, knows its vocabulary size, its
end-of-document token (or None), how many bytes of text each token id stands for (for
bits per byte) and a fingerprint that keys the shard cache. `BytesTokenizer` needs no
file; `HFTokenizer` wraps a `tokenizer.json` (trained here as byte-level BPE by
`train_bpe`, or any file a user names).
"""

import hashlib
import json
import os
from collections.abc import Iterable
from pathlib import Path
from typing import Any

import numpy as np

from ._base import DataError

EOD_TEXT = "<|endoftext|>"
# Names that end-of-document (or end-of-sequence) tokens go by in common tokenizer files.
EOD_NAMES = (EOD_TEXT, "<|end_of_text|>", "</s>", "<eos>", "<eod>", "<|eot_id|>", "[SEP]")
TOKENIZER_FILE = "tokenizer.json"


def encode(text: str) -> np.ndarray:
    """The UTF-8 bytes of `text` as an int32 token array."""
    return np.frombuffer(text.encode("utf-8"), dtype=np.uint8).astype(np.int32)


def decode(tokens: Any) -> str:
    """The text of byte tokens (UTF-8, malformed bytes replaced by U+FFFD)."""
    data = np.asarray(tokens).reshape(-1)
    if data.size and (data.min() < 0 or data.max() > 255):
        raise ValueError("byte tokens must lie in [0, 256)")
    return data.astype(np.uint8).tobytes().decode("utf-8", errors="replace")


class BytesTokenizer:
    """UTF-8 bytes as tokens 0..255, and with `eod` the end-of-document token 256.

    Decoding renders the end-of-document token as the text `<|endoftext|>`.
    """

    name = source = "bytes"

    def __init__(self, eod: bool):
        self.eod_id = 256 if eod else None
        self.vocab_size = 257 if eod else 256
        self.token_bytes = np.ones(self.vocab_size, np.int32)
        if eod:
            self.token_bytes[256] = 0
        self.fingerprint = "bytes+eod" if eod else "bytes"

    def encode(self, text: str) -> np.ndarray:
        return encode(text)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        return [encode(t) for t in texts]

    def decode(self, tokens: Any) -> str:
        data = np.asarray(tokens).reshape(-1)
        if data.size and (data.min() < 0 or data.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        if self.eod_id is None:
            return decode(data)
        parts = np.split(data, np.flatnonzero(data == self.eod_id))
        texts = [decode(parts[0])] + [EOD_TEXT + decode(p[1:]) for p in parts[1:]]
        return "".join(texts)

    def to_json(self) -> str | None:
        return None  # nothing to save: the tokenizer is defined by the code


def _byte_alphabet() -> dict[str, int]:
    """GPT-2's byte-to-unicode map inverted: the character ByteLevel writes per byte."""
    keep = list(range(ord("!"), ord("~") + 1)) + list(range(0xA1, 0xAD))
    keep += list(range(0xAE, 0x100))
    chars, extra = {}, 0
    for b in range(256):
        if b in keep:
            chars[chr(b)] = b
        else:
            chars[chr(256 + extra)] = b
            extra += 1
    return chars


class HFTokenizer:
    """A Hugging Face `tokenizers.Tokenizer`.

    Special tokens that occur literally in the text are encoded as text
    (`encode_special_tokens`), so the end-of-document id appears in a corpus only where
    it was inserted between documents.
    """

    name = "hf"

    def __init__(self, tokenizer: Any, source: str):
        self._tok = tokenizer
        self._tok.encode_special_tokens = True
        self.source = source
        self.vocab_size = tokenizer.get_vocab_size(with_added_tokens=True)
        self._json = tokenizer.to_str()
        self.fingerprint = "hf:" + hashlib.sha256(self._json.encode()).hexdigest()
        vocab = tokenizer.get_vocab(with_added_tokens=True)
        self.eod_id = next((vocab[n] for n in EOD_NAMES if n in vocab), None)
        self.token_bytes = self._token_bytes(json.loads(self._json))

    def _token_bytes(self, spec: dict) -> np.ndarray:
        """Bytes of text per token id: exact for byte-level tokenizers (every character
        of a token is one byte), the UTF-8 length of the decoded token otherwise."""
        special = {t["id"] for t in spec.get("added_tokens") or () if t.get("special")}
        byte_level = "ByteLevel" in json.dumps(spec.get("decoder"))
        alphabet = _byte_alphabet()
        out = np.zeros(self.vocab_size, np.int32)
        for i in range(self.vocab_size):
            if i in special:
                continue
            token = self._tok.id_to_token(i)
            if token is None:
                continue
            if byte_level:
                out[i] = sum(1 if c in alphabet else len(c.encode()) for c in token)
            else:
                out[i] = len(self._tok.decode([i], skip_special_tokens=False).encode())
        return out

    def encode(self, text: str) -> np.ndarray:
        return np.asarray(self._tok.encode(text, add_special_tokens=False).ids, np.int32)

    def encode_batch(self, texts: list[str]) -> list[np.ndarray]:
        encoded = self._tok.encode_batch(texts, add_special_tokens=False)
        return [np.asarray(e.ids, np.int32) for e in encoded]

    def decode(self, tokens: Any) -> str:
        ids = np.asarray(tokens).reshape(-1)
        if ids.size and (ids.min() < 0 or ids.max() >= self.vocab_size):
            raise ValueError(f"tokens must lie in [0, {self.vocab_size})")
        return self._tok.decode([int(i) for i in ids], skip_special_tokens=False)

    def to_json(self) -> str:
        return self._json


def load_tokenizer_file(path: str | Path, key: str = "task.tokenizer") -> HFTokenizer:
    """Read a `tokenizer.json`; a `DataError` naming `key` if it is missing or is not
    a tokenizer."""
    from tokenizers import Tokenizer

    path = Path(path)
    if not path.is_file():
        raise DataError(f"{key}: tokenizer file {str(path)!r} does not exist")
    try:
        tok = Tokenizer.from_file(str(path))
    except Exception as e:  # tokenizers raises a bare Exception for bad files
        first = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise DataError(
            f"{key}: {str(path)!r} is not a tokenizer.json file ({first})"
        ) from None
    return HFTokenizer(tok, str(path))


def train_bpe(texts: Iterable[str], vocab_size: int) -> HFTokenizer:
    """Byte-level BPE (GPT-2's pre-tokenisation, all 256 bytes in the vocabulary, so
    no text is unknown) trained on `texts`, with `<|endoftext|>` as id 0.

    Deterministic: the same texts in the same order give the same tokenizer.
    """
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers

    tok = Tokenizer(models.BPE())
    tok.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tok.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        special_tokens=[EOD_TEXT],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tok.train_from_iterator(texts, trainer)
    return HFTokenizer(tok, "bpe")


def write_atomic(path: Path, text: str) -> None:
    """Write `text` to `path` through a temporary name, so no reader sees half a file."""
    path.parent.mkdir(parents=True, exist_ok=True)
    tmp = path.with_name(f".{path.name}.tmp-{os.getpid()}")
    try:
        tmp.write_text(text, encoding="utf-8")
        os.replace(tmp, path)
    finally:
        tmp.unlink(missing_ok=True)
