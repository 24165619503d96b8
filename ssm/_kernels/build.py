"""The compiled CPU kernels: the diagonal linear scan (``_cpu_kernel.cc``, `scan`) and,
for the chunked operators (``_cpu_matmul.cc``), batched small matrix products
(`matmul`), the delta rule's chain of chunks (`chain`) and the per-key gated linear
attention's within-chunk tree (`per_key_tree`); see their docstrings. All are built
into one library, as described below.

XLA's CPU loops run one thread, zero-fill their output and write it row by row
through the cache; on a memory-bound scan that costs about half the time (see
``scripts/bench_scan.py``). The kernel splits the columns across threads and writes
large outputs with non-temporal stores. It is an XLA FFI custom call, built from
its C++ source with the system compiler the first time it is needed and cached:

- the cache is ``$SSM_KERNEL_CACHE``, else ``$XDG_CACHE_HOME/ssm-jax``, else
  ``~/.cache/ssm-jax``; one library per source, jaxlib version, compiler and CPU;
- the compiler is ``$CXX``, else the first of ``c++``, ``g++``, ``clang++`` found,
  with ``-O3 -march=native`` (without ``-march=native`` if the compiler refuses it);
- ``SSM_CPU_KERNEL=0`` turns them all off; `xla_only` does so for what is traced
  inside a block (the plain-JAX references of the chunked operators' derivatives).

Without a compiler (or if the build fails: a warning says why) everything runs on
XLA's loops, with the same results and derivatives, only slower. The kernel is used
by ``method="sequential"`` (and ``"auto"`` on CPU) for the cases it covers: a
diagonal scan on the CPU backend, real or complex, 32 or 64 bits (and bfloat16
decays and inputs to a float32 state), ``a`` of ``b``'s shape or time-invariant or
shared over leading state axes (see `covers`), ``resets`` one flag per step.
`available` tells whether it is loaded.
"""

from __future__ import annotations

import contextlib
import ctypes
import functools
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
import jax.numpy as jnp
import numpy as np

# The sources, built into one library, and the FFI targets it provides: the scan
# (`scan`) and batched small matrix products (`matmul`).
_SOURCES = tuple(Path(__file__).with_name(n) for n in ("_cpu_kernel.cc", "_cpu_matmul.cc"))
_TARGET, _SYMBOL = "ssm_linear_scan", "SsmLinearScan"
_MATMUL_TARGET, _MATMUL_SYMBOL = "ssm_matmul", "SsmMatmul"
_CHAIN_TARGET, _CHAIN_SYMBOL = "ssm_delta_chain", "SsmDeltaChain"
_TREE_TARGET, _TREE_SYMBOL = "ssm_gla_tree", "SsmGlaTree"
F32, BF16 = np.dtype(np.float32), np.dtype(jnp.bfloat16)
# The state dtypes (h0, h) and, for each, the dtypes `a` and `b` may have.
_INPUTS = {
    F32: (F32, BF16),
    np.dtype(np.float64): (np.dtype(np.float64),),
    np.dtype(np.complex64): (np.dtype(np.complex64),),
    np.dtype(np.complex128): (np.dtype(np.complex128),),
}
# Outputs at least this large are written with non-temporal stores (they would not
# stay in cache anyway); smaller ones through the cache, where the next op finds them.
NONTEMPORAL_BYTES = 8 << 20
# Below this many elements one thread does it all (starting threads costs more).
THREADS_ELEMENTS = 1 << 16

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
                *(source.read_text() for source in _SOURCES),
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
    flags = ["-O3", "-std=c++17", "-shared", "-fPIC", "-pthread"]
    with tempfile.TemporaryDirectory(dir=directory) as tmp:
        out = Path(tmp) / library.name
        # `-march=native` where the compiler knows it (vector width of this CPU),
        # else the compiler's default target.
        for arch in (["-march=native"], []):
            cmd = [cxx, *flags, *arch, "-I", include, *map(str, _SOURCES), "-o", str(out)]
            done = subprocess.run(cmd, capture_output=True, text=True, check=False)
            if done.returncode == 0:
                break
        else:
            raise RuntimeError(
                f"`{' '.join(cmd)}` failed ({done.returncode}):\n{done.stderr[-2000:]}"
            )
        os.replace(out, library)  # atomic: concurrent builds leave one whole file
    return library


