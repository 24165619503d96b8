"""`curves.png`: loss, the task's metrics, learning rate and throughput against step."""

from __future__ import annotations

import os
from pathlib import Path

from .tracking import read_jsonl

# Not drawn: bookkeeping, the time left, and the gradient norm.
_SKIP = {"step", "split", "time", "eta_s", "grad_norm"}
_LAST = ("lr", "tokens_per_s", "examples_per_s")


def _series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """`{metric: {split: (steps, values)}}` of the numbers in `records`."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        split = r.get("split", "train")
        for key, value in r.items():
            if key in _SKIP or not isinstance(value, int | float):
                continue
            xs, ys = series.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(r["step"])
            ys.append(value)
    if "tokens_per_s" in series:  # one throughput panel: tokens/s where there are tokens
        series.pop("examples_per_s", None)
    return series


def panel_names(records: list[dict]) -> list[str]:
    """The panels `plot_curves` draws, in order: `loss`, the task's metrics (as
    logged: `accuracy`, `bits_per_byte`, ...), `lr`, then the throughput
    (`tokens_per_s` for a language model, else `examples_per_s`)."""
    names = set(_series(records))
    middle = sorted(names - {"loss", *_LAST})
    return [n for n in ("loss", *middle, *_LAST) if n in names]


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> None:
    """Draw `panel_names` of a `metrics.jsonl` side by side, a line per split (train,
    val, test), into `out_path` (replaced atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    series = _series(records)
    names = panel_names(records)
    if not names:
        return
    fig, axes = plt.subplots(1, len(names), figsize=(4.5 * len(names), 3.5), squeeze=False)
    for ax, name in zip(axes[0], names, strict=True):
        for split, (xs, ys) in sorted(series[name].items()):
            style = "-" if split == "train" else "o-"
            ax.plot(xs, ys, style, label=split, markersize=3, linewidth=1)
        ax.set_xlabel("step")
        ax.set_title(name)
        if name == "loss":
            ax.set_yscale("log")
        ax.grid(alpha=0.3)
        ax.legend()
    fig.tight_layout()
    tmp = Path(out_path).with_suffix(".tmp.png")
    fig.savefig(tmp, dpi=100)
    plt.close(fig)
    os.replace(tmp, out_path)
