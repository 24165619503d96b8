"""The training loop: a run directory from a config, resumable at any step.

[`Trainer`][train.Trainer] owns the run's resources (trackers, the orbax checkpointer,
the progress bar) and closes them in one place however the run ends; the loop's
concerns (logging, evaluation, checkpoints, signals, progress, plots) are hooks
(`train.hooks`). [`run`][train.run] is `Trainer(...).fit()`.
"""

from __future__ import annotations

import contextlib
import datetime
import json
import os
import signal
import time
from dataclasses import dataclass
from pathlib import Path

import equinox as eqx
import jax
import jax.random as jr

from . import config as config_lib, data as data_lib, distributed, hooks as hooks_lib
from .checkpoint import Checkpointer, CheckpointError
from .config import Config, ConfigError
from .finetune import load_matching
from .hooks import Book, Hook, ProgressBar, StepInfo
from .plot import plot_curves
from .tracking import MultiTracker, open_trackers, truncate_jsonl
from .trainer import (
    TrainState,
    build_model,
    evaluate as evaluate_split,
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


def eval_metric_names(kind: str) -> tuple[str, ...]:
    """The metrics `train.trainer.evaluate` returns for a task of this kind (a language
    model's batches carry `bytes`, hence bits per byte)."""
    return ("loss", "accuracy", "bits_per_byte") if kind == "lm" else ("loss", "accuracy")


def _check_best_metric(config: Config, kind: str) -> None:
    names = eval_metric_names(kind)
    if config.train.best_metric not in names:
        raise ConfigError(
            f"train.best_metric: {config.train.best_metric!r} is not a metric of task "
            f"{config.task.name!r}; one of {sorted(names)}"
        )


def _check_split_lengths(config: Config, task) -> None:
    """Sequence parallelism splits every evaluated sequence too: `distributed.seq`
    must divide the lengths of `task.eval_lengths`."""
    seq = config.distributed.seq
    for split in task.splits:
        length = task.split_seq_len(split)
        if seq > 1 and length % seq:
            raise ConfigError(
                f"task.eval_lengths: split {split!r} has sequences of {length} steps, "
                f"which distributed.seq={seq} does not divide"
            )


def _check_new_run_dir(run_dir: Path) -> None:
    ckpt_dir = run_dir / "checkpoints"
    if ckpt_dir.exists() and any(ckpt_dir.iterdir()):
        raise ConfigError(
            f"--run-dir {run_dir} already holds checkpoints; continue it with "
            f"`ssm-train --resume {run_dir}` or choose another directory"
        )


def _format(metrics: dict) -> str:
    return " ".join(
        f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in metrics.items()
    )


@dataclass(frozen=True)
class _Registered:
    hook: Hook
    every: int
    final: bool

    def due(self, info: StepInfo) -> bool:
        return info.step % self.every == 0 or (self.final and info.last)


class Trainer:
    """Trains a config in a run directory, resumable at any step.

    **Arguments:**

    - `config`: a checked `train.Config`.
    - `run_dir`: the run directory (default `runs/NAME-TIME`).
    - `resume`: continue from the latest good checkpoint in `run_dir`.
    - `say`: where messages go (default: printed, above the progress bar); only
        process 0 speaks.

    Building a trainer checks all it can before anything is compiled or written (the
    run directory, the task's data, `train.best_metric` against the task's metrics,
    the model and the optimiser) and registers the loop's own hooks (`train.hooks`).
    `Trainer.fit` does the rest and closes the trackers, the checkpointer
    and the progress bar in one place, however it ends; it is `initialize`, `train`
    and `finish` in turn, then `close`.

    !!! example

        ```python
        trainer = train.Trainer(config, "runs/try")
        trainer.add_hook(lambda info: print(info.step, info.metrics["loss"]), every=100)
        summary = trainer.fit()
        ```

    **Raises:** `ConfigError` for a bad config.
    """

    def __init__(
        self,
        config: Config,
        run_dir: str | Path | None = None,
        *,
        resume: bool = False,
        say=None,
    ):
        distributed.initialize(config.distributed)  # before anything touches a device
        self.config, self.resume, self._say = config, resume, say
        self.run_dir = Path(run_dir) if run_dir is not None else default_run_dir(config)
        self.ckpt_dir = self.run_dir / "checkpoints"
        if not resume:
            _check_new_run_dir(self.run_dir)
        tc = config.train
        # errors in the data config surface here; a resumed run keeps its tokenizer
        self.task = data_lib.build_task(
            config.task, run_dir=self.run_dir if resume else None
        )
        _check_best_metric(config, self.task.kind)
        batch_sizes = {"train.batch_size": tc.batch_size}
        batch_sizes["train.eval_batch_size"] = tc.eval_batch_size
        self.layout = distributed.make_layout(
            config.distributed, batch_sizes, self.task.seq_len
        )
        _check_split_lengths(config, self.task)
        self._rows = self.layout.local_rows(tc.batch_size)
        self._eval_rows = self.layout.local_rows(tc.eval_batch_size)
        self.main = distributed.is_main()
        k_model, self._k_state = jr.split(jr.key(tc.seed))
        self._params, self.static = eqx.partition(
            build_model(config, self.task, k_model), eqx.is_array
        )
        self.optimizer, self.schedule = make_optimizer(config, self._params)
        self._eval_on_mesh = make_eval_step(config, self.static, self.task.kind)
        self._resources = contextlib.ExitStack()
        self._hooks: list[_Registered] = []
        self._saved: set[int] = set()
        self._last_eval: tuple[int, dict] | None = None
        self._stop = False
        self.book = Book()
        self.state: TrainState | None = None
        self.step = self.first_step = 0
        self.started = time.perf_counter()
        self.progress: ProgressBar | None = None
        self.checkpoints: Checkpointer | None = None
        self.tracker: MultiTracker | None = None
        self.init_report: dict | None = None
        hooks_lib.add_default_hooks(self)

    def add_hook(self, hook: Hook, every: int = 1, *, final: bool = False) -> None:
        """Run `hook(info)` (a `train.StepInfo`) after every step whose
        number is a multiple of `every`, and after the last step too when `final`.
        Hooks run in the order they were added, after the trainer's own; one that is a
        context manager is entered for the duration of the loop."""
        if isinstance(every, bool) or not isinstance(every, int) or every < 1:
            raise ValueError(f"every: must be a positive integer, got {every!r}")
        self._hooks.append(_Registered(hook, every, final))

    def say(self, text: str) -> None:
        """Print a message (through `say`, or above the progress bar) on process 0."""
        if self.main:
            write = self._say or (self.progress.write if self.progress else print)
            write(text)

    def fit(self) -> dict:
        """Train to `train.steps` (or until a hook stops the run), evaluate, write
        `summary.json`, and close every resource, also when something raises.

        **Returns:** the summary also written to `summary.json`.

        **Raises:** `TrainingError` when training cannot go on, `Interrupted` after
        saving on SIGINT/SIGTERM.
        """
        try:
            self._open_run_dir()
            self.initialize()
            self.train()
            return self.finish()
        finally:
            self.close()

    def close(self) -> None:
        """Close the trackers, the checkpointer (once its saves are committed) and the
        progress bar; calling it again does nothing."""
        self._resources.close()

    def _open_run_dir(self) -> None:
        self.run_dir.mkdir(parents=True, exist_ok=True)
        if self.main:
            config_lib.dump(self.config, self.run_dir / "config.yaml")
            self.task.save(self.run_dir)
        self.progress = ProgressBar(
            self.config.train.progress and self.main, self.config.train.steps
        )
        self._resources.callback(self.progress.close)

    def initialize(self) -> None:
        """The initial state (`init_from`'s matching parameters in a new run), then,
        when resuming, the latest good checkpoint; opens the checkpointer and the
        trackers."""
        tc, params = self.config.train, self._params
        if self.config.init_from and not self.resume:
            params, self.init_report = load_matching(
                params, self.config.init_from, report=self.say
            )
            if self.main:
                report = json.dumps(self.init_report, indent=1)
                (self.run_dir / "init_from.json").write_text(report)
        state = init_state(self.config, params, self.optimizer, self._k_state)
        self.state = self.layout.put_state(state)
        self.checkpoints = Checkpointer(
            self.ckpt_dir,
            keep=tc.keep_checkpoints,
            best_metric=tc.best_metric,
            best_mode=tc.best_mode,
        )
        self._resources.callback(self.checkpoints.close)
        if self.resume:
            self._restore()
        self.step = self.first_step = int(self.state.step)
        self._saved = set(self.checkpoints.steps())
        self._open_trackers()

    def _open_trackers(self) -> None:
        # After the restore, which cut metrics.jsonl back to the restored step.
        self.tracker = (
            open_trackers(self.config.logging.wandb, self.run_dir, self.say)
            if self.main
            else MultiTracker([])
        )
        self._resources.callback(self.tracker.finish)
        self.tracker.log_config(config_lib.to_dict(self.config))

    def _restore(self) -> None:
        try:
            restored = self.checkpoints.restore_latest(self.state, report=self.say)
        except CheckpointError as e:
            raise TrainingError(str(e)) from None
        if restored is None:
            self.say(f"no checkpoint in {self.ckpt_dir}; starting from step 0")
        else:
            self.state, meta = restored
            self.book = Book(**meta.get("book", {}))
            self.say(f"resumed {self.run_dir} at step {int(self.state.step)}")
        if self.main:
            truncate_jsonl(self.run_dir / "metrics.jsonl", int(self.state.step))

    def _batch(self, at: int) -> dict:
        tc = self.config.train
        local = data_lib.train_batch(self.task, tc.seed, at, tc.batch_size, rows=self._rows)
        return self.layout.put_batch(local, tc.batch_size)

    def train(self) -> None:
        """Steps from the current one to `train.steps`, running the hooks after each;
        ends early when a hook calls `Trainer.stop`."""
        tc = self.config.train
        step_fn = make_train_step(
            self.config,
            self.static,
            self.optimizer,
            self.task.kind,
            self.layout.state_shardings(self.state),
            self.layout.replicated,
        )
        self.progress.update(self.step)
        self.started = time.perf_counter()
        with contextlib.ExitStack() as entered:
            for registered in self._hooks:
                if hasattr(registered.hook, "__enter__"):
                    entered.enter_context(registered.hook)
            batch = self._batch(self.step)
            while self.step < tc.steps and not self._stop:
                with self.layout.context():
                    self.state, metrics = step_fn(self.state, batch)
                if self.step + 1 < tc.steps:  # build the next batch while the step runs
                    batch = self._batch(self.step + 1)
                metrics = jax.device_get(metrics)
                self._check_finite(metrics)
                self.step += 1
                self._run_hooks(StepInfo(self, self.step, self.state, metrics))

    def _run_hooks(self, info: StepInfo) -> None:
        for registered in self._hooks:
            if self._stop:
                return
            if registered.due(info):
                registered.hook(info)

    def _check_finite(self, metrics: dict) -> None:
        if bool(metrics["finite"]):
            return
        if self.config.train.on_nonfinite == "stop":
            self.checkpoints.wait()
            raise TrainingError(
                f"non-finite loss or gradient at step {self.step} (loss "
                f"{float(metrics['loss'])}); stopped. The last good checkpoint is in "
                f"{self.ckpt_dir} (steps {self.checkpoints.steps()}); lower optim.lr or "
                "set train.on_nonfinite=skip"
            )
        self.say(f"warning: non-finite loss at step {self.step}; the update was skipped")

    def stop(self, message: str | None = None) -> None:
        """End the loop after the hook that calls this (the step's remaining hooks are
        skipped); the run then finishes as usual. `message` is said first."""
        if message:
            self.say(message)
        self._stop = True

    def interrupt(self, signum: int) -> None:
        """Save the current step, wait until it is committed, raise `Interrupted`."""
        self.save()
        self.checkpoints.wait()
        raise Interrupted(signum, self.step, self.run_dir)

    def save(self, state: TrainState | None = None, metrics: dict | None = None) -> None:
        """Start saving `state` (default: the current one) as this step's checkpoint,
        with `book` and the config as its metadata, unless this step is saved already;
        `metrics` rank it for the keep-best policy."""
        if self.step in self._saved:
            return
        meta = {"book": self.book.__dict__, "config": config_lib.to_dict(self.config)}
        state = self.state if state is None else state
        self.checkpoints.save(self.step, state, meta, metrics=metrics)
        self._saved.add(self.step)

    def _eval_step(self, params, batch):
        with self.layout.context():
            return self._eval_on_mesh(params, batch)

    def evaluate(self, split: str, state: TrainState | None = None) -> dict[str, float]:
        """The metrics of `state` (default: the current one; its EMA when it has one)
        over the whole of `split` (see `eval_metric_names`)."""
        state = self.state if state is None else state
        params = state.ema if state.ema is not None else state.params
        tc = self.config.train

        def batches():
            for batch in data_lib.eval_batches(self.task, split, tc.eval_batch_size):
                local = {k: v[self._eval_rows] for k, v in batch.items()}
                yield self.layout.put_batch(local, tc.eval_batch_size)

        return evaluate_split(self._eval_step, params, batches(), self.task.kind)

    def validate(self, state: TrainState | None = None) -> dict[str, float]:
        """Evaluate on validation (once per step), log it, update `book` (the best
        value and step, evaluations since the best) and save this step's checkpoint,
        carrying the metric when it improved."""
        if self._last_eval is not None and self._last_eval[0] == self.step:
            return self._last_eval[1]
        tc, book = self.config.train, self.book
        state = self.state if state is None else state
        values = self.evaluate("val", state)
        self.tracker.log({"split": "val", **values}, self.step)
        book.last_val = values
        value = values[tc.best_metric]  # checked against eval_metric_names
        if book.improved(value, tc.best_mode):
            book.best_value, book.best_step, book.evals_since_best = value, self.step, 0
            # Only improvements carry metrics, so orbax's keep-best policy ranks exactly
            # the checkpoints this loop calls best (ties keep the earliest).
            self.save(state, {tc.best_metric: value})
        else:
            book.evals_since_best += 1
            self.save(state)
        self._last_eval = (self.step, values)
        self.say(f"step {self.step}: val {_format(values)}")
        return values

    def finish(self) -> dict:
        """The final evaluation (with the best checkpoint if `train.eval_with_best`),
        the test split, the splits of `task.eval_lengths` (`val_len{L}`,
        `test_len{L}`, each a key of the summary), `summary.json` and the last
        `curves.png`.

        **Returns:** the summary.
        """
        tc, book = self.config.train, self.book
        final_val = self.validate()
        self.checkpoints.wait()
        chosen = self.state
        if tc.eval_with_best and book.best_step is not None and book.best_step != self.step:
            chosen, _ = self.checkpoints.restore(book.best_step, self.state)
            final_val = self.evaluate("val", chosen)
        summary = {
            "train": book.last_train,
            "val": final_val,
            "steps": self.step,
            "parameters": sum(int(v.size) for v in jax.tree.leaves(self.state.params)),
            "best_step": book.best_step if tc.eval_with_best else self.step,
            f"best_val_{tc.best_metric}": book.best_value,
            "train_time_s": time.perf_counter() - self.started,
        }
        if "test" in self.task.splits:
            test = self.evaluate("test", chosen)
            self.tracker.log({"split": "test", **test}, self.step)
            summary["test"] = test
            self.say(f"test {_format(test)}")
        for split in self.task.splits:  # the other lengths of task.eval_lengths
            if split not in ("train", "val", "test"):
                values = self.evaluate(split, chosen)
                self.tracker.log({"split": split, **values}, self.step)
                summary[split] = values
                self.say(f"{split} {_format(values)}")
        if self.init_report is not None:
            summary["init_from"] = self.init_report["source"]
        self._write_summary(summary)
        return summary

    def _write_summary(self, summary: dict) -> None:
        if self.main:
            tmp = self.run_dir / "summary.json.tmp"
            tmp.write_text(json.dumps(summary, indent=1))
            os.replace(tmp, self.run_dir / "summary.json")
        self.tracker.log_summary(summary)
        if self.config.logging.plot and self.main:
            plot_curves(self.run_dir / "metrics.jsonl", self.run_dir / "curves.png")


def run(
    config: Config,
    run_dir: str | Path | None = None,
    *,
    resume: bool = False,
    say=None,
) -> dict:
    """Train `config` in `run_dir` (continuing its latest checkpoint if `resume`):
    `Trainer(config, run_dir, resume=resume, say=say).fit()`.

    **Returns:** the summary also written to `summary.json`.

    **Raises:** `ConfigError` for a bad config, `TrainingError` when training cannot
    go on, `Interrupted` after saving on SIGINT/SIGTERM.
    """
    return Trainer(config, run_dir, resume=resume, say=say).fit()
