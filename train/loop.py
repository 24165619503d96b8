"""The training loop: a run directory from a config, resumable at any step."""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
from dataclasses import dataclass, field
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr

from . import config as config_lib, data as data_lib, distributed
from .checkpoint import Checkpointer, CheckpointError
from .config import Config, ConfigError
from .finetune import load_matching
from .plot import plot_curves
from .tracking import JsonlTracker, MultiTracker, WandbTracker, truncate_jsonl, wandb_mode
from .trainer import (
    TrainState,
    build_model,
    evaluate,
    init_state,
    make_eval_step,
    make_optimizer,
    make_train_step,
)


class TrainingError(RuntimeError):
    """The run cannot go on (a non-finite loss, no usable checkpoint); the message says
    why, and the last good checkpoint is on disk."""


class Interrupted(Exception):
    """SIGINT or SIGTERM arrived; the state was saved before raising."""

    def __init__(self, signum: int, step: int, run_dir: Path):
        self.signum, self.step, self.run_dir = signum, step, run_dir
        name = signal.Signals(signum).name
        super().__init__(
            f"{name} at step {step}: checkpoint saved; continue with "
            f"`ssm-train --resume {run_dir}`"
        )


def default_run_dir(config: Config) -> Path:
    stamp = datetime.datetime.now().strftime("%Y%m%d-%H%M%S")
    return Path("runs") / f"{config.name}-{stamp}"


@dataclass
class _Book:
    """Host-side bookkeeping saved with every checkpoint."""

    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_val: dict = field(default_factory=dict)
    last_train: dict = field(default_factory=dict)

    def improved(self, value: float, mode: str) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if mode == "min" else value > self.best_value


@contextlib.contextmanager
def _catch_signals():
    """Record SIGINT/SIGTERM instead of dying, so the loop can save first."""
    caught: list[int] = []

    def handler(signum, frame):
        caught.append(signum)

    previous = {}
    for sig in (signal.SIGINT, signal.SIGTERM):
        try:
            previous[sig] = signal.signal(sig, handler)
        except ValueError:  # not the main thread: leave signals alone
            pass
    try:
        yield caught
    finally:
        for sig, h in previous.items():
            signal.signal(sig, h)


class _Progress:
    def __init__(self, enabled: bool, total: int, initial: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=initial, dynamic_ncols=True, disable=None)
        self.position = initial

    def update(self, step: int, postfix: dict | None = None):
        if self.bar is not None:
            self.bar.update(step - self.position)
            if postfix:
                self.bar.set_postfix(postfix, refresh=False)
        self.position = step

    def write(self, text: str):
        if self.bar is not None and not self.bar.disable:
            self.bar.write(text)
        else:
            print(text, flush=True)

    def close(self):
        if self.bar is not None:
            self.bar.close()


def _trackers(config: Config, run_dir: Path, say) -> MultiTracker:
    if not distributed.is_main():
        return MultiTracker([])
    trackers = [JsonlTracker(run_dir / "metrics.jsonl")]
    mode = wandb_mode(config.logging.wandb.mode)
    if mode != "disabled":
        try:
            w = config.logging.wandb
            trackers.append(
                WandbTracker(
                    project=w.project,
                    entity=w.entity,
                    name=run_dir.name,
                    tags=w.tags,
                    mode=mode,
                    run_dir=run_dir,
                    run_id=run_dir.name.replace("/", "-"),
                )
            )
        except Exception as e:  # wandb is optional: never lose a run to it
            say(f"warning: wandb could not start ({e}); logging to metrics.jsonl only")
    return MultiTracker(trackers)


def _format(metrics: dict) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


