"""The LM task through `ssm-train`: exact resume with BPE and packed documents, the
run's tokenizer reloaded, and every data mistake reported by key and file (exit 2).

Runs are in-process and tiny (a one-block LRU of width 16); the interrupted run is a
copy of a finished one without its later checkpoints, as `kill -9` leaves a run
(tests/test_train.py interrupts real subprocesses).
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import jax
import numpy as np
import pytest
import yaml

from train import cli, data
from train.tracking import read_jsonl

PARAGRAPHS = [
    "def add(a, b):\n    return a + b",
    "The quick brown fox jumps over the lazy dog.",
    "class Stack:\n    def push(self, item):\n        self.items.append(item)",
    "héllo → 世界, ünïcödé 🙂",
]

RUN = {
    "model": {"mixer": "lru", "d_model": 16, "n_layers": 1},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {
        "steps": 8,
        "batch_size": 8,
        "eval_every": 4,
        "eval_batch_size": 16,
        "checkpoint_every": 2,
        "keep_checkpoints": 10,
        "log_every": 1,
        "progress": False,
    },
    "logging": {"plot": False},
}


@pytest.fixture(autouse=True, scope="module")
def standard_promotion():
    with jax.numpy_dtype_promotion("standard"):  # optax is not written for strict
        yield


@pytest.fixture
def corpus(tmp_path, monkeypatch):
    rng = np.random.default_rng(0)
    for i in range(3):
        order = rng.integers(0, len(PARAGRAPHS), 40)
        text = "\n\n".join(PARAGRAPHS[j] for j in order) + "\n"
        (tmp_path / "docs" / f"{i}.txt").parent.mkdir(exist_ok=True)
        (tmp_path / "docs" / f"{i}.txt").write_text(text, encoding="utf-8")
    monkeypatch.chdir(tmp_path)
    return tmp_path


def write_config(tmp_path: Path, task: dict, name="lm") -> Path:
    raw = {**RUN, "task": {"name": "lm", "cache_dir": str(tmp_path / "cache"), **task}}
    path = tmp_path / f"{name}.yaml"
    path.write_text(yaml.safe_dump(raw))
    return path


def losses(run_dir: Path):
    return [
        (r["step"], r["split"], r["loss"], r.get("bits_per_byte"))
        for r in read_jsonl(run_dir / "metrics.jsonl")
    ]


BPE_TASK = {
    "paths": ["docs/*.txt"],
    "tokenizer": "bpe",
    "vocab_size": 320,
    "documents": "paragraphs",
    "seq_len": 32,
}


def test_resume_is_bit_exact_with_bpe_and_packing(corpus, capsys):
    cfg = write_config(corpus, BPE_TASK)
    ref = corpus / "ref"
    cli.train_main([str(cfg), "--run-dir", str(ref)])
    assert (ref / "tokenizer.json").is_file()
    summary = json.loads((ref / "summary.json").read_text())
    assert summary["val"]["bits_per_byte"] > 0

    # The same run as if killed after step 4: a copy without the later checkpoints
    # (the metrics after step 4 are rewritten on resume).
    run = corpus / "run"
    shutil.copytree(ref, run)
    for later in (run / "checkpoints").iterdir():
        if later.name.isdigit() and int(later.name) > 4:
            shutil.rmtree(later)
    (run / "summary.json").unlink()
    # Resume with no cache at all: the run's tokenizer.json, shards rebuilt from it.
    shutil.rmtree(corpus / "cache")
    cli.train_main(["--resume", str(run)])
    assert losses(run) == losses(ref)  # bit-identical, every step and evaluation
    assert (run / "tokenizer.json").read_text() == (ref / "tokenizer.json").read_text()
    assert not (corpus / "cache" / "tokenizers").exists()  # nothing was retrained

    # ssm-eval and ssm-generate load the run's tokenizer and data.
    config, task, _, step = cli._load_run(run, "latest")
    assert step == 8 and task.tokenizer.to_json() == (run / "tokenizer.json").read_text()
    capsys.readouterr()
    cli.eval_main([str(run), "--split", "val", "--checkpoint", "best"])
    out = json.loads(capsys.readouterr().out)
    theirs = json.loads((run / "summary.json").read_text())["val"]
    assert out["bits_per_byte"] == pytest.approx(theirs["bits_per_byte"], rel=1e-6)

    # Without its tokenizer.json a BPE run cannot go on: exit 2, the run left as it was.
    (run / "tokenizer.json").unlink()
    before = sorted(p.relative_to(run) for p in run.rglob("*"))
    with pytest.raises(SystemExit) as exc:
        cli.train_main(["--resume", str(run)])
    assert exc.value.code == 2
    err = capsys.readouterr().err
    assert "task.tokenizer" in err and str(run / "tokenizer.json") in err
    assert "Traceback" not in err
    assert sorted(p.relative_to(run) for p in run.rglob("*")) == before


def _write(path: Path, content: bytes | str):
    path.parent.mkdir(parents=True, exist_ok=True)
    if isinstance(content, str):
        content = content.encode()
    path.write_bytes(content)


def _case_no_match(tmp):
    return {"paths": ["nothing/*.txt"]}, "task.paths", "nothing/*.txt"


def _case_empty(tmp):
    _write(tmp / "e" / "a.txt", "")
    _write(tmp / "e" / "b.txt", "")
    return {"paths": ["e/*.txt"]}, "task.paths", "e/a.txt"


def _case_too_small(tmp):
    _write(tmp / "s" / "a.txt", "tiny corpus\n")
    return {"paths": ["s/*.txt"], "seq_len": 64}, "task.seq_len", "s/a.txt"


def _case_not_utf8(tmp):
    _write(tmp / "docs" / "1.txt", "caf\xe9 in latin-1".encode("latin-1"))
    return {"paths": ["docs/*.txt"], "tokenizer": "bpe"}, "task.paths", "docs/1.txt"


def _case_binary(tmp):
    _write(tmp / "docs" / "2.txt", b"text, then a NUL \0 byte")
    return {"paths": ["docs/*.txt"]}, "task.paths", "docs/2.txt"


def _case_tokenizer_missing(tmp):
    return (
        {"paths": ["docs/*.txt"], "tokenizer": "tok/none.json"},
        "task.tokenizer",
        ("tok/none.json"),
    )


def _case_tokenizer_not_one(tmp):
    _write(tmp / "tok" / "bad.json", '{"hello": "world"}')
    return (
        {"paths": ["docs/*.txt"], "tokenizer": "tok/bad.json"},
        "task.tokenizer",
        ("tok/bad.json"),
    )


CASES = [
    _case_no_match,
    _case_empty,
    _case_too_small,
    _case_not_utf8,
    _case_binary,
    _case_tokenizer_missing,
    _case_tokenizer_not_one,
]


@pytest.mark.parametrize("case", CASES, ids=[c.__name__[6:] for c in CASES])
def test_data_errors_exit_2_naming_key_and_file(corpus, capsys, case):
    task, key, name = case(corpus)
    cfg = write_config(corpus, task)
    never = corpus / "never"
    with pytest.raises(SystemExit) as exc:
        cli.train_main([str(cfg), "--run-dir", str(never)])
    err = capsys.readouterr().err
    assert exc.value.code == 2, err
    assert err.startswith("error: ") and key in err and name in err, err
    assert "Traceback" not in err
    assert not never.exists()
    # nothing half-written in the cache: no temporary names, only complete entries
    shards = corpus / "cache" / "shards"
    for entry in shards.iterdir() if shards.exists() else ():
        assert not entry.name.startswith(".") and (entry / "index.json").is_file()


def test_unreadable_file(corpus, capsys, monkeypatch):
    real_open = open

    def refusing(path, *args, **kwargs):  # root reads anything: refuse by hand
        if str(path).endswith("1.txt"):
            raise PermissionError(13, "Permission denied", str(path))
        return real_open(path, *args, **kwargs)

    monkeypatch.setattr(data._corpus, "open", refusing, raising=False)
    cfg = write_config(corpus, {"paths": ["docs/*.txt"]})
    with pytest.raises(SystemExit) as exc:
        cli.train_main([str(cfg), "--run-dir", str(corpus / "never")])
    err = capsys.readouterr().err
    assert exc.value.code == 2
    assert "task.paths: cannot read docs/1.txt: Permission denied" in err
    assert not (corpus / "never").exists()


def test_shard_cache_that_does_not_match_its_index(corpus, capsys):
    cfg = write_config(corpus, {"paths": ["docs/*.txt"], "shard_tokens": 1000})
    config = data.LMConfig(paths=("docs/*.txt",), cache_dir=str(corpus / "cache"),
                           shard_tokens=1000)  # fmt: skip
    entry = data.build_task(config).cache_path
    shard = entry / "train-00001.npy"
    good = np.load(shard)

    def fails(fragment):
        with pytest.raises(SystemExit) as exc:
            cli.train_main([str(cfg), "--run-dir", str(corpus / "never")])
        err = capsys.readouterr().err
        assert exc.value.code == 2 and "Traceback" not in err
        assert "task.cache_dir" in err and fragment in err and str(entry) in err, err
        assert not (corpus / "never").exists()

    np.save(shard, good[:-3])  # a shard shorter than its index says
    fails(str(shard))
    np.save(shard, good.astype(np.uint32))  # another dtype
    fails(str(shard))
    shard.unlink()
    fails(str(shard))
    np.save(shard, good)
    (entry / "index.json").write_text("{ not json")
    fails("index.json")
    (entry / "index.json").unlink()
    fails("index.json")


def test_resets_reach_mixers_that_take_them(corpus):
    """The batch's resets go into the model (every registered mixer takes them), for
    a single mixer and for a hybrid stack."""
    import equinox as eqx
    import jax.numpy as jnp
    import jax.random as jr

    import train
    from train.trainer import make_eval_step, takes_resets

    task_raw = {"name": "lm", "paths": ["docs/*.txt"], "seq_len": 24, "cache_dir": "c",
                "documents": "paragraphs"}  # fmt: skip
    losses = {}
    for mixer in ("lru", ["rglru", "local_attention"]):
        model_raw = {"mixer": mixer, "d_model": 16, "n_layers": 2}
        if isinstance(mixer, list):
            model_raw["mixer_kwargs"] = {"local_attention": {"window": 8}}
        cfg = train.config.parse({"model": model_raw, "task": task_raw})
        task = train.build_task(cfg.task)
        model = train.build_model(cfg, task, jr.key(0))
        assert takes_resets(model)
        params, static = eqx.partition(model, eqx.is_array)
        batch = {k: jnp.asarray(v) for k, v in task.examples("train", np.arange(8)).items()}
        assert bool(batch["resets"][:, 1:].any())  # documents start inside rows
        plain = {**batch, "resets": jnp.zeros_like(batch["resets"])}
        step = make_eval_step(cfg, static, task.kind)  # _sums, jitted
        got = [float(step(params, b)["loss"]) for b in (batch, plain)]
        losses[str(mixer)] = got
    for got in losses.values():  # the resets change the loss: they reached the mixers
        assert got[0] != got[1], losses
