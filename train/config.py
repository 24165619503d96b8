"""Typed run configuration: YAML in, frozen dataclasses out.

A config file has the sections `model`, `task`, `optim`, `train`, `logging` and
`distributed`, and
the top-level keys `name` and `init_from`. Every key is a field of a dataclass below;
`task` is parsed by the config class of the task it names (`train.data.TASKS`).
Command-line overrides are dotted keys (`optim.lr=3e-3 model.mixer=lru`), their
values read as YAML scalars. Anything that is not a known key of the expected type
and range is a `ConfigError` naming the key, raised before anything is compiled.
"""

from __future__ import annotations

import dataclasses
import inspect
import re
import types
import typing
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Literal

import yaml

from . import data as data_lib
from .errors import ConfigError as ConfigError


def _help(text: str, **kwargs):
    return field(metadata={"help": text}, **kwargs)


@dataclass(frozen=True)
class ModelConfig:
    """`layers.SequenceModel` options."""

    mixer: str | list[str] = _help(
        "sequence mixer, a name in layers.MIXERS; or a list of names repeated to "
        "n_layers, a hybrid stack (e.g. [rglru, rglru, local_attention])",
        default="s5",
    )
    d_model: int = _help("width of the residual stream", default=64)
    n_layers: int = _help("number of blocks", default=2)
    mixer_kwargs: dict[str, Any] = _help(
        "keyword arguments of the mixer's constructor; with a list of mixers, keyed by "
        "mixer name (e.g. {local_attention: {window: 64}})",
        default_factory=dict,
    )
    mlp_ratio: float = _help(
        "hidden width of the gated MLP / d_model (0: no MLP)", default=4.0
    )
    dropout: float = _help("dropout rate inside the blocks", default=0.0)
    pooling: Literal["auto", "mean", "last", "none"] = _help(
        "pooling of the outputs: auto = mean for classification, none otherwise",
        default="auto",
    )
    remat: bool = _help("rematerialise each block in the backward pass", default=False)
    compute_dtype: Literal["float32", "bfloat16"] = _help(
        "dtype of activations (parameters stay float32)", default="float32"
    )
    hf_config: dict[str, Any] | None = _help(
        "the architecture of a Hugging Face config.json: copied in from init_from: "
        "hf:PATH (leave it out), it fixes the model (mixer, d_model, n_layers, "
        "mlp_ratio and mixer_kwargs are filled in from it and must be absent or equal) "
        "and lets resume, ssm-eval and ssm-generate rebuild it without the directory",
        default=None,
    )

    def __post_init__(self):
        import layers

        kinds = [self.mixer] if isinstance(self.mixer, str) else list(self.mixer)
        if not kinds:
            raise ValueError("mixer: an empty list; give at least one mixer name")
        for i, kind in enumerate(kinds):
            key = "mixer" if isinstance(self.mixer, str) else f"mixer[{i}]"
            # a checkpoint's mixer may be a class that is not a registry name
            if kind not in layers.MIXERS and self.hf_config is None:
                raise ValueError(
                    f"{key}: unknown mixer {kind!r}; one of {sorted(layers.MIXERS)}"
                )
        if isinstance(self.mixer, list):
            for kind, options in self.mixer_kwargs.items():
                if kind not in kinds:
                    raise ValueError(
                        f"mixer_kwargs.{kind}: {kind!r} is not in the mixer list "
                        f"{kinds}; with a list of mixers, mixer_kwargs is keyed by "
                        "mixer name (e.g. {local_attention: {window: 64}})"
                    )
                if not isinstance(options, Mapping):
                    raise ValueError(
                        f"mixer_kwargs.{kind}: expected a mapping of keyword "
                        f"arguments, got {options!r}"
                    )
        for kind, options in self.kwargs_by_mixer().items():
            key = self._options_key(kind)
            if kind not in layers.MIXERS:  # the checkpoint's (hf_config): checked there
                continue
            _check_mixer_options(layers.MIXERS[kind], kind, options, key)
            window = options.get("window")
            if window is not None and (type(window) is not int or window < 1):
                raise ValueError(f"{key}.window: must be an integer >= 1, got {window!r}")
        _positive(self, "d_model", "n_layers")
        _nonnegative(self, "mlp_ratio")  # 0: mixer-only blocks (Mamba)
        if not 0.0 <= self.dropout < 1.0:
            raise ValueError(f"dropout: must be in [0, 1), got {self.dropout}")

    def _options_key(self, kind: str) -> str:
        return "mixer_kwargs" if isinstance(self.mixer, str) else f"mixer_kwargs.{kind}"

    def kwargs_by_mixer(self) -> dict[str, dict[str, Any]]:
        """The constructor options of each mixer kind in `mixer`, by name."""
        if isinstance(self.mixer, str):
            return {self.mixer: dict(self.mixer_kwargs)}
        return {kind: dict(self.mixer_kwargs.get(kind) or {}) for kind in self.mixer}

    def check_for_task(self, seq_len: int) -> None:
        """Raise a `ConfigError` for options that do not fit a task's sequences: an
        attention window longer than `seq_len` (that is global attention, slower)."""
        import layers

        for kind, options in self.kwargs_by_mixer().items():
            params = _init_parameters(layers.MIXERS[kind])
            if "window" not in params:
                continue
            given = "window" in options
            window = options["window"] if given else params["window"].default
            if isinstance(window, int) and window > seq_len:
                raise ConfigError(
                    f"model.{self._options_key(kind)}.window: the window of {kind} "
                    f"({window}{'' if given else ', its default'}) is longer than the "
                    f"task's sequences ({seq_len}); set a window <= {seq_len}, or use "
                    "global attention"
                )


