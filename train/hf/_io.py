"""Reading and writing Hugging Face model directories: `config.json` and safetensors
(one file or shards with `model.safetensors.index.json`), with named errors."""

from __future__ import annotations

import json
import math
from collections.abc import Iterable, Mapping
from pathlib import Path
from typing import Any

import numpy as np

from ..errors import ConfigError

CONFIG_FILE = "config.json"
WEIGHTS_FILE = "model.safetensors"
INDEX_FILE = "model.safetensors.index.json"
TOKENIZER_FILE = "tokenizer.json"

# safetensors dtype names we can hold exactly in float32 parameters
_FLOAT_DTYPES = ("F32", "F16", "BF16", "F64")


class HFError(ConfigError):
    """A Hugging Face model directory that cannot be read or mapped onto our layers.
    The message names the directory and the file, tensor or config field at fault."""


def read_config(path: str | Path) -> dict[str, Any]:
    """The parsed `config.json` of a model directory."""
    path = Path(path).expanduser()
    if not path.is_dir():
        raise HFError(f"{path}: not a directory (expected a Hugging Face model directory)")
    file = path / CONFIG_FILE
    if not file.is_file():
        raise HFError(
            f"{path}: no {CONFIG_FILE} (a Hugging Face model directory holds config.json "
            "and model.safetensors)"
        )
    try:
        config = json.loads(file.read_text())
    except (json.JSONDecodeError, UnicodeDecodeError) as e:
        raise HFError(f"{file}: not valid JSON ({e})") from None
    if not isinstance(config, dict):
        raise HFError(f"{file}: expected a JSON object, got {type(config).__name__}")
    return config


def _weight_files(path: Path) -> list[Path]:
    index = path / INDEX_FILE
    if index.is_file():
        try:
            weight_map = json.loads(index.read_text())["weight_map"]
        except (json.JSONDecodeError, KeyError, TypeError) as e:
            raise HFError(
                f"{index}: not a safetensors index with a weight_map ({e})"
            ) from None
        files = sorted(set(weight_map.values()))
        missing = [f for f in files if not (path / f).is_file()]
        if missing:
            raise HFError(f"{index}: names shard(s) {missing} that are not in {path}")
        return [path / f for f in files]
    if (path / WEIGHTS_FILE).is_file():
        return [path / WEIGHTS_FILE]
    others = sorted(p.name for p in path.glob("*.bin")) + sorted(
        p.name for p in path.glob("*.safetensors")
    )
    hint = (
        f" (found {others}; only safetensors are read, no torch pickles)" if others else ""
    )
    raise HFError(f"{path}: no {WEIGHTS_FILE} and no {INDEX_FILE}{hint}")


def read_tensors(path: str | Path) -> dict[str, np.ndarray]:
    """Every tensor of a model directory's safetensors file(s), as float32 numpy arrays
    (float16, bfloat16 and float64 convert exactly or to nearest; any other dtype is an
    `HFError` naming the tensor)."""
    from safetensors import safe_open

    path = Path(path).expanduser()
    tensors: dict[str, np.ndarray] = {}
    for file in _weight_files(path):
        try:
            header = _header(file)
        except (OSError, ValueError) as e:
            raise HFError(f"{file}: not a safetensors file ({e})") from None
        for name, entry in header.items():
            if name == "__metadata__":
                continue
            dtype = entry.get("dtype")
            if dtype not in _FLOAT_DTYPES:
                raise HFError(
                    f"{file}: tensor {name!r} has dtype {dtype}, which float32 parameters "
                    f"cannot hold; supported: {', '.join(_FLOAT_DTYPES)}"
                )
        with safe_open(file, framework="numpy") as f:
            for name in f.keys():  # noqa: SIM118 (safe_open is not a mapping)
                if name in tensors:
                    raise HFError(f"{file}: tensor {name!r} is also in another shard")
                if header[name]["dtype"] == "BF16":
                    tensors[name] = _bf16(file, header, name)
                else:
                    tensors[name] = np.asarray(f.get_tensor(name), np.float32)
    return tensors


def _header(file: Path) -> dict[str, Any]:
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        if n <= 0 or n > 100_000_000:
            raise ValueError("bad header length")
        return json.loads(f.read(n))


