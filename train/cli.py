"""Command-line entry points: `ssm-train`, `ssm-eval`, `ssm-generate`."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path

from . import config as config_lib
from .allocator import configure_allocator
from .checkpoint import CheckpointError
from .config import ConfigError

EPILOG_HEAD = """\
overrides are dotted keys with YAML values, e.g.
  ssm-train configs/mnist1d.yaml optim.lr=3e-3 model.mixer=lru train.steps=500

config keys (type, default):
"""


def _fail(message: str, code: int = 2):
    print(f"error: {message}", file=sys.stderr)
    raise SystemExit(code)


def train_main(argv: list[str] | None = None) -> None:
    configure_allocator()  # before JAX allocates; SSM_JAX_MALLOC=system opts out
    parser = argparse.ArgumentParser(
        prog="ssm-train",
        description="Train a sequence model from a YAML config.",
        formatter_class=argparse.RawDescriptionHelpFormatter,
        epilog=EPILOG_HEAD + config_lib.describe(),
    )
    parser.add_argument("config", nargs="?", help="YAML config file")
    parser.add_argument("overrides", nargs="*", help="dotted.key=value overrides")
    parser.add_argument("--run-dir", help="run directory (default runs/<name>-<time>)")
    parser.add_argument(
        "--resume", metavar="RUN_DIR", help="continue RUN_DIR from its latest checkpoint"
    )
    args = parser.parse_intermixed_args(argv)
    overrides = list(args.overrides)
    from . import loop  # after argument parsing: --help stays fast

    try:
        if args.resume:
            run_dir = Path(args.resume)
            if args.config is not None:
                if "=" not in args.config:
                    _fail(
                        "with --resume, give no config file: the run's config.yaml is used"
                    )
                overrides.insert(0, args.config)
            if not (run_dir / "config.yaml").is_file():
                _fail(f"--resume {run_dir}: no config.yaml there; is it a run directory?")
            config = config_lib.parse(
                config_lib.apply_overrides(
                    config_lib.read_yaml(run_dir / "config.yaml"), overrides
                )
            )
            loop.run(config, run_dir, resume=True)
        else:
            if args.config is None:
                parser.error("a config file (or --resume RUN_DIR) is required")
            config = config_lib.load(args.config, overrides)
            loop.run(config, args.run_dir)
    except ConfigError as e:
        _fail(str(e))
    except loop.Interrupted as e:
        print(f"\n{e}", file=sys.stderr)
        raise SystemExit(128 + e.signum) from None
    except loop.TrainingError as e:
        _fail(str(e), code=1)


def _load_run(run_dir: Path, which: str):
    """The config, task, model (evaluation parameters) and step of a run's checkpoint."""
    import equinox as eqx
    import jax.random as jr

    from . import data as data_lib
    from .checkpoint import Checkpointer
    from .trainer import build_model, init_state, make_optimizer

    if not (run_dir / "config.yaml").is_file():
        _fail(f"{run_dir}: no config.yaml; is it a run directory?")
    config = config_lib.parse(config_lib.read_yaml(run_dir / "config.yaml"))
    task = data_lib.build_task(config.task, run_dir=run_dir)
    k_model, k_state = jr.split(jr.key(config.train.seed))
    model = build_model(config, task, k_model)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer, _ = make_optimizer(config, params)
    like = init_state(config, params, optimizer, k_state)
    ckpt = Checkpointer(run_dir / "checkpoints", asynchronous=False)
    try:
        steps = ckpt.steps()
        if not steps:
            _fail(f"{run_dir}: no checkpoints")
        if which == "latest":
            state, _ = ckpt.restore_latest(like, report=lambda m: print(m, file=sys.stderr))
        else:
            if which == "best":
                summary = run_dir / "summary.json"
                best = (
                    json.loads(summary.read_text()).get("best_step")
                    if summary.exists()
                    else None
                )
                step = best if best in steps else steps[-1]
            else:
                step = int(which)
                if step not in steps:
                    _fail(f"--checkpoint {which}: no such step; the run has {steps}")
            state, _ = ckpt.restore(step, like)
    except CheckpointError as e:
        _fail(str(e), code=1)
    finally:
        ckpt.close()
    chosen = state.ema if state.ema is not None else state.params
    return config, task, eqx.combine(chosen, static), int(state.step)


