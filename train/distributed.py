"""Data parallelism across devices and hosts, with JAX's own machinery.

- `initialize(config)` calls `jax.distributed.initialize` for multi-process runs
  (configured by `distributed.*` or the usual `JAX_COORDINATOR_ADDRESS`,
  `JAX_NUM_PROCESSES`, `JAX_PROCESS_ID` variables); on CPU the collectives between
  processes go through gloo, so a multi-process run works over loopback.
- `Layout` holds the device mesh (`jax.make_mesh` with axes `data` and `fsdp`) and
  the shardings: the batch split over all devices, the parameters and optimiser state
  replicated, or with `distributed.fsdp > 1` split along their largest divisible
  dimension over the `fsdp` axis (ZeRO-3 style: XLA gathers them where they are used).
- Each process builds only its own rows of each batch and assembles the global array
  with `jax.make_array_from_process_local_data`.

The global batch is the same whatever the layout, and the loss is a mean over it, so
the same config reaches the same losses (to float tolerance) on one device, on many,
and on several processes.
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable

import jax
import numpy as np
from jax.sharding import NamedSharding, PartitionSpec as P

from .config import ConfigError, DistributedConfig

_INITIALIZED = False


def _from_env(value, name: str, cast: Callable = str):
    if value is not None:
        return value
    text = os.environ.get(name)
    return cast(text) if text else None


def initialize(dc: DistributedConfig) -> None:
    """Join a multi-process run if one is configured (idempotent, before any JAX use)."""
    global _INITIALIZED
    address = _from_env(dc.coordinator_address, "JAX_COORDINATOR_ADDRESS")
    num = _from_env(dc.num_processes, "JAX_NUM_PROCESSES", int)
    pid = _from_env(dc.process_id, "JAX_PROCESS_ID", int)
    if _INITIALIZED or (num is None or num <= 1) and address is None:
        return
    if address is None or num is None or pid is None:
        raise ConfigError(
            "distributed: a multi-process run needs coordinator_address, num_processes "
            f"and process_id (or JAX_COORDINATOR_ADDRESS, JAX_NUM_PROCESSES, "
            f"JAX_PROCESS_ID); got {address!r}, {num!r}, {pid!r}"
        )
    if not 0 <= pid < num:
        raise ConfigError(f"distributed.process_id: must be in [0, {num}), got {pid}")
    jax.distributed.initialize(address, num, pid)
    _INITIALIZED = True


def is_main() -> bool:
    """Whether this is process 0, the one that prints, logs and writes files."""
    return jax.process_index() == 0


SEQ_MIXERS = ("lru", "rglru")
"""Mixers whose recurrence is one `ssm.linear_scan` over the whole sequence, which
`distributed.seq > 1` splits over devices (`seq_axis` of the layer)."""


@dataclasses.dataclass(frozen=True)
class Layout:
    mesh: jax.sharding.Mesh
    fsdp: int
    seq: int = 1

    @property
    def batch_sharding(self) -> NamedSharding:
        return NamedSharding(self.mesh, P(("data", "fsdp")))

    def sharding_of(self, ndim: int) -> NamedSharding:
        """Batch arrays: rows over `data` x `fsdp`, time (axis 1) over `seq`."""
        if ndim >= 2 and self.seq > 1:
            return NamedSharding(self.mesh, P(("data", "fsdp"), "seq"))
        return self.batch_sharding

    def context(self):
        """The mesh in context while tracing, so layers find the `seq` axis."""
        import contextlib

        return jax.set_mesh(self.mesh) if self.seq > 1 else contextlib.nullcontext()

    @property
    def replicated(self) -> NamedSharding:
        return NamedSharding(self.mesh, P())

    @property
    def size(self) -> int:
        return self.mesh.size

    def param_sharding(self, x) -> NamedSharding:
        """Replicated, or (FSDP) split along the largest dimension `fsdp` divides."""
        shape = getattr(x, "shape", ())
        if self.fsdp > 1:
            dims = sorted(range(len(shape)), key=lambda d: -shape[d])
            for d in dims:
                if shape[d] % self.fsdp == 0 and shape[d] >= self.fsdp:
                    spec = [None] * len(shape)
                    spec[d] = "fsdp"
                    return NamedSharding(self.mesh, P(*spec))
        return self.replicated

    def state_shardings(self, state):
        return jax.tree.map(self.param_sharding, state)

    def put_state(self, state):
        return jax.device_put(state, self.state_shardings(state))

    def local_rows(self, batch_size: int) -> slice:
        """The rows of a global batch that this process's devices hold."""
        indices = self.batch_sharding.addressable_devices_indices_map((batch_size,))
        spans = {
            (idx[0].start or 0, batch_size if idx[0].stop is None else idx[0].stop)
            for idx in indices.values()
        }  # a set: devices that split time hold the same rows
        lo, hi = min(a for a, _ in spans), max(b for _, b in spans)
        if hi - lo != sum(b - a for a, b in spans):
            raise RuntimeError("this process's batch rows are not contiguous")
        return slice(lo, hi)

    def put_batch(self, local: dict[str, np.ndarray], batch_size: int) -> dict:
        """Assemble global arrays from this process's rows of a batch."""
        return {
            k: jax.make_array_from_process_local_data(
                self.sharding_of(v.ndim), v, (batch_size,) + v.shape[1:]
            )
            for k, v in local.items()
        }


def make_layout(
    dc: DistributedConfig, batch_sizes: dict[str, int], seq_len: int | None = None
) -> Layout:
    """The mesh over all devices (or the first `distributed.devices` of them)."""
    devices = jax.devices()
    if dc.devices:
        if jax.process_count() > 1:
            raise ConfigError("distributed.devices: only for single-process runs; use 0")
        if dc.devices > len(devices):
            raise ConfigError(
                f"distributed.devices: {dc.devices} requested, {len(devices)} available"
            )
        devices = devices[: dc.devices]
    n = len(devices)
    if n % (dc.fsdp * dc.seq):
        raise ConfigError(
            f"distributed.fsdp x distributed.seq: must divide the {n} devices, got "
            f"{dc.fsdp} x {dc.seq}"
        )
    if dc.seq > 1:
        if jax.process_count() > 1:
            raise ConfigError("distributed.seq: sequence parallelism runs in one process")
        if seq_len is not None and seq_len % dc.seq:
            raise ConfigError(
                f"distributed.seq: must divide the sequence length {seq_len}, got {dc.seq}"
            )
    rows = n // dc.seq
    for key, size in batch_sizes.items():
        if size % rows:
            raise ConfigError(
                f"{key}: must be a multiple of the {rows} devices that split the batch, "
                f"got {size}"
            )
    mesh = jax.make_mesh(
        (n // (dc.fsdp * dc.seq), dc.fsdp, dc.seq),
        ("data", "fsdp", "seq"),
        axis_types=(jax.sharding.AxisType.Auto,) * 3,
        devices=devices,
    )
    return Layout(mesh, dc.fsdp, dc.seq)