def _load() -> bool:
    with _lock:
        if _state["loaded"] is not None:
            return _state["loaded"]
        try:
            library = ctypes.cdll.LoadLibrary(str(_build()))
            for target, symbol in (
                (_TARGET, _SYMBOL),
                (_MATMUL_TARGET, _MATMUL_SYMBOL),
                (_CHAIN_TARGET, _CHAIN_SYMBOL),
                (_TREE_TARGET, _TREE_SYMBOL),
            ):
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
    """Whether the compiled CPU kernel is built, loaded and enabled (building it on
    the first call)."""
    if os.environ.get("SSM_CPU_KERNEL", "1") == "0" or not _state["enabled"]:
        return False
    if getattr(_tracing, "xla_only", 0):
        return False
    return _load()


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


def _cpus() -> int:
    """The CPUs this process may run on (its affinity mask where the OS has one)."""
    if hasattr(os, "sched_getaffinity"):
        return max(1, len(os.sched_getaffinity(0)))
    return max(1, os.cpu_count() or 1)


def _a_columns(a_shape, b_shape) -> int | None:
    """How many columns ``a`` has when ``b (T, *S)`` is flattened to ``(T, D)``: ``a``
    must be ``(T or 1, *Sa)`` with ``Sa`` equal to a trailing part of ``S`` after
    leading ones (a decay shared over leading state axes, such as a batch). ``None``
    if the kernel cannot broadcast it."""
    T, S = b_shape[0], tuple(b_shape[1:])
    if len(a_shape) == 0 or a_shape[0] not in (1, T) or len(a_shape) - 1 > len(S):
        return None
    Sa = (1,) * (len(S) - len(a_shape) + 1) + tuple(a_shape[1:])
    k = 0
    while k < len(S) and Sa[k] == 1 and S[k] != 1:
        k += 1
    if Sa[k:] != S[k:]:
        return None
    return int(np.prod(S[k:], dtype=np.int64))


def covers(a, b, h0, r, *, matrix: bool, has_resets: bool) -> bool:
    """Whether the kernel computes this case (arrays as the primitive passes them)."""
    inputs = _INPUTS.get(np.dtype(h0.dtype), ())
    if (
        matrix
        or (has_resets and not (r.dtype == np.bool_ and r.size == r.shape[0]))
        or np.dtype(a.dtype) not in inputs
        or np.dtype(b.dtype) not in inputs
    ):
        return False
    Da = _a_columns(a.shape, b.shape)
    if Da is None:
        return False
    # Only where the kernel's vector loops apply (a decay per column of b, one per
    # step, or shared in whole blocks of its vector loop); elsewhere its per-column
    # gather is slower forwards than XLA's loop (measured).
    real = np.dtype(h0.dtype) in (F32, np.dtype(np.float64))
    reals = Da * (1 if real else 2)
    block = 64 if np.dtype(h0.dtype) in (F32, np.dtype(np.complex64)) else 32
    return Da == int(np.prod(b.shape[1:])) or reals % block == 0 or (Da == 1 and real)


def scan(a, b, h0, r, *, reverse: bool, shift: bool, has_resets: bool):
    """The recurrence of ``_kernels`` (processing order, ``shift``) for a diagonal
    ``a`` and ``b (T, *S)`` that `covers` accepts; ``h0`` of shape ``S`` in the state
    dtype, which the states come out in; ``r`` the resets, one flag per step (or one
    for all), read only if ``has_resets``."""
    T = b.shape[0]
    D = int(np.prod(b.shape[1:], dtype=np.int64))
    Da = _a_columns(a.shape, b.shape)
    size = T * D
    out_bytes = size * np.dtype(h0.dtype).itemsize
    call = jax.ffi.ffi_call(_TARGET, jax.ShapeDtypeStruct((T, D), h0.dtype))
    h = call(
        a.reshape(a.shape[0], Da),
        b.reshape(T, D),
        h0.reshape(D),
        r.reshape(-1),
        reverse=bool(reverse),
        shift=bool(shift),
        has_resets=bool(has_resets),
        nontemporal=bool(out_bytes >= NONTEMPORAL_BYTES),
        threads=np.int64(1 if size < THREADS_ELEMENTS else _cpus()),
    )
    return h.reshape(b.shape)


# Products of fewer multiply-adds than this in all run on one thread (handing work to
# another costs more than it saves; measured on the chunked operators).
MATMUL_THREADS_MACS = 1 << 16


def _one_float_dtype(*arrays) -> bool:
    """Whether the arrays share one dtype the kernels compute in: float32 or float64."""
    dtypes = {np.dtype(x.dtype) for x in arrays}
    return len(dtypes) == 1 and dtypes.pop() in (F32, np.dtype(np.float64))