def _init_parameters(cls) -> dict[str, inspect.Parameter]:
    params = dict(inspect.signature(cls.__init__).parameters)
    for name in ("self", "key"):
        params.pop(name, None)
    return params


def _check_mixer_options(cls, kind: str, options: Mapping, prefix: str) -> None:
    """Every key of `options` names an argument of the mixer's constructor."""
    params = _init_parameters(cls)
    if any(p.kind is inspect.Parameter.VAR_KEYWORD for p in params.values()):
        return
    accepted = sorted(n for n in params if n != "d_model")
    for name in options:
        if name == "d_model":
            raise ValueError(f"{prefix}.d_model: set by model.d_model, not per mixer")
        if name not in params:
            raise ValueError(
                f"{prefix}.{name}: not an option of {kind} ({cls.__name__}); it takes "
                f"{', '.join(accepted)}"
            )


@dataclass(frozen=True)
class OptimConfig:
    """The optimiser, its schedule and the parameter groups."""

    name: Literal["adamw", "adam", "lion", "sgd"] = _help(
        "optax optimiser", default="adamw"
    )
    lr: float = _help("peak learning rate", default=1e-3)
    weight_decay: float = _help(
        "decoupled weight decay (matrices and embeddings only)", default=0.01
    )
    b1: float = _help("first-moment decay (momentum for sgd)", default=0.9)
    b2: float = _help("second-moment decay", default=0.999)
    warmup_steps: int = _help("linear warm-up steps", default=100)
    schedule: Literal["cosine", "constant"] = _help("decay after warm-up", default="cosine")
    min_lr_ratio: float = _help("final learning rate / peak (cosine)", default=0.0)
    clip_norm: float | None = _help(
        "global-norm gradient clipping (null: none)", default=1.0
    )
    ssm_lr_factor: float = _help(
        "learning-rate factor of the SSM parameters (layers.ssm_param_labels)", default=0.25
    )
    ssm_weight_decay: float = _help("weight decay of the SSM parameters", default=0.0)
    grad_accum: int = _help(
        "split each batch into this many micro-batches (same result, less memory)",
        default=1,
    )
    ema_decay: float | None = _help(
        "EMA of the parameters, used for evaluation (null: off)", default=None
    )

    def __post_init__(self):
        _positive(self, "lr", "grad_accum")
        _nonnegative(self, "weight_decay", "warmup_steps", "min_lr_ratio", "ssm_lr_factor")
        _nonnegative(self, "ssm_weight_decay")
        for key in ("b1", "b2"):
            if not 0.0 <= getattr(self, key) < 1.0:
                raise ValueError(f"{key}: must be in [0, 1), got {getattr(self, key)}")
        if self.clip_norm is not None and self.clip_norm <= 0:
            raise ValueError(f"clip_norm: must be > 0 or null, got {self.clip_norm}")
        if self.ema_decay is not None and not 0.0 < self.ema_decay < 1.0:
            raise ValueError(f"ema_decay: must be in (0, 1) or null, got {self.ema_decay}")