def _bf16(file: Path, header: Mapping[str, Any], name: str) -> np.ndarray:
    """numpy has no bfloat16: read the raw bytes and widen them to float32."""
    entry = header[name]
    start, end = entry["data_offsets"]
    with open(file, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        f.seek(8 + n + start)
        raw = np.frombuffer(f.read(end - start), np.dtype("<u2"))
    bits = raw.astype(np.uint32) << 16
    return bits.view(np.float32).reshape(entry["shape"])


def write_dir(
    path: str | Path,
    config: Mapping[str, Any],
    tensors: Mapping[str, np.ndarray],
    dtype: str = "float32",
) -> Path:
    """Write `config.json` and `model.safetensors` into `path` (created if needed),
    replacing a sharded checkpoint there (its index and shards)."""
    from safetensors.numpy import save_file

    if dtype not in ("float32", "float16"):
        raise ValueError(f"save_hf: dtype must be 'float32' or 'float16', got {dtype!r}")
    path = Path(path).expanduser()
    path.mkdir(parents=True, exist_ok=True)
    index = path / INDEX_FILE
    if index.is_file():  # a sharded checkpoint there would shadow the new file
        for file in set(json.loads(index.read_text()).get("weight_map", {}).values()):
            (path / file).unlink(missing_ok=True)
        index.unlink()
    arrays = {
        k: np.ascontiguousarray(np.asarray(v, np.float32).astype(dtype))
        for k, v in tensors.items()
    }
    save_file(arrays, str(path / WEIGHTS_FILE), metadata={"format": "pt"})
    (path / CONFIG_FILE).write_text(
        json.dumps(dict(config), indent=2, sort_keys=True) + "\n"
    )
    return path


class Tensors:
    """The tensors of one checkpoint, handed out by name with shape checks; `finish`
    raises for any that were never taken (nothing is silently dropped)."""

    def __init__(self, path: Path, tensors: dict[str, np.ndarray]):
        self.path, self._tensors, self._taken = path, tensors, set()

    def __contains__(self, name: str) -> bool:
        return name in self._tensors

    def take(self, name: str, shape: Iterable[int]) -> np.ndarray:
        shape = tuple(int(s) for s in shape)
        if name not in self._tensors:
            raise HFError(
                f"{self.path}: tensor {name!r} is missing (expected shape {shape})"
            )
        value = self._tensors[name]
        if value.shape != shape:
            raise HFError(
                f"{self.path}: tensor {name!r} has shape {tuple(value.shape)}, expected "
                f"{shape} from config.json"
            )
        self._taken.add(name)
        return value

    def skip(self, name: str) -> None:
        """Mark a tensor as read (one that duplicates another, e.g. a tied head)."""
        self._taken.add(name)

    def finish(self) -> None:
        unused = sorted(set(self._tensors) - self._taken)
        if unused:
            more = f" and {len(unused) - 5} more" if len(unused) > 5 else ""
            raise HFError(
                f"{self.path}: tensor(s) {unused[:5]}{more} are not used by the model "
                "config.json describes (refusing a partial mapping)"
            )


def field(
    config: Mapping[str, Any], name: str, kind: type | tuple, path: Path, default=...
):
    """`config[name]`, checked to be of type `kind`; a named error otherwise."""
    if name not in config or config[name] is None:
        if default is ...:
            raise HFError(f"{path / CONFIG_FILE}: field {name!r} is missing")
        return default
    value = config[name]
    kinds = kind if isinstance(kind, tuple) else (kind,)
    ok = isinstance(value, kinds) and not (isinstance(value, bool) and bool not in kinds)
    if float in kinds and isinstance(value, int) and not isinstance(value, bool):
        ok = True
    if not ok:
        names = " or ".join(k.__name__ for k in kinds)
        raise HFError(
            f"{path / CONFIG_FILE}: field {name!r} must be {names}, got {value!r}"
        )
    return value


def require(
    config: Mapping[str, Any], name: str, expected, path: Path, default=..., why=""
):
    """Refuse a config field whose value changes the computation in a way our layers
    do not implement."""
    value = config.get(name, default)
    if default is ... and name not in config:
        raise HFError(f"{path / CONFIG_FILE}: field {name!r} is missing")
    ok = value in expected if isinstance(expected, tuple | list) else value == expected
    if isinstance(expected, float) and isinstance(value, int | float):
        ok = math.isclose(value, expected)
    if not ok:
        raise HFError(
            f"{path / CONFIG_FILE}: field {name!r} = {value!r} is not supported "
            f"(expected {expected!r}){': ' + why if why else ''}"
        )
    return value