def eval_main(argv: list[str] | None = None) -> None:
    configure_allocator()  # before JAX allocates; SSM_JAX_MALLOC=system opts out
    parser = argparse.ArgumentParser(
        prog="ssm-eval", description="Evaluate a run's checkpoint on a split."
    )
    parser.add_argument("run_dir")
    parser.add_argument("--split", default="test")
    parser.add_argument(
        "--checkpoint", default="best", help="best (default), latest or a step number"
    )
    parser.add_argument("--batch-size", type=int, default=None)
    args = parser.parse_args(argv)
    import equinox as eqx

    from . import data as data_lib
    from .trainer import evaluate, make_eval_step

    try:
        config, task, model, step = _load_run(Path(args.run_dir), args.checkpoint)
        if args.split not in task.splits:
            _fail(f"--split {args.split!r}: task {config.task.name!r} has {task.splits}")
        params, static = eqx.partition(model, eqx.is_array)
        batch_size = args.batch_size or config.train.eval_batch_size
        values = evaluate(
            make_eval_step(config, static, task.kind),
            params,
            data_lib.eval_batches(task, args.split, batch_size),
            task.kind,
        )
    except ConfigError as e:
        _fail(str(e))
    print(json.dumps({"step": step, "split": args.split, **values}))


def generate_main(argv: list[str] | None = None) -> None:
    configure_allocator()  # before JAX allocates; SSM_JAX_MALLOC=system opts out
    parser = argparse.ArgumentParser(
        prog="ssm-generate",
        description=(
            "Sample text from a trained language model: the prompt is prefilled once, "
            "then one compiled loop over the model's step form makes the new tokens. "
            "Prints the prompt and its continuation to stdout, tokens/s to stderr."
        ),
    )
    parser.add_argument("run_dir", help="a run directory of ssm-train (an LM task)")
    parser.add_argument("--prompt", required=True, help="the text to continue")
    parser.add_argument(
        "--max-new-tokens",
        "--length",
        dest="max_new_tokens",
        type=int,
        default=200,
        help="tokens to generate (default 200; --length is an alias)",
    )
    parser.add_argument(
        "--temperature", type=float, default=0.8, help="0 is greedy (default 0.8)"
    )
    parser.add_argument(
        "--top-k", type=int, default=0, help="keep the k most likely tokens (0: off)"
    )
    parser.add_argument(
        "--top-p",
        type=float,
        default=1.0,
        help="nucleus: keep the most likely tokens up to mass p (1: off)",
    )
    parser.add_argument("--seed", type=int, default=0, help="the same seed, the same text")
    parser.add_argument(
        "--checkpoint", default="best", help="best (default), latest or a step number"
    )
    args = parser.parse_args(argv)
    import jax.random as jr

    from .generate import check_sampling, timed_generate

    try:
        check_sampling(args.max_new_tokens, args.temperature, args.top_k, args.top_p)
    except ValueError as e:  # the message names the argument: name it as a flag
        message = str(e)
        for name in ("max_new_tokens", "temperature", "top_k", "top_p"):
            message = message.replace(f"`{name}`", "--" + name.replace("_", "-"))
        _fail(message)
    try:
        config, task, model, _ = _load_run(Path(args.run_dir), args.checkpoint)
        if task.kind != "lm" or not hasattr(task, "encode"):
            _fail(f"{args.run_dir} trained task {config.task.name!r}, not a language model")
        prompt = task.encode(args.prompt)
        if len(prompt) == 0:
            _fail("--prompt is empty")
        try:
            tokens, stats = timed_generate(
                model,
                prompt,
                args.max_new_tokens,
                temperature=args.temperature,
                top_k=args.top_k or None,
                top_p=None if args.top_p >= 1 else args.top_p,
                key=jr.key(args.seed),
            )
        except ValueError as e:
            _fail(f"{args.run_dir}: {e}")
    except ConfigError as e:
        _fail(str(e))
    print(stats.describe(), file=sys.stderr)
    sys.stdout.write(args.prompt + task.decode(tokens) + "\n")
