"""`curves.png`: training and validation loss and metrics against step."""

from __future__ import annotations

import os
from pathlib import Path

from .tracking import read_jsonl

_SKIP = {"step", "split", "lr", "examples_per_s", "tokens_per_s", "time", "grad_norm"}


def plot_curves(metrics_path: str | Path, out_path: str | Path) -> None:
    """Draw one panel per metric (loss first), a line per split, from metrics.jsonl."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        split = r.get("split", "train")
        for key, value in r.items():
            if key in _SKIP or not isinstance(value, int | float):
                continue
            xs, ys = series.setdefault(key, {}).setdefault(split, ([], []))
            xs.append(r["step"])
            ys.append(value)
    if not series:
        return
    names = sorted(series, key=lambda k: (k != "loss", k))
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
