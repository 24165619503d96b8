"""`python -m train.hf export RUN_DIR OUT`: a run's model as a Hugging Face directory.

Writes `config.json`, `model.safetensors` and the run's `tokenizer.json` (when it has
one), which `transformers.AutoModelForCausalLM.from_pretrained(OUT)` loads.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(
        prog="python -m train.hf", description="Hugging Face checkpoints of runs."
    )
    sub = parser.add_subparsers(dest="command", required=True)
    export = sub.add_parser(
        "export", help="write a run's model as a Hugging Face directory"
    )
    export.add_argument("run_dir", type=Path)
    export.add_argument("out", type=Path)
    export.add_argument(
        "--checkpoint", default="best", help="best (default), latest or a step number"
    )
    export.add_argument("--dtype", default="float32", choices=["float32", "float16"])
    args = parser.parse_args(argv)

    from ..cli import _fail, _load_run
    from ..errors import ConfigError
    from . import save_hf

    try:
        _, _, model, step = _load_run(args.run_dir, args.checkpoint)
        tokenizer = args.run_dir / "tokenizer.json"
        out = save_hf(
            model,
            args.out,
            tokenizer=tokenizer if tokenizer.is_file() else None,
            dtype=args.dtype,
        )
    except (ConfigError, ValueError, TypeError) as e:
        _fail(str(e))
    print(f"wrote {out} (step {step} of {args.run_dir})", file=sys.stderr)


if __name__ == "__main__":
    main()
