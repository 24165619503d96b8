"""Data parallelism: the same config gives the same losses on 1 device, on the 4 fake
CPU devices of the test session (batch sharded, parameters replicated or FSDP-sharded)
and on 2 processes with 2 devices each talking over loopback (gloo)."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import jax
import numpy as np
import pytest

import train
from train import distributed
from train.tracking import read_jsonl

ROOT = Path(__file__).resolve().parent.parent

RAW = {
    "model": {"mixer": "lru", "d_model": 16, "n_layers": 1},
    "task": {"name": "mnist1d", "train_noise": 0.1},
    "optim": {"lr": 3e-3, "warmup_steps": 2},
    "train": {
        "steps": 10,
        "batch_size": 16,
        "eval_every": 5,
        "eval_batch_size": 64,
        "log_every": 1,
        "checkpoint_every": 0,
        "progress": False,
    },
    "logging": {"plot": False},
}


def with_overrides(**sections):
    raw = {k: dict(v) if isinstance(v, dict) else v for k, v in RAW.items()}
    for section, values in sections.items():
        raw[section] = {**raw.get(section, {}), **values}
    return train.config.parse(raw)


def losses(run_dir):
    return np.array([r["loss"] for r in read_jsonl(Path(run_dir) / "metrics.jsonl")])


@pytest.fixture(autouse=True, scope="module")
def standard_promotion():  # optax mixes Python floats and int32 counts
    with jax.numpy_dtype_promotion("standard"):
        yield


@pytest.fixture(scope="module")
def single_device(tmp_path_factory):
    run_dir = tmp_path_factory.mktemp("one") / "run"
    train.run(with_overrides(distributed={"devices": 1}), run_dir)
    return run_dir


def test_data_parallel_matches_one_device(single_device, tmp_path):
    assert jax.device_count() == 4  # set by conftest
    train.run(with_overrides(), tmp_path / "dp")
    np.testing.assert_allclose(losses(tmp_path / "dp"), losses(single_device), rtol=2e-5)


def test_fsdp_shards_parameters_and_matches(single_device, tmp_path):
    config = with_overrides(distributed={"fsdp": 2})
    layout = distributed.make_layout(config.distributed, {"b": 16})
    assert dict(layout.mesh.shape) == {"data": 2, "fsdp": 2, "seq": 1}
    matrix = np.zeros((16, 64), np.float32)
    assert layout.param_sharding(matrix).spec == jax.sharding.PartitionSpec(None, "fsdp")
    train.run(config, tmp_path / "fsdp")
    np.testing.assert_allclose(losses(tmp_path / "fsdp"), losses(single_device), rtol=2e-5)


def test_layout_errors():
    config = with_overrides(distributed={"fsdp": 3})
    with pytest.raises(train.ConfigError, match="distributed.fsdp"):
        distributed.make_layout(config.distributed, {})
    with pytest.raises(
        train.ConfigError, match="train.eval_batch_size: must be a multiple"
    ):
        distributed.make_layout(
            with_overrides().distributed, {"train.eval_batch_size": 250}
        )


def free_port() -> int:
    with socket.socket() as s:
        s.bind(("localhost", 0))
        return s.getsockname()[1]


def test_two_processes_match_one(single_device, tmp_path):
    import yaml

    cfg = tmp_path / "mp.yaml"
    cfg.write_text(yaml.safe_dump(train.config.to_dict(with_overrides())))
    port = free_port()
    procs = []
    for pid in range(2):
        env = dict(os.environ)
        env.update(
            XLA_FLAGS="--xla_force_host_platform_device_count=2",
            JAX_PLATFORMS="cpu",
            JAX_ENABLE_X64="1",
            JAX_COORDINATOR_ADDRESS=f"localhost:{port}",
            JAX_NUM_PROCESSES="2",
            JAX_PROCESS_ID=str(pid),
            WANDB_MODE="disabled",
            PYTHONPATH=str(ROOT),
        )
        log = open(tmp_path / f"p{pid}.log", "w")  # noqa: SIM115
        procs.append(
            subprocess.Popen(
                [
                    sys.executable,
                    "-m",
                    "train",
                    str(cfg),
                    "--run-dir",
                    str(tmp_path / "mp"),
                ],
                cwd=ROOT,
                env=env,
                stdout=log,
                stderr=subprocess.STDOUT,
            )
        )
    try:
        codes = [p.wait(timeout=300) for p in procs]
    finally:
        for p in procs:
            p.kill()
    logs = "\n".join((tmp_path / f"p{i}.log").read_text() for i in range(2))
    assert codes == [0, 0], logs
    np.testing.assert_allclose(losses(tmp_path / "mp"), losses(single_device), rtol=2e-5)
    assert "test loss" in (tmp_path / "p0.log").read_text()  # process 0 reports
    assert "test loss" not in (tmp_path / "p1.log").read_text()  # the others stay quiet


def test_sequence_parallel_matches_one_device(single_device, tmp_path):
    config = with_overrides(distributed={"seq": 2})
    layout = distributed.make_layout(config.distributed, {"b": 16}, 40)
    assert dict(layout.mesh.shape) == {"data": 2, "fsdp": 1, "seq": 2}
    task = train.build_task(config.task)
    model = train.build_model(config, task, jax.random.key(0))
    x = np.zeros((40, 1), np.float32)
    with layout.context():  # under the mesh, the LRU's scan is split over `seq`
        assert "shard_map" in str(jax.make_jaxpr(model)(x))
    assert "shard_map" not in str(jax.make_jaxpr(model)(x))  # and not elsewhere
    train.run(config, tmp_path / "seq")
    np.testing.assert_allclose(losses(tmp_path / "seq"), losses(single_device), rtol=2e-5)
    with pytest.raises(train.ConfigError, match="distributed.seq: sequence parallelism"):
        bad = with_overrides(distributed={"seq": 2}, model={"mixer": "mamba"})
        train.build_model(bad, task, jax.random.key(0))
    with pytest.raises(train.ConfigError, match="must divide the sequence length 30"):
        distributed.make_layout(with_overrides(distributed={"seq": 4}).distributed, {}, 30)
