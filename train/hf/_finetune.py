"""`init_from: hf:PATH`: the trainer's model is the checkpoint's architecture (from its
`config.json`, kept in the config as `model.hf_config`), and the checkpoint's tensors
are copied into its parameters."""

from __future__ import annotations

import copy
from collections.abc import Mapping
from pathlib import Path
from typing import Any

import jax.numpy as jnp
import numpy as np

import layers

from ..errors import ConfigError
from ._io import TOKENIZER_FILE, HFError, read_config
from ._tree import arrays_of

PREFIX = "hf:"
# the model keys an architecture fixes (besides mixer_kwargs)
FIXED_KEYS = ("mixer", "d_model", "n_layers", "mlp_ratio")
# what the trainer decides itself: outputs and vocabulary from the task, and its own
# head (untied, with a bias, which language modelling freezes at zero)
_TRAINER_SETS = ("d_output", "vocab_size", "tie_embeddings", "head_bias")
# rows of these follow the vocabulary, which the task's tokenizer sets
_VOCAB_ROWS = ("embedding.weight", "head.weight", "head.bias")


def hf_path(source: str | Path | None) -> Path | None:
    """The directory of an `init_from: hf:PATH`, or None for other sources."""
    source = "" if source is None else str(source)
    return Path(source[len(PREFIX) :]).expanduser() if source.startswith(PREFIX) else None


def architecture(config: Mapping[str, Any], path: str | Path = "model.hf_config"):
    """The `layers.SequenceModel` keyword arguments (all but `key`) of a `config.json`,
    from its model type's module (`path` names it in errors); raises `HFError`."""
    from . import _module

    config, path = dict(config), Path(path)
    return _module(config, path).architecture(config, path)


def mixer_name(mixer) -> str:
    """A mixer's registry name, or its class's name when it has none."""
    if isinstance(mixer, str):
        return mixer
    names = [n for n, cls in layers.MIXERS.items() if cls is mixer]
    return names[0] if names else mixer.__name__


def fixed_keys(arch: Mapping[str, Any]) -> dict[str, Any]:
    """The model section's keys that `arch` fixes: `mixer` (names), `d_model`,
    `n_layers`, `mlp_ratio` (one that gives `mlp_hidden` where that is set) and
    `mixer_kwargs` (by mixer name for a list of mixers)."""
    mixer, options = arch["mixer"], dict(arch.get("mixer_kwargs") or {})
    hybrid = isinstance(mixer, list | tuple)
    hidden, D = arch.get("mlp_hidden"), arch["d_model"]
    return {
        "mixer": [mixer_name(m) for m in mixer] if hybrid else mixer_name(mixer),
        "d_model": D,
        "n_layers": arch["n_layers"],
        # Block's hidden width is round(2 * mlp_ratio * d_model / 3)
        "mlp_ratio": float(
            arch.get("mlp_ratio", 4.0) if hidden is None else 1.5 * hidden / D
        ),
        "mixer_kwargs": (
            {mixer_name(k): dict(v) for k, v in options.items()} if hybrid else options
        ),
    }


def trainer_architecture(
    config: Mapping[str, Any], options: Mapping[str, Mapping[str, Any]]
) -> dict[str, Any]:
    """For `train.trainer.build_model`: the `SequenceModel` keyword arguments of the
    `config.json` `config` without those the trainer sets itself (`d_output`,
    `vocab_size`, `tie_embeddings`, `head_bias`), each mixer taking `options[name]`
    (the model section's `mixer_kwargs`, by mixer name: the checkpoint's and the
    run's own, such as `chunk_size`)."""
    arch = architecture(config)
    for key in _TRAINER_SETS:
        arch.pop(key, None)
    mixer = arch["mixer"]
    if isinstance(mixer, list | tuple):
        arch["mixer_kwargs"] = {
            m: dict(options.get(mixer_name(m)) or {}) for m in dict.fromkeys(mixer)
        }
    else:
        arch["mixer_kwargs"] = dict(options.get(mixer_name(mixer)) or {})
    return arch


def _merge_options(given, derived: Mapping, key: str, where: str) -> dict:
    if not isinstance(given, Mapping):
        raise ConfigError(f"{key}: expected a mapping of keyword arguments, got {given!r}")
    for name, value in derived.items():
        if name in given and given[name] != value:
            raise ConfigError(
                f"{key}.{name}: {given[name]!r} differs from the checkpoint's {value!r} "
                f"({where}); leave it out to take the checkpoint's"
            )
    return {**given, **derived}


def with_hf_model(raw: Mapping[str, Any]) -> dict[str, Any]:
    """A raw config whose `init_from` is `hf:PATH` (or whose `model.hf_config` is set),
    with `model.hf_config` set to the checkpoint's `config.json` (kept when given:
    a resumed run rebuilds its model from it, without the directory), the keys it
    fixes filled in (`mixer`, `d_model`, `n_layers`, `mlp_ratio`, the mixer's options
    in `mixer_kwargs`), `task.tokenizer` set to the checkpoint's `tokenizer.json` when
    the task takes one and the config names none, and `head.bias` added to
    `train.freeze` for language modelling (the reference's `lm_head` has no bias, so
    `save_hf` can write the result).

    A key the config gives that contradicts the checkpoint is a `ConfigError`
    naming it.
    """
    raw = copy.deepcopy(dict(raw))
    model = raw.get("model") or {}
    if not isinstance(model, Mapping):
        raise ConfigError(f"model: expected a mapping of keys, got {model!r}")
    model = dict(model)
    path = hf_path(raw.get("init_from"))
    stored = model.get("hf_config")
    if stored is None:
        where = f"init_from: {raw['init_from']}"
        try:
            config = read_config(path)
        except HFError as e:
            raise ConfigError(f"{where}: {e}") from None
    else:
        where = "model.hf_config"
        if not raw.get("init_from"):
            raise ConfigError(
                "model.hf_config: needs init_from (hf:PATH, or a run directory that was "
                "fine-tuned from one), whose parameters the model starts from"
            )
        if not isinstance(stored, Mapping):
            raise ConfigError(f"model.hf_config: expected a mapping, got {stored!r}")
        config = dict(stored)
    try:
        fixed = fixed_keys(architecture(config, path or where))
    except HFError as e:
        raise ConfigError(f"{where}: {e}") from None
    for key in FIXED_KEYS:
        if key in model and model[key] != fixed[key]:
            raise ConfigError(
                f"model.{key}: {model[key]!r} differs from the checkpoint's "
                f"{fixed[key]!r} ({where}); leave it out to take the checkpoint's"
            )
        model[key] = fixed[key]
    given = model.get("mixer_kwargs") or {}
    if isinstance(fixed["mixer"], list):
        given = _merge_options(given, {}, "model.mixer_kwargs", where)
        model["mixer_kwargs"] = {
            name: _merge_options(
                given.get(name) or {}, options, f"model.mixer_kwargs.{name}", where
            )
            for name, options in fixed["mixer_kwargs"].items()
        } | {k: v for k, v in given.items() if k not in fixed["mixer_kwargs"]}
    else:
        model["mixer_kwargs"] = _merge_options(
            given, fixed["mixer_kwargs"], "model.mixer_kwargs", where
        )
    model["hf_config"] = config
    raw["model"] = model

    from .. import data as data_lib

    task = raw.get("task")
    if isinstance(task, Mapping):
        task = dict(task)
        cls = data_lib.TASKS.get(task.get("name", "mnist1d"))
        fields = getattr(cls, "__dataclass_fields__", {})
        if "tokenizer" in fields and "tokenizer" not in task and path is not None:
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
