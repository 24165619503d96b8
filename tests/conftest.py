"""Test configuration in the Equinox manner.

Strict dtype promotion and rank-promotion errors surface silent coercions; float64 is
enabled so references can be exact; several fake CPU devices are set up before JAX
starts so sharding tests have something to shard over.
"""

import os

os.environ.setdefault("XLA_FLAGS", "")
if "xla_force_host_platform_device_count" not in os.environ["XLA_FLAGS"]:
    os.environ["XLA_FLAGS"] += " --xla_force_host_platform_device_count=4"
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
    seed = hash(os.environ.get("PYTEST_CURRENT_TEST", "")) % (1 << 31)
    base = jr.key(seed)

    def _getkey():
        return jr.fold_in(base, next(counter))

    return _getkey
