"""`init_from: hf:PATH`: the trainer's model section from a Hugging Face checkpoint,
and its tensors copied into the trainer's parameters."""

from __future__ import annotations

import copy
import math
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

from ..errors import ConfigError
from ._io import TOKENIZER_FILE, HFError, read_config
from ._tree import arrays_of

PREFIX = "hf:"
# the trainer's RMS norms have equinox's default epsilon
TRAINER_NORM_EPS = 1e-5
# rows of these follow the vocabulary, which the task's tokenizer sets
_VOCAB_ROWS = ("embedding.weight", "head.weight", "head.bias")


def hf_path(source: str | Path) -> Path | None:
    """The directory of an `init_from: hf:PATH`, or None for other sources."""
    source = str(source)
    return Path(source[len(PREFIX) :]).expanduser() if source.startswith(PREFIX) else None


def _module_and_model(path: Path):
    from . import _module

    config = read_config(path)
    module = _module(config, path)
    return module, module.model_config(config, path)


def with_hf_model(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw config whose `init_from` is `hf:PATH`, with the `model` section the
    checkpoint needs filled in (`mixer`, `d_model`, `n_layers`, `mlp_ratio` and the
    mixer's structural options), `task.tokenizer` set to the checkpoint's
    `tokenizer.json` when the task takes one and the config names none, and
    `head.bias` added to `train.freeze` for language modelling (the reference's
    `lm_head` has no bias, so `save_hf` can write the result).

    A key the config gives that contradicts the checkpoint is a `ConfigError`
    naming it.
    """
    raw = copy.deepcopy(dict(raw))
    path = hf_path(raw["init_from"])
    where = f"init_from: {raw['init_from']}"
    try:
        _, derived = _module_and_model(path)
    except HFError as e:
        raise ConfigError(f"{where}: {e}") from None
    eps = derived.pop("norm_eps")
    if not math.isclose(eps, TRAINER_NORM_EPS):
        raise ConfigError(
            f"{where}: layer_norm_epsilon is {eps}, but the trainer's models use "
            f"{TRAINER_NORM_EPS}; load it with train.hf.load_hf instead"
        )
    model = dict(raw.get("model") or {})
    for key in ("mixer", "d_model", "n_layers", "mlp_ratio"):
        if key in model and model[key] != derived[key]:
            raise ConfigError(
                f"model.{key}: {model[key]!r} differs from the checkpoint's "
                f"{derived[key]!r} ({where}); leave it out to take the checkpoint's"
            )
        model[key] = derived[key]
    options = dict(model.get("mixer_kwargs") or {})
    for key, value in derived["mixer_kwargs"].items():
        if key in options and options[key] != value:
            raise ConfigError(
                f"model.mixer_kwargs.{key}: {options[key]!r} differs from the "
                f"checkpoint's {value!r} ({where})"
            )
        options[key] = value
    model["mixer_kwargs"] = options
    raw["model"] = model

    from .. import data as data_lib

    task = raw.get("task")
    if isinstance(task, Mapping):
        task = dict(task)
        cls = data_lib.TASKS.get(task.get("name", "mnist1d"))
        fields = getattr(cls, "__dataclass_fields__", {})
        if "tokenizer" in fields and "tokenizer" not in task:
            if (path / TOKENIZER_FILE).is_file():
                task["tokenizer"] = str(path / TOKENIZER_FILE)
        raw["task"] = task
        if "tokenizer" in fields:  # language modelling: the head keeps no bias
            train = dict(raw.get("train") or {})
            freeze = list(train.get("freeze") or [])
            if "head.bias" not in freeze:
                train["freeze"] = freeze + ["head.bias"]
            raw["train"] = train
    return raw


def load_matching_hf(params, source: str, report=print):
    """`train.finetune.load_matching` for `hf:PATH`: every parameter from the
    checkpoint (a tied `lm_head` is the embedding, the absent head bias is zero).

    The vocabulary rows (embedding, head) are cut or extended to the task's
    vocabulary (new rows keep their fresh initialisation, reported as resized); any
    other parameter that does not match is an error, not a partial model.
    """
    from ..checkpoint import flatten, unflatten
    from . import load_hf

    path = hf_path(source)
    try:
        model, info = load_hf(path)
    except HFError as e:
        raise ConfigError(f"init_from: {e}") from None
    src = arrays_of(model)
    if "head.weight" not in src:
        src["head.weight"] = src["embedding.weight"]
    if "head.bias" not in src:
        src["head.bias"] = np.zeros(src["head.weight"].shape[0], np.float32)
    flat = flatten(params)
    vocab = flat["embedding.weight"].shape[0] if "embedding.weight" in flat else None
    loaded, reshaped, skipped, new = [], [], {}, {}
    for name, value in flat.items():
        s = src.get(name)
        # a head over the vocabulary (language modelling), not over classes
        lm_rows = name == "embedding.weight" or value.shape[0] == vocab
        if s is not None and s.shape == value.shape:
            loaded.append(name)
            new[name] = jnp.asarray(s, value.dtype)
        elif (
            s is not None
            and name in _VOCAB_ROWS
            and lm_rows
            and s.shape[1:] == value.shape[1:]
        ):
            rows = min(s.shape[0], value.shape[0])
            reshaped.append(f"{name} ({s.shape[0]} rows in the checkpoint, {rows} kept)")
            if rows == value.shape[0]:  # cut: nothing of the fresh value is kept
                new[name] = jnp.asarray(s[:rows], value.dtype)
            else:  # extended: the new rows keep their fresh initialisation
                new[name] = jnp.asarray(value).at[:rows].set(s.astype(value.dtype))
        elif name.startswith("head."):  # a new head (another task's outputs)
            skipped[name] = "not in the checkpoint" if s is None else f"shape {s.shape}"
            new[name] = value
        else:
            got = "absent" if s is None else f"of shape {s.shape}"
            raise ConfigError(
                f"init_from: {source}: parameter {name} {got} in the checkpoint, "
                f"{value.shape} in this model (the model section does not match it)"
            )
    result = {
        "source": str(path),
        "model_type": info["model_type"],
        "loaded": loaded,
        "reshaped": reshaped,
        "skipped": skipped,
        "unused_in_source": sorted(set(src) - set(flat)),
    }
    report(
        f"init_from {source} ({info['model_type']}): loaded {len(loaded)} parameters, "
        f"resized {len(reshaped)}, skipped {len(skipped)}"
        + "".join(f"\n  resized {k}" for k in reshaped)
        + "".join(f"\n  skipped {k}: {v}" for k, v in skipped.items())
    )
    return unflatten(params, new), result
