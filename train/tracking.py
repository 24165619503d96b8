"""Experiment trackers: one small interface, a JSONL file always, wandb optionally.

```python
tracker = MultiTracker([JsonlTracker(run_dir / "metrics.jsonl"), WandbTracker(...)])
tracker.log_config(config_dict)
tracker.log({"split": "train", "loss": 0.7, "lr": 1e-3}, step=10)
tracker.log_summary({"test": {"loss": 0.1, "accuracy": 0.98}})
tracker.finish()
```
"""

from __future__ import annotations

import json
import math
import os
from pathlib import Path
from typing import Any, Protocol


class Tracker(Protocol):
    def log_config(self, config: dict[str, Any]) -> None: ...
    def log(self, metrics: dict[str, Any], step: int) -> None: ...
    def log_summary(self, summary: dict[str, Any]) -> None: ...
    def finish(self) -> None: ...


def _clean(value):
    """JSON-safe numbers (non-finite floats become strings, which JSON cannot hold)."""
    if isinstance(value, dict):
        return {k: _clean(v) for k, v in value.items()}
    if hasattr(value, "item"):
        value = value.item()
    if isinstance(value, float) and not math.isfinite(value):
        return str(value)
    return value


class JsonlTracker:
    """Appends one JSON object per `log` to a file: `{"step": ..., "split": ..., ...}`.

    Every line is flushed as it is written, so a crash loses nothing logged.
    """

    def __init__(self, path: str | Path):
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)
        self._file = open(self.path, "a", buffering=1)  # noqa: SIM115 (kept open)

    def log_config(self, config):
        pass  # config.yaml sits beside the file

    def log(self, metrics, step):
        self._file.write(json.dumps(_clean({"step": int(step), **metrics})) + "\n")
        self._file.flush()

    def log_summary(self, summary):
        pass  # summary.json sits beside the file

    def finish(self):
        self._file.close()


def truncate_jsonl(path: str | Path, last_step: int) -> None:
    """Drop the lines of a metrics file logged after `last_step` (and any torn line):
    what a resumed run will log again."""
    path = Path(path)
    if not path.exists():
        return
    kept = []
    for line in path.read_text().splitlines():
        try:
            record = json.loads(line)
        except json.JSONDecodeError:
            continue
        if isinstance(record, dict) and record.get("step", 0) <= last_step:
            kept.append(line)
    path.write_text("".join(line + "\n" for line in kept))


def read_jsonl(path: str | Path) -> list[dict]:
    path = Path(path)
    if not path.exists():
        return []
    records = []
    for line in path.read_text().splitlines():
        try:
            records.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return records


def wandb_mode(mode: str) -> str:
    """Resolve `logging.wandb.mode`: `WANDB_MODE` in the environment wins; `auto` is
    online when an API key is configured and offline otherwise (no network needed)."""
    env = os.environ.get("WANDB_MODE")
    if env in ("online", "offline", "disabled"):
        return env
    if mode != "auto":
        return mode
    if os.environ.get("WANDB_API_KEY"):
        return "online"
    netrc = Path.home() / ".netrc"
    if netrc.exists() and "api.wandb.ai" in netrc.read_text(errors="ignore"):
        return "online"
    return "offline"


class WandbTracker:
    """Weights & Biases, imported only when a run uses it."""

    def __init__(self, *, project, entity, name, tags, mode, run_dir, run_id):
        import wandb  # lazily: importing wandb is slow and it is optional

        self._wandb = wandb
        self.run = wandb.init(
            project=project,
            entity=entity,
            name=name,
            tags=list(tags),
            mode=mode,
            dir=str(run_dir),
            id=run_id,
            resume="allow",
        )

    def log_config(self, config):
        self.run.config.update(config, allow_val_change=True)

    def log(self, metrics, step):
        split = metrics.get("split", "train")
        flat = {
            f"{split}/{k}": v
            for k, v in metrics.items()
            if k != "split" and isinstance(v, int | float)
        }
        self.run.log(flat, step=int(step))

    def log_summary(self, summary):
        for split, values in summary.items():
            if isinstance(values, dict):
                for k, v in values.items():
                    self.run.summary[f"{split}/{k}"] = v

    def finish(self):
        self.run.finish()


class MultiTracker:
    def __init__(self, trackers):
        self.trackers = list(trackers)

    def log_config(self, config):
        for t in self.trackers:
            t.log_config(config)

    def log(self, metrics, step):
        for t in self.trackers:
            t.log(metrics, step)

    def log_summary(self, summary):
        for t in self.trackers:
            t.log_summary(summary)

    def finish(self):
        for t in self.trackers:
            t.finish()


def open_trackers(wandb_config, run_dir: str | Path, say=print) -> MultiTracker:
    """`metrics.jsonl` in `run_dir`, and wandb unless `wandb_mode` resolves
    `wandb_config.mode` (a `train.config.WandbConfig`) to disabled. wandb that fails to
    start is reported through `say` and left out: it never costs a run."""
    run_dir = Path(run_dir)
    trackers: list = [JsonlTracker(run_dir / "metrics.jsonl")]
    mode = wandb_mode(wandb_config.mode)
    if mode != "disabled":
        try:
            trackers.append(
                WandbTracker(
                    project=wandb_config.project,
                    entity=wandb_config.entity,
                    name=run_dir.name,
                    tags=wandb_config.tags,
                    mode=mode,
                    run_dir=run_dir,
                    run_id=run_dir.name.replace("/", "-"),
                )
            )
        except Exception as e:  # wandb is optional: never lose a run to it
            say(f"warning: wandb could not start ({e}); logging to metrics.jsonl only")
    return MultiTracker(trackers)
