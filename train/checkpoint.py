"""Orbax checkpoints of a train state: keep-last-N plus keep-best, checked restores.

A checkpoint holds two items: `state`, a flat mapping from parameter paths
(`"params.blocks.0.mixer.log_dt"`) to arrays, and `meta`, JSON (the step, the
resolved config, the loop's bookkeeping). Saving is asynchronous (orbax copies the
arrays to host memory and writes in a background thread); a checkpoint becomes
visible only once orbax has committed it, so an interrupted save leaves nothing
half-written behind. Restoring checks that every array the model expects is there,
with its shape and dtype, and that the metadata names the same step; a checkpoint
that fails is reported by name and the previous one is used.
"""

from __future__ import annotations

import logging
import warnings
from collections.abc import Callable
from pathlib import Path
from typing import Any

import jax
import numpy as np
import orbax.checkpoint as ocp
from orbax.checkpoint import checkpoint_managers as ocm

log = logging.getLogger(__name__)


class CheckpointError(RuntimeError):
    """No usable checkpoint, or one that does not match the model."""


def path_str(path) -> str:
    """`"blocks.0.mixer.weight"` for a pytree key path."""
    parts = []
    for key in path:
        if isinstance(key, jax.tree_util.GetAttrKey):
            parts.append(key.name)
        elif isinstance(key, jax.tree_util.SequenceKey):
            parts.append(str(key.idx))
        elif isinstance(key, jax.tree_util.DictKey):
            parts.append(str(key.key))
        elif isinstance(key, jax.tree_util.FlattenedIndexKey):
            parts.append(str(key.key))
        else:
            parts.append(str(key))
    return ".".join(parts)


def flatten(tree) -> dict[str, Any]:
    """The array leaves of `tree` by path (None leaves are skipped)."""
    leaves = jax.tree_util.tree_leaves_with_path(tree)
    return {path_str(p): leaf for p, leaf in leaves}


def unflatten(like, flat: dict[str, Any]):
    """Put the arrays of `flat` into the structure of `like` (same paths)."""
    leaves, treedef = jax.tree_util.tree_flatten_with_path(like)
    return jax.tree_util.tree_unflatten(treedef, [flat[path_str(p)] for p, _ in leaves])


