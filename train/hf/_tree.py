"""Our side of the mapping: a model's skeleton filled from arrays named by path."""

from __future__ import annotations

from collections.abc import Callable, Mapping

import equinox as eqx
import jax
import jax.numpy as jnp
import numpy as np

from ..checkpoint import path_str


def build(make: Callable[[], eqx.Module], arrays: Mapping[str, np.ndarray]) -> eqx.Module:
    """`make()` with every array leaf replaced by `arrays[path]` (paths as
    `"blocks.0.norm1.weight"`).

    `make` is traced only for shapes (no random initialisation is computed); every
    leaf must be given with its exact shape, and every array must be used.
    """
    skeleton = eqx.filter_eval_shape(make)
    leaves, treedef = jax.tree_util.tree_flatten_with_path(skeleton)
    filled, used = [], set()
    for path, leaf in leaves:
        name = path_str(path)
        if not isinstance(leaf, jax.ShapeDtypeStruct):
            filled.append(leaf)
            continue
        if name not in arrays:
            raise AssertionError(f"the mapping gives no array for {name}")
        value = np.asarray(arrays[name])
        if value.shape != leaf.shape:
            raise AssertionError(f"{name}: mapped shape {value.shape}, needs {leaf.shape}")
        filled.append(jnp.asarray(value, leaf.dtype))
        used.add(name)
    extra = set(arrays) - used
    if extra:
        raise AssertionError(f"the mapping gives arrays the model lacks: {sorted(extra)}")
    return jax.tree_util.tree_unflatten(treedef, filled)


def arrays_of(model: eqx.Module) -> dict[str, np.ndarray]:
    """The model's arrays by path, as float32 numpy arrays."""
    leaves = jax.tree_util.tree_leaves_with_path(eqx.filter(model, eqx.is_array))
    return {path_str(p): np.asarray(leaf, np.float32) for p, leaf in leaves}