def run(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    say=None,
) -> dict:
    """Train `config` in `run_dir` (continuing its latest checkpoint if `resume`).

    **Returns:** the summary also written to `summary.json`.

    **Raises:** `ConfigError` for a bad config, `TrainingError` when training cannot
    go on, `Interrupted` after saving on SIGINT/SIGTERM.
    """
    distributed.initialize(config.distributed)  # before anything touches a device
    run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
    ckpt_dir = run_dir / "checkpoints"
    if not resume and ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ConfigError(
            f"--run-dir {run_dir} already holds checkpoints; continue it with "
            f"`ssm-train --resume {run_dir}` or choose another directory"
        )
    tc = config.train

    # errors in the data config surface here; a resumed run keeps its tokenizer
    task = data_lib.build_task(config.task, run_dir=run_dir if resume else None)
    layout = distributed.make_layout(
        config.distributed,
        {"train.batch_size": tc.batch_size, "train.eval_batch_size": tc.eval_batch_size},
        task.seq_len,
    )
    main = distributed.is_main()
    k_model, k_state = jr.split(jr.key(tc.seed))
    model = build_model(config, task, k_model)
    params, static = eqx.partition(model, eqx.is_array)
    optimizer, schedule = make_optimizer(config, params)
    run_dir.mkdir(parents=True, exist_ok=True)
    if main:
        config_lib.dump(config, run_dir / "config.yaml")
        task.save(run_dir)
    progress = _Progress(tc.progress and main, tc.steps, 0)
    say = (say or progress.write) if main else (lambda text: None)

    init_report = None
    if config.init_from and not resume:
        params, init_report = load_matching(params, config.init_from, report=say)
        if main:
            (run_dir / "init_from.json").write_text(json.dumps(init_report, indent=1))
    state = layout.put_state(init_state(config, params, optimizer, k_state))
    book = _Book()
    ckpt = Checkpointer(
        ckpt_dir,
        keep=tc.keep_checkpoints,
        best_metric=tc.best_metric,
        best_mode=tc.best_mode,
    )
    if resume:
        try:
            restored = ckpt.restore_latest(state, report=say)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        if restored is None:
            say(f"no checkpoint in {ckpt_dir}; starting from step 0")
        else:
            state, meta = restored
            book = _Book(**meta.get("book", {}))
            say(f"resumed {run_dir} at step {int(state.step)}")
        if main:
            truncate_jsonl(run_dir / "metrics.jsonl", int(state.step))

    tracker = _trackers(config, run_dir, say)
    tracker.log_config(config_lib.to_dict(config))
    train_step = make_train_step(
        config,
        static,
        optimizer,
        task.kind,
        layout.state_shardings(state),
        layout.replicated,
    )
    rows = layout.local_rows(tc.batch_size)
    eval_rows = layout.local_rows(tc.eval_batch_size)

    def next_batch(at: int):
        local = data_lib.train_batch(task, tc.seed, at, tc.batch_size, rows=rows)
        return layout.put_batch(local, tc.batch_size)

    def split_batches(split: str):
        for batch in data_lib.eval_batches(task, split, tc.eval_batch_size):
            local = {k: v[eval_rows] for k, v in batch.items()}
            yield layout.put_batch(local, tc.eval_batch_size)

    eval_on_mesh = make_eval_step(config, static, task.kind)

    def eval_step(params, batch):
        with layout.context():
            return eval_on_mesh(params, batch)

    tokens = task.seq_len if task.kind == "lm" else None
    step = int(state.step)
    progress.update(step)

    def meta():
        return {"book": book.__dict__, "config": config_lib.to_dict(config)}

    def eval_params(s: TrainState):
        return s.ema if s.ema is not None else s.params

    saved = set(ckpt.steps())

    def save(s: TrainState, metrics=None):
        if step not in saved:
            ckpt.save(step, s, meta(), metrics=metrics)
            saved.add(step)

    last_eval = {}

    def validate(s: TrainState) -> dict:
        if last_eval.get("step") == step:
            return last_eval["values"]
        values = evaluate(eval_step, eval_params(s), split_batches("val"), task.kind)
        tracker.log({"split": "val", **values}, step)
        book.last_val = values
        if tc.best_metric not in values:
            raise ConfigError(
                f"train.best_metric: {tc.best_metric!r} is not a metric of this task; "
                f"one of {sorted(values)}"
            )
        value = values[tc.best_metric]
        if book.improved(value, tc.best_mode):
            book.best_value, book.best_step, book.evals_since_best = value, step, 0
            # Only improvements carry metrics, so orbax's keep-best policy ranks exactly
            # the checkpoints this loop calls best (ties keep the earliest).
            save(s, {tc.best_metric: value})
        else:
            book.evals_since_best += 1
            save(s)
        last_eval.update(step=step, values=values)
        say(f"step {step}: val {_format(values)}")
        if config.logging.plot and main:
            plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
        return values

    interrupted = None
    started = time.perf_counter()
    window_start, window_steps = time.perf_counter(), 0
    with _catch_signals() as caught:
        batch = next_batch(step)
        while step < tc.steps:
            with layout.context():
                state, metrics = train_step(state, batch)
            if step + 1 < tc.steps:  # build the next batch while the step runs
                batch = next_batch(step + 1)
            metrics = jax.device_get(metrics)
            if not bool(metrics["finite"]):
                if tc.on_nonfinite == "stop":
                    ckpt.wait()
                    tracker.finish()
                    progress.close()
                    raise TrainingError(
                        f"non-finite loss or gradient at step {step} (loss "
                        f"{float(metrics['loss'])}); stopped. The last good checkpoint is "
                        f"in {ckpt_dir} (steps {ckpt.steps()}); lower optim.lr or set "
                        "train.on_nonfinite=skip"
                    )
                say(f"warning: non-finite loss at step {step}; the update was skipped")
            step += 1
            window_steps += 1
            if step % tc.log_every == 0 or step == tc.steps:
                elapsed = time.perf_counter() - window_start
                rate = window_steps * tc.batch_size / max(elapsed, 1e-9)
                values = {
                    "split": "train",
                    "loss": float(metrics["loss"]),
                    "accuracy": float(metrics["accuracy"]),
                    "grad_norm": float(metrics["grad_norm"]),
                    "lr": float(schedule(step - 1)),
                    "examples_per_s": rate,
                    "eta_s": (tc.steps - step) * elapsed / max(window_steps, 1),
                }
                if tokens:
                    values["tokens_per_s"] = rate * tokens
                tracker.log(values, step)
                book.last_train = {k: v for k, v in values.items() if k != "split"}
                postfix = {"loss": f"{values['loss']:.4f}", "lr": f"{values['lr']:.2e}"}
                postfix["tok/s" if tokens else "ex/s"] = f"{rate * (tokens or 1):.0f}"
                progress.update(step, postfix)
                window_start, window_steps = time.perf_counter(), 0
            if tc.eval_every and step % tc.eval_every == 0 and step < tc.steps:
                validate(state)
                if tc.early_stopping and book.evals_since_best >= tc.early_stopping:
                    say(
                        f"early stopping at step {step}: no better val {tc.best_metric} "
                        f"for {tc.early_stopping} evaluations"
                    )
                    break
            elif (
                tc.checkpoint_every and step % tc.checkpoint_every == 0 and step < tc.steps
            ):
                save(state)
            if caught:
                save(state)
                ckpt.wait()
                interrupted = Interrupted(caught[0], step, run_dir)
                break
    if interrupted is not None:
        tracker.finish()
        progress.close()
        ckpt.close()
        raise interrupted

    final_val = validate(state)
    ckpt.wait()
    chosen = state
    if tc.eval_with_best and book.best_step is not None and book.best_step != step:
        chosen, _ = ckpt.restore(book.best_step, state)
        final_val = evaluate(
            eval_step, eval_params(chosen), split_batches("val"), task.kind
        )
    summary = {
        "train": book.last_train,
        "val": final_val,
        "steps": step,
        "parameters": sum(int(v.size) for v in jax.tree.leaves(state.params)),
        "best_step": book.best_step if tc.eval_with_best else step,
        f"best_val_{tc.best_metric}": book.best_value,
        "train_time_s": time.perf_counter() - started,
    }
    if "test" in task.splits:
        test = evaluate(eval_step, eval_params(chosen), split_batches("test"), task.kind)
        tracker.log({"split": "test", **test}, step)
        summary["test"] = test
        say(f"test {_format(test)}")
    if init_report is not None:
        summary["init_from"] = init_report["source"]
    if main:
        tmp = run_dir / "summary.json.tmp"
        tmp.write_text(json.dumps(summary, indent=1))
        os.replace(tmp, run_dir / "summary.json")
    tracker.log_summary(summary)
    tracker.finish()
    ckpt.close()
    progress.close()
    if config.logging.plot and main:
        plot_curves(run_dir / "metrics.jsonl", run_dir / "curves.png")
    return summary