class Checkpointer:
    """A thin layer over `orbax.checkpoint.CheckpointManager` for train states.

    **Arguments:**

    - `directory`: where the step directories go (`RUN_DIR/checkpoints`).
    - `keep`: how many of the latest checkpoints to keep.
    - `best_metric`, `best_mode`: also keep the checkpoint whose saved metrics are
      best on this key (`"min"` or `"max"`); checkpoints saved without metrics are
      kept only as latest.
    """

    def __init__(
        self,
        directory: str | Path,
        *,
        keep: int = 2,
        best_metric: str | None = None,
        best_mode: str = "min",
        asynchronous: bool = True,
    ):
        self.directory = Path(directory).absolute()
        policies: list = [ocm.LatestN(keep)]
        if best_metric is not None:
            policies.append(
                ocm.BestN(
                    get_metric_fn=lambda m: m[best_metric],
                    reverse=best_mode == "min",
                    n=1,
                    keep_checkpoints_without_metrics=False,
                )
            )
        options = ocp.CheckpointManagerOptions(
            preservation_policy=ocm.AnyPreservationPolicy(policies),
            enable_async_checkpointing=asynchronous,
            cleanup_tmp_directories=True,
        )
        with warnings.catch_warnings():
            warnings.simplefilter("ignore")
            self._manager = ocp.CheckpointManager(
                self.directory,
                options=options,
                item_handlers={
                    "state": ocp.StandardCheckpointHandler(),
                    "meta": ocp.JsonCheckpointHandler(),
                },
            )

    def steps(self) -> list[int]:
        """The committed checkpoint steps, oldest first."""
        self._manager.reload()
        return sorted(self._manager.all_steps())

    def save(
        self, step: int, state, meta: dict, metrics: dict[str, float] | None = None
    ) -> None:
        """Start saving `state` (a pytree of arrays) and `meta` (JSON) as `step`."""
        meta = dict(meta, step=int(step))
        args = ocp.args.Composite(
            state=ocp.args.StandardSave(flatten(state)), meta=ocp.args.JsonSave(meta)
        )
        self._manager.save(int(step), args=args, metrics=metrics, force=True)

    def wait(self) -> None:
        """Block until the saves in flight are committed."""
        self._manager.wait_until_finished()

    def close(self) -> None:
        self._manager.close()

    def restore(self, step: int, like) -> tuple[Any, dict]:
        """Restore checkpoint `step` into the structure, shapes and dtypes of `like`.

        Raises `CheckpointError` naming the checkpoint when it is missing, unreadable,
        or does not match `like`.
        """
        where = self.directory / str(step)
        expected = {
            k: ocp.utils.to_shape_dtype_struct(v) if hasattr(v, "shape") else v
            for k, v in flatten(like).items()
        }
        try:
            stored = self._manager.item_metadata(step)["state"]
            _check_keys(expected, stored, where)
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(expected), meta=ocp.args.JsonRestore()
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                restored = self._manager.restore(step, args=args)
        except CheckpointError:
            raise
        except Exception as e:  # orbax/tensorstore raise many kinds
            raise CheckpointError(f"checkpoint {where} is unreadable: {e}") from e
        flat, meta = dict(restored["state"]), restored["meta"]
        if not isinstance(meta, dict) or meta.get("step") != step:
            raise CheckpointError(
                f"checkpoint {where} is inconsistent: its metadata names step "
                f"{None if not isinstance(meta, dict) else meta.get('step')}"
            )
        for k, spec in expected.items():
            got = flat[k]
            if tuple(got.shape) != tuple(spec.shape) or got.dtype != spec.dtype:
                raise CheckpointError(
                    f"checkpoint {where}: {k} has shape {tuple(got.shape)} {got.dtype}, "
                    f"expected {tuple(spec.shape)} {spec.dtype}"
                )
        return unflatten(like, flat), meta

    def restore_latest(
        self, like, report: Callable[[str], None] = print
    ) -> tuple[Any, dict] | None:
        """Restore the newest checkpoint that reads back correctly, or None if there
        are none; a bad one is reported through `report` and the previous one tried.
        Raises `CheckpointError` when checkpoints exist but none is usable."""
        steps = self.steps()
        if not steps:
            return None
        failures = []
        for step in reversed(steps):
            try:
                return self.restore(step, like)
            except CheckpointError as e:
                failures.append(str(e))
                report(f"warning: {e}; trying the previous checkpoint")
        raise CheckpointError(
            "no usable checkpoint in "
            + str(self.directory)
            + ":\n  "
            + "\n  ".join(failures)
        )

    def read_raw(self, step: int) -> tuple[dict[str, np.ndarray], dict]:
        """The arrays and metadata of checkpoint `step`, without a model to match."""
        where = self.directory / str(step)
        try:
            stored = self._manager.item_metadata(step)["state"]
            target = {k: np.zeros(v.shape, v.dtype) for k, v in dict(stored).items()}
            args = ocp.args.Composite(
                state=ocp.args.StandardRestore(target), meta=ocp.args.JsonRestore()
            )
            with warnings.catch_warnings():
                warnings.simplefilter("ignore")
                restored = self._manager.restore(step, args=args)
        except Exception as e:
            raise CheckpointError(f"checkpoint {where} is unreadable: {e}") from e
        return {k: np.asarray(v) for k, v in dict(restored["state"]).items()}, restored[
            "meta"
        ]


def _check_keys(expected: dict, stored, where: Path) -> None:
    if stored is None:
        raise CheckpointError(f"checkpoint {where} has no readable array metadata")
    stored = dict(stored)
    missing = sorted(set(expected) - set(stored))
    extra = sorted(set(stored) - set(expected))
    if missing or extra:
        raise CheckpointError(
            f"checkpoint {where} does not match this model: missing {missing[:5]}"
            f"{' ...' if len(missing) > 5 else ''}, unexpected {extra[:5]}"
            f"{' ...' if len(extra) > 5 else ''}"
        )
