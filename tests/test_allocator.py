"""`train.configure_allocator`: glibc keeps freed memory; `SSM_JAX_MALLOC=system` opts out.

Each case runs in a fresh interpreter (the setting is process-wide): it mallocs and
touches 96 MiB, frees it, and reports how much of it is still resident.
"""

import os
import subprocess
import sys
import textwrap

import pytest

from train import allocator

PROBE = textwrap.dedent(
    """
    import ctypes, importlib.util, os, sys
    # The module alone, without importing the train package (and JAX).
    spec = importlib.util.spec_from_file_location("allocator", sys.argv[1])
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    state = module.configure_allocator()
    libc = ctypes.CDLL("libc.so.6")
    libc.malloc.restype = ctypes.c_void_p
    page = os.sysconf("SC_PAGE_SIZE")
    def resident():
        with open("/proc/self/statm") as f:
            return int(f.read().split()[1]) * page
    n = 96 << 20
    before = resident()
    p = libc.malloc(n)
    ctypes.memset(p, 1, n)
    libc.free(ctypes.c_void_p(p))
    print(state, (resident() - before) / n)
    """
)


def probe(setting):
    env = dict(os.environ)
    env.pop(allocator.ENV, None)
    if setting is not None:
        env[allocator.ENV] = setting
    out = subprocess.run(
        [sys.executable, "-c", PROBE, allocator.__file__],
        env=env,
        capture_output=True,
        text=True,
    )
    assert out.returncode == 0, out.stderr
    state, kept = out.stdout.split()
    return state, float(kept)


glibc = pytest.mark.skipif(allocator._glibc() is None, reason="needs glibc")


@glibc
def test_default_keeps_freed_memory():
    state, kept = probe(None)
    assert state == "retained"
    assert kept > 0.9  # the freed 96 MiB stays resident, ready for the next step


@glibc
def test_system_opt_out_returns_memory():
    state, kept = probe("system")
    assert state == "system"
    assert kept < 0.1  # glibc unmapped the block on free


def test_bad_setting_is_named(monkeypatch):
    monkeypatch.setattr(allocator, "_state", None)
    monkeypatch.setenv(allocator.ENV, "fast")
    with pytest.raises(ValueError, match="SSM_JAX_MALLOC"):
        allocator.configure_allocator()