def _xla_matmul(a, b, ta, tb, precision):
    """``op(a) @ op(b)`` by ``jnp.matmul``: the path off the kernel."""
    a, b = (jnp.swapaxes(x, -1, -2) if t else x for x, t in ((a, ta), (b, tb)))
    return jnp.matmul(a, b, precision=precision)


def matmul(a, b, *, transpose_a: bool = False, transpose_b: bool = False, precision=None):
    """``op(a) @ op(b)`` over the leading (batch) axes, ``op`` a transpose of the last
    two axes where asked.

    On the CPU backend with the kernel available, for float32 or float64 operands of
    one dtype, the compiled kernel does it (in full precision, threaded over the
    batch); otherwise, and when lowered for other platforms, ``jnp.matmul`` with
    ``precision``. Reverse-mode differentiable (its derivative is made of the same
    products); not forward-mode where the kernel is used."""
    if not _one_float_dtype(a, b) or a.ndim < 2 or b.ndim < 2 or not available():
        return _xla_matmul(a, b, transpose_a, transpose_b, precision)
    batch = tuple(jnp.broadcast_shapes(a.shape[:-2], b.shape[:-2]))
    a = jnp.broadcast_to(a, batch + a.shape[-2:])
    b = jnp.broadcast_to(b, batch + b.shape[-2:])
    return _matmul(a, b, bool(transpose_a), bool(transpose_b), precision)


@functools.partial(jax.custom_vjp, nondiff_argnums=(2, 3, 4))
def _matmul(a, b, ta, tb, precision):
    M, N = (a.shape[-1] if ta else a.shape[-2]), (b.shape[-2] if tb else b.shape[-1])
    K = a.shape[-2] if ta else a.shape[-1]
    count = int(np.prod(a.shape[:-2], dtype=np.int64))
    threads = 1 if count * M * K * N < MATMUL_THREADS_MACS else _cpus()

    def kernel(a, b):
        call = jax.ffi.ffi_call(
            _MATMUL_TARGET,
            jax.ShapeDtypeStruct(a.shape[:-2] + (M, N), a.dtype),
            vmap_method="broadcast_all",
        )
        return call(a, b, transpose_a=ta, transpose_b=tb, threads=np.int64(threads))

    xla = functools.partial(_xla_matmul, ta=ta, tb=tb, precision=precision)
    return jax.lax.platform_dependent(a, b, cpu=kernel, default=xla)


def _matmul_fwd(a, b, ta, tb, precision):
    return _matmul(a, b, ta, tb, precision), (a, b)


def _matmul_bwd(ta, tb, precision, res, dc):
    a, b = res
    # c = op(a) op(b): d op(a) = dc op(b)^T, d op(b) = op(a)^T dc (transposed back
    # where the operand is stored transposed).
    mm = functools.partial(matmul, precision=precision)
    if ta:
        da = mm(b, dc, transpose_a=tb, transpose_b=True)
    else:
        da = mm(dc, b, transpose_b=not tb)
    if tb:
        db = mm(dc, a, transpose_a=True, transpose_b=ta)
    else:
        db = mm(a, dc, transpose_a=not ta)
    return da, db


_matmul.defvjp(_matmul_fwd, _matmul_bwd)


def _xla_chain(y0, a, b, gamma, s0, c, a_offset, b_offset, negate_a, negate_b, reverse):
    """`chain` by a loop of ``jnp.matmul`` (unrolled: ``n`` is a group's few chunks)."""
    dk, dv = s0.shape[-2:]
    y0, a = y0[..., :dv], a[..., a_offset : a_offset + dk]
    b = b[..., b_offset : b_offset + dk]
    states, ys, s = [None] * y0.shape[-4], [None] * y0.shape[-4], s0
    for i in reversed(range(len(ys))) if reverse else range(len(ys)):
        states[i] = s
        ay = jnp.matmul(a[..., i, :, :, :], s)
        ys[i] = y0[..., i, :, :, :] + (-ay if negate_a else ay)
        by = jnp.matmul(jnp.swapaxes(b[..., i, :, :, :], -1, -2), ys[i])
        s = gamma[..., i, :, None, None] * s + (-by if negate_b else by)
        if c is not None:
            s = s + c[..., i, :, :, :]
    return jnp.stack(states, -4), jnp.stack(ys, -4), s


