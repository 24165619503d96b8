"""`scripts/reproduce.py` and the shipped table configs (`configs/tables/`): every
config parses and fits its task, the paper data names real configs, and one tiny
table runs end to end, resumes from its finished runs and prints its table."""

from __future__ import annotations

import importlib.util
import json
import sys
from pathlib import Path

import pytest

import train

ROOT = Path(__file__).resolve().parents[1]
TABLE_CONFIGS = sorted((ROOT / "configs" / "tables").glob("*/*.yaml"))


def _load_script():
    spec = importlib.util.spec_from_file_location(
        "reproduce", ROOT / "scripts" / "reproduce.py"
    )
    module = importlib.util.module_from_spec(spec)
    sys.modules["reproduce"] = module  # dataclasses look their module up
    spec.loader.exec_module(module)
    return module


reproduce = _load_script()


def test_every_table_has_configs_and_paper_data():
    tables = reproduce.table_names()
    assert set(tables) == {
        "selective_copying",
        "induction_heads",
        "mqar",
        "mqar_256",
        "state_tracking",
        "mnist1d",
    }
    assert set(reproduce.PAPERS) == set(tables)
    for table, paper in reproduce.PAPERS.items():
        names = set(reproduce.configs_of(table))
        assert paper.source and set(paper.rows) <= names, (table, set(paper.rows) - names)


@pytest.mark.parametrize("path", TABLE_CONFIGS, ids=lambda p: f"{p.parent.name}/{p.stem}")
def test_table_config_loads_and_validates(path):
    config = train.config.load(path)
    task = train.build_task(config.task)
    config.model.check_for_task(task.seq_len)
    assert config.train.best_metric == "accuracy" and config.train.best_mode == "max"
    if path.parent.name in ("induction_heads", "state_tracking"):
        assert config.task.eval_lengths, "tested at longer lengths"
        assert min(config.task.eval_lengths) > task.seq_len


def test_mnist1d_table_has_every_mixer_at_matched_size():
    import layers

    names = set(reproduce.configs_of("mnist1d"))
    assert names == set(layers.MIXERS)


def test_state_tracking_table_pairs_negative_eigenvalues():
    names = set(reproduce.configs_of("state_tracking"))
    for task in ("parity", "modular_addition"):
        for mixer in ("deltanet", "gated_deltanet", "mamba"):
            assert {f"{task}_{mixer}", f"{task}_{mixer}_neg"} <= names
        assert {f"{task}_lstm", f"{task}_gru"} <= names
    neg = train.config.load(ROOT / "configs/tables/state_tracking/parity_deltanet_neg.yaml")
    assert neg.model.mixer_kwargs == {"allow_neg_eigval": True}


def test_markdown_table():
    def run(acc, long, seed):
        summary = {
            "parameters": 12345,
            "steps": 10,
            "test": {"accuracy": acc},
            "test_len64": {"accuracy": long},
        }
        return {"summary": summary, "wall_s": 60.0, "seed": seed, "mixer": "mamba"}

    text = reproduce.markdown(
        "state_tracking", {"parity_mamba": [run(1.0, 0.5, 0), run(0.5, 0.25, 1)]}
    )
    lines = text.splitlines()
    assert lines[0].startswith("| config | mixer | params | steps | seeds | test acc % |")
    assert "test acc % at 64" in lines[0]
    assert (
        "| `parity_mamba` | mamba | 12k | 10 | 2 | 75.0 (100.0, 50.0) | 37.5 (50.0, 25.0) |"
        in text
    )
    assert "fails ([0, 1])" in text and "Grazzi et al. 2025" in text


TINY = [
    "model.d_model=8",
    "model.n_layers=1",
    "task.num_train=64",
    "task.num_val=8",
    "task.num_test=8",
    "task.eval_lengths=[48]",
    "train.batch_size=4",
    "train.eval_batch_size=8",
    "logging.plot=false",
]


