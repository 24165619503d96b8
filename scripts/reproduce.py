"""The papers' tables in miniature: train a table's shipped configs, print ours by theirs.

Each config of `configs/tables/TABLE/*.yaml` is a normal `ssm-train` config; every one
(and every seed) trains in its own run directory, `--out/NAME/seedS`, in a fresh
process (`python -m train`), so that each run compiles and allocates as a user's would.
A run whose `summary.json` exists is reused, and one that was interrupted is resumed
from its last checkpoint, so an interrupted table continues where it stopped. The
script then reads every summary and prints a Markdown table of test accuracy (and of
the other evaluation lengths, `task.eval_lengths`) beside the published numbers, and
writes it to `--out/table.md` and `--out/table.json`.

    python scripts/reproduce.py selective_copying           # the whole table
    python scripts/reproduce.py mqar --only mamba_d64 attention_d64 --seeds 0 1 2
    python scripts/reproduce.py state_tracking --steps 200  # a shorter try
    python scripts/reproduce.py mnist1d --list              # its configs, and what ran
    python scripts/reproduce.py mqar --sweep optim.lr=1e-3,3e-3,1e-2  # tuned on val

With `--sweep KEY=V1,V2,..` every config trains once per value (in
`--out/NAME/KEY=V/seedS`); the table reports, per config, the value with the best mean
validation accuracy (`best_val_accuracy`, the checkpoint selection's own figure) and
that value's test accuracy, and `--out/sweep.md` records the validation accuracy of
every value tried.

The published numbers are data below (`PAPERS`), each with its source; a row the paper
reports only in a figure or in words is given in words, not as a number read off a
plot. See docs/tables.md for the settings and what did and did not reproduce.
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys
import time
from dataclasses import dataclass, field
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
TABLES = ROOT / "configs" / "tables"


@dataclass(frozen=True)
class Paper:
    """A published table: its source, the numbers (test accuracy, %) or words of the
    rows our configs correspond to (keyed by our config name), and its other rows."""

    source: str
    rows: dict[str, float | str] = field(default_factory=dict)
    other_rows: dict[str, float | str] = field(default_factory=dict)
    finding: str = ""


_MAMBA_T1 = (
    "Gu & Dao 2023, 'Mamba: linear-time sequence modeling with selective state "
    "spaces', Table 1 (selective copying, 16 data tokens among 4096 positions, "
    "2-layer models; accuracy %)"
)
_ZOOLOGY = (
    "Arora et al. 2024, 'Zoology: measuring and improving recall in efficient language "
    "models', Fig. 2 and Sec. 3 (MQAR; reported as plots of accuracy against model "
    "width)"
)
_GRAZZI = (
    "Grazzi et al. 2025, 'Unlocking state-tracking in linear RNNs through negative "
    "eigenvalues' (ICLR), Sec. 5.1 (formal-language tasks of Deletang et al. 2023 as in "
    "xLSTM: train on lengths 3 to 40, test on 40 to 256)"
)

PAPERS: dict[str, Paper] = {
    "selective_copying": Paper(
        source=_MAMBA_T1,
        rows={"mamba": 99.8, "s4d": "18.3 (S4, no gating)"},
        other_rows={
            "S4, no gating": 18.3,
            "S6, no gating": 97.0,
            "H3 (S4 layer)": 57.0,
            "Hyena (H3 architecture)": 30.1,
            "H3 architecture, S6 layer": 99.7,
            "Mamba architecture, S4 layer": 56.4,
            "Mamba architecture, Hyena layer": 28.4,
            "Mamba (S6)": 99.8,
        },
        finding="selective (input-dependent) layers solve it; time-invariant ones "
        "(S4, Hyena) do not",
    ),
    "induction_heads": Paper(
        source="Gu & Dao 2023, Mamba, Table 2 (induction heads, vocabulary 16, "
        "trained at 256, tested at 64 to 2^20)",
        rows={
            "mamba": "100 at every length up to 2^20",
            "attention": "perfect at 256; fails beyond about twice the training "
            "length (MHA with absolute, RoPE or xPos positions)",
        },
        finding="Mamba extrapolates far beyond its training length; attention with "
        "positional encodings does not",
    ),
    "mqar": Paper(
        source=_ZOOLOGY,
        rows={
            "attention_d64": "solves it (~100%)",
            "attention_d128": "solves it (~100%)",
        },
        finding="attention solves MQAR at every width; gated convolutions and "
        "time-invariant SSMs need width growing with the number of pairs; the delta "
        "rule and input-dependent recurrences are strong",
    ),
    "mqar_256": Paper(
        source=_ZOOLOGY,
        rows={"attention": "solves it (~100%)"},
        finding="attention solves MQAR at every width and length; with more key-value "
        "pairs the recurrences need more width, gated convolutions and time-invariant "
        "SSMs most",
    ),
    "state_tracking": Paper(
        source=_GRAZZI,
        rows={
            "parity_deltanet": "fails (eigenvalues in [0, 1])",
            "parity_deltanet_neg": "solves it ([-1, 1])",
            "parity_mamba": "fails ([0, 1])",
            "parity_mamba_neg": "solves it ([-1, 1])",
            "parity_lstm": "solves it (nonlinear RNN)",
            "parity_gru": "solves it (nonlinear RNN)",
            "modular_addition_deltanet_neg": "improves on [0, 1]",
            "modular_addition_mamba_neg": "improves on [0, 1]",
        },
        finding="with negative eigenvalues Mamba and DeltaNet solve parity and improve "
        "on modular counting; with eigenvalues in [0, 1] they cannot solve parity at any "
        "length (their Theorem 1); nonlinear RNNs (LSTM) solve it",
    ),
    "mnist1d": Paper(
        source="Greydanus & Kobak 2024, 'Scaling down deep learning with MNIST-1D' "
        "(ICML), the dataset's published baseline table (test accuracy %)",
        rows={"gru": 91.0},
        other_rows={
            "logistic regression": 32.0,
            "MLP": 68.0,
            "GRU": 91.0,
            "CNN": 94.0,
            "human expert": 96.0,
        },
        finding="",
    ),
}


def table_names() -> list[str]:
    return sorted(p.name for p in TABLES.iterdir() if p.is_dir())


def configs_of(table: str) -> dict[str, Path]:
    """The configs of a table, by name (the file stem)."""
    directory = TABLES / table
    if not directory.is_dir():
        raise SystemExit(f"error: no table {table!r}; one of {', '.join(table_names())}")
    return {p.stem: p for p in sorted(directory.glob("*.yaml"))}


def overrides_for(steps: int | None, extra: list[str]) -> list[str]:
    """`train.steps=N` with evaluations and checkpoints every N/4 steps, then `extra`."""
    out = []
    if steps is not None:
        every = max(1, steps // 4)
        out += [f"train.steps={steps}", f"train.eval_every={every}"]
        out += [f"train.checkpoint_every={every}"]
    return out + list(extra)


def train_one(config: Path, run_dir: Path, seed: int, overrides: list[str]) -> dict:
    """Train (or resume, or reuse) one run; returns its record: the summary, the
    overrides it ran with and its wall time."""
    record_path = run_dir / "reproduce.json"
    if (run_dir / "summary.json").is_file() and record_path.is_file():
        record = json.loads(record_path.read_text())
        if record["overrides"] != overrides:
            raise SystemExit(
                f"error: {run_dir} ran with overrides {record['overrides']}, not "
                f"{overrides}; use another --out"
            )
        record["summary"] = json.loads((run_dir / "summary.json").read_text())
        record["reused"] = True
        return record
    every = [f"train.seed={seed}", "train.progress=false", *overrides]
    resume = (run_dir / "config.yaml").is_file()
    if resume:
        cmd = [sys.executable, "-m", "train", "--resume", str(run_dir), *every]
    else:
        cmd = [sys.executable, "-m", "train", str(config), "--run-dir", str(run_dir)]
        cmd += every
    print(("resume: " if resume else "run: ") + " ".join(cmd[2:]), flush=True)
    started = time.perf_counter()
    code = subprocess.run(cmd, cwd=ROOT).returncode
    if code != 0:  # reported in the table; the other runs go on
        print(f"failed (exit code {code}): {run_dir}", flush=True)
        return {"config": str(config.relative_to(ROOT)), "seed": seed, "failed": code}
    record = {
        "config": str(config.relative_to(ROOT)),
        "seed": seed,
        "overrides": overrides,
        "wall_s": time.perf_counter() - started,
        "resumed": resume,
    }
    record_path.write_text(json.dumps(record, indent=1))
    record["summary"] = json.loads((run_dir / "summary.json").read_text())
    record["reused"] = False
    return record


def _lengths(summary: dict) -> list[int]:
    return sorted(
        int(k.removeprefix("test_len")) for k in summary if k.startswith("test_len")
    )


def _percent(values: list[float]) -> str:
    if not values:
        return "-"
    mean = 100 * statistics.fmean(values)
    if len(values) == 1:
        return f"{mean:.1f}"
    each = ", ".join(f"{100 * v:.1f}" for v in values)
    return f"{mean:.1f} ({each})"


def _paper_cell(value) -> str:
    if value is None:
        return "-"
    return f"{value:.1f}" if isinstance(value, float) else str(value)


def parse_sweep(text: str | None) -> tuple[str | None, list[str]]:
    """`KEY=V1,V2,..` into the key and its values; `None` into no sweep."""
    if text is None:
        return None, [None]
    key, sep, values = text.partition("=")
    items = [v.strip() for v in values.split(",") if v.strip()]
    if not sep or not key.strip() or not items:
        raise SystemExit(f"error: --sweep: expected KEY=V1,V2,.., got {text!r}")
    if len(set(items)) != len(items):
        raise SystemExit(f"error: --sweep: repeated values in {text!r}")
    return key.strip(), items


def val_score(runs: list[dict]) -> float | None:
    """Mean over seeds of the best validation accuracy (None if no run finished)."""
    scores = []
    for r in runs:
        s = r.get("summary")
        if s is not None:
            scores.append(s.get("best_val_accuracy", s.get("val", {}).get("accuracy")))
    scores = [v for v in scores if v is not None]
    return statistics.fmean(scores) if scores else None


def choose(swept: dict[str, list[dict]]) -> str:
    """The swept value whose runs have the best mean validation accuracy (the first
    of equals; the first value if none finished)."""
    scored = [(val_score(runs), i, v) for i, (v, runs) in enumerate(swept.items())]
    finished = [(s, -i, v) for s, i, v in scored if s is not None]
    return max(finished)[2] if finished else next(iter(swept))


def sweep_markdown(key: str, sweeps: dict[str, dict[str, list[dict]]]) -> str:
    """Validation accuracy (%, mean over seeds) of every config at every swept value;
    the chosen value in bold."""
    values = list(dict.fromkeys(v for swept in sweeps.values() for v in swept))
    head = ["config"] + [f"{key}={v}" for v in values]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, swept in sweeps.items():
        best = choose(swept)
        cells = [f"`{name}`"]
        for v in values:
            score = val_score(swept.get(v, []))
            cell = "-" if score is None else f"{100 * score:.1f}"
            cells.append(f"**{cell}**" if v == best and score is not None else cell)
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines)


def markdown(
    table: str, results: dict[str, list[dict]], chosen: dict[str, str] | None = None
) -> str:
    """The table: per config, its mixer, parameters, steps, test accuracy (mean over
    seeds, then each seed) at the training length and at each evaluation length,
    the paper's number, and the wall time (mean per run). With `chosen` (a sweep's
    key=value per config), a column says which value the row is."""
    paper = PAPERS.get(table)
    lengths = sorted(
        {
            n
            for runs in results.values()
            for r in runs
            for n in _lengths(r.get("summary", {}))
        }
    )
    head = ["config", "mixer", "params", "steps", "seeds"]
    head += ["chosen on val"] if chosen else []
    head += ["test acc %"]
    head += [f"test acc % at {n}" for n in lengths]
    head += ["paper", "wall/run"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, all_runs in results.items():
        runs = [r for r in all_runs if "summary" in r]
        if not runs:
            codes = ", ".join(str(r["failed"]) for r in all_runs)
            cells = [f"`{name}`", all_runs[0].get("mixer", "?"), f"failed (exit {codes})"]
            lines.append("| " + " | ".join(cells + ["-"] * (len(head) - 3)) + " |")
            continue
        s = runs[0]["summary"]
        row = [
            f"`{name}`",
            runs[0].get("mixer", "?"),
            f"{s['parameters'] / 1e3:.0f}k",
            str(s["steps"]),
            str(len(runs)),
            *([chosen.get(name, "-")] if chosen else []),
            _percent([r["summary"]["test"]["accuracy"] for r in runs]),
        ]
        for n in lengths:
            key = f"test_len{n}"
            row.append(
                _percent(
                    [r["summary"][key]["accuracy"] for r in runs if key in r["summary"]]
                )
            )
        row.append(_paper_cell(paper.rows.get(name) if paper else None))
        wall = statistics.fmean(r["wall_s"] for r in runs)
        row.append(f"{wall / 60:.1f} min")
        lines.append("| " + " | ".join(row) + " |")
    if paper is not None:
        lines += ["", f"Paper: {paper.source}."]
        if paper.other_rows:
            rows = ", ".join(f"{k} {_paper_cell(v)}" for k, v in paper.other_rows.items())
            lines.append(f"Its rows: {rows}.")
        if paper.finding:
            lines.append(f"Its finding: {paper.finding}.")
    return "\n".join(lines)


def _mixer(config: Path) -> str:
    import yaml

    model = (yaml.safe_load(config.read_text()) or {}).get("model", {})
    mixer = model.get("mixer", "?")
    if (model.get("mixer_kwargs") or {}).get("allow_neg_eigval"):
        mixer += " [-1, 1]"
    return str(mixer)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        description=__doc__.splitlines()[0],
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog="tables: " + ", ".join(table_names()),
    )
    parser.add_argument("table", help="a directory of configs/tables")
    parser.add_argument("--out", default=None, help="runs go here (runs/tables/TABLE)")
    parser.add_argument(
        "--seeds", type=int, nargs="+", default=[0], help="train.seed values"
    )
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument(
        "--only", nargs="+", default=None, metavar="NAME", help="these configs"
    )
    parser.add_argument(
        "--set", nargs="+", default=[], metavar="KEY=VALUE", help="more config overrides"
    )
    parser.add_argument(
        "--sweep",
        default=None,
        metavar="KEY=V1,V2,..",
        help="train every config at each value; report the best on validation",
    )
    parser.add_argument("--list", action="store_true", help="list the configs and stop")
    args = parser.parse_args(argv)
    configs = configs_of(args.table)
    if args.only:
        unknown = sorted(set(args.only) - set(configs))
        if unknown:
            parser.error(f"--only: {unknown} not in {args.table}: {', '.join(configs)}")
        configs = {k: v for k, v in configs.items() if k in args.only}
    out = Path(args.out) if args.out else ROOT / "runs" / "tables" / args.table
    if args.steps is not None and args.steps < 1:
        parser.error("--steps: must be >= 1")
    if args.list:
        for name, path in configs.items():
            done = [
                s
                for s in args.seeds
                if (out / name / f"seed{s}" / "summary.json").is_file()
            ]
            state = f"done for seeds {done}" if done else "not run"
            print(f"{name:32s} {_mixer(path):24s} {path.relative_to(ROOT)}  ({state})")
        return
    key, values = parse_sweep(args.sweep)
    sweeps: dict[str, dict[str, list[dict]]] = {}
    for name, path in configs.items():
        for value in values:
            extra = args.set if key is None else [*args.set, f"{key}={value}"]
            overrides = overrides_for(args.steps, extra)
            run_root = out / name if key is None else out / name / f"{key}={value}"
            for seed in args.seeds:
                record = train_one(path, run_root / f"seed{seed}", seed, overrides)
                record["mixer"] = _mixer(path)
                sweeps.setdefault(name, {}).setdefault(value, []).append(record)
    picked = {name: choose(swept) for name, swept in sweeps.items()}
    results = {name: sweeps[name][v] for name, v in picked.items()}
    chosen = None if key is None else {n: f"{key}={v}" for n, v in picked.items()}
    text = markdown(args.table, results, chosen)
    out.mkdir(parents=True, exist_ok=True)
    (out / "table.md").write_text(text + "\n")
    (out / "table.json").write_text(json.dumps(results, indent=1))
    print(text)
    if key is not None:
        sweep_text = sweep_markdown(key, sweeps)
        (out / "sweep.md").write_text(sweep_text + "\n")
        (out / "sweep.json").write_text(json.dumps(sweeps, indent=1))
        print(f"\nValidation accuracy % by {key} (bold: chosen):\n\n{sweep_text}")
    failed = [
        r["config"]
        for swept in sweeps.values()
        for runs in swept.values()
        for r in runs
        if "failed" in r
    ]
    if failed:
        raise SystemExit(f"error: {len(failed)} run(s) failed: {', '.join(failed)}")


if __name__ == "__main__":
    main()
