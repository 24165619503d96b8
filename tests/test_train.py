"""The training framework end to end: CLI runs, exact resume, fine-tuning, checkpoints.

Runs are tiny (a one-block S5 of width 16, a few dozen steps) so the whole file stays
around a minute. Interrupted runs are real subprocesses that get SIGTERM or SIGKILL;
they run with the same JAX settings as this process (x64), so their losses can be
compared bit for bit with an in-process run. Optax's update rules are not written for
strict dtype promotion (`b1 ** count` mixes a Python float and an int32 count), so
these tests use JAX's standard promotion, as users' runs do.
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import jax
import jax.numpy as jnp
import jax.random as jr
import numpy as np
import pytest
import yaml

import train
from train import cli
from train.checkpoint import Checkpointer, CheckpointError, flatten
from train.tracking import read_jsonl, wandb_mode

ROOT = Path(__file__).resolve().parent.parent

TINY = {
    "model": {"mixer": "s5", "d_model": 16, "n_layers": 1, "dropout": 0.1},
    "task": {"name": "mnist1d", "train_shift": 3},
    "optim": {"lr": 3e-3, "warmup_steps": 5, "ema_decay": 0.9},
    "train": {
        "steps": 24,
        "batch_size": 16,
        "eval_every": 8,
        "checkpoint_every": 3,
        "log_every": 1,
        "progress": False,
    },
    "logging": {"plot": False},
}


def write_config(tmp_path: Path, raw: dict, name="tiny") -> Path:
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path):
    return [
        (r["step"], r["split"], r["loss"]) for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


def subprocess_env():
    env = dict(os.environ)
    env.update(
        JAX_ENABLE_X64="1",
        JAX_NUMPY_DTYPE_PROMOTION="standard",
        JAX_NUMPY_RANK_PROMOTION="raise",
        JAX_PLATFORMS="cpu",
        WANDB_MODE="disabled",
        PYTHONPATH=str(ROOT),
    )
    return env


@pytest.fixture(autouse=True, scope="module")
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def reference(tmp_path_factory):
    """An uninterrupted tiny run, through the CLI in this process."""
    tmp = tmp_path_factory.mktemp("ref")
    cfg = write_config(tmp, TINY)
    run_dir = tmp / "run"
    cli.train_main([str(cfg), "--run-dir", str(run_dir)])
    return cfg, run_dir


def test_cli_run_directory_and_eval(reference, capsys):
    cfg, run_dir = reference
    for name in ("config.yaml", "metrics.jsonl", "summary.json", "checkpoints"):
        assert (run_dir / name).exists(), name
    summary = json.loads((run_dir / "summary.json").read_text())
    assert set(summary["val"]) == {"loss", "accuracy"}
    assert set(summary["test"]) == {"loss", "accuracy"}
    assert summary["steps"] == 24
    records = read_jsonl(run_dir / "metrics.jsonl")
    train_steps = [r["step"] for r in records if r["split"] == "train"]
    assert train_steps == list(range(1, 25))
    assert {"loss", "lr", "examples_per_s", "eta_s"} <= set(records[0])
    assert [r["step"] for r in records if r["split"] == "val"] == [8, 16, 24]
    # The resolved config reads back to the same config.
    again = train.config.parse(yaml.safe_load((run_dir / "config.yaml").read_text()))
    assert again == train.config.load(cfg)
    # ssm-eval on the checkpoint the summary names reproduces the summary's test metrics.
    capsys.readouterr()
    cli.eval_main([str(run_dir), "--split", "test"])
    out = json.loads(capsys.readouterr().out)
    assert out["step"] == summary["best_step"]
    assert out["loss"] == pytest.approx(summary["test"]["loss"], rel=1e-6)
    assert out["accuracy"] == summary["test"]["accuracy"]


def spawn(args, log):
    return subprocess.Popen(
        [sys.executable, "-m", "train", *args],
        cwd=ROOT,
        env=subprocess_env(),
        stdout=log,
        stderr=subprocess.STDOUT,
    )


def wait_for_step(proc, run_dir: Path, step: int, timeout=240.0):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if proc.poll() is not None:
            raise AssertionError(f"the run ended (rc {proc.returncode}) before step {step}")
        if any(s >= step for s, _, _ in losses(run_dir)):
            return
        time.sleep(0.05)
    proc.kill()
    raise AssertionError(f"step {step} not reached in {timeout} s")


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGKILL])
def test_exact_resume_after_interrupt(reference, tmp_path, sig):
    cfg, ref_dir = reference
    run_dir = tmp_path / "run"
    with open(tmp_path / "log.txt", "w") as log:
        proc = spawn([str(cfg), "--run-dir", str(run_dir)], log)
        wait_for_step(proc, run_dir, 10)
        proc.send_signal(sig)
        rc = proc.wait(timeout=120)
    log_text = (tmp_path / "log.txt").read_text()
    assert rc == 128 + sig if sig == signal.SIGTERM else rc == -sig, log_text
    steps = Checkpointer(run_dir / "checkpoints").steps()
    assert steps, log_text
    if sig == signal.SIGTERM:  # saved at the very step it stopped
        assert "--resume" in log_text
        assert steps[-1] == max(s for s, split, _ in losses(run_dir) if split == "train")
    cli.train_main(["--resume", str(run_dir)])
    assert losses(run_dir) == losses(ref_dir)  # bit-identical, every step
    ours = json.loads((run_dir / "summary.json").read_text())
    theirs = json.loads((ref_dir / "summary.json").read_text())
    assert ours["test"] == theirs["test"]


def test_config_errors_name_the_key(tmp_path, capsys):
    cases = [
        ({"model": {"d_modle": 8}}, "model.d_modle"),
        ({"model": {"d_model": "wide"}}, "model.d_model: expected int"),
        ({"model": {"mixer": "transformer"}}, "model.mixer"),
        ({"optim": {"lr": -1.0}}, "optim.lr: must be > 0"),
        ({"task": {"name": "imagenet"}}, "task.name"),
        ({"task": {"name": "mnist1d", "num_val": 5000}}, "task.num_val"),
        ({"train": {"steps": 1.5}}, "train.steps"),
        ({"optim": {"grad_accum": 3}}, "optim.grad_accum"),
        ({"colour": "blue"}, "colour"),
    ]
    for raw, expected in cases:
        path = write_config(tmp_path, raw, "bad")
        with pytest.raises(SystemExit) as exc:
            cli.train_main([str(path), "--run-dir", str(tmp_path / "never")])
        assert exc.value.code == 2
        err = capsys.readouterr().err
        assert expected in err, (expected, err)
        assert "Traceback" not in err
        assert not (tmp_path / "never").exists()
    # Overrides: YAML values, the same checks; 1e-3 is a float although YAML 1.1 says str.
    config = train.config.load(None, ["optim.lr=1e-3", "model.mixer=lru"])
    assert config.optim.lr == 1e-3 and config.model.mixer == "lru"
    with pytest.raises(train.ConfigError, match="train.batch_size: expected int"):
        train.config.load(None, ["train.batch_size=[1, 2]"])
    with pytest.raises(train.ConfigError, match="does not exist"):
        train.config.load(tmp_path / "missing.yaml")
    path = tmp_path / "unsafe.yaml"
    path.write_text("model: !!python/object/apply:os.system ['true']\n")
    with pytest.raises(train.ConfigError, match="not valid YAML"):
        train.config.load(path)


def test_help_lists_keys(capsys):
    with pytest.raises(SystemExit):
        cli.train_main(["--help"])
    out = capsys.readouterr().out
    for key in ("model.mixer", "optim.lr", "train.steps", "train.freeze", "init_from"):
        assert key in out
    assert "task.num_kv_pairs" in out  # the tasks' own keys


def test_checkpoint_restores_what_was_saved(tmp_path, getkey):
    tree = {
        "w": jr.normal(getkey(), (3, 5), jnp.float32),
        "b": [jr.normal(getkey(), (7,), jnp.float64), jnp.arange(4, dtype=jnp.int32)],
    }
    ckpt = Checkpointer(tmp_path / "c", keep=3)
    for step in (1, 2):
        ckpt.save(step, jax.tree.map(lambda x, s=step: x * s, tree), {"note": step})
    ckpt.wait()
    like = jax.tree.map(jnp.zeros_like, tree)
    restored, meta = ckpt.restore(2, like)
    assert meta["note"] == 2 and meta["step"] == 2
    for a, b in zip(jax.tree.leaves(restored), jax.tree.leaves(tree), strict=True):
        assert a.dtype == b.dtype
        np.testing.assert_array_equal(np.asarray(a), np.asarray(b * 2))
    # A model that does not match is refused by name, never filled with zeros.
    with pytest.raises(CheckpointError, match="does not match"):
        ckpt.restore(2, {"w": like["w"]})
    with pytest.raises(CheckpointError, match="shape"):
        ckpt.restore(2, {**like, "w": jnp.zeros((5, 3), jnp.float32)})
    # Corrupt the newest: it is reported by name and the previous one is used.
    for f in (tmp_path / "c" / "2" / "state").rglob("*"):
        if f.is_file() and f.stat().st_size > 0 and "manifest" not in f.name:
            f.write_bytes(b"\0" * 3)
    messages = []
    fresh = Checkpointer(tmp_path / "c")
    restored, meta = fresh.restore_latest(like, report=messages.append)
    assert meta["step"] == 1
    assert any(str(tmp_path / "c" / "2") in m for m in messages), messages
    np.testing.assert_array_equal(np.asarray(restored["w"]), np.asarray(tree["w"]))
    # An interrupted save (orbax's temporary directory) is not a checkpoint.
    (tmp_path / "c" / "3.orbax-checkpoint-tmp-123").mkdir()
    assert Checkpointer(tmp_path / "c").steps() == [1, 2]


def test_finetune_new_head_and_freeze(tmp_path):
    source = {
        "model": {"mixer": "s5", "d_model": 16, "n_layers": 2},
        "task": {"name": "copying", "vocab_size": 6, "num_tokens": 3, "lag": 4},
        "train": {"steps": 4, "batch_size": 8, "eval_every": 0, "progress": False},
        "optim": {"warmup_steps": 1},
        "logging": {"plot": False},
    }
    src_dir = tmp_path / "source"
    cli.train_main([str(write_config(tmp_path, source, "src")), "--run-dir", str(src_dir)])
    target = dict(source)
    target["task"] = {"name": "copying", "vocab_size": 9, "num_tokens": 3, "lag": 4}
    target["init_from"] = str(src_dir)
    target["train"] = dict(source["train"], freeze=["blocks.0.*"])
    dst_dir = tmp_path / "target"
    cli.train_main([str(write_config(tmp_path, target, "dst")), "--run-dir", str(dst_dir)])
    report = json.loads((dst_dir / "init_from.json").read_text())
    assert set(report["skipped"]) == {"embedding.weight", "head.weight", "head.bias"}
    assert any(k.startswith("blocks.1.") for k in report["loaded"])
    src, _ = Checkpointer(src_dir / "checkpoints").read_raw(4)
    dst, _ = Checkpointer(dst_dir / "checkpoints").read_raw(4)
    frozen = [k for k in dst if k.startswith("params.blocks.0.")]
    trained = [k for k in dst if k.startswith("params.blocks.1.")]
    assert frozen and trained
    for k in frozen:  # loaded and then never updated
        np.testing.assert_array_equal(dst[k], src[k])
    assert any(not np.array_equal(dst[k], src[k]) for k in trained)
    with pytest.raises(train.ConfigError, match="match no parameter"):
        train.run(
            train.config.parse(dict(target, train=dict(source["train"], freeze=["nope*"]))),
            tmp_path / "x",
        )


def test_nonfinite_loss_stops_or_skips(tmp_path):
    raw = {
        "model": {"mixer": "s5", "d_model": 8, "n_layers": 1},
        "optim": {"lr": 1e35, "warmup_steps": 0, "clip_norm": None, "schedule": "constant"},
        "train": {"steps": 6, "batch_size": 8, "eval_every": 0, "checkpoint_every": 1},
        "logging": {"plot": False},
    }
    raw["train"]["progress"] = False
    with pytest.raises(
        train.TrainingError, match=r"non-finite loss or gradient at step \d"
    ):
        train.run(train.config.parse(raw), tmp_path / "stop")
    steps = Checkpointer(tmp_path / "stop" / "checkpoints").steps()
    for step in steps:  # everything that was saved is finite
        arrays, _ = Checkpointer(tmp_path / "stop" / "checkpoints").read_raw(step)
        assert all(np.all(np.isfinite(v)) for v in arrays.values())
    raw["train"]["on_nonfinite"] = "skip"
    train.run(train.config.parse(raw), tmp_path / "skip")
    arrays, _ = Checkpointer(tmp_path / "skip" / "checkpoints").read_raw(6)
    assert all(np.all(np.isfinite(v)) for v in arrays.values())


def test_grad_accumulation_matches_full_batch(getkey):
    config = train.config.parse({"model": {"mixer": "lru", "d_model": 8, "n_layers": 1}})
    task = train.build_task(config.task)
    model = train.build_model(config, task, getkey())
    import equinox as eqx

    from train.trainer import init_state, make_train_step

    params, static = eqx.partition(model, eqx.is_array)
    batch = {k: jnp.asarray(v) for k, v in train.train_batch(task, 0, 0, 8).items()}
    results = []
    for accum in (1, 4):
        cfg = train.config.parse(
            {**train.config.to_dict(config), "optim": {"grad_accum": accum}}
        )
        opt, _ = train.make_optimizer(cfg, params)
        state = init_state(cfg, jax.tree.map(jnp.copy, params), opt, jr.key(0))
        step = make_train_step(cfg, static, opt, task.kind)
        state, metrics = step(state, batch)
        results.append((state.params, metrics["loss"]))
    assert float(results[0][1]) == pytest.approx(float(results[1][1]), rel=1e-5)
    full, micro = flatten(results[0][0]), flatten(results[1][0])
    assert full.keys() == micro.keys()
    for a, b in zip(full.values(), micro.values(), strict=True):
        np.testing.assert_allclose(np.asarray(a), np.asarray(b), rtol=1e-4, atol=1e-6)


def test_lm_bf16_remat_and_generate(tmp_path, capsys):
    text = tmp_path / "corpus.txt"
    text.write_text("the quick brown fox jumps over the lazy dog. " * 40)
    raw = {
        "model": {
            "mixer": "lru",
            "d_model": 16,
            "n_layers": 1,
            "remat": True,
            "compute_dtype": "bfloat16",
        },
        "task": {"name": "lm_bytes", "paths": [str(text)], "seq_len": 32},
        "train": {"steps": 3, "batch_size": 4, "eval_every": 0, "progress": False},
        "logging": {"plot": True},
    }
    run_dir = tmp_path / "lm"
    cli.train_main([str(write_config(tmp_path, raw, "lm")), "--run-dir", str(run_dir)])
    summary = json.loads((run_dir / "summary.json").read_text())
    assert np.isfinite(summary["val"]["loss"]) and "bits_per_byte" in summary["val"]
    assert "tokens_per_s" in read_jsonl(run_dir / "metrics.jsonl")[0]
    assert (run_dir / "curves.png").stat().st_size > 0
    capsys.readouterr()
    cli.generate_main([str(run_dir), "--prompt", "the qu", "--length", "12"])
    out = capsys.readouterr().out
    assert out.startswith("the qu") and len(out.rstrip("\n")) >= 6


def test_wandb_modes(monkeypatch, tmp_path):
    monkeypatch.setenv("WANDB_MODE", "disabled")
    assert wandb_mode("online") == "disabled"
    monkeypatch.delenv("WANDB_MODE")
    monkeypatch.delenv("WANDB_API_KEY", raising=False)
    monkeypatch.setenv("HOME", str(tmp_path))
    assert wandb_mode("auto") == "offline"  # no key: never touches the network
    monkeypatch.setenv("WANDB_API_KEY", "x" * 40)
    assert wandb_mode("auto") == "online"
    assert wandb_mode("disabled") == "disabled"


def test_shipped_configs_are_valid(monkeypatch):
    monkeypatch.chdir(ROOT)  # lm_bytes reads files relative to the working directory
    paths = sorted((ROOT / "configs").glob("*.yaml"))
    names = {p.stem for p in paths}
    assert {"mnist1d", "selective_copying", "mqar", "induction_heads", "lm_bytes"} <= names
    for path in paths:
        config = train.config.load(path)
        if config.init_from is not None:  # the fine-tuning example names a run to come
            continue
        task = train.build_task(config.task)
        import equinox as eqx

        model = eqx.filter_eval_shape(train.build_model, config, task, jr.key(0))
        assert model.head.out_features == task.n_outputs, path.name


def test_early_stopping(tmp_path):
    raw = {
        "model": {"mixer": "lru", "d_model": 8, "n_layers": 1},
        "optim": {"lr": 1e-12, "warmup_steps": 0},
        "train": {
            "steps": 50,
            "batch_size": 8,
            "eval_every": 1,
            "early_stopping": 2,
            "best_metric": "accuracy",
            "best_mode": "max",
            "progress": False,
        },
        "logging": {"plot": False},
    }
    summary = train.run(train.config.parse(raw), tmp_path / "es")
    # The accuracy cannot improve at this learning rate: the first evaluation is the
    # best, and two more without improvement stop the run.
    assert summary["steps"] == 3 and summary["best_step"] == 1
