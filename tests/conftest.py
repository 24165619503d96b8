"""Test configuration in the Equinox manner.

Strict dtype promotion and rank-promotion errors surface silent coercions; float64 is
enabled so references can be exact; several fake CPU devices are set up before JAX
starts so sharding tests have something to shard over.

Most of the suite's time is XLA compiling small programs, so the CPU backend's LLVM
optimisations are turned down (about half the compile time; XLA's HLO passes, which
decide fusion and buffers and so what `memory_analysis` reports, still run). Set
`SSM_TEST_FULL_OPT=1` to test with the optimisation level a user's process gets.
"""

import os
import zlib

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
if not os.environ.get("SSM_TEST_FULL_OPT") and "xla_backend_optimization_level" not in (
    os.environ["XLA_FLAGS"]
):
    os.environ["XLA_FLAGS"] += (
        " --xla_backend_optimization_level=0 --xla_llvm_disable_expensive_passes=true"
    )
os.environ.setdefault("JAX_PLATFORMS", "cpu")
os.environ.setdefault("WANDB_MODE", "disabled")

import jax  # noqa: E402
import jax.random as jr  # noqa: E402
import pytest  # noqa: E402

jax.config.update("jax_enable_x64", True)
jax.config.update("jax_numpy_dtype_promotion", "strict")
jax.config.update("jax_numpy_rank_promotion", "raise")


@pytest.fixture
def getkey():
    """Fresh, distinct keys on every call, seeded per test for reproducibility."""
    counter = iter(range(1 << 30))
    # crc32, not hash(): str hashes change with every process (PYTHONHASHSEED)
    seed = zlib.crc32(os.environ.get("PYTEST_CURRENT_TEST", "").encode()) % (1 << 31)
    base = jr.key(seed)

    def _getkey():
        return jr.fold_in(base, next(counter))

    return _getkey