@dataclass(frozen=True)
class TrainConfig:
    """The loop: length, batches, evaluation, checkpoints."""

    steps: int = _help("number of optimiser steps", default=1000)
    batch_size: int = _help("examples per step (the global batch)", default=64)
    seed: int = _help("seed of the initialisation, dropout and batch order", default=0)
    eval_every: int = _help(
        "evaluate on validation every N steps (0: only at the end)", default=200
    )
    eval_batch_size: int = _help("batch size of evaluation", default=256)
    log_every: int = _help("write training metrics every N steps", default=10)
    checkpoint_every: int = _help(
        "save a checkpoint every N steps (0: only at the end)", default=500
    )
    keep_checkpoints: int = _help("keep the last N periodic checkpoints", default=2)
    best_metric: str = _help(
        "validation metric that picks the best checkpoint (loss, accuracy, ...)",
        default="loss",
    )
    best_mode: Literal["min", "max"] = _help(
        "whether a lower or higher best_metric is better", default="min"
    )
    early_stopping: int | None = _help(
        "stop after this many evaluations without improvement (null: never)", default=None
    )
    eval_with_best: bool = _help(
        "evaluate the final test split with the best checkpoint (else the last state)",
        default=True,
    )
    on_nonfinite: Literal["stop", "skip"] = _help(
        "non-finite loss or gradient: stop (keeping the last good state) or skip the step",
        default="stop",
    )
    freeze: list[str] = _help(
        "parameter path patterns (fnmatch, e.g. 'blocks.0.*') that are not trained",
        default_factory=list,
    )
    progress: bool = _help("show a progress bar", default=True)

    def __post_init__(self):
        _positive(self, "steps", "batch_size", "eval_batch_size", "log_every")
        _positive(self, "keep_checkpoints")
        _nonnegative(self, "eval_every", "checkpoint_every")
        if self.early_stopping is not None and self.early_stopping < 1:
            raise ValueError(
                f"early_stopping: must be >= 1 or null, got {self.early_stopping}"
            )


@dataclass(frozen=True)
class WandbConfig:
    """Weights & Biases (imported only when used)."""

    mode: Literal["auto", "online", "offline", "disabled"] = _help(
        "auto: online with an API key configured, else offline; WANDB_MODE overrides",
        default="auto",
    )
    project: str = _help("wandb project", default="ssm-jax")
    entity: str | None = _help("wandb entity (team or user)", default=None)
    tags: list[str] = _help("wandb tags", default_factory=list)


@dataclass(frozen=True)
class LoggingConfig:
    """Trackers and plots (metrics.jsonl is always written)."""

    wandb: WandbConfig = field(default_factory=WandbConfig)
    plot: bool = _help("redraw curves.png at each evaluation", default=True)


@dataclass(frozen=True)
class DistributedConfig:
    """Devices and processes (see `train/distributed.py`)."""

    coordinator_address: str | None = _help(
        "host:port of process 0 for a multi-process run (or JAX_COORDINATOR_ADDRESS)",
        default=None,
    )
    num_processes: int | None = _help(
        "number of processes (or JAX_NUM_PROCESSES); null or 1: one process",
        default=None,
    )
    process_id: int | None = _help("this process's index (or JAX_PROCESS_ID)", default=None)
    devices: int = _help(
        "use the first N devices of a single process (0: all devices)", default=0
    )
    fsdp: int = _help(
        "devices that shard the parameters and optimiser state (1: replicate them)",
        default=1,
    )
    seq: int = _help(
        "devices that split each sequence along time (sequence parallelism; the lru "
        "and rglru mixers; one process)",
        default=1,
    )

    def __post_init__(self):
        _nonnegative(self, "devices")
        _positive(self, "fsdp", "seq")
        if self.num_processes is not None and self.num_processes < 1:
            raise ValueError(f"num_processes: must be >= 1, got {self.num_processes}")


@dataclass(frozen=True)
class Config:
    """A whole run."""

    name: str = _help("run name (default: the config file's stem)", default="run")
    init_from: str | None = _help(
        "fine-tune: a run directory or checkpoint to load matching parameters from, "
        "or hf:PATH, a Hugging Face model directory (its architecture, as "
        "model.hf_config, and its tokenizer.json are taken from it)",
        default=None,
    )
    model: ModelConfig = field(default_factory=ModelConfig)
    task: Any = field(default_factory=lambda: data_lib.TASKS["mnist1d"]())
    optim: OptimConfig = field(default_factory=OptimConfig)
    train: TrainConfig = field(default_factory=TrainConfig)
    logging: LoggingConfig = field(default_factory=LoggingConfig)
    distributed: DistributedConfig = field(default_factory=DistributedConfig)

    def __post_init__(self):
        if self.train.batch_size % self.optim.grad_accum:
            raise ValueError(
                "optim.grad_accum: must divide train.batch_size "
                f"({self.train.batch_size}), "
                f"got {self.optim.grad_accum}"
            )