def chain(
    y0,
    a,
    b,
    gamma,
    s0,
    c=None,
    *,
    a_offset=0,
    b_offset=0,
    negate_a=False,
    negate_b=False,
    reverse=False,
):
    """The sequential part of the delta rule's chunked form (`_delta.py`): for each
    head, over the links ``i`` of a chain in order (or reversed), from ``s = s0``,

        states[i] = s
        y[i] = y0[i] ± a[i] @ s
        s = gamma[i] s ± b[i]ᵀ @ y[i]  (+ c[i])

    Shapes, with any leading batch ``L...``: ``s0 (L..., H, dk, dv)``; ``y0 (L..., n,
    H, C, ≥ dv)``, of which the first ``dv`` columns are read; ``a``, ``b (L..., n, H,
    C, ≥ offset + dk)``, of which ``dk`` columns from ``a_offset`` (``b_offset``) are
    read (slices of a wider array, without a copy); ``gamma (L..., n, H)``; ``c``
    like the states or ``None``. Returns ``(states, y, s)``, ``states (L..., n, H, dk,
    dv)``, ``y (L..., n, H, C, dv)``. Not differentiable (the delta rule's derivative
    is written by hand).

    On the CPU backend with the kernel available, for float32 or float64, one call of
    the compiled kernel runs every chain (threaded over heads and batch); otherwise,
    and when lowered for other platforms, a loop of ``jnp.matmul``.
    """
    args = (y0, a, b, gamma, s0, c)
    static = (a_offset, b_offset, negate_a, negate_b, reverse)
    if not _one_float_dtype(*(x for x in args if x is not None)) or not available():
        return _xla_chain(*args, *static)
    dk, dv = s0.shape[-2:]
    n, H, C = y0.shape[-4:-1]
    lead = s0.shape[:-3]
    dtype = s0.dtype
    count = int(np.prod(lead, dtype=np.int64)) * H
    threads = 1 if count * n * C * dk * dv * 2 < MATMUL_THREADS_MACS else _cpus()

    def kernel(y0, a, b, gamma, s0, c):
        call = jax.ffi.ffi_call(
            _CHAIN_TARGET,
            (
                jax.ShapeDtypeStruct(lead + (n, H, dk, dv), dtype),
                jax.ShapeDtypeStruct(lead + (n, H, C, dv), dtype),
                jax.ShapeDtypeStruct(s0.shape, dtype),
            ),
            vmap_method="broadcast_all",
        )
        has_c = c is not None
        return call(
            y0,
            a,
            b,
            gamma,
            c if has_c else jnp.zeros((1,), dtype),
            s0,
            a_offset=np.int64(a_offset),
            b_offset=np.int64(b_offset),
            negate_a=bool(negate_a),
            negate_b=bool(negate_b),
            reverse=bool(reverse),
            has_c=has_c,
            threads=np.int64(threads),
        )

    def xla(*args):
        return _xla_chain(*args, *static)

    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)


def per_key_tree(q, k, v, b, do=None, *, xla):
    """The within-chunk outputs of gated linear attention with a decay per key
    (``_gla._intra_per_key``: the binary tree over a chunk), or with ``do`` their
    derivative ``(dq, dk, dv, db)``; ``q, k, b (..., C, d_k)``, ``v, do (..., C, d_v)``.

    On the CPU backend with the kernel available, for float32 or float64 and ``C`` a
    power of two, one call of the compiled kernel (chunks shared across threads, the
    exponentials vectorised); otherwise, and when lowered for other platforms,
    ``xla(q, k, v, b[, do])``, the same tree in XLA ops. Not differentiable (the
    operator's derivative is written by hand)."""
    args = (q, k, v, b) if do is None else (q, k, v, b, do)
    C, dk, dv = q.shape[-2], q.shape[-1], v.shape[-1]
    power_of_two = C >= 1 and C & (C - 1) == 0
    same_rows = len({x.shape[:-1] for x in args}) == 1
    if not (_one_float_dtype(*args) and power_of_two and same_rows and available()):
        return xla(*args)
    count = int(np.prod(q.shape[:-2], dtype=np.int64))
    threads = 1 if count * C * C * (dk + dv) < MATMUL_THREADS_MACS else _cpus()
    out = (v,) if do is None else (q, k, v, b)
    out = tuple(jax.ShapeDtypeStruct(x.shape, x.dtype) for x in out)

    def kernel(*args):
        call = jax.ffi.ffi_call(_TREE_TARGET, out, vmap_method="broadcast_all")
        result = call(*args, threads=np.int64(threads))
        return result[0] if do is None else tuple(result)

    return jax.lax.platform_dependent(*args, cpu=kernel, default=xla)
