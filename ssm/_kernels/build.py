"""Building and loading the compiled CPU kernels (the sources beside this file).

Each kernel is an XLA FFI custom call written in C++ (`SOURCES`), all built into one
library with the system compiler the first time a CPU computation needs one, and
cached:

- the cache is ``$SSM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ssm-jax``, else
  ``~/.cache/ssm-jax``; one library per source text, jaxlib version, compiler and CPU;
- the compiler is ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` found,
  with ``-O3 -march=native`` (without ``-march=native`` if the compiler refuses it);
- ``SSM_CPU_KERNEL=0`` turns them all off; `xla_only` does so for what is traced
  inside a block (the plain-JAX references of the chunked operators' derivatives).

Nothing is built at import, nor when JAX's default backend is not the CPU (a GPU or
TPU user never runs the compiler): `available` is the one gate, asked by the wrappers
(`ssm._kernels.linear_scan`, `ssm._kernels.products`) when they are traced. Without a
compiler (or if the build fails: a warning says why) everything runs on XLA's loops,
with the same results and derivatives, only slower.

Adding a kernel: put its source beside this file, name it in `SOURCES`, and its FFI
target and exported symbol in `TARGETS`.
"""

from __future__ import annotations

import contextlib
import ctypes
import hashlib
import os
import platform
import shutil
import subprocess
import tempfile
import threading
import warnings
from pathlib import Path

import jax

# The C++ sources, built into one library, and the FFI targets it provides (target
# name: exported symbol): the diagonal scan (scan.cc); batched small products, the
# delta rule's chain and the per-key GLA tree (matmul.cc); Mamba's selective scan
# (selective.cc).
SOURCES = tuple(
    Path(__file__).with_name(n) for n in ("scan.cc", "matmul.cc", "selective.cc")
)
# Included by the sources (part of the cache key, not compiled on their own).
HEADERS = (Path(__file__).with_name("parallel.h"),)
TARGETS = {
    "ssm_linear_scan": "SsmLinearScan",
    "ssm_matmul": "SsmMatmul",
    "ssm_delta_chain": "SsmDeltaChain",
    "ssm_gla_tree": "SsmGlaTree",
    "ssm_selective_fwd": "SsmSelectiveFwd",
    "ssm_selective_bwd": "SsmSelectiveBwd",
}

_lock = threading.Lock()
_state: dict = {"loaded": None, "enabled": True}
_tracing = threading.local()  # `xla_only` depth, per thread (tracing is per thread)


def _cache_dir() -> Path:
    if os.environ.get("SSM_KERNEL_CACHE"):
        return Path(os.environ["SSM_KERNEL_CACHE"])
    base = os.environ.get("XDG_CACHE_HOME") or Path.home() / ".cache"
    return Path(base) / "ssm-jax"


def _compiler() -> str | None:
    if os.environ.get("CXX"):
        return shutil.which(os.environ["CXX"]) or os.environ["CXX"]
    for name in ("c++", "g++", "clang++"):
        found = shutil.which(name)
        if found:
            return found
    return None


def _cpu_id() -> str:
    """What `-march=native` depends on: the CPU model and flags (Linux), else the
    machine name."""
    with contextlib.suppress(OSError):
        text = Path("/proc/cpuinfo").read_text()
        lines = [
            line
            for line in text.splitlines()
            if line.startswith(("model name", "flags", "Features", "CPU part"))
        ]
        return "\n".join(sorted(set(lines)))
    return platform.machine() + platform.processor()


def _build() -> Path:
    cxx = _compiler()
    if cxx is None:
        raise RuntimeError("no C++ compiler found (set $CXX, or install g++ or clang++)")
    version = subprocess.run(
        [cxx, "--version"], capture_output=True, text=True, check=False
    ).stdout
    include = jax.ffi.include_dir()
    key = hashlib.sha256(
        b"\0".join(
            s.encode()
            for s in (
                *(source.read_text() for source in SOURCES + HEADERS),
                jax.lib.__version__,
                version,
                _cpu_id(),
                include,
            )
        )
    ).hexdigest()[:16]
    directory = _cache_dir()
    library = directory / f"ssm_cpu_kernel_{key}.so"
    if library.exists():
        return library
    directory.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = Path(tmp) / library.name
        # `-march=native` where the compiler knows it (vector width of this CPU),
        # else the compiler's default target.
        for arch in (["-march=native"], []):
            failed = _compile(cxx, arch, include, Path(tmp), out)
            if failed is None:
                break
        else:
            raise RuntimeError(failed)
        os.replace(out, library)  # atomic: concurrent builds leave one whole file
    return library


