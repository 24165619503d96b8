"""The training loop's concerns as hooks: callables of a [`StepInfo`][train.StepInfo]
that a [`Trainer`][train.Trainer] runs every N steps (after Levanter's hooks).

```python
trainer = train.Trainer(config, "runs/try")
trainer.add_hook(lambda info: print(info.step, info.metrics["loss"]), every=100)
summary = trainer.fit()
```

A hook that is also a context manager is entered when the loop starts and exited
when it ends, however it ends. A trainer registers these, in this order, when it is
built (so the checkpoint of an evaluation step carries its metric, and an interrupt
saves after everything else of its step): `LogMetrics` and `show_progress` every
`train.log_every` steps and at the last step, `evaluate` and `draw_curves` every
`train.eval_every` steps, `save_checkpoint` every `train.checkpoint_every` steps and
`CatchSignals` every step. Hooks added with `Trainer.add_hook` run after them. Once a
hook calls `Trainer.stop`, the step's remaining hooks are skipped and the loop ends.
"""

from __future__ import annotations

import signal
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from .plot import plot_curves

if TYPE_CHECKING:
    from .loop import Trainer
    from .trainer import TrainState


@dataclass(frozen=True, eq=False)
class StepInfo:
    """What a hook is given after an optimiser step.

    **Attributes:**

    - `trainer`: the [`Trainer`][train.Trainer] (its `config`, `tracker`, `book`, ...).
    - `step`: the optimiser steps done so far (1 after the first step).
    - `state`: the [`TrainState`][train.TrainState] after that step.
    - `metrics`: the step's host values: `loss`, `accuracy`, `grad_norm`, `finite`.
    """

    trainer: Trainer
    step: int
    state: TrainState
    metrics: dict[str, Any]

    @property
    def last(self) -> bool:
        """Whether this is the run's last step (`train.steps`)."""
        return self.step == self.trainer.config.train.steps


Hook = Callable[[StepInfo], None]


@dataclass
class Book:
    """Host-side bookkeeping saved with every checkpoint (as its `book` metadata): the
    best validation value and its step, evaluations since then, the last metrics."""

    best_value: float | None = None
    best_step: int | None = None
    evals_since_best: int = 0
    last_val: dict = field(default_factory=dict)
    last_train: dict = field(default_factory=dict)

    def improved(self, value: float, mode: str) -> bool:
        if self.best_value is None:
            return True
        return value < self.best_value if mode == "min" else value > self.best_value


class ProgressBar:
    """A tqdm bar (or nothing), through which the trainer's messages are printed."""

    def __init__(self, enabled: bool, total: int):
        self.bar = None
        if enabled:
            from tqdm.auto import tqdm

            self.bar = tqdm(total=total, initial=0, dynamic_ncols=True, disable=None)
        self.position = 0

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


class LogMetrics:
    """Training metrics to the trackers (and `trainer.book.last_train`): `loss`,
    `accuracy`, `grad_norm`, `lr`, `examples_per_s` (and `tokens_per_s` for a language
    model) over the steps since the last call, and `eta_s`."""

    def __init__(self):
        self._since: tuple[float, int] | None = None  # (time, step) of the last call

    def __call__(self, info: StepInfo) -> None:
        t, tc = info.trainer, info.trainer.config.train
        if self._since is None:  # the loop's first step: count from where it started
            self._since = (t.started, t.first_step)
        elapsed = time.perf_counter() - self._since[0]
        steps = info.step - self._since[1]
        rate = steps * tc.batch_size / max(elapsed, 1e-9)
        m = info.metrics
        values = {
            "split": "train",
            "loss": float(m["loss"]),
            "accuracy": float(m["accuracy"]),
            "grad_norm": float(m["grad_norm"]),
            "lr": float(t.schedule(info.step - 1)),
            "examples_per_s": rate,
            "eta_s": (tc.steps - info.step) * elapsed / max(steps, 1),
        }
        if t.task.kind == "lm":
            values["tokens_per_s"] = rate * t.task.seq_len
        t.tracker.log(values, info.step)
        t.book.last_train = {k: v for k, v in values.items() if k != "split"}
        self._since = (time.perf_counter(), info.step)


def show_progress(info: StepInfo) -> None:
    """Move the progress bar to the step, with the loss, learning rate and throughput
    that `LogMetrics` last logged."""
    last = info.trainer.book.last_train
    postfix = {"loss": f"{last['loss']:.4f}", "lr": f"{last['lr']:.2e}"}
    if "tokens_per_s" in last:
        postfix["tok/s"] = f"{last['tokens_per_s']:.0f}"
    else:
        postfix["ex/s"] = f"{last['examples_per_s']:.0f}"
    info.trainer.progress.update(info.step, postfix)


def evaluate(info: StepInfo) -> None:
    """`Trainer.validate` (logs, best and early-stopping bookkeeping, a checkpoint),
    then stop the run after `train.early_stopping` evaluations without improvement.
    Not at the last step: the final evaluation is `Trainer.finish`'s."""
    if info.last:
        return
    t, tc = info.trainer, info.trainer.config.train
    t.validate(info.state)
    if tc.early_stopping and t.book.evals_since_best >= tc.early_stopping:
        t.stop(
            f"early stopping at step {info.step}: no better val {tc.best_metric} "
            f"for {tc.early_stopping} evaluations"
        )


def save_checkpoint(info: StepInfo) -> None:
    """`Trainer.save` (nothing if this step is saved already). Not at the last step:
    the final evaluation saves it, with its metric."""
    if not info.last:
        info.trainer.save(info.state)


def draw_curves(info: StepInfo) -> None:
    """Redraw `curves.png` from `metrics.jsonl`."""
    if not info.last:
        t = info.trainer
        plot_curves(t.run_dir / "metrics.jsonl", t.run_dir / "curves.png")


class CatchSignals:
    """Inside the loop, SIGINT and SIGTERM are recorded instead of ending the process;
    at the end of the step they arrived in, `Trainer.interrupt` saves and raises
    `Interrupted`. Outside a main thread, signals are left alone."""

    def __enter__(self):
        self.caught: list[int] = []
        self._previous = {}
        for sig in (signal.SIGINT, signal.SIGTERM):
            try:
                self._previous[sig] = signal.signal(sig, self._handler)
            except ValueError:  # not the main thread
                pass
        return self

    def _handler(self, signum, frame):
        self.caught.append(signum)

    def __exit__(self, *exc):
        for sig, handler in self._previous.items():
            signal.signal(sig, handler)
        self._previous = {}

    def __call__(self, info: StepInfo) -> None:
        if self.caught:
            info.trainer.interrupt(self.caught[0])


def add_default_hooks(trainer: Trainer) -> None:
    """Register the loop's own hooks on `trainer`, in the order the module docstring
    gives."""
    tc = trainer.config.train
    trainer.add_hook(LogMetrics(), every=tc.log_every, final=True)
    trainer.add_hook(show_progress, every=tc.log_every, final=True)
    if tc.eval_every:
        trainer.add_hook(evaluate, every=tc.eval_every)
        if trainer.config.logging.plot and trainer.main:
            trainer.add_hook(draw_curves, every=tc.eval_every)
    if tc.checkpoint_every:
        trainer.add_hook(save_checkpoint, every=tc.checkpoint_every)
    trainer.add_hook(CatchSignals(), every=1)