def _positive(obj, *keys):
    for key in keys:
        if getattr(obj, key) <= 0:
            raise ValueError(f"{key}: must be > 0, got {getattr(obj, key)}")


def _nonnegative(obj, *keys):
    for key in keys:
        if getattr(obj, key) < 0:
            raise ValueError(f"{key}: must be >= 0, got {getattr(obj, key)}")


# --------------------------------------------------------------------------- parsing

_FLOAT = re.compile(r"^[+-]?(\d+\.?\d*|\.\d+)([eE][+-]?\d+)?$")


def _type_name(tp) -> str:
    origin = typing.get_origin(tp)
    if origin is Literal:
        return " | ".join(repr(a) for a in typing.get_args(tp))
    if origin in (typing.Union, types.UnionType):
        return " | ".join(_type_name(a) for a in typing.get_args(tp))
    if origin is not None:
        return str(tp).replace("typing.", "")
    if tp is type(None):
        return "null"
    return getattr(tp, "__name__", str(tp))


def _convert(value, tp, key: str):
    """Check `value` against the annotation `tp`; the only conversions are int -> float
    and YAML 1.1's quirk of reading `1e-3` as a string."""
    origin = typing.get_origin(tp)
    if tp is Any:
        return value
    if origin in (typing.Union, types.UnionType):
        args = typing.get_args(tp)
        if value is None and type(None) in args:
            return None
        for arg in args:
            if arg is type(None):
                continue
            try:
                return _convert(value, arg, key)
            except ConfigError:
                pass
        raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")
    if origin is Literal:
        if value in typing.get_args(tp):
            return value
        raise ConfigError(f"{key}: expected one of {_type_name(tp)}, got {value!r}")
    if origin in (list, tuple):
        if not isinstance(value, list | tuple):
            raise ConfigError(f"{key}: expected a list, got {value!r}")
        (item,) = typing.get_args(tp)[:1]
        return [_convert(v, item, f"{key}[{i}]") for i, v in enumerate(value)]
    if origin is dict:
        if not isinstance(value, Mapping):
            raise ConfigError(f"{key}: expected a mapping, got {value!r}")
        return dict(value)
    if dataclasses.is_dataclass(tp):
        return _from_dict(tp, value, key)
    if tp is bool:
        if isinstance(value, bool):
            return value
    elif tp is int:
        if isinstance(value, int) and not isinstance(value, bool):
            return value
    elif tp is float:
        if isinstance(value, int | float) and not isinstance(value, bool):
            return float(value)
        if isinstance(value, str) and _FLOAT.match(value.strip()):
            return float(value)
    elif tp is str:
        if isinstance(value, str):
            return value
    else:
        raise TypeError(f"unsupported config annotation {tp!r} at {key}")
    raise ConfigError(f"{key}: expected {_type_name(tp)}, got {value!r}")


def _fields(cls) -> dict[str, tuple[dataclasses.Field, Any]]:
    hints = typing.get_type_hints(cls)
    return {f.name: (f, hints[f.name]) for f in dataclasses.fields(cls)}


def _from_dict(cls, raw, prefix: str):
    where = prefix or "the config"
    if raw is None:
        raw = {}
    if not isinstance(raw, Mapping):
        raise ConfigError(f"{where}: expected a mapping of keys, got {raw!r}")
    if cls is Config:
        return _config_from_dict(raw)
    fields = _fields(cls)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        dotted = ", ".join(_join(prefix, k) for k in unknown)
        raise ConfigError(
            f"unknown key {dotted}; {where} accepts: {', '.join(sorted(fields))}"
        )
    kwargs = {k: _convert(v, fields[k][1], _join(prefix, k)) for k, v in raw.items()}
    try:
        return cls(**kwargs)
    except ValueError as e:
        raise ConfigError(_qualify(prefix, str(e))) from None


def _config_from_dict(raw) -> Config:
    init_from = raw.get("init_from")
    model = raw.get("model")
    if (isinstance(init_from, str) and init_from.startswith("hf:")) or (
        isinstance(model, Mapping) and model.get("hf_config") is not None
    ):
        from .hf import with_hf_model  # the model section the checkpoint fixes

        raw = with_hf_model(raw)
    kwargs = {}
    fields = _fields(Config)
    unknown = sorted(set(raw) - set(fields))
    if unknown:
        raise ConfigError(
            f"unknown key {', '.join(unknown)}; the top level accepts: {', '.join(fields)}"
        )
    for key, value in raw.items():
        if key == "task":
            kwargs[key] = _task_from_dict(value)
        else:
            kwargs[key] = _convert(value, fields[key][1], key)
    try:
        return Config(**kwargs)
    except ValueError as e:
        raise ConfigError(str(e)) from None