def _compile(cxx, arch, include, tmp: Path, out: Path) -> str | None:
    """Compiles the sources to objects side by side (one compiler process each, in
    parallel), then links them into ``out``. Returns what failed, or None."""
    flags = ["-O3", "-std=c++17", "-fPIC", "-pthread", *arch]
    objects = [tmp / f"{source.stem}.o" for source in SOURCES]
    commands = [
        [cxx, *flags, "-I", include, "-c", str(source), "-o", str(obj)]
        for source, obj in zip(SOURCES, objects, strict=True)
    ]
    commands.append([cxx, *flags, "-shared", *map(str, objects), "-o", str(out)])
    # Each compiler's messages go to a file, so that no pipe fills while another waits.
    logs = [tmp / f"{obj.stem}.log" for obj in objects]
    jobs = []
    try:
        for cmd, log in zip(commands, logs, strict=False):
            with log.open("w") as stderr:
                jobs.append(subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=stderr))
    finally:
        codes = [job.wait() for job in jobs]
    results = [
        (cmd, code, log.read_text())
        for cmd, code, log in zip(commands, codes, logs, strict=False)
    ]
    if len(codes) == len(objects) and all(code == 0 for code in codes):
        done = subprocess.run(commands[-1], capture_output=True, text=True, check=False)
        results = [(commands[-1], done.returncode, done.stderr)]
    for cmd, code, err in results:
        if code != 0:
            return f"`{' '.join(cmd)}` failed ({code}):\n{err[-2000:]}"
    return None


def _load() -> bool:
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            library = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in TARGETS.items():
                capsule = jax.ffi.pycapsule(getattr(library, symbol))
                jax.ffi.register_ffi_target(target, capsule, platform="cpu")
            _state["loaded"] = True
        except Exception as error:  # noqa: BLE001 (any failure means: use XLA's loops)
            warnings.warn(
                f"ssm: the compiled CPU kernels are unavailable, so linear scans and the "
                f"chunked operators' products on CPU run on XLA's loops and dots (same "
                f"results, slower): {error}",
                RuntimeWarning,
                stacklevel=3,
            )
            _state["loaded"] = False
        return _state["loaded"]


def available() -> bool:
    """Whether the compiled CPU kernels are built, loaded and enabled, building them
    on the first call. False (and nothing built) when JAX's default backend is not the
    CPU, when ``SSM_CPU_KERNEL=0``, inside `xla_only` or `disabled`."""
    if os.environ.get("SSM_CPU_KERNEL", "1") == "0" or not _state["enabled"]:
        return False
    if getattr(_tracing, "xla_only", 0) or _backend() != "cpu":
        return False
    return _load()


def _backend() -> str:
    """JAX's default backend (a function of its own, so that tests can pretend)."""
    return jax.default_backend()


@contextlib.contextmanager
def xla_only():
    """Within this block (in this thread) the kernel wrappers emit XLA ops only, so
    what is traced inside is plain JAX that JAX can differentiate to any order (the
    kernels have hand-written reverse-mode rules at most). For the references of the
    chunked operators' derivatives (`ssm._autodiff.fast_vjp`), traced inside the
    block. Unlike `disabled`, JAX's caches are not cleared: the wrappers decide when
    they are traced, and nothing they trace is cached across calls."""
    depth = getattr(_tracing, "xla_only", 0)
    _tracing.xla_only = depth + 1
    try:
        yield
    finally:
        _tracing.xla_only = depth


@contextlib.contextmanager
def disabled():
    """Within this block scans use XLA's loops, not the kernel (for tests and
    comparisons). JAX's caches are cleared on entry and exit, so that functions traced
    on one side are traced again on the other."""
    before = _state["enabled"]
    _state["enabled"] = False
    jax.clear_caches()
    try:
        yield
    finally:
        _state["enabled"] = before
        jax.clear_caches()


def cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)
