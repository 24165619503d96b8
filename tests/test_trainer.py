"""`train.Trainer`: hooks every N steps, teardown on every exit path, metric names
checked before anything compiles. Runs are a width-8 S5 block for a few steps."""

from __future__ import annotations

import json
import os
import signal

import jax
import pytest

import train
from train import loop
from train.checkpoint import Checkpointer
from train.plot import panel_names, plot_curves
from train.tracking import MultiTracker

RAW = {
    "model": {"mixer": "s5", "d_model": 8, "n_layers": 1},
    "task": {"name": "mnist1d", "num_train": 100, "num_val": 20, "num_test": 20},
    "optim": {"warmup_steps": 0},
    "train": {
        "steps": 6,
        "batch_size": 8,
        "eval_batch_size": 20,
        "eval_every": 0,
        "checkpoint_every": 0,
        "log_every": 2,
        "progress": False,
    },
    "logging": {"plot": False},
}


def config(**train_overrides):
    raw = {**RAW, "train": {**RAW["train"], **train_overrides}}
    return train.config.parse(raw)


@pytest.fixture(autouse=True, scope="module")
def standard_promotion():  # optax mixes Python floats and int32 counts
    with jax.numpy_dtype_promotion("standard"):
        yield


class FakeTracker:
    def __init__(self):
        self.logged, self.finished = [], False

    def log_config(self, config):
        pass

    def log(self, metrics, step):
        assert not self.finished, "logged after finish"
        self.logged.append((step, metrics["split"]))

    def log_summary(self, summary):
        pass

    def finish(self):
        self.finished = True


@pytest.fixture
def fake_tracker(monkeypatch):
    """The tracker of the latest run (as `fake_tracker.last`)."""

    class Opened:
        last: FakeTracker | None = None

    def open_trackers(*args, **kwargs):
        Opened.last = FakeTracker()
        return MultiTracker([Opened.last])

    monkeypatch.setattr(loop, "open_trackers", open_trackers)
    return Opened


METRICS = {"loss": 1.0, "accuracy": 0.5, "grad_norm": 1.0, "finite": True}


@pytest.fixture
def fake_steps(monkeypatch):
    """Train steps that leave the state as it is: the loop without a compilation."""
    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: lambda s, b: (s, METRICS))


@pytest.fixture
def closed_checkpointers(monkeypatch):
    closed = []
    close = Checkpointer.close

    def recording_close(self):
        closed.append(self.directory)
        close(self)

    monkeypatch.setattr(Checkpointer, "close", recording_close)
    return closed


def test_hooks_run_every_n_steps_and_can_stop(tmp_path, fake_tracker, fake_steps):
    trainer = train.Trainer(config(), tmp_path / "run")
    seen, entered = [], []

    class Entered:
        def __enter__(self):
            entered.append("enter")

        def __exit__(self, *exc):
            entered.append("exit")

        def __call__(self, info):
            pass

    trainer.add_hook(lambda info: seen.append(("every 2", info.step)), every=2)
    trainer.add_hook(lambda info: seen.append(("final", info.step)), every=4, final=True)
    trainer.add_hook(Entered())
    summary = trainer.fit()
    assert seen == [("every 2", 2), ("every 2", 4), ("final", 4), ("every 2", 6)] + [
        ("final", 6)
    ]
    assert entered == ["enter", "exit"]
    assert [s for s, split in fake_tracker.last.logged if split == "train"] == [2, 4, 6]
    assert fake_tracker.last.finished
    # The names the trainer checks best_metric against are what evaluation returns.
    assert set(summary["val"]) == set(loop.eval_metric_names(trainer.task.kind))
    with pytest.raises(ValueError, match="every"):
        trainer.add_hook(print, every=0)

    stopping = train.Trainer(config(), tmp_path / "stop")
    stopping.add_hook(lambda info: info.trainer.stop("enough"), every=3)
    assert stopping.fit()["steps"] == 3


