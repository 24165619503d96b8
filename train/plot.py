"""`curves.png`: loss, the task's metrics, learning rate and throughput against step;
with `task.eval_lengths`, a last panel of the final metric against evaluation length."""

from __future__ import annotations

import os
import re
from pathlib import Path

from .tracking import read_jsonl

# Not drawn: bookkeeping, the time left, and the gradient norm.
_SKIP = {"step", "split", "time", "eta_s", "grad_norm"}
_LAST = ("lr", "tokens_per_s", "examples_per_s")
_LENGTH_SPLIT = re.compile(r"^(val|test)_len(\d+)$")  # as train.data.length_split


def _by_length(records: list[dict]) -> tuple[str, dict[str, tuple[list, list]]] | None:
    """`(metric, {"val"|"test": (lengths, values)})` of the evaluation-length splits
    (the last record of each), with `accuracy` as the metric when logged, else `loss`."""
    last: dict[str, dict] = {}
    for r in records:
        if _LENGTH_SPLIT.match(str(r.get("split", ""))):
            last[r["split"]] = r
    if not last:
        return None
    metric = "accuracy" if all("accuracy" in r for r in last.values()) else "loss"
    out: dict[str, tuple[list, list]] = {}
    for split, r in sorted(last.items(), key=lambda kv: int(_LENGTH_SPLIT.match(kv[0])[2])):
        base, length = _LENGTH_SPLIT.match(split).groups()
        xs, ys = out.setdefault(base, ([], []))
        xs.append(int(length))
        ys.append(r[metric])
    return metric, out


def _series(records: list[dict]) -> dict[str, dict[str, tuple[list, list]]]:
    """`{metric: {split: (steps, values)}}` of the numbers in `records`."""
    series: dict[str, dict[str, tuple[list, list]]] = {}
    for r in records:
        split = r.get("split", "train")
        if _LENGTH_SPLIT.match(str(split)):  # drawn against length, not step
            continue
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
    val, test), and, when the run evaluated other lengths (`val_len{L}`,
    `test_len{L}`), their last accuracy (else loss) against the length, into
    `out_path` (replaced atomically)."""
    import matplotlib

    matplotlib.use("Agg", force=True)
    import matplotlib.pyplot as plt

    records = read_jsonl(metrics_path)
    series = _series(records)
    names = panel_names(records)
    lengths = _by_length(records)
    if not names:
        return
    n = len(names) + (lengths is not None)
    fig, axes = plt.subplots(1, n, figsize=(4.5 * n, 3.5), squeeze=False)
    if lengths is not None:
        metric, curves = lengths
        ax = axes[0][-1]
        for split, (xs, ys) in sorted(curves.items()):
            ax.plot(xs, ys, "o-", label=split, markersize=3, linewidth=1)
        ax.set_xscale("log", base=2)
        ax.set_xlabel("evaluation length")
        ax.set_title(f"{metric} by length")
        ax.grid(alpha=0.3)
        ax.legend()
    for ax, name in zip(axes[0][: len(names)], names, strict=True):
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
