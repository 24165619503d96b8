"""The compiled CPU kernels are built only when a CPU computation needs them: not at
import, and never when JAX's default backend is not the CPU (a GPU user running GLA or
the delta rule must not run a C++ compiler)."""

import os
import subprocess
import sys

import jax
import jax.numpy as jnp
import numpy as np
import pytest

import ssm
from ssm import _kernels


def _operators(key):
    kq, kk, kv, kb, kg = jax.random.split(key, 5)
    T, H, d = 17, 2, 8
    q, k, v = (jax.random.normal(x, (T, H, d)) for x in (kq, kk, kv))
    g = -jax.nn.softplus(jax.random.normal(kg, (T, H, d)))
    beta = jax.nn.sigmoid(jax.random.normal(kb, (T, H)))

    def run(q, k, v, g, beta):
        o1 = ssm.gated_linear_attention(q, k, v, g, chunk_size=4)
        o2 = ssm.delta_rule(q, k / jnp.linalg.norm(k, axis=-1, keepdims=True), v, beta)
        o3 = ssm.linear_scan(jnp.exp(g[:, 0]), v[:, 0], method="sequential")
        return o1, o2, o3

    return run, (q, k, v, g, beta)


def test_no_build_off_cpu(monkeypatch, getkey):
    """With a non-CPU default backend no kernel is built or emitted, and the results
    are the XLA forms' (checked against a run with the kernels turned off)."""
    run, args = _operators(getkey())
    with _kernels.disabled():
        expected = jax.jit(run)(*args)

    def no_build():
        raise AssertionError("the kernels were built for a non-CPU backend")

    monkeypatch.setattr(_kernels.build, "_backend", lambda: "gpu")
    monkeypatch.setattr(_kernels.build, "_build", no_build)
    monkeypatch.setitem(_kernels.build._state, "loaded", None)
    assert not _kernels.available()
    jax.clear_caches()
    try:
        text = jax.jit(run).lower(*args).as_text()
        got = jax.jit(run)(*args)
    finally:
        jax.clear_caches()
    assert "ssm_" not in text  # no custom call of ours in the program
    assert _kernels.build._state["loaded"] is None
    for g, e in zip(jax.tree.leaves(got), jax.tree.leaves(expected), strict=True):
        np.testing.assert_allclose(g, e, rtol=1e-10, atol=1e-12)


def test_import_builds_nothing(tmp_path):
    """Importing the packages and building a model compiles nothing (an empty kernel
    cache stays empty)."""
    code = (
        "import jax, ssm, layers, train\n"
        "from ssm import _kernels\n"
        "m = layers.SequenceModel('gla', 8, 1, 8, vocab_size=8,"
        " key=jax.random.key(0))\n"
        "assert _kernels.build._state['loaded'] is None\n"
    )
    env = dict(os.environ, SSM_KERNEL_CACHE=str(tmp_path), JAX_PLATFORMS="cpu")
    done = subprocess.run(
        [sys.executable, "-c", code], env=env, capture_output=True, text=True
    )
    assert done.returncode == 0, done.stderr[-2000:]
    assert list(tmp_path.iterdir()) == []


@pytest.mark.skipif(_kernels.build._compiler() is None, reason="no C++ compiler")
def test_cpu_lowering_uses_kernels(getkey):
    """On the CPU backend the same program does use them (so the test above can fail)."""
    run, args = _operators(getkey())
    assert _kernels.available()
    assert "ssm_" in jax.jit(run).lower(*args).as_text()