def test_teardown_when_a_step_raises(
    tmp_path, monkeypatch, fake_tracker, closed_checkpointers
):
    calls = []

    def failing(state, batch):
        calls.append(1)
        if len(calls) == 3:
            raise RuntimeError("boom")
        return state, METRICS

    monkeypatch.setattr(loop, "make_train_step", lambda *a, **k: failing)
    handler = signal.getsignal(signal.SIGINT)
    trainer = train.Trainer(config(checkpoint_every=1), tmp_path / "run")
    with pytest.raises(RuntimeError, match="boom"):
        trainer.fit()
    assert fake_tracker.last.finished
    assert closed_checkpointers == [trainer.checkpoints.directory]
    assert signal.getsignal(signal.SIGINT) is handler
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps() == [1, 2]
    trainer.close()  # again: nothing left to close
    assert closed_checkpointers == [trainer.checkpoints.directory]


def test_a_raising_hook_is_torn_down_too(
    tmp_path, fake_tracker, fake_steps, closed_checkpointers
):
    trainer = train.Trainer(config(), tmp_path / "run")

    def hook(info):
        raise KeyError("hook failed")

    trainer.add_hook(hook, every=4)
    with pytest.raises(KeyError, match="hook failed"):
        trainer.fit()
    assert trainer.step == 4 and fake_tracker.last.finished and closed_checkpointers


def test_bad_best_metric_fails_before_anything_compiles(tmp_path, monkeypatch):
    def never(*args, **kwargs):
        raise AssertionError("built a model for a config with a bad best_metric")

    monkeypatch.setattr(loop, "build_model", never)
    monkeypatch.setattr(loop, "make_train_step", never)
    with pytest.raises(train.ConfigError, match=r"train.best_metric: 'bpb'.*'accuracy'"):
        train.run(config(best_metric="bpb"), tmp_path / "run")
    assert not (tmp_path / "run").exists()


def test_interrupt_saves_raises_and_tears_down(tmp_path, fake_tracker, fake_steps):
    trainer = train.Trainer(config(), tmp_path / "run")
    # User hooks run after the signal hook, so a signal sent at step 2 is seen at 3.
    trainer.add_hook(lambda info: os.kill(os.getpid(), signal.SIGINT), every=2)
    with pytest.raises(train.Interrupted) as caught:
        trainer.fit()
    assert caught.value.step == 3 and caught.value.signum == signal.SIGINT
    assert Checkpointer(tmp_path / "run" / "checkpoints").steps() == [3]
    assert fake_tracker.last.finished


def test_curves_panels(tmp_path):
    rows = [
        {"step": 1, "split": "train", "loss": 2.0, "accuracy": 0.1, "grad_norm": 1.0}
        | {"lr": 1e-3, "examples_per_s": 9.0, "eta_s": 5.0},
        {"step": 1, "split": "val", "loss": 2.1, "accuracy": 0.2},
    ]
    assert panel_names(rows) == ["loss", "accuracy", "lr", "examples_per_s"]
    lm = [dict(rows[0], tokens_per_s=90.0), dict(rows[1], bits_per_byte=3.0)]
    assert panel_names(lm) == ["loss", "accuracy", "bits_per_byte", "lr", "tokens_per_s"]
    path = tmp_path / "metrics.jsonl"
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    plot_curves(path, tmp_path / "curves.png")
    assert (tmp_path / "curves.png").stat().st_size > 0


def test_unalias_copies_shared_leaves_so_a_donated_step_runs():
    import equinox as eqx
    import jax.numpy as jnp

    from train.trainer import unalias

    shared = jnp.arange(3.0)
    tree = {"a": shared, "b": shared, "c": jnp.ones(2), "n": 3}
    fixed = unalias(tree)
    assert fixed["a"] is shared and fixed["b"] is not shared and fixed["c"] is tree["c"]
    assert fixed["n"] == 3 and bool(jnp.all(fixed["b"] == shared))
    step = jax.jit(lambda t: jax.tree.map(lambda x: x + 1, t), donate_argnums=0)
    arrays = eqx.filter(fixed, eqx.is_array)
    out = step(arrays)
    assert float(out["b"][2]) == 3.0


def test_no_mixer_shares_one_array_between_two_parameters():
    import equinox as eqx
    import jax.random as jr

    import layers

    for name, cls in layers.MIXERS.items():  # the mLSTM's two gates once shared zeros
        leaves = jax.tree.leaves(eqx.filter(cls(16, key=jr.key(0)), eqx.is_array))
        assert len({id(x) for x in leaves}) == len(leaves), name