def _task_from_dict(raw):
    if not isinstance(raw, Mapping):
        raise ConfigError(f"task: expected a mapping with a `name`, got {raw!r}")
    name = raw.get("name", "mnist1d")
    if name not in data_lib.TASKS:
        raise ConfigError(
            f"task.name: unknown task {name!r}; one of {', '.join(sorted(data_lib.TASKS))}"
        )
    return _from_dict(data_lib.TASKS[name], raw, "task")


def _join(prefix, key):
    return f"{prefix}.{key}" if prefix else key


def _qualify(prefix: str, message: str) -> str:
    """Prefix the field name a dataclass's own check put first with its section."""
    return f"{prefix}.{message}" if prefix else message


def apply_overrides(raw: dict, overrides: Sequence[str]) -> dict:
    """Apply `dotted.key=value` overrides (values parsed as YAML) to a raw config dict."""
    raw = _deepcopy(raw)
    for item in overrides:
        if "=" not in item:
            raise ConfigError(f"override {item!r}: expected dotted.key=value")
        key, text = item.split("=", 1)
        try:
            value = yaml.safe_load(text) if text.strip() else None
        except yaml.YAMLError as e:
            raise ConfigError(f"{key}: cannot read the value {text!r} ({e})") from None
        node = raw
        parts = key.strip().split(".")
        for i, part in enumerate(parts[:-1]):
            child = node.setdefault(part, {})
            if not isinstance(child, dict):
                raise ConfigError(f"{'.'.join(parts[: i + 1])}: is not a section")
            node = child
        node[parts[-1]] = value
    return raw


def _deepcopy(x):
    if isinstance(x, dict):
        return {k: _deepcopy(v) for k, v in x.items()}
    if isinstance(x, list):
        return [_deepcopy(v) for v in x]
    return x


def read_yaml(path: str | Path) -> dict:
    path = Path(path)
    if not path.is_file():
        raise ConfigError(f"config file {str(path)!r} does not exist")
    try:
        raw = yaml.safe_load(path.read_text())
    except yaml.YAMLError as e:
        raise ConfigError(f"{path}: not valid YAML ({e})") from None
    if raw is None:
        return {}
    if not isinstance(raw, dict):
        raise ConfigError(
            f"{path}: expected a mapping of sections, got {type(raw).__name__}"
        )
    return raw


def parse(raw: Mapping) -> Config:
    """A `Config` from a raw mapping (as read from YAML); raises `ConfigError`."""
    return _from_dict(Config, raw, "")


def load(path: str | Path | None, overrides: Sequence[str] = ()) -> Config:
    """Read a YAML config, apply the overrides and check everything."""
    raw = read_yaml(path) if path is not None else {}
    if path is not None and "name" not in raw:
        raw["name"] = Path(path).stem
    return parse(apply_overrides(raw, overrides))


def to_dict(config) -> dict:
    """The config as plain data (what `config.yaml` holds); `parse` inverts it."""
    return dataclasses.asdict(config)


def dump(config, path: str | Path) -> None:
    Path(path).write_text(yaml.safe_dump(to_dict(config), sort_keys=False))


def describe() -> str:
    """Every key with its type, default and meaning, for `--help`."""
    lines = []

    def walk(cls, prefix):
        for name, (f, tp) in _fields(cls).items():
            key = _join(prefix, name)
            if dataclasses.is_dataclass(tp):
                walk(tp, key)
                continue
            if key == "task":
                continue
            default = (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            )
            text = f.metadata.get("help", "")
            lines.append(f"  {key} ({_type_name(tp)}, default {default!r}): {text}")

    walk(Config, "")
    lines.append("")
    lines.append("  task.name selects the task; each task has its own keys:")
    for name, cls in data_lib.TASKS.items():
        lines.append(f"  task.name={name}:")
        for fname, (f, tp) in _fields(cls).items():
            if fname == "name":
                continue
            default = (
                f.default if f.default is not dataclasses.MISSING else f.default_factory()  # type: ignore[misc]
            )
            text = f.metadata.get("help", "")
            lines.append(
                f"    task.{fname} ({_type_name(tp)}, default {default!r}): {text}"
            )
    return "\n".join(lines)