def test_smoke_run_reuse_and_mismatch(tmp_path, capsys):
    base = ["state_tracking", "--only", "parity_lstm", "--out", str(tmp_path)]
    args = [*base, "--steps", "2", "--set", *TINY]
    reproduce.main(args)
    text = capsys.readouterr().out
    run_dir = tmp_path / "parity_lstm" / "seed0"
    summary = json.loads((run_dir / "summary.json").read_text())
    assert summary["steps"] == 2 and "test_len48" in summary
    assert "| `parity_lstm` | lstm |" in text and "test acc % at 48" in text
    assert "| `parity_lstm` | lstm |" in (tmp_path / "table.md").read_text()
    # a finished run is reused, not trained again
    reproduce.main(args)
    records = json.loads((tmp_path / "table.json").read_text())
    assert records["parity_lstm"][0]["reused"] is True
    # the same directory with other settings is refused
    with pytest.raises(SystemExit, match="ran with overrides"):
        reproduce.main([*base, "--steps", "3", "--set", *TINY])
    reproduce.main(["state_tracking", "--list", "--out", str(tmp_path)])
    listing = capsys.readouterr().out
    assert "parity_lstm" in listing and "done for seeds [0]" in listing
    assert "parity_gru" in listing and "not run" in listing


def test_unknown_table_and_config():
    with pytest.raises(SystemExit, match="no table 'nope'"):
        reproduce.main(["nope"])
    with pytest.raises(SystemExit):
        reproduce.main(["mqar", "--only", "nope"])


def test_a_failed_run_is_reported_and_the_table_printed(tmp_path, capfd):
    args = ["state_tracking", "--only", "parity_gru", "--out", str(tmp_path)]
    with pytest.raises(SystemExit, match="1 run\\(s\\) failed"):
        reproduce.main([*args, "--steps", "2", "--set", "task.min_len=0"])
    out = capfd.readouterr()
    assert "| `parity_gru` | gru | failed (exit 2) |" in out.out
    assert "task.min_len: must be >= 1" in out.err


def test_sweep_chooses_on_validation_and_records_every_value(tmp_path, capsys):
    args = ["state_tracking", "--only", "parity_gru", "--out", str(tmp_path)]
    args += ["--steps", "2", "--set", *TINY, "--sweep", "optim.lr=0.001,0.01"]
    reproduce.main(args)
    text = capsys.readouterr().out
    sweeps = json.loads((tmp_path / "sweep.json").read_text())["parity_gru"]
    assert set(sweeps) == {"0.001", "0.01"}
    for value, runs in sweeps.items():
        run_dir = tmp_path / "parity_gru" / f"optim.lr={value}" / "seed0"
        assert train.config.load(run_dir / "config.yaml").optim.lr == float(value)
        assert runs[0]["overrides"][-1] == f"optim.lr={value}"
        assert (run_dir / "summary.json").is_file()
    scores = {v: runs[0]["summary"]["best_val_accuracy"] for v, runs in sweeps.items()}
    best = max(scores, key=lambda v: (scores[v], v == "0.001"))
    assert f"| optim.lr={best} |" in text
    assert "optim.lr=0.001 | optim.lr=0.01 |" in (tmp_path / "sweep.md").read_text()
    assert "**" in (tmp_path / "sweep.md").read_text()


def test_choose_and_parse_sweep():
    def runs(*accs):
        return [{"summary": {"best_val_accuracy": a}} for a in accs]

    assert reproduce.choose({"a": runs(0.5, 0.7), "b": runs(0.55, 0.6)}) == "a"
    assert reproduce.choose({"a": runs(0.5), "b": runs(0.5)}) == "a"  # first of equals
    assert reproduce.choose({"a": [{"failed": 1}], "b": runs(0.1)}) == "b"
    assert reproduce.parse_sweep("optim.lr=1e-3, 3e-3") == ("optim.lr", ["1e-3", "3e-3"])
    assert reproduce.parse_sweep(None) == (None, [None])
    for bad in ("optim.lr", "=1", "optim.lr=", "k=1,1"):
        with pytest.raises(SystemExit, match="--sweep"):
            reproduce.parse_sweep(bad)
