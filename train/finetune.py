"""`init_from`: start a run from the parameters of another run or checkpoint."""

from __future__ import annotations

from pathlib import Path

import jax.numpy as jnp
import numpy as np

from .checkpoint import Checkpointer, CheckpointError, flatten, unflatten
from .config import ConfigError


def resolve_source(source: str | Path) -> tuple[Path, int | None]:
    """The checkpoint directory and step that `init_from` names.

    Accepted: a run directory (its best checkpoint if one was recorded, else its
    latest), its `checkpoints/` directory, or one step directory `.../checkpoints/N`.
    """
    path = Path(source).expanduser()
    if not path.exists():
        raise ConfigError(f"init_from: {str(source)!r} does not exist")
    if path.name.isdigit() and (path / "state").is_dir():
        return path.parent, int(path.name)
    if (path / "checkpoints").is_dir():
        return path / "checkpoints", _best_step(path)
    if path.name == "checkpoints":
        return path, _best_step(path.parent)
    raise ConfigError(
        f"init_from: {str(source)!r} is neither a run directory (with checkpoints/) nor a "
        "checkpoint step directory (checkpoints/N)"
    )


def _best_step(run_dir: Path) -> int | None:
    import json

    summary = run_dir / "summary.json"
    if summary.exists():
        try:
            step = json.loads(summary.read_text()).get("best_step")
        except json.JSONDecodeError:
            return None
        if isinstance(step, int) and (run_dir / "checkpoints" / str(step)).is_dir():
            return step
    return None


def load_matching(params, source: str | Path, report=print):
    """Copy into `params` every parameter of `source` with the same path and shape.

    `source` may also be `hf:PATH`, a Hugging Face model directory (`train.hf`).

    A parameter whose shape differs but whose size is the same is reshaped; one whose
    size differs (a new head, a new class count) or that the source lacks keeps its
    fresh initialisation. Returns the new parameters and a report
    `{"loaded": [...], "reshaped": [...], "skipped": {path: reason}, "source": ...}`.
    """
    if str(source).startswith("hf:"):  # a Hugging Face model directory
        from .hf import load_matching_hf

        return load_matching_hf(params, str(source), report)
    directory, step = resolve_source(source)
    ckpt = Checkpointer(directory, asynchronous=False)
    try:
        steps = ckpt.steps()
        if not steps:
            raise ConfigError(f"init_from: no checkpoints in {directory}")
        step = steps[-1] if step is None else step
        try:
            stored, _ = ckpt.read_raw(step)
        except CheckpointError as e:
            raise ConfigError(f"init_from: {e}") from None
    finally:
        ckpt.close()
    # The source's EMA (if any) is the smoothed model it evaluated with: prefer it.
    prefix = "ema." if any(k.startswith("ema.") for k in stored) else "params."
    source_params = {k[len(prefix) :]: v for k, v in stored.items() if k.startswith(prefix)}
    flat = flatten(params)
    loaded, reshaped, skipped, new = [], [], {}, {}
    for name, value in flat.items():
        src = source_params.get(name)
        if src is None:
            skipped[name] = "not in the source"
            new[name] = value
        elif src.shape == value.shape:
            loaded.append(name)
            new[name] = jnp.asarray(src, value.dtype)
        elif src.size == value.size:
            reshaped.append(name)
            new[name] = jnp.asarray(np.reshape(src, value.shape), value.dtype)
        else:
            skipped[name] = f"shape {src.shape} in the source, {value.shape} here"
            new[name] = value
    unused = sorted(set(source_params) - set(flat))
    result = {
        "source": str(directory / str(step)),
        "loaded": loaded,
        "reshaped": reshaped,
        "skipped": skipped,
        "unused_in_source": unused,
    }
    report(
        f"init_from {result['source']}: loaded {len(loaded)} parameters, reshaped "
        f"{len(reshaped)}, skipped {len(skipped)}"
        + "".join(f"\n  skipped {k}: {v}" for k, v in skipped.items())
        + "".join(f"\n  reshaped {k}" for k in reshaped)
    )
    if not loaded and not reshaped:
        raise ConfigError(
            f"init_from: nothing in {result['source']} matches this model's parameters"
        )
    return unflatten(params, new), result
