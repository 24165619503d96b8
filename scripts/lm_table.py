"""The language-model table: one run per family on the Python standard library.

Trains each config below with `ssm-train` (one run each, in a fresh process, so that
every run compiles and allocates as a user's would), then prints a Markdown table of
validation bits per byte, parameters, training tokens/s and wall time, and writes it
to `--out` as JSON too.

    python scripts/lm_table.py                      # the shipped 800-step configs
    python scripts/lm_table.py --steps 200          # a shorter try, same settings
    python scripts/lm_table.py --only attention rglru

Every config trains the same task (`configs/lm_stdlib.yaml`'s corpus, BPE tokenizer,
packing, batch and schedule) at a matched parameter count (within 10%).
"""

from __future__ import annotations

import argparse
import json
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent
CONFIGS = {  # family -> config
    "gla": "configs/lm_stdlib.yaml",
    "attention": "configs/lm_stdlib_attention.yaml",
    "mamba2": "configs/lm_stdlib_mamba2.yaml",
    "gated_deltanet": "configs/lm_stdlib_gated_deltanet.yaml",
    "rglru": "configs/lm_stdlib_rglru.yaml",
    "griffin": "configs/lm_hybrid.yaml",
}


def run(family: str, config: str, steps: int | None, runs: Path) -> dict:
    run_dir = runs / family
    cmd = [sys.executable, "-m", "train", str(ROOT / config), "--run-dir", str(run_dir)]
    if steps is not None:
        eval_every = max(1, steps // 4)
        cmd += [f"train.steps={steps}", f"train.eval_every={eval_every}"]
        cmd += [f"train.checkpoint_every={eval_every}"]
    cmd += ["logging.plot=false"]
    started = time.perf_counter()
    subprocess.run(cmd, check=True, cwd=ROOT)
    wall = time.perf_counter() - started
    summary = json.loads((run_dir / "summary.json").read_text())
    return {
        "family": family,
        "config": config,
        "params": summary["parameters"],
        "val_bits_per_byte": summary["val"].get("bits_per_byte"),
        "val_loss": summary["val"].get("loss"),
        "tokens_per_s": summary["train"].get("tokens_per_s"),
        "steps": summary["steps"],
        "wall_s": wall,
    }


def table(rows: list[dict]) -> str:
    lines = [
        "| family | config | parameters | val bits/byte | train tokens/s | steps | wall |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        bpb = "-" if r["val_bits_per_byte"] is None else f"{r['val_bits_per_byte']:.3f}"
        tps = "-" if r["tokens_per_s"] is None else f"{r['tokens_per_s']:.0f}"
        lines.append(
            f"| {r['family']} | `{r['config']}` | {r['params'] / 1e6:.2f}M | {bpb} | "
            f"{tps} | {r['steps']} | {r['wall_s'] / 60:.1f} min |"
        )
    return "\n".join(lines)


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=None, help="override train.steps")
    parser.add_argument("--only", nargs="*", choices=sorted(CONFIGS), default=None)
    parser.add_argument("--runs", default="runs/lm_table", help="where the runs go")
    parser.add_argument("--out", default="runs/lm_table/table.json")
    args = parser.parse_args(argv)
    runs = Path(args.runs).resolve()
    rows = [
        run(family, config, args.steps, runs)
        for family, config in CONFIGS.items()
        if args.only is None or family in args.only
    ]
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(json.dumps(rows, indent=1))
    print(table(rows))


if __name__ == "__main__":
    main()
